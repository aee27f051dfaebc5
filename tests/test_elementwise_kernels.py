"""Fused elementwise kernels (hotlora.kernels.elementwise) against their torch references.

Under TRITON_INTERPRET=1 (CI) in fp32/fp16 at small sizes; bf16 and real sizes on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels.elementwise import add_rms_norm, rope_kv_, silu_mul
from hotlora.kernels.reference import FP8_KV, add_rms_norm_ref, rope_kv_ref, rope_ref, silu_mul_ref, to_cache
from hotlora.server.model.rope import Rotary

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def device(kernel_device: str) -> str:  # conftest.kernel_device: the interpreter on the CPU, and the GPU
    return kernel_device


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    return ((a.float() - b.float()).norm() / b.float().norm()).item() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "width"), [(1, 576), (7, 96), (33, 4096)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(device, dtype, rows, width, with_delta):
    h = torch.randn(rows, width, dtype=dtype, device=device)
    delta = torch.randn(rows, width, dtype=dtype, device=device) if with_delta else None
    w = torch.randn(width, dtype=dtype, device=device)
    h_ref = h.clone()
    want = add_rms_norm_ref(h_ref, None if delta is None else delta.clone(), w, 1e-5)
    got = add_rms_norm(h, delta, w, 1e-5)
    assert close(got, want, dtype)
    assert torch.equal(h, h_ref)  # the residual add rounds exactly as torch's


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_on_views(device, dtype):
    both = torch.randn(9, 2 * 1536, dtype=dtype, device=device)  # gate/up as column views of one tensor
    gate, up = both.split(1536, dim=1)
    assert close(silu_mul(gate, up), silu_mul_ref(gate, up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 1, 128)])
def test_rope_kv_on_fused_qkv_views(device, dtype, heads, kv_heads, dim):
    """q and k rotated in place on column views of one qkv output, k and v written to their cache slots (in
    blocks of 4), the other slots and v itself untouched."""
    rot = Rotary(dim, 10000.0, None, 64, device, dtype)
    qkv = torch.randn(5, (heads + 2 * kv_heads) * dim, dtype=dtype, device=device)
    q, k, v = (t.view(5, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1))
    positions = torch.tensor([0, 3, 17, 63, 5], device=device)
    slots = torch.tensor([9, 2, 14, 3, 0], device=device)
    caches = [torch.randn(4, 4, kv_heads, dim, dtype=dtype, device=device) for _ in range(2)]
    q_ref, k_ref, v_ref = q.clone(), k.clone(), v.clone()
    kc_ref, vc_ref = (c.clone() for c in caches)
    rope_kv_ref(q_ref, k_ref, v_ref, positions, rot.cos, rot.sin, kc_ref, vc_ref, slots)
    v_before = v.clone()
    rope_kv_(q, k, v, positions, rot.cos, rot.sin, *caches, slots)
    assert close(q, q_ref, dtype) and close(k, k_ref, dtype)
    assert torch.equal(v, v_before)
    kc, vc = (c.view(16, kv_heads, dim) for c in caches)
    assert close(kc[slots], k_ref, dtype) and torch.equal(vc[slots], v_before)
    kept = torch.ones(16, dtype=torch.bool, device=device)
    kept[slots] = False
    assert torch.equal(kc[kept], kc_ref.view(16, kv_heads, dim)[kept])
    assert torch.equal(vc[kept], vc_ref.view(16, kv_heads, dim)[kept])


# values whose float8_e4m3fn rounding is easy to get wrong: ties to even, rounding up into the next binade
# (-125 -> -128), subnormals (spacing 2^-9), past the largest finite value (448: saturates), signed zeros
FP8_EDGES = [5.25, -5.25, 5.75, 124.0, -125.08, 120.0, 2**-10, 3 * 2**-10, -(2**-9) * 0.5001, 464.0, -1000.0, 0.0,
             -0.0, 0.3, 1e-9, 447.9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_kv_into_fp8_caches(device, dtype):
    """Into float8_e4m3fn caches, k and v go in as to_cache rounds them (clamped to +-448, nearest even), the
    kernel and the reference alike; q and k themselves are rotated as with caches of their own dtype."""
    heads, kv_heads, dim = 4, 2, 16
    rot = Rotary(dim, 10000.0, None, 64, device, dtype)
    q = torch.randn(5, heads, dim, dtype=dtype, device=device) * 50
    k = torch.randn(5, kv_heads, dim, dtype=dtype, device=device) * 200
    v = torch.randn(5, kv_heads, dim, dtype=dtype, device=device) * 200
    v.view(-1)[: len(FP8_EDGES)] = torch.tensor(FP8_EDGES, dtype=dtype)
    positions, slots = torch.tensor([0, 3, 17, 63, 5], device=device), torch.tensor([9, 2, 14, 3, 0], device=device)
    got = [torch.zeros(4, 4, kv_heads, dim, dtype=FP8_KV, device=device) for _ in range(2)]
    want = [c.clone() for c in got]
    q_ref, k_ref, v_ref = q.clone(), k.clone(), v.clone()
    rope_kv_ref(q_ref, k_ref, v_ref, positions, rot.cos, rot.sin, *want, slots)
    rope_kv_(q, k, v, positions, rot.cos, rot.sin, *got, slots)
    assert close(q, q_ref, dtype) and close(k, k_ref, dtype)
    # value equality (the interpreter writes -0 as +0); the reference is to_cache of the rotated k and of v
    vc = got[1].view(16, kv_heads, dim).float()
    assert torch.equal(vc[slots], to_cache(v_ref, FP8_KV).float())
    assert torch.equal(vc, want[1].view(16, kv_heads, dim).float())
    # k is rotated by each side in its own rounding (fp16: off by up to ~2^-10 of the largest input), and each
    # rounds that to fp8 (3 mantissa bits): per element at most one fp8 step (1/8 of the value) apart, plus the
    # rotation's difference, which near zero spans many of fp8's small steps
    kc, kw = got[0].view(16, kv_heads, dim)[slots].float(), to_cache(k_ref, FP8_KV).float()
    assert ((kc - kw).abs() <= kw.abs() / 8 + 2**-9 * k_ref.abs().max().float()).all()
    assert vc.abs().max() == 448 and torch.equal(vc[slots].flatten()[:4].cpu(), torch.tensor([5.0, -5.0, 6.0, 128.0]))


def test_rope_reference_matches_rotary():
    """The in-place reference is the model's Rotary, bit for bit (the CPU path stays what it was)."""
    rot = Rotary(64, 10000.0, None, 32, "cpu", torch.float32)
    q, k = torch.randn(4, 3, 64), torch.randn(4, 1, 64)
    pos = torch.tensor([1, 2, 30, 0])
    want_q, want_k = rot(q, pos), rot(k, pos)
    rope_ref(q, k, pos, rot.cos, rot.sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_checks():
    with pytest.raises(ValueError, match="delta"):
        add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-5)
    with pytest.raises(ValueError, match="must match"):
        silu_mul(torch.randn(2, 8), torch.randn(2, 9))
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="must agree"):
        rope_kv_(torch.randn(2, 3, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8), torch.zeros(2, dtype=torch.long),
                 torch.randn(4, 8), torch.randn(4, 8), cache, cache, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="caches"):
        rope_kv_(torch.randn(2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.zeros(2, dtype=torch.long),
                 torch.randn(4, 8), torch.randn(4, 8), cache, torch.zeros(2, 4, 2, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="KV caches"):  # fp16 caches for fp32 k and v
        rope_kv_(torch.randn(2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.zeros(2, dtype=torch.long),
                 torch.randn(4, 8), torch.randn(4, 8), cache.half(), cache.half(), torch.zeros(2, dtype=torch.long))
