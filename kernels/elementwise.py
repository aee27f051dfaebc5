"""Fused elementwise ops of a decoder layer: each replaces a chain of small torch kernels with one launch.

    add_rms_norm(h, delta, weight, eps) -> x           in place on h when delta is given:
        if delta is not None: h += delta                 (rounded to h's dtype, as torch's add)
        x = weight * (h.float() * rsqrt(mean(h.float() ** 2, -1) + eps)).to(h.dtype)
        h, delta, x: [T, D] (unit column stride), weight [D], one float dtype

    silu_mul(gate, up) -> y = silu(gate.float()).to(dtype) * up     gate, up [T, I] (views allowed), y [T, I]

    rope_kv_(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
        for x in (q, k): in place on q [T, H, Dh] and k [T, KVH, Dh]
            c, s = cos[positions], sin[positions]      # tables [max_len, Dh] (the halves repeated)
            x = x * c + cat(-x[..., Dh/2:], x[..., :Dh/2]) * s    (fp32 math, one rounding)
        k_cache.view(-1, KVH, Dh)[slots] = k; v_cache.view(-1, KVH, Dh)[slots] = v   (slots int64 [T])
        caches [blocks, block_size, KVH, Dh]; a slot repeated (graph padding) gets any one of its rows
        caches of k's dtype, or float8_e4m3fn: then k and v go in as to_cache(x) = x.float() clamped to +-448
        and rounded to nearest even (kernels.reference.to_cache; unscaled, as vLLM's fp8 cache without scales)

CUDA tensors go to Triton; CPU tensors to the torch references in hotlora.kernels.reference (bit-identical to
the unfused model code), unless HOTLORA_TRITON_CPU=1 (with TRITON_INTERPRET=1).

Own kernels rather than torch.compile (inductor) of the references: bench/elementwise.py on the H200 (bf16,
CUDA-graph timing) had inductor within -9..+14% on add_rms_norm and silu_mul at 1-2048 tokens, and 4-5x slower on
rope_kv at decode sizes (14 us against 2.7-3.4 us at 1-32 tokens: its scatter into the cache is separate
kernels); the ~0.3 us inductor saves on add_rms_norm at decode is 0.02 ms of a 5-ms step, and a compile step
at start-up costs more than that buys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_rows
from ._launch import pdl_args, pdl_enter, use_triton
from .reference import FP8_KV, FP8_KV_MAX, add_rms_norm_ref, rope_kv_ref, silu_mul_ref

__all__ = ["add_rms_norm", "rope_kv_", "silu_mul"]


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, x_ptr, D, stride_h, stride_d, stride_x, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        h = (h.to(tl.float32) + tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32))
        h = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
    normed = (hf * inv).to(h_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * stride_x + offs, (w * normed).to(x_ptr.dtype.element_ty), mask=mask)


def check_add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> None:
    """add_rms_norm's arguments (also kernels.lora_fused.norm_shrink's): h [T, D] rows with unit column stride,
    delta like h (its stride is checked where a kernel reads it), weight [D]."""
    check_rows(h, "h")
    if delta is not None and (delta.shape != h.shape or delta.dtype != h.dtype):
        raise ValueError(f"delta must match h {tuple(h.shape)} {h.dtype}, got {tuple(delta.shape)} {delta.dtype}")
    if weight.shape != (h.shape[1],):
        raise ValueError(f"weight must be [{h.shape[1]}], got {tuple(weight.shape)}")


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta (in place, if given); returns RMSNorm(h) * weight (module docstring)."""
    check_add_rms_norm(h, delta, weight)
    if not use_triton(h):
        return add_rms_norm_ref(h, delta, weight, eps)
    if delta is not None:
        check_rows(delta, "delta")
    x = torch.empty_like(h, memory_format=torch.contiguous_format)
    if h.shape[0]:
        _add_rms_norm_kernel[(h.shape[0],)](
            h, delta if delta is not None else h, weight, x, h.shape[1], h.stride(0),
            delta.stride(0) if delta is not None else 0, x.stride(0), eps,
            HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(h.shape[1]), num_warps=8, **pdl_args(h),
        )
    return x


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, width, stride_g, stride_u, stride_y, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


