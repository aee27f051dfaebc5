"""nf4_ss_kernel (both wgmma operands in shared memory, a lookup warpgroup beside the MMA ones) against the recorded
config and bf16 cuBLAS at prefill sizes, on one CUDA device (Hopper).

    python bench/nf4_ss.py [--ms 512 2048] [--shapes "gate/up 4096->28672" ...] [--rings 2,4,4 3,6,3] [--cast]

Per shape and M: cuBLAS on a bf16 weight of the same shape, the recorded config (pick_config), and nf4_ss_kernel's
tiles (nf4_sweep_configs.ss_configs) at each ring depth (code, weight and x stages: HOTLORA_NF4_SS_RINGS), each with
its relative error against x @ dequantize_4bit(W).T in fp32. --cast also times the best tile with the lookup
replaced by a cast of the code bytes (wrong values on purpose: what the kernel costs without its lookup). Times as
bench/nf4_gemm.py: CUDA-graph replays over rotating weight copies (weights from HBM), medians, us.
"""

from __future__ import annotations

import argparse
import os

import torch
from nf4_gemm import SHAPES, Case, bench_m, check, cublas_us
from nf4_sweep_configs import ss_configs

from hotlora.kernels.nf4 import pick_config


def timed(case: Case, m: int, cfg) -> float:
    return bench_m(case, m, cfg, baselines=False, rep=50)["nf4_us"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", type=int, nargs="+", default=[512])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="subset of: " + ", ".join(SHAPES))
    ap.add_argument("--rings", nargs="+", default=["2,4,4"], help="code,weight,x ring stages to time")
    ap.add_argument("--cast", action="store_true", help="also time the best tile without its lookup")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for name in args.shapes:
        case = Case(*SHAPES[name])
        for m in args.ms:
            cublas = cublas_us(case, m)
            rec = pick_config(m, case.n, case.k, gemv=False)
            print(f"## {name} M={m}: cuBLAS {cublas:.1f} us; recorded {timed(case, m, rec):.1f} us ({rec})",
                  flush=True)
            best = (float("inf"), None, None)
            for rings in args.rings:
                os.environ["HOTLORA_NF4_SS_RINGS"] = rings
                for cfg in ss_configs(rec, m, case.n, case.k)[1:]:
                    try:
                        us, err = timed(case, m, cfg), check(case, m, cfg)
                    except Exception as exc:  # a tile whose rings pass the shared memory: skip it
                        print(f"   rings {rings} block_m={cfg.block_m} block_n={cfg.block_n} split_k={cfg.split_k}: "
                              f"skipped ({type(exc).__name__})", flush=True)
                        continue
                    print(f"   rings {rings} block_m={cfg.block_m} block_n={cfg.block_n} split_k={cfg.split_k}: "
                          f"{us:.1f} us ({us / cublas:.2f}x cuBLAS), rel err {err:.1e}", flush=True)
                    if us < best[0] and err < 2e-2:
                        best = (us, cfg, rings)
            if args.cast and best[1] is not None:
                os.environ["HOTLORA_NF4_SS_RINGS"], os.environ["HOTLORA_NF4_SS_CAST"] = best[2], "1"
                us = timed(case, m, best[1])
                del os.environ["HOTLORA_NF4_SS_CAST"]
                print(f"   best without its lookup (cast): {us:.1f} us ({us / cublas:.2f}x cuBLAS) against "
                      f"{best[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
