"""The warp-specialized Gluon NF4 kernel (kernels._nf4_gluon, Nf4Config.ws) on a Hopper GPU: against bitsandbytes'
dequantization in fp32, at Llama-3-8B sizes and at sizes that are not multiples of its tiles, with bias, in
fp16 and bf16, and captured in a CUDA graph. Skipped without a Hopper-or-newer GPU (the interpreter cannot run
Gluon; CI tests the tl.dot kernel it stands beside)."""

from __future__ import annotations

import pytest
import torch
from nf4_cases import LLAMA, TOLERANCE, packed_group, quantize, reference, rel_err

from hotlora.kernels.nf4 import Nf4Config, nf4_matmul

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                       reason="needs a Hopper-or-newer GPU"),
]

TILES = [Nf4Config(256, 128, warps=4, stages=2, ws=True), Nf4Config(128, 128, warps=8, stages=3, ws=True),
         Nf4Config(128, 64, warps=4, stages=3, ws=True)]


@pytest.mark.parametrize("shape", list(LLAMA))
def test_gpu_ws_llama_sizes(shape):
    k, widths = LLAMA[shape]
    members = quantize(widths, k, torch.bfloat16, "cuda")
    w = packed_group(members)
    for m in (1, 100, 257, 512, 1000):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        ref = reference(x, members, None)
        for cfg in TILES:
            assert rel_err(nf4_matmul(x, w, config=cfg), ref) < TOLERANCE[torch.bfloat16], (m, cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_ws_ragged_sizes_and_bias(dtype):
    # SmolLM2's 576 -> 1536 and 576 -> 192: K not a multiple of 128, N not a multiple of the tile
    for k, widths in ((576, (1536,)), (576, (192,)), (1024, (320, 64, 64))):
        members = quantize(widths, k, dtype, "cuda")
        w = packed_group(members)
        bias = torch.randn(sum(widths), dtype=dtype, device="cuda")
        for m in (3, 130, 300):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            for b in (None, bias):
                got = nf4_matmul(x, w, b, config=TILES[0])
                assert rel_err(got, reference(x, members, b)) < TOLERANCE[dtype], (k, widths, m, b is None)


def test_gpu_ws_graph_capture_and_replay():
    k, widths = LLAMA["down"]
    members = quantize(widths, k, torch.bfloat16, "cuda")
    w = packed_group(members)
    x = torch.randn(384, k, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(384, w.shape[0], dtype=torch.bfloat16, device="cuda")
    nf4_matmul(x, w, out=out, config=TILES[0])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nf4_matmul(x, w, out=out, config=TILES[0])
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, members, None)) < TOLERANCE[torch.bfloat16]
