"""The fused NF4 dequant-GEMM against bitsandbytes' matmul_4bit and bf16 cuBLAS, on one CUDA device.

    python bench/nf4_gemm.py [--quick] [--sweep [--sweep-m 1 4 8]] [--markdown out.md] [--json out.json]

Llama-3-8B projections as the engine runs them: q/k/v fused 4096->6144, o 4096->4096, gate/up fused
4096->28672, down 14336->4096; bf16 x, M tokens. Times are medians of triton.testing.do_bench over replays
of one CUDA graph holding one call per rotating weight copy (copies * bytes >= 4x L2, so weights come from
HBM), divided by the number of copies. bitsandbytes runs a fused group as its separate projections (as the
engine did), and its time is their sum. "floor" is a plain device copy of the op's minimal bytes (packed
nibbles + 8-bit absmax + x + y, rounded up to 64 KB: graph_timing.same_bytes_copy_us), timed the same way in the
same run. --sweep times launch configs per shape and
M; for M <= 8 it sweeps the GEMV kernel (nf4_gemv_kernel) and prints the tl.dot path's config beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import replace
from unittest.mock import patch

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from graph_timing import COPY_ALIGN, graph_time_us, same_bytes_copy_us
from nf4_sweep_configs import GEMV_SWEEP_MAX_M, VARIANTS, sweep_configs

from hotlora.kernels import _nf4_regs_gluon
from hotlora.kernels.nf4 import (
    LOOKUP_CAST,
    LOOKUP_PRMT,
    LOOKUP_TABLE,
    MAX_GEMV_M,
    Nf4Config,
    nf4_dequantize,
    nf4_matmul,
    pack_nf4,
    pack_nf4_group,
    pick_config,
)

DT = torch.bfloat16
L2_BYTES = 60 * 2**20
SHAPES = {  # name: (K, member output widths)
    "qkv 4096->6144": (4096, (4096, 1024, 1024)),
    "o 4096->4096": (4096, (4096,)),
    "gate/up 4096->28672": (4096, (14336, 14336)),
    "down 14336->4096": (14336, (4096,)),
}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192)


def copies_for(nbytes: int) -> int:
    return max(2, min(64, -(-4 * L2_BYTES // nbytes)))


def nf4_members(k: int, widths: tuple[int, ...]) -> list:
    """bitsandbytes' NF4 storage (packed, quant_state) of a random [n, k] weight for each output width n."""
    return [bnbF.quantize_4bit(torch.randn(n, k, device="cuda", dtype=DT) * 0.02, blocksize=64,
                               compress_statistics=True, quant_type="nf4") for n in widths]


