"""The NF4 kernel's K loop in SASS, compiled here for sm_90 with no GPU: instructions per weight value, registers,
spills, and the opcodes that dominate (hotlora.kernels._nf4_triton.nf4_matmul_kernel).

    python bench/nf4_sass.py                      # the recorded config of each M bucket (kernels._nf4_configs._CONFIGS)
    python bench/nf4_sass.py --m 16 --lookup 3 --no-even --dump /tmp/loop.sass
    python bench/nf4_sass.py --m 128 --scale 1 --lookup 1 --tile 128 128 8
    python bench/nf4_sass.py --regs --m 1 8 16     # nf4_regs_kernel (Gluon) at regs_config, or 16-row x tiles

Triton compiles the kernel as its JIT would for an H200 (the divisibility hints of 16-aligned pointers and sizes),
with the ptxas, cuobjdump and nvdisasm its wheel ships. The loop is the longest backward branch of the SASS; the
regs kernel's served slices have none (straight-line steps), so its cost a group is a difference (regs_report).
Counts are a proxy: on the H200 the small-M kernel is bounded by instruction issue (ncu, BENCHMARKS.md), but
fewer instructions have also measured slower (the unmasked path at M 17-64), so timings decide.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from dataclasses import replace

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from hotlora.kernels import _nf4_regs_gluon, _nf4_triton
from hotlora.kernels.nf4 import LOOKUP_PRMT, Nf4Config, pick_config, regs_config

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTERS = {"x_ptr": "*bf16", "xt_ptr": "*bf16", "w_ptr": "*u8", "absmax_ptr": "*fp32", "lut_ptr": "*i32",
            "bias_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32"}
SCALARS = ("M", "N", "K", "NUM_G", "stride_xm", "stride_wn", "stride_an", "stride_ym")


def compile_sm90(cfg: Nf4Config, iters: int = 16) -> bytes:
    """The cubin of nf4_matmul_kernel for `cfg` (bf16 x, no bias), as the JIT builds it for an H200."""
    fn = _nf4_triton.nf4_matmul_kernel
    consts = dict(HAS_BIAS=False, W_DTYPE=tl.bfloat16, PRECISION="tf32", SCALE=cfg.scale,
                  SWAP_AB=cfg.swap_ab, LOOKUP=cfg.lookup, V_DTYPE=tl.bfloat16, TABLE_REGS=cfg.table_regs,
                  PREFETCH=cfg.prefetch, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k,
                  ITERS=iters, GROUP_M=cfg.group_m, EVEN=cfg.even,
                  PDL=True, TMA=cfg.tma, TAIL_M=cfg.tail_m, X_TMA=cfg.x_tma)
    pointers = POINTERS | ({"w_ptr": f"tensordesc<u8[{cfg.block_n}, 64]>"} if cfg.tma else {})
    if cfg.x_tma:
        pointers |= {"x_ptr": f"tensordesc<bf16[{cfg.block_m}, 64]>",
                     "xt_ptr": f"tensordesc<bf16[{cfg.tail_m}, 64]>" if cfg.tail_m else "*bf16"}
    signature = {**pointers, **dict.fromkeys(SCALARS, "i32"), **dict.fromkeys(consts, "constexpr")}
    names = list(signature)
    aligned = [*(p for p in POINTERS if not pointers[p].startswith("tensordesc")), *(s for s in SCALARS if s != "M")]
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    options = dict(num_warps=cfg.warps, num_stages=cfg.stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def compile_regs_sm90(cfg: Nf4Config, iters: int = 16) -> bytes:
    """The cubin of nf4_regs_kernel for `cfg` (bf16 x, split K, no bias), as the JIT builds it for an H200."""
    consts = dict(HAS_BIAS=False, V_DTYPE=tl.bfloat16, BLOCK_M=cfg.block_m, TILES=cfg.block_n // (16 * cfg.warps),
                  SPLIT_K=cfg.split_k, ITERS=iters, PDL=True, STAGES=cfg.stages,
                  EVEN=cfg.even, PROBE=0)
    pointers = {"x_ptr": "*bf16", "w_ptr": "*u8", "absmax_ptr": "*fp32", "lut_ptr": "*i32", "bias_ptr": "*bf16",
                "y_ptr": "*bf16", "part_ptr": "*fp32"}
    signature = {**pointers, **dict.fromkeys(SCALARS, "i32"), **dict.fromkeys(consts, "constexpr")}
    names = list(signature)
    aligned = [*pointers, *(s for s in SCALARS if s not in ("M", "N"))]
    src = GluonASTSource(fn=_nf4_regs_gluon.nf4_regs_kernel, signature=signature,
                         constexprs={(names.index(k),): v for k, v in consts.items()},
                         attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    options = dict(num_warps=cfg.warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def disassemble(cubin: bytes) -> tuple[list[str], dict]:
    """The cubin's SASS lines (nvdisasm) and its registers and stack bytes a thread (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([f"{BIN}/nvdisasm", "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    return sass.splitlines(), {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
                               "stack": int(re.search(r"STACK:(\d+)", usage).group(1))}


def _instructions(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r"/\*[0-9a-f]{4}\*/", line)]


def _opcodes(body: list[str]) -> collections.Counter:
    return collections.Counter(re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line).group(1) for line in body)


