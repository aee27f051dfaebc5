"""The fused NF4 dequant-GEMM (hotlora.kernels.nf4) against bitsandbytes and an fp32 reference.

On the CPU the Triton kernel runs under TRITON_INTERPRET=1 (CI sets it) at small sizes in fp16/fp32: the
interpreter rounds bf16 wrongly (triton-lang/triton#11584), so bf16 and real sizes run on the GPU.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from hotlora.kernels import nf4 as nf4_mod
from hotlora.kernels.nf4 import (
    LOOKUP_PRMT,
    LOOKUP_PRMT_IMM,
    MAX_GEMV_M,
    SCALE_EXACT,
    SCALE_VALUES,
    Nf4Config,
    nf4_dequantize,
    nf4_matmul,
    pack_nf4,
    pack_nf4_group,
    pick_config,
)
from hotlora.kernels.reference import NF4_CODE, nf4_dequantize_ref

interpret = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1 (set by make test)"
)
gpu = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# relative Frobenius error of y against the fp32 reference, by x dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def quantize(widths: tuple[int, ...], k: int, dtype: torch.dtype, device: str = "cpu"):
    """bnb NF4 storage of random weights, one per member width: [(packed, state), ...]."""
    members = []
    for n in widths:
        w = torch.randn(n, k, dtype=dtype, device=device) * 0.05
        members.append(bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
    return members


def packed_group(members):
    return pack_nf4_group([pack_nf4(p, s) for p, s in members])


def reference(x: torch.Tensor, members, bias: torch.Tensor | None) -> torch.Tensor:
    """x.float() @ dequantize_4bit(W).float().T (+ bias): bitsandbytes' own dequantization."""
    w = torch.cat([bnbF.dequantize_4bit(p, s) for p, s in members]).to(x.dtype).float()
    y = x.float() @ w.T
    return y if bias is None else y + bias.float()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.fixture
def triton_cpu(monkeypatch):
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1")


def test_code_book_is_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE), bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
def test_reference_dequantizes_bit_identically(dtype, nested):
    w = torch.randn(48, 320, dtype=dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    got = nf4_dequantize_ref(pack_nf4(packed, state))
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), bnbF.dequantize_4bit(packed, state).view(torch.uint8))


@interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_dequantizes_bit_identically(triton_cpu, dtype):
    members = quantize((40, 24), 576, dtype)
    got = nf4_dequantize(packed_group(members))
    want = torch.cat([bnbF.dequantize_4bit(p, s) for p, s in members])
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


# (K, member widths): SmolLM2's 576->192 (k/v) and 576->1536 (gate), GQA q/k/v, a fused gate/up
SHAPES = {"kv": (576, (192,)), "gate": (576, (1536,)), "qkv": (128, (64, 16, 16)), "gate_up": (192, (80, 80))}
MS = (1, 3, 16, 33, 64, 257)


def _cases():
    out = []
    for i, m in enumerate(MS):
        for j, shape in enumerate(SHAPES):
            if m > 64 and shape == "gate":
                continue  # the interpreter is slow: one large-M case per other shape is enough
            dtype = (torch.float16, torch.float32)[(i + j) % 2]
            out.append(pytest.param(m, shape, dtype, (i + j) % 3 == 0, id=f"M{m}-{shape}-{str(dtype)[6:]}"))
    return out


@interpret
@pytest.mark.parametrize(("m", "shape", "dtype", "with_bias"), _cases())
def test_triton_matmul_matches_reference(triton_cpu, m, shape, dtype, with_bias):
    k, widths = SHAPES[shape]
    members = quantize(widths, k, dtype)
    w = packed_group(members)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(sum(widths), dtype=dtype) if with_bias else None
    y = nf4_matmul(x, w, bias)
    assert y.shape == (m, sum(widths)) and y.dtype == dtype
    assert rel_err(y, reference(x, members, bias)) < TOLERANCE[dtype]


CONFIGS = {
    "split2": Nf4Config(16, 16, split_k=2),
    "split3-scale-first": Nf4Config(16, 32, split_k=3, scale=SCALE_EXACT),
    "m32-scale-first": Nf4Config(32, 16, scale=SCALE_EXACT, group_m=2),
    "scale-values": Nf4Config(32, 16, split_k=2, scale=SCALE_VALUES),
    "scale-values-swap-ab": Nf4Config(64, 32, scale=SCALE_VALUES, swap_ab=True),
    "scale-exact-swap-ab": Nf4Config(32, 32, scale=SCALE_EXACT, swap_ab=True),
    "dense": Nf4Config(16, 16, dense=True),
    "swap-ab": Nf4Config(64, 32, split_k=2, swap_ab=True),
    "prefetch-split3": Nf4Config(16, 16, split_k=3, prefetch=True),
    "prefetch-swap-ab": Nf4Config(64, 32, swap_ab=True, prefetch=True),
}


