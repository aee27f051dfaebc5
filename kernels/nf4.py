"""Fused NF4 dequant-GEMM: bitsandbytes' 4-bit weights multiplied without materialising them.

Layout (``NF4Weight``, built once at load by ``pack_nf4`` / ``pack_nf4_group`` from bitsandbytes' storage):

    codes  uint8   [N, Kp // 2]  Kp = K rounded up to 128. Per row, 128-column groups of 64 bytes; byte j of
                                  group g holds the nibble of column 128g + j in its high half and of column
                                  128g + 64 + j in its low half (bitsandbytes packs columns 2j, 2j + 1:
                                  regrouping lets a kernel unpack two dense halves with no shuffle). A nibble
                                  n stands for code NF4_NIBBLE_ORDER[n], value NF4_NIBBLE[n] (a fixed
                                  permutation of bitsandbytes' code book that makes the register lookup
                                  cheaper: reference.NF4_NIBBLE_ORDER). Columns past K hold value 0, absmax 0.
    absmax float32 [N, Kp // 64]  each 64-column block's scale, de-nested once by bitsandbytes itself
                                  (dequantize_blockwise(absmax, state2) + offset, as dequantize_4bit does)
    dtype                         what bitsandbytes rounds dequantized values to (quant_state.dtype)
    splits                        output widths of a fused group (q/k/v, gate/up); (N,) for one projection

Needs K % 64 == 0 (no 64-block straddles two rows; true of every Llama-family projection), so a group is
the row-concatenation of its members. The fp32 absmax costs 0.5 bit per weight over bitsandbytes' nested
8-bit one (4.5 instead of 4.125 bits) and buys exact scales with no in-kernel double-quantization decode.
Values are bit-identical to ``dequantize_4bit`` (``nf4_dequantize`` reproduces it; a test checks).

Semantics of ``nf4_matmul(x, w, bias=None, out=None)``, fp32 accumulation:

    W = (NF4[code] * absmax[:, col // 64]).to(w.dtype)       # [N, K], == bnb dequantize_4bit
    y = (x.float() @ W.to(x.dtype).float().T + bias).to(x.dtype)     # x [M, K] fp16/bf16/fp32, y [M, N]

Paths by M (``_nf4_configs._CONFIGS``, swept on the H200 with bench/nf4_gemm.py; no autotuning at serve time):
- M <= MAX_GEMV_M (decode at batch 1-4), when SERVE_GEMV (off: not faster yet, see there) or asked for:
  ``nf4_gemv_kernel``, no tl.dot. Each program streams BLOCK_N weight
  rows over a K slice, multiplies the code values (fp32) by every x row (the bytes are read once for all
  rows), sums each 64-block and scales it by absmax afterwards; K is split into slices (fp32 partials plus
  ``nf4_reduce_kernel``) when N alone gives too few programs to keep the GPU's memory system busy.
- M <= MAX_REGS_M (decode at batch 1-16: 8 or 16 x-rows a program; CUDA, 16-bit x; SERVE_REGS, HOTLORA_NF4_REGS):
  ``nf4_regs_kernel``
  (Gluon, _nf4_regs_gluon), the looked-up code values as mma.sync's register operand in layouts chosen so that
  nothing is shuffled between the lookup and the MMA; code bytes and x by cp.async rings; SCALE_PARTIALS; split-K
  as below, with the reduce launch. The interpreter cannot run Gluon: the CPU and fp32 x take the next path.
- up to 256: ``nf4_matmul_kernel``, tl.dot on the raw code values (NF4 in x's dtype), each 64-block's
  partial sums scaled by absmax afterwards (SCALE_PARTIALS), or (SCALE_VALUES: from 65 rows, and for large
  weights from 17) the code values scaled by absmax in x's dtype before the dot; split-K as above. From 65 rows
  the weight bytes arrive by TMA (``Nf4Config.tma``: a tensor descriptor of the codes, copied into shared
  memory, the pipeliner keeping ``stages`` groups in flight), and large weights take it again at 385-512 where
  nf4_ss_kernel cannot run (not Hopper, fp32 x). At 65-96
  and 129-192 rows a program covers a row tile plus a smaller tail tile (``Nf4Config.tail_m``: 128 + 64 rows
  dotted with one dequantized weight tile) rather than a power-of-two tile up to twice M.
- SS_MIN_M-SS_MAX_M rows (384-768) for large weights (Hopper, 16-bit x; SERVE_SS, HOTLORA_NF4_SS=0 turns it
  off): ``nf4_ss_kernel`` (Gluon, _nf4_ss_gluon), both wgmma operands in shared memory: a lookup warpgroup
  stores each group's looked-up, absmax-scaled weights (SCALE_VALUES) into a ring that two MMA warpgroups read beside
  x's TMA ring.
- larger M: dequantize the whole weight (``nf4_dequant_kernel``, bit-identical) and call cuBLAS.
SCALE_PARTIALS rounds differently from W by one rounding of the code value (to x's dtype on CUDA with 16-bit
x; exact fp32 values in the GEMV path's table lookup); SCALE_VALUES by that and the rounding of absmax and of
the product to x's dtype. CUDA tensors go to Triton; CPU tensors
go to the torch reference unless HOTLORA_TRITON_CPU=1 (with TRITON_INTERPRET=1). Capture-safe: no host
sync; it allocates only the output and, for split-K configs, an fp32 partial-sum buffer (from the graph's
pool under capture).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import pdl_args, tma, use_triton
from ._nf4_configs import (
    BY_SMS,
    LARGE_WEIGHT,
    MAX_GEMV_M,
    SCALE_EXACT,
    SCALE_PARTIALS,
    SCALE_VALUES,
    Nf4Config,
    pick_config,
    regs_config,
    split_for_sms,
    ss_config,
)
from ._nf4_gemv_triton import nf4_gemv_kernel
from ._nf4_regs_gluon import launch_regs, regs_fit
from ._nf4_ss_gluon import launch_ss, ss_fit
from ._nf4_sums_triton import fixup_wanted as _fixup
from ._nf4_sums_triton import reduce_splits as _reduce
from ._nf4_sums_triton import split_counts as _counts
from ._nf4_triton import (
    LOOKUP_CAST,
    LOOKUP_PRMT,
    LOOKUP_PRMT_IMM,
    LOOKUP_TABLE,
    nf4_dequant_kernel,
    nf4_matmul_kernel,
    prmt_table_words,
)
from .reference import NF4_NIBBLE, NF4_NIBBLE_ORDER, nf4_dequantize_ref, nf4_matmul_ref

__all__ = [
    "BY_SMS",
    "LARGE_WEIGHT",
    "LOOKUP_CAST",
    "LOOKUP_PRMT",
    "LOOKUP_PRMT_IMM",
    "LOOKUP_TABLE",
    "MAX_GEMV_M",
    "SCALE_EXACT",
    "SCALE_PARTIALS",
    "SCALE_VALUES",
    "NF4Weight",
    "Nf4Config",
    "nf4_dequantize",
    "nf4_matmul",
    "pack_nf4",
    "pack_nf4_group",
    "pick_config",
    "regs_config",
    "split_for_sms",
    "ss_config",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, slots=True)
class NF4Weight:
    codes: torch.Tensor  # uint8 [N, Kp // 2], 128-column groups
    absmax: torch.Tensor  # float32 [N, Kp // 64]
    in_features: int  # K
    dtype: torch.dtype  # what dequantized values round to
    splits: tuple[int, ...]  # output widths of the group's members

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.in_features

    def rows(self, start: int, stop: int) -> NF4Weight:
        """Output rows start..stop as one projection: views of this weight's storage, no copy."""
        return NF4Weight(self.codes[start:stop], self.absmax[start:stop], self.in_features, self.dtype,
                         (stop - start,))