def loop_report(cubin: bytes) -> dict:
    lines, usage = disassemble(cubin)
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    # a span holding an EXIT is no loop: the mbarrier wait's retry branch sits past the epilogue and jumps back
    # into the loop (TMA configs)
    loops = [(a, b) for a, b in loops if not any(re.search(r"\bEXIT\b", line) for line in lines[a:b])]
    start, end = max(loops, key=lambda span: span[1] - span[0])
    body = _instructions(lines[start:end + 1])
    return {**usage, "loop": len(body), "opcodes": dict(_opcodes(body).most_common(10)), "sass": "\n".join(body)}


def regs_report(cfg: Nf4Config) -> dict:
    """nf4_regs_kernel's cost a group step: its slices of up to _nf4_regs_gluon.UNROLL_ITERS groups are
    straight-line code (no loop to measure), so the whole kernel at 16 groups less the same at 8, over 8; registers,
    stack and the SASS are the 16-group kernel's."""
    counts = []
    for iters in (8, 16):
        lines, usage = disassemble(compile_regs_sm90(cfg, iters))
        body = _instructions(lines)
        counts.append(_opcodes(body))
    step = {op: (counts[1][op] - counts[0][op]) / 8 for op in counts[1]}
    return {**usage, "step": sum(step.values()),
            "opcodes": dict(sorted(((op, n) for op, n in step.items() if n), key=lambda t: -t[1])[:10]),
            "sass": "\n".join(body)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 32, 64, 128], help="M: picks the recorded config")
    ap.add_argument("--n", type=int, default=28672, help="N (output width; gate/up by default)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--lookup", type=int, help="override: 1 LOOKUP_PRMT, 3 LOOKUP_PRMT_IMM")
    ap.add_argument("--table-regs", action=argparse.BooleanOptionalAction, default=None, help="override")
    ap.add_argument("--even", action=argparse.BooleanOptionalAction, default=None, help="override")
    ap.add_argument("--swap-ab", action=argparse.BooleanOptionalAction, default=None, help="override")
    ap.add_argument("--tma", action=argparse.BooleanOptionalAction, default=None, help="override")
    ap.add_argument("--scale", type=int, help="override: 0 SCALE_PARTIALS, 1 SCALE_VALUES, 2 SCALE_EXACT")
    ap.add_argument("--tile", type=int, nargs=3, metavar=("BLOCK_M", "BLOCK_N", "WARPS"), help="override")
    ap.add_argument("--tail", type=int, help="override: tail_m (a second row tile per program)")
    ap.add_argument("--x-tma", action=argparse.BooleanOptionalAction, default=None, help="override (x by TMA)")
    ap.add_argument("--dump", help="write the last config's loop SASS here")
    ap.add_argument("--regs", action="store_true", help="nf4_regs_kernel: regs_config(M), else 16-row x tiles")
    a = ap.parse_args()
    for m in a.m if a.regs else ():
        cfg = regs_config(m, a.n, a.k) or Nf4Config(max(8, 1 << (m - 1).bit_length()), 64, 4, stages=3, regs=True,
                                                    lookup=LOOKUP_PRMT)
        rep = regs_report(cfg)
        values = cfg.block_n * 128 // (32 * cfg.warps)  # one group a step
        print(f"M={m} regs: {cfg.block_m} x-rows, {cfg.block_n} weight rows over {cfg.warps} warps, {cfg.stages} "
              f"stages: {rep['registers']} registers, {rep['stack']} B stack; {rep['step']:.0f} instructions a group "
              f"step, {rep['step'] / values:.2f} per weight value; {rep['opcodes']}", flush=True)
        if a.dump:
            with open(a.dump, "w") as fh:
                fh.write(rep["sass"] + "\n")
    for m in () if a.regs else a.m:
        cfg = pick_config(m, a.n, a.k, gemv=False)
        if cfg.dense:
            print(f"M={m}: dequantize + cuBLAS (no fused loop)")
            continue
        overrides = {"lookup": a.lookup, "table_regs": a.table_regs, "even": a.even, "swap_ab": a.swap_ab, "tma": a.tma,
                     "scale": a.scale, "tail_m": a.tail, "x_tma": a.x_tma,
                     **dict(zip(("block_m", "block_n", "warps"), a.tile or (), strict=False))}
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        rep = loop_report(compile_sm90(cfg))
        values = cfg.block_n * 128 // (32 * cfg.warps)  # weight values per thread per 128-column group
        lookup = {LOOKUP_PRMT: "prmt"}.get(cfg.lookup, str(cfg.lookup))
        print(f"M={m}: {cfg.block_m}x{cfg.block_n} split {cfg.split_k} warps {cfg.warps} swap_ab {cfg.swap_ab} "
              f"lookup {lookup} table_regs {cfg.table_regs} even {cfg.even} scale {cfg.scale} tma {cfg.tma} "
              f"tail {cfg.tail_m} x_tma {cfg.x_tma}: "
              f"{rep['registers']} registers, "
              f"{rep['stack']} B stack; loop {rep['loop']} instructions, {rep['loop'] / values:.2f} per weight "
              f"value; {rep['opcodes']}", flush=True)
        if a.dump:
            with open(a.dump, "w") as fh:
                fh.write(rep["sass"] + "\n")


if __name__ == "__main__":
    main()
