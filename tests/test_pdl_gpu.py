"""Programmatic dependent launch (kernels._launch) on a CUDA device: a chain of dependent kernels shaped like a
decoder layer's decode path, eagerly and from a CUDA graph, gives the same bits with PDL as without. A kernel
that read its input before the kernel before it finished would differ. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from nf4_cases import packed_group, quantize

from hotlora.kernels import _launch
from hotlora.kernels.attention import paged_attention
from hotlora.kernels.elementwise import add_rms_norm, silu_mul
from hotlora.kernels.nf4 import nf4_matmul

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

D, INTER, HEADS, KV_HEADS, HEAD_DIM, CTX, BLOCK = 1024, 2816, 8, 2, 128, 300, 16


def _chain(h, norm, w_qkv, w_o, w_up, w_down, caches, meta, layers=4):
    """h [T, D] through `layers` of norm -> qkv -> attention -> o -> norm -> gate/up -> SiLU*mul -> down, each
    kernel reading what the one before wrote. Returns h (updated in place)."""
    k_cache, v_cache = caches
    delta = None
    for _ in range(layers):
        x = add_rms_norm(h, delta, norm, 1e-5)
        qkv = nf4_matmul(x, w_qkv)
        q = qkv[:, : HEADS * HEAD_DIM].reshape(-1, HEADS, HEAD_DIM).contiguous()
        attn = paged_attention(q, k_cache, v_cache, *meta, HEAD_DIM ** -0.5, max_q_len=1, max_ctx_len=CTX)
        x = add_rms_norm(h, nf4_matmul(attn.reshape(-1, HEADS * HEAD_DIM), w_o), norm, 1e-5)
        gu = nf4_matmul(x, w_up)
        delta = nf4_matmul(silu_mul(gu[:, :INTER], gu[:, INTER:]), w_down)
    return add_rms_norm(h, delta, norm, 1e-5)


def _setup(tokens: int):
    torch.manual_seed(0)
    dt = torch.bfloat16
    w_qkv = packed_group(quantize((HEADS * HEAD_DIM, 2 * KV_HEADS * HEAD_DIM), D, dt, "cuda"))
    w_o = packed_group(quantize((D,), HEADS * HEAD_DIM, dt, "cuda"))
    w_up = packed_group(quantize((INTER, INTER), D, dt, "cuda"))
    w_down = packed_group(quantize((D,), INTER, dt, "cuda"))
    norm = torch.rand(D, dtype=dt, device="cuda") + 0.5
    blocks = tokens * -(-CTX // BLOCK)
    caches = tuple(torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=dt, device="cuda") for _ in range(2))
    cu = torch.arange(tokens + 1, dtype=torch.int32, device="cuda")
    ctx = torch.full((tokens,), CTX, dtype=torch.int32, device="cuda")
    tables = torch.arange(blocks, dtype=torch.int32, device="cuda").reshape(tokens, -1)
    meta = (cu, ctx, tables)
    h0 = torch.randn(tokens, D, dtype=dt, device="cuda")
    return h0, (norm, w_qkv, w_o, w_up, w_down, caches, meta)


def _run(monkeypatch, pdl: bool, tokens: int, graph: bool) -> torch.Tensor:
    monkeypatch.setenv("HOTLORA_NO_PDL", "0" if pdl else "1")
    h0, args = _setup(tokens)
    h = h0.clone()
    if not graph:
        return _chain(h, *args).clone()
    _chain(h, *args)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _chain(h, *args)
    h.copy_(h0)
    g.replay()
    torch.cuda.synchronize()
    return out.clone()


@pytest.mark.parametrize("tokens", [1, 8])
def test_gpu_pdl_chain_same_bits(monkeypatch, tokens):
    """PDL is on for this device (Hopper or newer) and the chain's output is bit-identical with it and without,
    eager and replayed from a graph."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs Hopper or newer")
    monkeypatch.setenv("HOTLORA_NO_PDL", "0")
    assert _launch.pdl_args(torch.empty(1, device="cuda")) == {"PDL": True, "launch_pdl": True}
    want = _run(monkeypatch, False, tokens, graph=False)
    assert torch.isfinite(want.float()).all()
    for graph in (False, True):
        got = _run(monkeypatch, True, tokens, graph)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), graph
    assert torch.equal(_run(monkeypatch, False, tokens, graph=True).view(torch.int16), want.view(torch.int16))