class Case:
    """Rotating copies of one shape's weights: bnb members, the packed group, bf16 dense."""

    def __init__(self, k: int, widths: tuple[int, ...]) -> None:
        self.k, self.widths, self.n = k, widths, sum(widths)
        self.count = copies_for(self.n * k // 2)
        self.bnb, self.packed = [], []
        for _ in range(self.count):
            members = nf4_members(k, widths)
            self.bnb.append(members)
            self.packed.append(pack_nf4_group([pack_nf4(p, s) for p, s in members]))
        # fp32 x @ dequantize_4bit(W).T's W, for check(): made once, not per checked config
        self.reference = torch.cat([bnbF.dequantize_4bit(p, s) for p, s in self.bnb[0]]).float()
        self.dense_count = copies_for(self.n * k * 2)
        self.dense = [torch.randn(self.n, k, device="cuda", dtype=DT) * 0.02 for _ in range(self.dense_count)]

    def floor_bytes(self, m: int) -> int:
        return self.n * self.k // 2 + self.n * self.k // 64 + 2 * m * (self.k + self.n)


def floor_us(nbytes: int, align: int = COPY_ALIGN) -> float:
    """The floor: graph_timing.same_bytes_copy_us over enough rotating buffers to miss L2."""
    return same_bytes_copy_us(nbytes, copies_for(nbytes), align)


def floors(cases: dict[str, Case], ms: tuple[int, ...] = (1, 4, 8), rounds: int = 2) -> None:
    """Each shape's floor at each M as timed (bytes rounded up to COPY_ALIGN) and unrounded, `rounds` times in
    alternating M order. Unrounded, down's and q/k/v's floor at M = 1 (the two whose copy halves are no multiple of
    4 KB) came out 27-38% above M = 4-8's in three calls."""
    for name, case in cases.items():
        times: dict[tuple[int, int], list[float]] = {}
        for r in range(rounds):
            for m, align in itertools.product(ms if r % 2 == 0 else ms[::-1], (COPY_ALIGN, 4)):
                times.setdefault((m, align), []).append(floor_us(case.floor_bytes(m), align))
        cells = [f"M={m} {'rounded' if align > 4 else 'unrounded'} " + "/".join(f"{t:.1f}" for t in ts)
                 for (m, align), ts in times.items()]
        print(f"## floors {name} (us): " + "; ".join(cells), flush=True)


def _skip_reduce(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> bool:
    """A finish hook that claims the split sums and writes nothing: the matmul kernel without its reduce launch."""
    return True


def probes(cases: dict[str, Case], ms: tuple[int, ...]) -> None:
    """The served decode kernel (nf4_regs_kernel) at each shape and M as served, and without the split-K reduce launch
    after it (no-reduce), each with PDL as served (the next kernel scheduled at the start), late (scheduled after
    the store: PROBE_LATE_PDL) and off (HOTLORA_NO_PDL=1); then under its other PROBE_BITS: cast (no lookup: the
    bytes and the skeleton), no-stream (no copies after the rings' first fill: the lookup and the skeleton), both
    (the skeleton alone), no-x (x copied in the first fill only: what its copies cost beside the codes') and
    hot-scales (every scale load kept, all programs reading the same 16 rows' scales: what their bytes cost). Wrong
    results on purpose: untimed by check. sm_90 registers (offline, gate/up's slices): 80 served, 64 cast, 74
    no-stream, 56 both, 80 no-x, 80 hot-scales, so cast may fit 8 programs an SM where the served kernel fits 6."""
    cast, no_stream, no_x = (_nf4_regs_gluon.PROBE_CAST.value, _nf4_regs_gluon.PROBE_NO_STREAM.value,
                             _nf4_regs_gluon.PROBE_NO_X.value)
    hot_scales = _nf4_regs_gluon.PROBE_HOT_SCALES.value
    late = _nf4_regs_gluon.PROBE_LATE_PDL.value
    cells = [(name + pdl, late if pdl == " late-pdl" else 0, finish, pdl == " no-pdl")
             for pdl in ("", " late-pdl", " no-pdl")
             for name, finish in (("served", None), ("no-reduce", _skip_reduce))]
    cells += [(name, bits, None, False) for name, bits in (("cast", cast), ("no-stream", no_stream),
                                                           ("both", cast | no_stream), ("no-x", no_x),
                                                           ("hot-scales", hot_scales))]
    for (name, case), m in itertools.product(cases.items(), ms):
        out = []
        for label, bits, finish, no_pdl in cells:
            with patch.object(_nf4_regs_gluon, "PROBE_BITS", bits), patch.dict(os.environ):
                os.environ.pop("HOTLORA_NO_PDL", None)
                if no_pdl:
                    os.environ["HOTLORA_NO_PDL"] = "1"
                out.append(f"{label} {bench_m(case, m, baselines=False, finish=finish)['nf4_us']:.1f}")
        floor = floor_us(case.floor_bytes(m))
        print(f"## probes {name} M={m}: " + ", ".join(out) + f" us; floor {floor:.1f} us", flush=True)


def check(case: Case, m: int, config: Nf4Config | None = None) -> float:
    """Relative error of nf4_matmul (config: the recorded one) against x @ dequantize_4bit(W).T in fp32; inf where
    the output has a non-finite value."""
    x = torch.randn(m, case.k, device="cuda", dtype=DT)
    y = nf4_matmul(x, case.packed[0], config=config).float()
    if not torch.isfinite(y).all():
        return float("inf")
    r = x.float() @ case.reference.T
    return ((y - r).norm() / r.norm()).item()


SWEEP_MAX_REL_ERR = 2e-2  # a swept config past this (or non-finite) computed wrong results: its time is not kept


def bench_m(case: Case, m: int, config: Nf4Config | None = None, baselines: bool = True, rep: int = 200,
            finish=None) -> dict:
    xs = [torch.randn(m, case.k, device="cuda", dtype=DT) for _ in range(case.count)]
    row = {"M": m, "nf4_us": graph_time_us(
        lambda i: nf4_matmul(xs[i], case.packed[i], config=config, finish=finish), case.count, rep=rep)}
    if baselines:
        def bnb_call(i: int) -> None:
            for p, s in case.bnb[i]:
                bnb.matmul_4bit(xs[i], p, quant_state=s)

        row["bnb_us"] = graph_time_us(bnb_call, case.count)
        row["cublas_us"] = cublas_us(case, m)
        row["floor_us"] = floor_us(case.floor_bytes(m))
        row["rel_err"] = check(case, m)
    return row


def cublas_us(case: Case, m: int) -> float:
    """bf16 cuBLAS x [m, K] @ W.T over the case's rotating dense weights of the same shape."""
    xd = [torch.randn(m, case.k, device="cuda", dtype=DT) for _ in range(case.dense_count)]
    return graph_time_us(lambda i: torch.matmul(xd[i], case.dense[i].T), case.dense_count)


def label(cfg: Nf4Config) -> str:
    if cfg.gemv:
        return f"gemv(block_n={cfg.block_n}, split_k={cfg.split_k}, warps={cfg.warps}, k_groups={cfg.k_groups})"
    return str(cfg)


def sweep(cases: dict[str, Case], ms: tuple[int, ...], occupancy: bool = False, variants: str | None = None
          ) -> list[dict]:
    out = []
    for (name, case), m in itertools.product(cases.items(), ms):
        best = []
        configs = sweep_configs(m, case.n, case.k, occupancy, variants)
        for cfg in configs:
            try:
                us = bench_m(case, m, cfg, baselines=False, rep=50)["nf4_us"]
                err = check(case, m, cfg)
            except Exception as exc:  # a config the compiler rejects (shared memory): skip it
                print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            if not err <= SWEEP_MAX_REL_ERR:  # a timing of wrong results (the 256-row tile's race) is no timing
                print(f"  WRONG (rel err {err:.2e}) {cfg}", flush=True)
                continue
            best.append((us, cfg))
        best.sort(key=lambda t: t[0])
        print(f"## sweep {name} M={m}: " + "; ".join(f"{us:.1f}us {label(c)}" for us, c in best[:3]), flush=True)
        for swap, lookup in itertools.product((False, True), (LOOKUP_TABLE, LOOKUP_PRMT, LOOKUP_CAST)):
            kind = [us for us, c in best if c.swap_ab == swap and c.lookup == lookup and not (c.dense or c.gemv)]
            if kind:
                print(f"   best swap_ab={swap} lookup={lookup}: {min(kind):.1f}us", flush=True)
        timed = {c: us for us, c in best}
        for cfg in configs if variants else ():
            fields = " ".join(f"{f}={getattr(cfg, f)}" for f in VARIANTS[variants][1])
            us = f"{timed[cfg]:.1f}us" if cfg in timed else "skipped"
            print(f"   {fields}: {us}", flush=True)
        for regs in (None, 96, 72):
            kind = [us for us, c in best if occupancy and c.maxnreg == regs and not (c.dense or c.gemv)]
            if kind:
                print(f"   best maxnreg={regs}: {min(kind):.1f}us", flush=True)
        for groups in (1, 2, 4):
            kind = [us for us, c in best if c.gemv and c.k_groups == groups]
            if kind:
                print(f"   best gemv k_groups={groups}: {min(kind):.1f}us", flush=True)
        dense = [us for us, c in best if c.dense]
        if dense:
            print(f"   dense: {dense[0]:.1f}us", flush=True)
        row = {"shape": name, "M": m, "best": [(us, label(c)) for us, c in best[:5]]}
        if m <= GEMV_SWEEP_MAX_M and best:
            row.update(gemv_baselines(case, m, best[0][1]))
        out.append(row)
    return out


def gemv_baselines(case: Case, m: int, best: Nf4Config) -> dict:
    """Beside a GEMV sweep: the tl.dot path's recorded config, the GEMV default (if M is in its bucket),
    the best config with the code lookup replaced by a cast (wrong values: what the lookup costs) and the
    same-bytes copy, timed in the same run."""
    dot = pick_config(m, case.n, case.k, gemv=False)
    row = {"dot_us": bench_m(case, m, dot, baselines=False)["nf4_us"],
           "best_cast_lookup_us": bench_m(case, m, replace(best, lookup=LOOKUP_CAST), baselines=False)["nf4_us"],
           "floor_us": floor_us(case.floor_bytes(m))}
    if m <= MAX_GEMV_M:
        row["gemv_default_us"] = bench_m(case, m, pick_config(m, case.n, case.k, gemv=True),
                                         baselines=False)["nf4_us"]
    print("   " + "; ".join(f"{key} {us:.1f}us" for key, us in row.items()) + f" (tl.dot config: {dot})", flush=True)
    return row


def bench_dequant(case: Case) -> None:
    """Dequantizing the whole weight (the large-M path): our kernel's configs against bitsandbytes'."""
    def bnb_call(i: int) -> None:
        for p, s in case.bnb[i]:
            bnbF.dequantize_4bit(p, s)

    print(f"## dequant bnb: {graph_time_us(bnb_call, case.count):.1f}us", flush=True)
    for bn, warps in itertools.product((16, 32, 64), (2, 4, 8)):
        us = graph_time_us(lambda i, bn=bn, w=warps: nf4_dequantize(case.packed[i], bn, w), case.count)
        print(f"## dequant block_n={bn} warps={warps}: {us:.1f}us", flush=True)


def ab_prefetch(cases: dict[str, Case]) -> None:
    """The recorded config against the same config with register double-buffering, M = 16 and 32."""
    for (name, case), m in itertools.product(cases.items(), (16, 32)):
        cfg = pick_config(m, case.n, case.k)
        base = bench_m(case, m, cfg, baselines=False)["nf4_us"]
        pre = bench_m(case, m, replace(cfg, prefetch=True), baselines=False)["nf4_us"]
        print(f"## prefetch {name} M={m}: {base:.1f}us -> {pre:.1f}us", flush=True)


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Device: {device}. bf16 x; CUDA-graph replay medians over rotating weights (HBM).", "",
             "| projection | M | NF4 fused us | bnb.matmul_4bit us | bf16 cuBLAS us | floor (copy) us "
             "| x bnb | x floor | x cuBLAS | rel err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["nf4_us"]
        lines.append(f"| {r['shape']} | {r['M']} | {t:.1f} | {r['bnb_us']:.1f} | {r['cublas_us']:.1f} "
                     f"| {r['floor_us']:.1f} | {r['bnb_us'] / t:.2f} | {t / r['floor_us']:.2f} "
                     f"| {t / r['cublas_us']:.2f} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="M in {1, 32, 2048} only")
    ap.add_argument("--sweep", action="store_true", help="sweep launch configs first")
    ap.add_argument("--sweep-m", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--occupancy", action="store_true",
                    help="M <= 64: sweep the register cap, tile width and K slices instead")
    ap.add_argument("--lookups", dest="variants", action="store_const", const="lookups",
                    help="sweep the register lookups on the recorded tiles (both operand orders) instead")
    ap.add_argument("--even", dest="variants", action="store_const", const="even",
                    help="sweep the recorded configs with and without the unmasked (EVEN) path instead")
    ap.add_argument("--scales", dest="variants", action="store_const", const="scales",
                    help="sweep: the recorded config against SCALE_VALUES tiles (and dense above M=64)")
    ap.add_argument("--splits", dest="variants", action="store_const", const="splits",
                    help="sweep: the recorded tile over K slice counts (1-16 and the fewest that fill the SMs)")
    ap.add_argument("--tma", dest="variants", action="store_const", const="tma",
                    help="sweep: each M's recorded config with its weight bytes read by TMA (3 and 5 stages)")
    ap.add_argument("--tails", dest="variants", action="store_const", const="tails",
                    help="sweep: the recorded config against a row tile plus a tail tile per program (tail_m)")
    ap.add_argument("--x-tma", dest="variants", action="store_const", const="x-tma",
                    help="sweep: each M's recorded config against x's tiles by TMA too")
    ap.add_argument("--mid", dest="variants", action="store_const", const="mid",
                    help="sweep: 65-256 rows, the recorded config against the tiles that may take x by TMA")
    ap.add_argument("--small-warps", dest="variants", action="store_const", const="small-warps",
                    help="sweep: the recorded config against weights-first tiles over 2 warps (mma.sync)")
    ap.add_argument("--regs", dest="variants", action="store_const", const="regs",
                    help="sweep: M <= 32, the recorded config against nf4_regs_kernel's configs")
    ap.add_argument("--regs-grid", dest="variants", action="store_const", const="regs-grid",
                    help="sweep: M <= 8, nf4_regs_kernel's served config over 1-4 warps and K slices of 2-16 "
                         "groups")
    ap.add_argument("--ss", dest="variants", action="store_const", const="ss",
                    help="sweep: M >= 65, the recorded config against nf4_ss_kernel's tiles (Hopper)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="subset of: " + ", ".join(SHAPES))
    ap.add_argument("--ab-prefetch", action="store_true", help="time prefetch on/off at M = 16, 32 first")
    ap.add_argument("--dequant", action="store_true", help="time whole-weight dequantization first")
    ap.add_argument("--floors", action="store_true",
                    help="time each shape's floor at M = 1, 4, 8, rounded and not, first")
    ap.add_argument("--probes", action="store_true",
                    help="time the decode kernel without its lookup / its streaming at --sweep-m's M (<= 8), first")
    ap.add_argument("--no-table", action="store_true", help="skip the final table")
    ap.add_argument("--ms", type=int, nargs="+", help="the table's M values (default: all of MS)")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    cases = {name: Case(*SHAPES[name]) for name in args.shapes}
    if args.ab_prefetch:
        ab_prefetch(cases)
    if args.dequant:
        for case in cases.values():
            bench_dequant(case)
    if args.floors:
        floors(cases)
    if args.probes:
        probes(cases, tuple(args.sweep_m))
    swept = sweep(cases, tuple(args.sweep_m), args.occupancy, args.variants) if args.sweep else []
    rows = []
    for name, case in cases.items():
        for m in () if args.no_table else (1, 32, 2048) if args.quick else args.ms or MS:
            rows.append({"shape": name, **bench_m(case, m)})
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, device)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "rows": rows, "sweep": swept}, fh, indent=1)


if __name__ == "__main__":
    main()
