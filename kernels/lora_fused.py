"""The LoRA shrink inside the kernel that writes its input ("producer-fused"), for steps of a few tokens.

    norm_shrink(h, delta, weight, eps, slices, meta) -> (h2, x)
        h2 = h + delta (rounded to h's dtype; out of place, h is left as it was)
        x  = add_rms_norm's x of h2 (kernels.elementwise: the same math and rounding)
        and the shrink of x for every slice (below)
    silu_mul_shrink(gate, up, slices, meta) -> y
        y  = silu_mul(gate, up) (kernels.elementwise), and the shrink of y for every slice

The shrink's result goes to meta.workspace as meta.split_k partial sums over in_features: for every token t of
a slot s (-1 or >= num_slots: none) and slice i with r = slices[i].rank[s] > 0, p = meta.token_pos[t],

    meta.workspace[:, i, p, :r].sum(0) == x[t].float() @ slices[i].a[row_start[s] : row_start[s] + r].float().T

(each of the split_k programs of a token covers 1/split_k of the columns; every part is written, zeros where a
program's columns run past the end). ``lora_project(..., shrunk=True)`` then reads the parts: the finish
(or the expand) adds them up before the B product. The parts are fp32 and summed in a fixed order, so the
result is deterministic.

Why: at decode sizes the separate shrink launch on a side stream costs more than its bytes (at batch 1, ~4.7 us
per projection group for its fork, join and launch against ~0.1 us of bytes; BENCHMARKS.md, ninth session).
Here the shrink rides on a kernel the layer launches anyway, split over split_k programs per token so that its
A rows (384 KB for q/k/v at r=16) are read by many SMs. The residual add is out of place because every program
reads the whole row for the norm: one program writing h while another reads it would be a race.

CUDA tensors go to Triton; CPU tensors to the references (kernels.reference.norm_shrink_ref and
silu_mul_shrink_ref), unless HOTLORA_TRITON_CPU=1 (with TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _interp_compat
from ._checks import check_rows, check_slices, check_x
from ._launch import pdl_args, pdl_enter, use_triton
from ._meta import LoraMeta, LoraSlice
from .elementwise import check_add_rms_norm, check_silu_mul
from .lora import _pad3
from .reference import norm_shrink_ref, silu_mul_shrink_ref

__all__ = ["norm_shrink", "silu_mul_shrink"]

_interp_compat.install()


@triton.jit
def _first_rows(a_ptr, stride_a, rank_ptr, slot, valid, row0, c, c_mask, BLOCK_R: tl.constexpr):
    """(the slot's rank for this slice, 0 if no slot; its first BLOCK_R rows of a, columns c)."""
    rank = tl.load(rank_ptr + slot, mask=valid, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    a = tl.load(a_ptr + (row0 + offs_r)[:, None] * stride_a + c[None, :],
                mask=(offs_r < rank)[:, None] & c_mask[None, :], other=0.0)
    return rank, a


@triton.jit
def _preload(t, c, c_mask, a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2, rank0_ptr, rank1_ptr, rank2_ptr,
             slots_ptr, pos_ptr, row_start_ptr, num_slots, NUM_SLICES: tl.constexpr, BLOCK_R: tl.constexpr):
    """Token t's slot and every slice's first A rows at columns c: none of it is written by the kernel before, so
    it is loaded ahead of the PDL wait (a chain of dependent loads that would otherwise follow the norm)."""
    slot = tl.load(slots_ptr + t)
    valid = (slot >= 0) & (slot < num_slots)
    slot = tl.where(valid, slot, 0)
    row0 = tl.load(row_start_ptr + slot, mask=valid, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    r0, t0 = _first_rows(a0_ptr, stride_a0, rank0_ptr, slot, valid, row0, c, c_mask, BLOCK_R)
    r1, t1, r2, t2 = r0 * 0, t0, r0 * 0, t0
    if NUM_SLICES > 1:
        r1, t1 = _first_rows(a1_ptr, stride_a1, rank1_ptr, slot, valid, row0, c, c_mask, BLOCK_R)
    if NUM_SLICES > 2:
        r2, t2 = _first_rows(a2_ptr, stride_a2, rank2_ptr, slot, valid, row0, c, c_mask, BLOCK_R)
    return row0, pos, r0, t0, r1, t1, r2, t2


@triton.jit
def _shrink_slice(xc, a, rank, c, c_mask, a_ptr, stride_a, row0, out_ptr, BLOCK_R: tl.constexpr):
    """out[:rank] = xc @ a[row0 : row0 + rank, c].T in fp32 (this part's columns); `a`: the first BLOCK_R rows."""
    offs_r = tl.arange(0, BLOCK_R)
    tl.store(out_ptr + offs_r, tl.sum(a.to(tl.float32) * xc[None, :], axis=1), mask=offs_r < rank)
    for r0 in range(BLOCK_R, rank, BLOCK_R):  # ranks above the largest class
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        a = tl.load(a_ptr + (row0 + offs_r)[:, None] * stride_a + c[None, :], mask=r_mask[:, None] & c_mask[None, :],
                    other=0.0)
        tl.store(out_ptr + offs_r, tl.sum(a.to(tl.float32) * xc[None, :], axis=1), mask=r_mask)


@triton.jit
def _store_parts(xc, c, c_mask, part, row0, pos, r0, t0, r1, t1, r2, t2, a0_ptr, a1_ptr, a2_ptr, stride_a0,
                 stride_a1, stride_a2, ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
                 NUM_SLICES: tl.constexpr, BLOCK_R: tl.constexpr):
    """Part `part` of every slice's shrink of x (module docstring); xc fp32 [BLOCK_C], 0 where masked."""
    out = ws_ptr + part * stride_ws_split + pos * stride_ws_pos
    _shrink_slice(xc, t0, r0, c, c_mask, a0_ptr, stride_a0, row0, out, BLOCK_R)
    if NUM_SLICES > 1:
        _shrink_slice(xc, t1, r1, c, c_mask, a1_ptr, stride_a1, row0, out + stride_ws_slice, BLOCK_R)
    if NUM_SLICES > 2:
        _shrink_slice(xc, t2, r2, c, c_mask, a2_ptr, stride_a2, row0, out + 2 * stride_ws_slice, BLOCK_R)


@triton.jit
def _norm_shrink_kernel(
    h_ptr, d_ptr, w_ptr, h2_ptr, x_ptr, D, chunk, stride_h, stride_d, stride_h2, stride_x, eps,
    a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2, rank0_ptr, rank1_ptr, rank2_ptr,
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos, slots_ptr, pos_ptr, row_start_ptr, num_slots,
    NUM_SLICES: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (token, part): the row's norm from the whole row, then h2, x and the shrink of its columns."""
    t = tl.program_id(0)
    part = tl.program_id(1)
    c = part * chunk + tl.arange(0, BLOCK_C)
    c_mask = (tl.arange(0, BLOCK_C) < chunk) & (c < D)
    row0, pos, r0, t0, r1, t1, r2, t2 = _preload(
        t, c, c_mask, a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2, rank0_ptr, rank1_ptr, rank2_ptr,
        slots_ptr, pos_ptr, row_start_ptr, num_slots, NUM_SLICES, BLOCK_R)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    pdl_enter(PDL)
    dtype = h_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(h_ptr + t * stride_h + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        h = (h.to(tl.float32) + tl.load(d_ptr + t * stride_d + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)  # as elementwise._add_rms_norm_kernel
    hc = tl.load(h_ptr + t * stride_h + c, mask=c_mask, other=0.0)
    if HAS_DELTA:
        hc = (hc.to(tl.float32) + tl.load(d_ptr + t * stride_d + c, mask=c_mask, other=0.0).to(tl.float32)).to(dtype)
    tl.store(h2_ptr + t * stride_h2 + c, hc, mask=c_mask)
    normed = (hc.to(tl.float32) * inv).to(dtype).to(tl.float32)
    xc = (w * normed).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + t * stride_x + c, xc, mask=c_mask)
    _store_parts(xc.to(tl.float32), c, c_mask, part, row0, pos, r0, t0, r1, t1, r2, t2, a0_ptr, a1_ptr, a2_ptr,
                 stride_a0, stride_a1, stride_a2, ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
                 NUM_SLICES, BLOCK_R)


@triton.jit
def _silu_mul_shrink_kernel(
    g_ptr, u_ptr, y_ptr, width, chunk, stride_g, stride_u, stride_y,
    a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2, rank0_ptr, rank1_ptr, rank2_ptr,
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos, slots_ptr, pos_ptr, row_start_ptr, num_slots,
    NUM_SLICES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (token, part): y's columns of the part, as elementwise._silu_mul_kernel, and their shrink."""
    t = tl.program_id(0)
    part = tl.program_id(1)
    c = part * chunk + tl.arange(0, BLOCK_C)
    c_mask = (tl.arange(0, BLOCK_C) < chunk) & (c < width)
    row0, pos, r0, t0, r1, t1, r2, t2 = _preload(
        t, c, c_mask, a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2, rank0_ptr, rank1_ptr, rank2_ptr,
        slots_ptr, pos_ptr, row_start_ptr, num_slots, NUM_SLICES, BLOCK_R)
    pdl_enter(PDL)
    g = tl.load(g_ptr + t * stride_g + c, mask=c_mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + t * stride_u + c, mask=c_mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    yc = (act * u).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + t * stride_y + c, yc, mask=c_mask)
    _store_parts(yc.to(tl.float32), c, c_mask, part, row0, pos, r0, t0, r1, t1, r2, t2, a0_ptr, a1_ptr, a2_ptr,
                 stride_a0, stride_a1, stride_a2, ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
                 NUM_SLICES, BLOCK_R)


def _write_parts(shrink: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    """The references' shrink [n, T, max_rank] into the workspace parts: all of it in part 0, zeros in the rest."""
    ws = meta.workspace[:, : len(slices)]
    ws.zero_()
    ws[0].index_copy_(1, meta.token_pos.long(), shrink.to(ws.dtype))


def _lora_args(slices: Sequence[LoraSlice], meta: LoraMeta) -> list:
    a, ranks, ws = _pad3([sl.a for sl in slices]), _pad3([sl.rank for sl in slices]), meta.workspace
    return [*a, *(t.stride(0) for t in a), *ranks, ws, *ws.stride()[:3], meta.token_slots, meta.token_pos,
            meta.row_start, meta.num_slots]


def norm_shrink(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                slices: Sequence[LoraSlice], meta: LoraMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, RMSNorm(h + delta) * weight) and the shrink's parts (module docstring). h, delta: [T, D]
    in the LoRA weights' dtype, unit column stride; weight [D]."""
    check_add_rms_norm(h, delta, weight)
    if delta is not None:
        check_rows(delta, "delta")
    check_slices(slices, meta)
    check_x(h, slices, meta)
    if not use_triton(h):
        h2, x, shrink = norm_shrink_ref(h, delta, weight, eps, slices, meta)
        _write_parts(shrink, slices, meta)
        return h2, x
    h2, x = torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(h)
    parts, d = meta.split_k, h.shape[1]
    chunk = triton.cdiv(d, parts)
    if h.shape[0]:
        _norm_shrink_kernel[(h.shape[0], parts)](
            h, delta if delta is not None else h, weight, h2, x, d, chunk, h.stride(0),
            delta.stride(0) if delta is not None else 0, h2.stride(0), x.stride(0), eps, *_lora_args(slices, meta),
            NUM_SLICES=len(slices), HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(d),
            BLOCK_C=triton.next_power_of_2(chunk), BLOCK_R=meta.rank_class, num_warps=8, **pdl_args(h),
        )  # fmt: skip
    return h2, x


def silu_mul_shrink(gate: torch.Tensor, up: torch.Tensor, slices: Sequence[LoraSlice],
                    meta: LoraMeta) -> torch.Tensor:
    """silu(gate) * up [T, I] and the shrink's parts of it (module docstring); gate and up may be views."""
    check_silu_mul(gate, up)
    check_slices(slices, meta)
    check_x(gate, slices, meta)
    if not use_triton(gate):
        y, shrink = silu_mul_shrink_ref(gate, up, slices, meta)
        _write_parts(shrink, slices, meta)
        return y
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    parts, width = meta.split_k, gate.shape[1]
    chunk = triton.cdiv(width, parts)
    if gate.shape[0]:
        _silu_mul_shrink_kernel[(gate.shape[0], parts)](
            gate, up, y, width, chunk, gate.stride(0), up.stride(0), y.stride(0), *_lora_args(slices, meta),
            NUM_SLICES=len(slices), BLOCK_C=triton.next_power_of_2(chunk), BLOCK_R=meta.rank_class, num_warps=8,
            **pdl_args(y),
        )  # fmt: skip
    return y
