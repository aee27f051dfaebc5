"""The NF4 kernel's recorded TMA configs compile for an H200 (sm_90) with the options nf4_matmul launches them with,
for every x dtype the engine runs: no GPU needed (Triton's passes and the ptxas its wheel ships run here). So does
nf4_regs_kernel (Gluon, which the interpreter cannot run): its served configs, with the shared memory of its
cp.async rings and nothing more (no operand passes through shared memory); and nf4_ss_kernel's served configs within
one SM's shared memory and registers.

A GPU engine in fp32 once met a pipeliner abort (2-stage TMA loops over fp32 x) that the bf16 kernel tests could
not see; this catches that kind of failure in CI. The compiles run in one child process without TRITON_INTERPRET
(under the interpreter @triton.jit yields functions the compiler cannot take)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from hotlora.kernels import _nf4_configs, _nf4_regs_gluon, _nf4_ss_gluon, _nf4_triton, nf4
from hotlora.kernels.nf4 import LOOKUP_TABLE, SCALE_EXACT, Nf4Config

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(_BIN, "ptxas")),
                                reason="this Triton wheel ships no ptxas")

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _recorded_tma_configs() -> list[Nf4Config]:
    configs = [c for _, cfg, large in _nf4_configs._CONFIGS for c in (cfg, large) if c is not None]
    return list(dict.fromkeys(c for c in configs if c.tma and not (c.dense or c.gemv)))


def compile_sm90(cfg: Nf4Config, x_dtype: torch.dtype) -> None:
    """Compile nf4_matmul_kernel as nf4._launch would launch `cfg` over x_dtype x (TMA codes, split K, no bias)."""
    lookup = cfg.lookup if cfg.scale != SCALE_EXACT and x_dtype != torch.float32 else LOOKUP_TABLE
    x_tma = nf4.x_by_tma(cfg, x_dtype)
    consts = dict(HAS_BIAS=False, W_DTYPE=tl.bfloat16, PRECISION="ieee" if x_dtype == torch.float32 else "tf32",
                  SCALE=cfg.scale, SWAP_AB=cfg.swap_ab, LOOKUP=lookup, V_DTYPE=_TL[x_dtype], TABLE_REGS=cfg.table_regs,
                  PREFETCH=cfg.prefetch, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=2, ITERS=4,
                  GROUP_M=cfg.group_m, EVEN=cfg.even, PDL=True, TMA=True, TAIL_M=cfg.tail_m, X_TMA=x_tma)
    x = _NAME[x_dtype]
    xs = f"tensordesc<{x}[{cfg.block_m}, 64]>" if x_tma else f"*{x}"
    xt = f"tensordesc<{x}[{cfg.tail_m}, 64]>" if x_tma and cfg.tail_m else f"*{x}"
    pointers = {"x_ptr": xs, "xt_ptr": xt, "w_ptr": f"tensordesc<u8[{cfg.block_n}, 64]>", "absmax_ptr": "*fp32",
                "lut_ptr": "*fp32" if lookup == LOOKUP_TABLE else "*i32", "bias_ptr": f"*{x}", "y_ptr": f"*{x}",
                "part_ptr": "*fp32", "count_ptr": "*i32"}
    scalars = ("M", "N", "K", "NUM_G", "stride_xm", "stride_wn", "stride_an", "stride_ym")
    signature = {**pointers, **dict.fromkeys(scalars, "i32"), **dict.fromkeys(consts, "constexpr")}
    names = list(signature)
    src = ASTSource(fn=_nf4_triton.nf4_matmul_kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    options = {"num_warps": cfg.warps, "num_stages": nf4.stages(cfg, x_dtype, True)}
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


_LLAMA = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
_REGS_CASES = [*((m, dtype) for m in (1, 8) for dtype in ("bf16", "fp16")), (16, "bf16")]
_REGS_PROGRAMS_PER_SM = {8: 6, 16: 4}  # by x-rows a program (regs_config's K slices are sized for these)


def compile_regs_sm90(m: int, n: int, k: int, x: str, bias: bool, probe: int = 0):
    """nf4_regs_kernel compiled as _nf4_regs_gluon.launch_regs launches regs_config(m, n, k) (the Llama shapes tile
    evenly), with the PROBE bits `probe` (_nf4_regs_gluon.PROBE_BITS)."""
    cfg = _nf4_configs.regs_config(m, n, k)
    consts = dict(HAS_BIAS=bias, V_DTYPE=tl.bfloat16 if x == "bf16" else tl.float16, BLOCK_M=cfg.block_m,
                  TILES=cfg.block_n // (16 * cfg.warps), SPLIT_K=cfg.split_k, ITERS=-(-k // 128 // cfg.split_k),
                  PDL=True, STAGES=cfg.stages, EVEN=True, PROBE=probe)
    pointers = {"x_ptr": f"*{x}", "w_ptr": "*u8", "absmax_ptr": "*fp32", "lut_ptr": "*i32", "bias_ptr": f"*{x}",
                "y_ptr": f"*{x}", "part_ptr": "*fp32"}
    scalars = ("M", "N", "K", "NUM_G", "stride_xm", "stride_wn", "stride_an", "stride_ym")
    signature = {**pointers, **dict.fromkeys(scalars, "i32"), **dict.fromkeys(consts, "constexpr")}
    names = list(signature)
    aligned = [*pointers, "K", "NUM_G", "stride_xm", "stride_wn", "stride_an", "stride_ym"]  # as the JIT specializes
    src = GluonASTSource(fn=_nf4_regs_gluon.nf4_regs_kernel, signature=signature,
                         constexprs={(names.index(c),): v for c, v in consts.items()},
                         attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.warps})


def _tool(cubin: bytes, tool: str, *args: str) -> str:
    """What one of the wheel's CUDA tools (nvdisasm, cuobjdump) prints for the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(_BIN, tool), *args, f.name], capture_output=True, text=True,
                              check=True).stdout