@functools.cache
def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 16 nibble values (NF4_NIBBLE) in `dtype` (fp32: exact), on `device`."""
    return torch.tensor(NF4_NIBBLE, dtype=torch.float32).to(device=device, dtype=dtype)


@functools.cache
def _lookup_table(device: torch.device, dtype: torch.dtype, lookup: int) -> torch.Tensor:
    """What the kernels' lut argument holds: the nibble values in `dtype`, or LOOKUP_PRMT's table words."""
    if lookup == LOOKUP_PRMT:
        return torch.tensor(prmt_table_words(dtype), dtype=torch.int32, device=device)
    return _lut(device, dtype)


@functools.cache
def _nibble_of_code(device: torch.device) -> torch.Tensor:
    """uint8 [16]: the stored nibble of each bitsandbytes code (the inverse of NF4_NIBBLE_ORDER)."""
    inverse = [NF4_NIBBLE_ORDER.index(c) for c in range(16)]
    return torch.tensor(inverse, dtype=torch.uint8, device=device)


def _regroup(codes: torch.Tensor) -> torch.Tensor:
    """[N, Kp] nibbles (0..15) -> [N, Kp // 2] bytes in the 128-column group layout of the module docstring."""
    n, kp = codes.shape
    g = codes.view(n, kp // 128, 2, 64)
    return ((g[:, :, 0] << 4) | g[:, :, 1]).reshape(n, kp // 2)


def pack_nf4(packed: torch.Tensor, state) -> NF4Weight:
    """One projection from ``bnb.functional.quantize_4bit(W, blocksize=64, quant_type="nf4", ...)``'s
    (packed uint8 [(N*K+1)//2, 1], QuantState); compress_statistics may be on or off."""
    import bitsandbytes.functional as bnbF  # only at load: the kernels themselves need no bitsandbytes

    n, k = state.shape
    if state.quant_type != "nf4" or state.blocksize != 64:
        raise ValueError(f"need NF4 with blocksize 64, got {state.quant_type} / {state.blocksize}")
    if k % 64:
        raise ValueError(f"in_features must be a multiple of 64, got {k}")
    if packed.dtype != torch.uint8 or packed.numel() != n * k // 2:
        raise ValueError(f"packed weight must be uint8 with {n * k // 2} bytes, got {packed.dtype} {packed.numel()}")
    absmax = state.absmax
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    kp = -(-k // 128) * 128
    raw = packed.reshape(n, k // 2)
    to_nibble = _nibble_of_code(packed.device)
    codes = torch.full((n, kp), NF4_NIBBLE.index(0.0), dtype=torch.uint8, device=packed.device)
    codes[:, 0:k:2], codes[:, 1:k:2] = to_nibble[(raw >> 4).long()], to_nibble[(raw & 15).long()]
    scales = torch.zeros(n, kp // 64, dtype=torch.float32, device=packed.device)
    scales[:, : k // 64] = absmax.float().reshape(n, k // 64)
    return NF4Weight(_regroup(codes), scales, k, state.dtype, (n,))


def pack_nf4_group(members: Sequence[NF4Weight]) -> NF4Weight:
    """Projections sharing their input (q/k/v, gate/up) as one weight with concatenated outputs."""
    first = members[0]
    for m in members:
        if m.shape[1] != first.shape[1] or m.dtype != first.dtype or m.codes.device != first.codes.device:
            raise ValueError("group members must share in_features, dtype and device")
    return NF4Weight(torch.cat([m.codes for m in members]), torch.cat([m.absmax for m in members]),
                     first.in_features, first.dtype, tuple(s for m in members for s in m.splits))


def _check(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None) -> None:
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {k}] with unit column stride, got {tuple(x.shape)} {x.stride()}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.device != w.codes.device:
        raise ValueError(f"x on {x.device}, weight on {w.codes.device}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{n}], got {tuple(bias.shape)}")


def nf4_dequantize(w: NF4Weight, block_n: int = 32, warps: int = 4, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as a dense [N, K] tensor in w.dtype (bit-identical to bnb's dequantize_4bit); into `out`
    (w.dtype, [N, K], unit column stride) if given."""
    n, k = w.shape
    if out is not None and (out.shape != (n, k) or out.dtype != w.dtype or out.stride(1) != 1
                            or out.device != w.codes.device):
        raise ValueError(f"out must be a {w.dtype} [{n}, {k}] tensor with unit column stride on {w.codes.device}")
    if not use_triton(w.codes):
        y = nf4_dequantize_ref(w)
        return y if out is None else out.copy_(y)
    out = torch.empty(n, k, dtype=w.dtype, device=w.codes.device) if out is None else out
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, 128))
    nf4_dequant_kernel[grid](w.codes, w.absmax, _lut(out.device, torch.float32), out, n, k, w.codes.stride(0),
                             w.absmax.stride(0), out.stride(0), BLOCK_N=block_n, num_warps=warps)
    return out


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


Finish = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], bool]


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: Nf4Config | None = None,
               finish: Finish | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(w).T (+ bias [N]) in x's dtype (module docstring: exact semantics).

    finish: when the launch splits K, called as finish(part, bias, y) (part: the fp32 sums [split, M, N]) in
    place of the reduce; it returns True if it wrote y itself (kernels.lora.lora_project adds the LoRA delta
    in the same pass), False to let the reduce run. Without one, or with one whose `alone` attribute is true
    (the shrink already ran, kernels.lora_fused), no LoRA shrink runs beside the matmul, which picks its config
    accordingly (pick_config's `alone`)."""
    _check(x, w, bias)
    if not use_triton(x):
        y = nf4_matmul_ref(x, w, bias)
        return y if out is None else out.copy_(y)
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    cfg = config or _served_config(x, w, finish)
    if cfg.dense:
        dense = nf4_dequantize(w).to(x.dtype)
        return torch.addmm(bias, x, dense.T, out=y) if bias is not None else torch.mm(x, dense.T, out=y)
    takes = _hook_takes(finish, m, y)
    fixup = not takes and _fixup(declined=finish is not None)
    if cfg.gemv:
        part = _launch_gemv(x, w, bias, y, cfg)
    elif cfg.regs and regs_fit(x, w.codes, cfg):
        part = launch_regs(x, w.codes, w.absmax, _lookup_table(x.device, x.dtype, LOOKUP_PRMT), bias, y, cfg)
    elif cfg.ss and ss_fit(x, w.codes):
        part = launch_ss(x, w.codes, w.absmax, _lookup_table(x.device, x.dtype, LOOKUP_PRMT), bias, y, cfg)
    else:
        part = _launch(x, w, bias, y, pick_config(m, n, k, gemv=False) if cfg.regs or cfg.ss else cfg, fixup=fixup)
    if part is not None and not (takes and finish(part, bias, y)):
        _reduce(part, bias, y)
    return y


def _served_config(x: torch.Tensor, w: NF4Weight, finish: Finish | None) -> Nf4Config:
    """The config nf4_matmul runs without one given: nf4_regs_kernel's or nf4_ss_kernel's where served and fitting,
    else the recorded one (pick_config; `alone` where no LoRA shrink runs beside the matmul)."""
    m, k = x.shape
    regs = regs_config(m, w.shape[0], k)
    if regs is not None and regs_fit(x, w.codes, regs):
        return regs
    ss = ss_config(m, w.shape[0], k)
    if ss is not None and ss_fit(x, w.codes):
        return ss
    return pick_config(m, w.shape[0], k, alone=finish is None or getattr(finish, "alone", False))


def _hook_takes(finish: Finish | None, m: int, y: torch.Tensor) -> bool:
    """Whether the finish hook would sum the splits itself: its `takes(m, y)` if it has one; a hook without it
    may, so it gets the sums."""
    if finish is None:
        return False
    takes = getattr(finish, "takes", None)
    return True if takes is None else takes(m, y)


def stages(cfg: Nf4Config, x_dtype: torch.dtype, by_tma: bool) -> int:
    """The pipeline stages of a launch: the config's, but Triton 3.6's pipeliner aborts on 2-stage TMA loops over fp32
    x (compiled for sm_90 without a GPU: tests/test_nf4_compile.py), so fp32 x takes at least 3 there."""
    return max(cfg.stages, 3) if by_tma and x_dtype == torch.float32 else cfg.stages


def x_by_tma(cfg: Nf4Config, x_dtype: torch.dtype) -> bool:
    """Whether a launch of `cfg` over x_dtype x reads x by TMA where x's rows are aligned: 16-bit x only (a
    [rows, 64] box of fp32 would pass the 128-byte swizzle span)."""
    return cfg.x_tma and x_dtype.itemsize == 2


def _launch(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None, y: torch.Tensor,
            cfg: Nf4Config, fixup: bool = False) -> torch.Tensor | None:
    """The matmul kernel writing y, or (split K) its fp32 sums, returned for the reduce; with `fixup` (where
    _counts allows it) the kernel sums the splits into y itself and None is returned."""
    m, k = x.shape
    n = w.shape[0]
    split = cfg.split_k
    groups = w.codes.shape[1] // 64
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    grid = (triton.cdiv(m, cfg.rows) * triton.cdiv(n, cfg.block_n), split)
    exact = cfg.scale == SCALE_EXACT
    lookup = cfg.lookup if not exact and x.is_cuda and x.dtype != torch.float32 else LOOKUP_TABLE
    lut = _lookup_table(x.device, torch.float32 if exact else x.dtype, lookup)
    even = cfg.even and n % cfg.block_n == 0 and k % 128 == 0 and groups % split == 0
    by_tma = cfg.tma and not cfg.prefetch and tma(x)  # else the same tile with pointer loads (before Hopper)
    codes = TensorDescriptor.from_tensor(w.codes, [cfg.block_n, 64]) if by_tma else w.codes
    x_tma = (by_tma and x_by_tma(cfg, x.dtype) and x.data_ptr() % 16 == 0
             and x.stride(0) * x.element_size() % 16 == 0)  # a descriptor needs 16-byte aligned rows
    xs = TensorDescriptor.from_tensor(x, [cfg.block_m, 64]) if x_tma else x
    xt = TensorDescriptor.from_tensor(x, [cfg.tail_m, 64]) if x_tma and cfg.tail_m else x
    counts = _counts(x.device, grid[0]) if fixup and split > 1 else None
    nf4_matmul_kernel[grid](
        xs, xt, codes, w.absmax, lut, bias if bias is not None else y, y, part, part if counts is None else counts,
        m, n, k, groups, x.stride(0), w.codes.stride(0), w.absmax.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, W_DTYPE=_TL[w.dtype], PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        SCALE=cfg.scale, SWAP_AB=cfg.swap_ab, LOOKUP=lookup,
        V_DTYPE=_TL[x.dtype], TABLE_REGS=cfg.table_regs, PREFETCH=cfg.prefetch, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, SPLIT_K=split, ITERS=triton.cdiv(groups, split), GROUP_M=cfg.group_m, EVEN=even,
        TMA=by_tma, TAIL_M=cfg.tail_m, X_TMA=x_tma, FIXUP=counts is not None, num_warps=cfg.warps,
        num_stages=stages(cfg, x.dtype, by_tma), **pdl_args(x),
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )
    return part if split > 1 and counts is None else None


def _launch_gemv(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None, y: torch.Tensor,
                 cfg: Nf4Config) -> torch.Tensor | None:
    m, k = x.shape
    n = w.shape[0]
    if m > cfg.block_m:
        raise ValueError(f"a gemv config serves M <= block_m ({cfg.block_m}), got M = {m}")
    split = cfg.split_k
    groups = w.codes.shape[1] // 64
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    # the register lookup needs 16-bit x on NVIDIA (its table words are x's dtype); the table loads read fp32 values
    # (exact code values), as everything after the lookup is fp32
    lookup = cfg.lookup if x.is_cuda and x.dtype != torch.float32 else LOOKUP_TABLE
    lut = _lookup_table(x.device, x.dtype if lookup == LOOKUP_PRMT else torch.float32, lookup)
    nf4_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, w.codes, w.absmax, lut, bias if bias is not None else y, y, part,
        m, n, k, groups, x.stride(0), w.codes.stride(0), w.absmax.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, LOOKUP=lookup, V_DTYPE=_TL[x.dtype], TABLE_REGS=cfg.table_regs,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, G=cfg.k_groups, SPLIT_K=split,
        ITERS=triton.cdiv(triton.cdiv(groups, cfg.k_groups), split), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return part if split > 1 else None