def check_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> None:
    """silu_mul's arguments (also kernels.lora_fused.silu_mul_shrink's): gate and up [T, I] alike, rows with unit
    column stride."""
    check_rows(gate, "gate")
    check_rows(up, "up")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, [T, I] (module docstring)."""
    check_silu_mul(gate, up)
    if not use_triton(gate):
        return silu_mul_ref(gate, up)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.shape[0]:
        block = 1024
        _silu_mul_kernel[(gate.shape[0], triton.cdiv(gate.shape[1], block))](
            gate, up, y, gate.shape[1], gate.stride(0), up.stride(0), y.stride(0), BLOCK=block, **pdl_args(y))
    return y


FP8_MAX = tl.constexpr(FP8_KV_MAX)


@triton.jit
def _cached(x, cache_ptr, FP8: tl.constexpr):
    """x as the cache at cache_ptr stores it (kernels.reference.to_cache)."""
    if FP8:
        x = _fp8_round(tl.minimum(tl.maximum(x.to(tl.float32), -FP8_MAX), FP8_MAX))
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _fp8_round(x):
    """x (fp32, |x| <= 448) rounded to nearest even on the float8_e4m3fn grid (3 mantissa bits, subnormals
    spaced 2^-9), in fp32: the conversion that follows is then exact. The GPU's conversion rounds so too, but
    Triton 3.6's interpreter does not (it halves values that round up into the next binade, e.g. -125 -> -64),
    and CI tests the kernel there."""
    bits = x.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    ulp = ((exp + 124) << 23).to(tl.float32, bitcast=True)  # 2^(exp - 3)
    r = tl.abs(x) / ulp
    f = tl.floor(r)
    half = r - f
    up = (half > 0.5) | ((half == 0.5) & (f - 2.0 * tl.floor(f * 0.5) != 0.0))
    y = (f + up.to(tl.float32)) * ulp
    return tl.where(bits < 0, -y, y)


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, H, KVH,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                    stride_c, HALF: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    """One program per (token, head): heads [0, H) are q's, [H, H + KVH) k's (rotated, then also stored in
    the cache), the rest v's (copied to the cache)."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    head = tl.program_id(1)
    offs = tl.arange(0, HALF)
    slot = tl.load(slot_ptr + t)
    if head >= H + KVH:
        kvh = head - H - KVH
        src = v_ptr + t * stride_vt + kvh * stride_vh
        dst = vc_ptr + slot * stride_cs + kvh * stride_ch
        tl.store(dst + offs, _cached(tl.load(src + offs), vc_ptr, FP8))
        tl.store(dst + HALF + offs, _cached(tl.load(src + HALF + offs), vc_ptr, FP8))
        return
    if head < H:  # noqa: SIM108 (a run-time branch choosing the tensor)
        base = q_ptr + t * stride_qt + head * stride_qh
    else:
        base = k_ptr + t * stride_kt + (head - H) * stride_kh
    pos = tl.load(pos_ptr + t)
    x1 = tl.load(base + offs).to(tl.float32)
    x2 = tl.load(base + HALF + offs).to(tl.float32)
    c1 = tl.load(cos_ptr + pos * stride_c + offs).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_c + HALF + offs).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_c + offs).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_c + HALF + offs).to(tl.float32)
    y1 = (x1 * c1 - x2 * s1).to(q_ptr.dtype.element_ty)
    y2 = (x2 * c2 + x1 * s2).to(q_ptr.dtype.element_ty)
    tl.store(base + offs, y1)
    tl.store(base + HALF + offs, y2)
    if head >= H:
        dst = kc_ptr + slot * stride_cs + (head - H) * stride_ch
        tl.store(dst + offs, _cached(y1, kc_ptr, FP8))
        tl.store(dst + HALF + offs, _cached(y2, kc_ptr, FP8))


def rope_kv_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Rotate q [T, H, Dh] and k [T, KVH, Dh] in place by each token's position, and write k and v [T, KVH, Dh]
    into the caches at `slots` (module docstring): one launch for what took a rope kernel and two index copies."""
    _check_rope_kv(q, k, v, cos, sin, k_cache, v_cache)
    dh = q.shape[2]
    if not use_triton(q) or dh & (dh - 1):  # Triton ranges need a power-of-two half
        rope_kv_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
        return
    if q.shape[0] == 0:
        return
    kc, vc = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    kvh = k.shape[1]
    _rope_kv_kernel[(q.shape[0], q.shape[1] + 2 * kvh)](
        q, k, v, kc, vc, positions, slots, cos, sin, q.shape[1], kvh, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), kc.stride(0), kc.stride(1), cos.stride(0), HALF=dh // 2,
        FP8=kc.dtype == FP8_KV, **pdl_args(q),
    )


def _check_rope_kv(q, k, v, cos, sin, k_cache, v_cache) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[2] != k.shape[2] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q [T, H, Dh] and k [T, KVH, Dh] must agree, got {tuple(q.shape)} {tuple(k.shape)}")
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"v must match k {tuple(k.shape)} {k.dtype}, got {tuple(v.shape)} {v.dtype}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (k.dtype, FP8_KV):
        raise TypeError(f"the KV caches must both be {k.dtype} or {FP8_KV}, got {k_cache.dtype} / {v_cache.dtype}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches [blocks, block_size, {k.shape[1]}, {k.shape[2]}] expected, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v, cos)) or cos.shape != sin.shape or sin.stride(1) != 1:
        raise ValueError("q, k, v and the cos/sin tables need unit stride in the head dimension")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