def _registers(cubin: bytes) -> int:
    """Registers a thread of the cubin's kernel (cuobjdump's resource usage)."""
    return int(re.search(r"REG:(\d+)", _tool(cubin, "cuobjdump", "--dump-resource-usage")).group(1))


_SS_CASES = [(n, k, x, warps) for n, k in _LLAMA if n * k >= _nf4_configs.LARGE_WEIGHT for x in ("bf16", "fp16")
             for warps in (8, 4)]  # 4: the 64-row programs of the tail launch


def compile_ss_sm90(n: int, k: int, x: str, warps: int) -> list[int]:
    """Compile nf4_ss_kernel as _nf4_ss_gluon.launch_ss launches ss_config(512, n, k) over `warps` MMA warps (split 1
    takes the bias; with HOTLORA_NF4_SS=1, as the fixture runs this): its shared memory in bytes, registers, local
    loads and stores in loops (spills), and threads."""
    from triton.experimental.gluon import language as gl

    cfg = _nf4_configs.ss_config(512, n, k)
    cfg = replace(cfg, warps=warps, block_n=16 * warps)
    el = gl.bfloat16 if x == "bf16" else gl.float16
    x_layout = gl.NVMMASharedLayout.get_default_for([cfg.block_m, 64], el)
    c_layout = gl.NVMMASharedLayout.get_default_for([cfg.block_n, 64], gl.uint8)
    cs, ws, xs = _nf4_ss_gluon.SS_RINGS
    consts = dict(HAS_BIAS=cfg.split_k == 1, SPLIT_K=cfg.split_k, ITERS=-(-k // 128 // cfg.split_k), PDL=True, CS=cs,
                  WS=ws, XS=xs, LOOKUP_REGS=_nf4_ss_gluon.SS_REGS[0], CAST=False)
    pointers = {"x_desc": f"tensordesc<{x}[{cfg.block_m}, 64],{x_layout!r}>",
                "c_desc": f"tensordesc<u8[{cfg.block_n}, 64],{c_layout!r}>", "absmax_ptr": "*fp32", "lut_ptr": "*i32",
                "bias_ptr": f"*{x}", "y_ptr": f"*{x}", "part_ptr": "*fp32"}
    scalars = ("M", "N", "N_BASE", "NUM_G", "stride_an", "stride_ym")
    signature = {**pointers, **dict.fromkeys(scalars, "i32"), **dict.fromkeys(consts, "constexpr")}
    names = list(signature)
    aligned = [*(p for p in pointers if not p.endswith("desc")), "N", "NUM_G", "stride_an", "stride_ym"]
    src = GluonASTSource(fn=_nf4_ss_gluon.nf4_ss_kernel, signature=signature,
                         constexprs={(names.index(c),): v for c, v in consts.items()},
                         attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg.warps, "maxnreg": _nf4_ss_gluon.SS_REGS[1][cfg.warps]})
    sass = _tool(kernel.asm["cubin"], "nvdisasm", "-c").splitlines()
    regs = _registers(kernel.asm["cubin"])
    # spills in loops: local loads and stores between a label and a branch back to it (a span holding an EXIT is an
    # mbarrier wait's retry branch from past the end, no loop)
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"(\.L_x_\d+):", line))}
    loops = [sass[labels[m.group(1)]:i] for i, line in enumerate(sass)
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    spills = sum(bool(re.search(r"\b(STL|LDL)", line)) for body in loops if not any("EXIT" in x for x in body)
                 for line in body)
    return [kernel.metadata.shared, regs, spills, 32 * kernel.metadata.num_warps]


def _regs_label(m: int, x: str) -> str:
    return f"regs-m{m}-{x}"


def _label(cfg: Nf4Config) -> str:
    return f"{cfg.block_m}+{cfg.tail_m}x{cfg.block_n}w{cfg.warps}s{cfg.stages}" + ("-xtma" if cfg.x_tma else "")


def _compile_all() -> dict[str, str]:
    """label-dtype -> "ok" or the compiler's error, for every recorded TMA config and x dtype."""
    out = {}
    configs = _recorded_tma_configs()
    assert len({_label(c) for c in configs}) == len(configs), "two recorded configs share a label"
    for cfg in configs:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            try:
                compile_sm90(cfg, dtype)
                out[f"{_label(cfg)}-{_NAME[dtype]}"] = "ok"
            except Exception as exc:  # the report names it; the test fails on it
                out[f"{_label(cfg)}-{_NAME[dtype]}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for m, x in _REGS_CASES:
        try:  # every Llama shape (their K slices differ; split 1 takes the bias)
            kernels = [compile_regs_sm90(m, n, k, x, bias=_nf4_configs.regs_config(m, n, k).split_k == 1)
                       for n, k in _LLAMA]
            sizes = [(kernel.metadata.shared, _registers(kernel.asm["cubin"])) for kernel in kernels]
            out[_regs_label(m, x)] = sorted({shared for shared, _ in sizes})
            out[_regs_label(m, x) + "-registers"] = max(regs for _, regs in sizes)
        except Exception as exc:
            out[_regs_label(m, x)] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for probe in (0, 1, 2, 8, 16):  # gate/up's slices at M = 1
        try:
            sass = _tool(compile_regs_sm90(1, 28672, 4096, "bf16", False, probe).asm["cubin"], "nvdisasm", "-c")
            out[f"regs-probe{probe}"] = [len(re.findall(rf"\b{op}\b", sass)) for op in ("PRMT", "LDGSTS", "LDG")]
            if probe == 0:  # the copies before the PDL wait (ACQBULK), and from it to the first CTA barrier
                before, _, after = sass.partition("ACQBULK")
                out["regs-pdl-copies"] = [before.count("LDGSTS"), after.split("BAR.SYNC")[0].count("LDGSTS")]
        except Exception as exc:
            out[f"regs-probe{probe}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for n, k, x, warps in _SS_CASES:
        try:
            out[f"ss-{n}x{k}-{x}-w{warps}"] = compile_ss_sm90(n, k, x, warps)
        except Exception as exc:
            out[f"ss-{n}x{k}-{x}-w{warps}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HOTLORA_NF4_SS"] = "1"  # nf4_ss_kernel's configs (ss_config) whether it is served or not (SERVE_SS)
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("x_dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cfg", _recorded_tma_configs(), ids=_label)
def test_recorded_tma_configs_compile_for_sm90(compiled, cfg, x_dtype):
    assert compiled[f"{_label(cfg)}-{x_dtype}"] == "ok"


@pytest.mark.parametrize(("m", "x_dtype"), _REGS_CASES)
def test_regs_kernel_compiles_for_sm90_with_only_its_rings_in_shared_memory(compiled, m, x_dtype):
    cfg = _nf4_configs.regs_config(m, 4096, 4096)
    rings = cfg.stages * (cfg.block_n * 64 + 128 * cfg.block_m * 2)  # code bytes + x's 128 columns, per group
    assert compiled[_regs_label(m, x_dtype)] == [rings]
    # six 4-warp programs an SM at 8 x-rows, four at 16: the served slices are straight-line steps (unrolled; as a
    # loop 8 x-rows took 104 registers)
    programs = _REGS_PROGRAMS_PER_SM[cfg.block_m]
    assert programs * 32 * cfg.warps * compiled[_regs_label(m, x_dtype) + "-registers"] <= 65536


def test_regs_kernel_probes_drop_what_they_name(compiled):
    """The bench's probes (_nf4_regs_gluon.PROBE_BITS): PROBE_CAST leaves no lookup (no PRMT) and every copy;
    PROBE_NO_STREAM every lookup and only the first fill's copies (3 cp.async a group: the code bytes' two, x's one);
    PROBE_NO_X every lookup and, after the first fill, the code bytes' copies only; PROBE_HOT_SCALES every lookup,
    copy and scale load (from other addresses)."""
    prmt, copies, loads = compiled["regs-probe0"]
    stages = _nf4_configs.regs_config(1, 28672, 4096).stages
    assert prmt > 0 and copies > 3 * stages and loads > 0
    assert compiled["regs-probe1"][:2] == [0, copies]
    assert compiled["regs-probe2"][:2] == [prmt, 3 * (stages - 1)]
    assert compiled["regs-probe8"][:2] == [prmt, 3 * (stages - 1) + 2 * (copies - 3 * (stages - 1)) // 3]
    assert compiled["regs-probe16"] == [prmt, copies, loads]


def test_regs_kernel_copies_the_first_code_bytes_before_the_pdl_wait(compiled):
    """The first fill's code bytes (two cp.async a group and thread) are issued before the PDL wait, since the kernel
    before does not write them (kernels._launch); x's (one a group), which it may write, only after it."""
    stages = _nf4_configs.regs_config(1, 28672, 4096).stages
    assert compiled["regs-pdl-copies"] == [2 * (stages - 1), stages - 1]


@pytest.mark.parametrize(("n", "k", "x_dtype", "warps"), _SS_CASES)
def test_ss_kernel_compiles_for_sm90_within_one_sms_resources(compiled, n, k, x_dtype, warps):
    """The served nf4_ss_kernel (gate/up, down, and the tail launch's 64-row programs): its rings fit an H200 SM's
    shared memory (227 KB a program), and its warps' registers its register file (64K), with no spill in a loop (the
    4-warp program's epilogue saves a register once)."""
    shared, regs, spills, threads = compiled[f"ss-{n}x{k}-{x_dtype}-w{warps}"]
    assert shared <= 227 * 1024 and regs * threads <= 65536 and spills == 0


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