@interpret
@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_configs_match_reference(triton_cpu, name):
    members = quantize((48,), 640, torch.float32)
    x = torch.randn(37, 640)
    bias = torch.randn(48)
    y = nf4_matmul(x, packed_group(members), bias, config=CONFIGS[name])
    assert rel_err(y, reference(x, members, bias)) < TOLERANCE[torch.float32]


@interpret
@pytest.mark.parametrize("swap_ab", [False, True])
def test_triton_scale_values_in_half_precision(triton_cpu, swap_ab):
    """SCALE_VALUES rounds absmax and each scaled code value to x's dtype: within fp16's tolerance, and no
    closer to the reference than that extra rounding allows (it is not SCALE_PARTIALS under another name)."""
    members = quantize((96,), 512, torch.float16)
    w = packed_group(members)
    x = torch.randn(40, 512, dtype=torch.float16)
    ref = reference(x, members, None)
    values = nf4_matmul(x, w, config=Nf4Config(64, 32, split_k=2, swap_ab=swap_ab, scale=SCALE_VALUES))
    partials = nf4_matmul(x, w, config=Nf4Config(64, 32, split_k=2, swap_ab=swap_ab))
    assert rel_err(values, ref) < TOLERANCE[torch.float16]
    assert not torch.equal(values, partials)


@interpret
@pytest.mark.parametrize("m", [3, 16, 40])
def test_triton_even_path_matches_reference(triton_cpu, m):
    """Shapes that tile evenly (N % block_n, K % 128, groups % split_k) take the unmasked loads."""
    members = quantize((64, 64), 512, torch.float16)
    w = packed_group(members)
    x = torch.randn(m, 512, dtype=torch.float16)
    cfg = pick_config(m, 128, 512, gemv=False)
    assert 128 % cfg.block_n == 0 and 4 % cfg.split_k == 0  # EVEN holds for the recorded config
    ref = reference(x, members, None)
    for even in (True, False):
        y = nf4_matmul(x, w, config=replace(cfg, even=even))
        assert rel_err(y, ref) < TOLERANCE[torch.float16], even


def test_cpu_path_is_the_reference():
    members = quantize((24,), 128, torch.float32)
    x = torch.randn(4, 128)
    y = nf4_matmul(x, packed_group(members))
    assert rel_err(y, reference(x, members, None)) < TOLERANCE[torch.float32]


def test_wrapper_checks():
    w = packed_group(quantize((16,), 128, torch.float32))
    with pytest.raises(ValueError, match="x must be"):
        nf4_matmul(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="x must be"):
        nf4_matmul(torch.randn(128, 2).T, w)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        nf4_matmul(torch.zeros(2, 128, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="bias"):
        nf4_matmul(torch.randn(2, 128), w, torch.randn(15))
    packed, state = bnbF.quantize_4bit(torch.randn(8, 96), blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_nf4(packed, state)
    packed, state = bnbF.quantize_4bit(torch.randn(8, 128), blocksize=128, quant_type="nf4")
    with pytest.raises(ValueError, match="blocksize 64"):
        pack_nf4(packed, state)


def test_configs_cover_every_m():
    for m in (1, MAX_GEMV_M, MAX_GEMV_M + 1, 16, 17, 64, 65, 2048, 10**6):
        cfg = nf4_mod.pick_config(m, 4096, 4096, gemv=True)
        assert cfg.gemv == (m <= MAX_GEMV_M)
        assert pick_config(m, 4096, 4096).gemv == (m <= MAX_GEMV_M and nf4_mod.SERVE_GEMV)
        assert cfg.block_m >= m if m <= 256 else cfg.dense
        assert not pick_config(m, 4096, 4096, gemv=False).gemv


def test_gemv_split_fills_the_gpu():
    """Few output tiles take more K slices (o, down); a wide output needs none (gate/up: no reduce launch)."""
    splits = {name: pick_config(1, sum(w), k, gemv=True).split_k for name, (k, w) in LLAMA.items()}
    assert splits["gate_up"] == 1 and splits["o"] > 1 and splits["down"] > 1
    assert pick_config(1, 192, 576, gemv=True).split_k <= 3  # never more slices than SmolLM2's 5 groups can fill


# --- the GEMV path (M <= MAX_GEMV_M): no tl.dot, each row's products summed per 64-block -----------------

GEMV_CASES = [  # (M, shape, dtype, bias): every M of the bucket, each shape, both dtypes, with and without bias
    (1, "kv", torch.float16, True), (2, "gate", torch.float32, False), (3, "qkv", torch.float16, False),
    (MAX_GEMV_M, "gate_up", torch.float32, True), (2, "kv", torch.float32, True), (4, "qkv", torch.float32, False),
]


@interpret
@pytest.mark.parametrize(("m", "shape", "dtype", "with_bias"), GEMV_CASES,
                         ids=[f"M{m}-{shape}-{str(dt)[6:]}{'-bias' * b}" for m, shape, dt, b in GEMV_CASES])
def test_gemv_matches_reference(triton_cpu, m, shape, dtype, with_bias):
    k, widths = SHAPES[shape]
    members = quantize(widths, k, dtype)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(sum(widths), dtype=dtype) if with_bias else None
    out = torch.full((m, sum(widths)), float("nan"), dtype=dtype)
    cfg = pick_config(m, sum(widths), k, gemv=True)
    y = nf4_matmul(x, packed_group(members), bias, out=out, config=cfg)
    assert y is out and cfg.gemv
    assert rel_err(y, reference(x, members, bias)) < TOLERANCE[dtype]


GEMV_CONFIGS = {  # K = 640 is 5 groups: slices and multi-group steps that run past the last group
    "split1-g1": Nf4Config(4, 16, 1, warps=1, gemv=True),
    "split3-g2": Nf4Config(4, 32, 3, gemv=True, k_groups=2),
    "split2-g4": Nf4Config(4, 16, 2, warps=2, gemv=True, k_groups=4),
    "split8-g1": Nf4Config(4, 64, 8, gemv=True),
}


@interpret
@pytest.mark.parametrize("name", list(GEMV_CONFIGS))
def test_gemv_configs_match_reference(triton_cpu, name):
    members = quantize((40, 8), 640, torch.float32)
    x = torch.randn(3, 640)
    bias = torch.randn(48)
    y = nf4_matmul(x, packed_group(members), bias, config=GEMV_CONFIGS[name])
    assert rel_err(y, reference(x, members, bias)) < TOLERANCE[torch.float32]


@interpret
def test_gemv_bucket_edge_agrees_with_the_dot_path(triton_cpu):
    """M = MAX_GEMV_M (GEMV) and MAX_GEMV_M + 1 (tl.dot) both match the reference; a GEMV config refuses
    more rows than it was built for."""
    members = quantize((192,), 576, torch.float32)
    w = packed_group(members)
    x = torch.randn(MAX_GEMV_M + 1, 576)
    for m in (MAX_GEMV_M, MAX_GEMV_M + 1):
        cfg = pick_config(m, 192, 576, gemv=True)
        assert cfg.gemv == (m == MAX_GEMV_M)
        y = nf4_matmul(x[:m], w, config=cfg)
        assert rel_err(y, reference(x[:m], members, None)) < TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="block_m"):
        nf4_matmul(x, w, config=Nf4Config(MAX_GEMV_M, 64, gemv=True))


# --- GPU: bf16, real sizes, graph capture ---------------------------------------------------------------

LLAMA = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
         "down": (14336, (4096,))}


@gpu
@cuda
@pytest.mark.parametrize("shape", list(LLAMA))
def test_gpu_bit_identical_and_matches(shape):
    k, widths = LLAMA[shape]
    members = quantize(widths, k, torch.bfloat16, "cuda")
    w = packed_group(members)
    want = torch.cat([bnbF.dequantize_4bit(p, s) for p, s in members])
    assert torch.equal(nf4_dequantize(w).view(torch.int16), want.view(torch.int16))
    for m in (1, 3, 16, 24, 33, 64, 128, 257, 2048):  # every M bucket of the recorded configs
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        ref = reference(x, members, None)
        assert rel_err(nf4_matmul(x, w), ref) < TOLERANCE[torch.bfloat16], m


@gpu
@cuda
def test_gpu_matches_bnb_matmul_and_bias():
    members = quantize((4096,), 4096, torch.bfloat16, "cuda")
    (p, s), w = members[0], packed_group(members)
    bias = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    for m in (1, 32, 512):
        x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
        want = bnb.matmul_4bit(x, p, bias=bias, quant_state=s).float()
        assert rel_err(nf4_matmul(x, w, bias), want) < TOLERANCE[torch.bfloat16], m


@gpu
@cuda
def test_gpu_cuda_graph_capture_and_replay():
    members = quantize((1024, 256, 256), 2048, torch.bfloat16, "cuda")
    w = packed_group(members)
    for m in (1, 48, 600):
        assert _replayed_error(members, w, m, None, None) < TOLERANCE[torch.bfloat16], m


def _replayed_error(members, w, m: int, bias: torch.Tensor | None, config: Nf4Config | None) -> float:
    """nf4_matmul of M = m rows (bf16, out=) captured in a CUDA graph, replayed on new x: its relative error."""
    x = torch.randn(m, w.shape[1], dtype=torch.bfloat16, device="cuda")
    out = torch.empty(m, w.shape[0], dtype=torch.bfloat16, device="cuda")
    nf4_matmul(x, w, bias, out=out, config=config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nf4_matmul(x, w, bias, out=out, config=config)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    return rel_err(out, reference(x, members, bias))


@gpu
@cuda
@pytest.mark.parametrize("shape", list(LLAMA))
def test_gpu_gemv_graph_capture_and_replay(shape):
    """Every M of the GEMV bucket at real sizes, bias and out=, captured into a CUDA graph and replayed
    (split-K with its reduce launch for o/q/k/v/down, a single launch for gate/up)."""
    k, widths = LLAMA[shape]
    n = sum(widths)
    members = quantize(widths, k, torch.bfloat16, "cuda")
    w = packed_group(members)
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    for m in range(1, MAX_GEMV_M + 1):
        cfg = pick_config(m, n, k, gemv=True)
        assert cfg.gemv
        assert _replayed_error(members, w, m, bias, cfg) < TOLERANCE[torch.bfloat16], m


@gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_gemv_configs_and_dtypes(dtype):
    """Register lookup (16-bit x) and table lookup (fp32 x), over the configs the sweep visits."""
    members = quantize((1536, 256, 256), 2048, dtype, "cuda")
    w = packed_group(members)
    x = torch.randn(3, 2048, dtype=dtype, device="cuda")
    ref = reference(x, members, None)
    for bn, split, warps, groups in ((16, 1, 1, 1), (32, 2, 2, 4), (64, 4, 4, 2), (128, 8, 8, 1)):
        cfg = Nf4Config(4, bn, split, warps=warps, gemv=True, k_groups=groups, lookup=LOOKUP_PRMT)
        assert rel_err(nf4_matmul(x, w, config=cfg), ref) < TOLERANCE[dtype], cfg


@gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_register_lookup_equals_table_lookup(dtype):
    """The prmt lookups (inline PTX: table words in registers, loaded uniform, or immediates) yield the same
    values as the table loads, with and without the unmasked (EVEN) path: equal outputs."""
    w = packed_group(quantize((256, 64), 1024, dtype, "cuda"))
    lookups = [(LOOKUP_PRMT, True), (LOOKUP_PRMT, False), (LOOKUP_PRMT_IMM, False)]
    for m in (1, 16, 40):
        x = torch.randn(m, 1024, dtype=dtype, device="cuda")
        for swap in (False, True):
            bm, bn = (16 if m <= 16 else 64), (64 if swap else 32)
            table = nf4_matmul(x, w, config=Nf4Config(bm, bn, swap_ab=swap, even=False))
            for (lookup, regs), even in itertools.product(lookups, (False, True)):
                cfg = Nf4Config(bm, bn, swap_ab=swap, lookup=lookup, table_regs=regs, even=even)
                assert torch.equal(nf4_matmul(x, w, config=cfg), table), (m, swap, lookup, regs, even)


@gpu
@cuda
@pytest.mark.parametrize("shape", ["qkv", "down"])
def test_gpu_scale_values_tiles(shape):
    """SCALE_VALUES in bf16 (which the interpreter cannot test) at real sizes, over the tiles that
    bench/nf4_gemm.py --scales sweeps, both register lookups, eagerly and replayed from a CUDA graph."""
    k, widths = LLAMA[shape]
    members = quantize(widths, k, torch.bfloat16, "cuda")
    w = packed_group(members)
    tiles = [(32, 64, 4, False), (64, 64, 4, True), (64, 128, 8, True), (128, 64, 4, True), (128, 128, 8, True),
             (256, 128, 8, True)]
    for (bm, bn, warps, swap), lookup, m in itertools.product(tiles, (LOOKUP_PRMT, LOOKUP_PRMT_IMM), (24, 200)):
        cfg = Nf4Config(bm, bn, 2, warps, swap_ab=swap, lookup=lookup, scale=SCALE_VALUES)
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        assert rel_err(nf4_matmul(x, w, config=cfg), reference(x, members, None)) < TOLERANCE[torch.bfloat16], cfg
    assert _replayed_error(members, w, 200, None, cfg) < TOLERANCE[torch.bfloat16]


@gpu
@cuda
def test_gpu_register_cap_configs():
    """A register cap (maxnreg: more programs per SM, spills allowed) changes no result."""
    members = quantize((1536, 256, 256), 2048, torch.bfloat16, "cuda")
    w = packed_group(members)
    for m in (1, 16, 33):
        x = torch.randn(m, 2048, dtype=torch.bfloat16, device="cuda")
        bm = max(16, 1 << (m - 1).bit_length())
        free = nf4_matmul(x, w, config=Nf4Config(bm, 64, 2, lookup=LOOKUP_PRMT))
        for regs in (96, 72):
            assert torch.equal(nf4_matmul(x, w, config=Nf4Config(bm, 64, 2, lookup=LOOKUP_PRMT, maxnreg=regs)), free)
