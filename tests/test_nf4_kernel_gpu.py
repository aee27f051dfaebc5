"""The fused NF4 dequant-GEMM on a CUDA device: bf16, Llama-3-8B sizes, every M bucket, CUDA-graph capture and
replay, and the register lookups against the table loads. Skipped without CUDA."""

from __future__ import annotations

import itertools
from dataclasses import replace

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from nf4_cases import LLAMA, TOLERANCE, packed_group, quantize, reference, rel_err

from hotlora.kernels._nf4_sums_triton import SPLIT_COUNTS
from hotlora.kernels.nf4 import (
    LOOKUP_PRMT,
    LOOKUP_PRMT_IMM,
    MAX_GEMV_M,
    SCALE_VALUES,
    Nf4Config,
    nf4_dequantize,
    nf4_matmul,
    pick_config,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("shape", list(LLAMA))
def test_gpu_bit_identical_and_matches(shape):
    k, widths = LLAMA[shape]
    members = quantize(widths, k, torch.bfloat16, "cuda")
    w = packed_group(members)
    want = torch.cat([bnbF.dequantize_4bit(p, s) for p, s in members])
    assert torch.equal(nf4_dequantize(w).view(torch.int16), want.view(torch.int16))
    for m in (1, 3, 16, 24, 33, 64, 128, 257, 512, 2048):  # every M bucket of the recorded configs
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        ref = reference(x, members, None)
        assert rel_err(nf4_matmul(x, w), ref) < TOLERANCE[torch.bfloat16], m


def test_gpu_matches_bnb_matmul_and_bias():
    members = quantize((4096,), 4096, torch.bfloat16, "cuda")
    (p, s), w = members[0], packed_group(members)
    bias = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    for m in (1, 32, 512):
        x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
        want = bnb.matmul_4bit(x, p, bias=bias, quant_state=s).float()
        assert rel_err(nf4_matmul(x, w, bias), want) < TOLERANCE[torch.bfloat16], m


def test_gpu_cuda_graph_capture_and_replay():
    members = quantize((1024, 256, 256), 2048, torch.bfloat16, "cuda")
    w = packed_group(members)
    for m in (1, 48, 200, 600):  # 200: the weight bytes by TMA (a tensor descriptor among the graph's arguments)
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


@pytest.mark.parametrize("shape", ["qkv", "down"])
def test_gpu_tail_tiles(shape):
    """A row tile plus a tail tile on the same dequantized weights (Nf4Config.tail_m) in bf16 at real sizes, TMA
    on and off, bias, eagerly and replayed from a CUDA graph; M past, inside and below the two tiles."""
    k, widths = LLAMA[shape]
    members = quantize(widths, k, torch.bfloat16, "cuda")
    w = packed_group(members)
    bias = torch.randn(sum(widths), dtype=torch.bfloat16, device="cuda")
    tiles = [(128, 64, 4, 64), (128, 128, 8, 64), (64, 64, 4, 32), (128, 128, 8, 128)]
    for (bm, bn, warps, tail), tma, m in itertools.product(tiles, (False, True), (24, 176, 200)):
        cfg = Nf4Config(bm, bn, 2, warps, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=tma, tail_m=tail)
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        y = nf4_matmul(x, w, bias, config=cfg)
        assert rel_err(y, reference(x, members, bias)) < TOLERANCE[torch.bfloat16], (cfg, m)
        assert torch.equal(y, nf4_matmul(x, w, bias, config=cfg)), (cfg, m)  # bit for bit again: no race
    assert _replayed_error(members, w, 176, bias, cfg) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("shape", ["qkv", "down"])
def test_gpu_x_by_tma(shape):
    """x's tiles by TMA beside the weight bytes (Nf4Config.x_tma), in bf16 at real sizes, with and without a tail,
    bias, eagerly and replayed from a CUDA graph; M past, inside and below the tiles. A view of x whose rows are not
    16-byte aligned takes the pointer loads, and is right too. The 256x128 tile over 8 warps at 3 stages, which raced
    with x by TMA (a few non-finite columns, different each run), is refused by Nf4Config (tests/test_nf4_configs.py);
    at 2 stages it is here, with the 128-row tile over 8 warps."""
    k, widths = LLAMA[shape]
    members = quantize(widths, k, torch.bfloat16, "cuda")
    w = packed_group(members)
    bias = torch.randn(sum(widths), dtype=torch.bfloat16, device="cuda")
    tiles = [(128, 64, 4, 64, 2), (128, 64, 4, 128, 2), (128, 64, 4, 0, 3), (64, 64, 4, 32, 3), (256, 128, 8, 0, 2),
             (128, 128, 8, 0, 3)]
    for (bm, bn, warps, tail, stages), m in itertools.product(tiles, (24, 176, 200, 300)):
        cfg = Nf4Config(bm, bn, 1, warps, stages, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=True,
                        tail_m=tail, x_tma=True)
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        y = nf4_matmul(x, w, bias, config=cfg)
        assert rel_err(y, reference(x, members, bias)) < TOLERANCE[torch.bfloat16], (cfg, m)
        assert torch.equal(y, nf4_matmul(x, w, bias, config=replace(cfg, x_tma=False))), (cfg, m)  # same math
    wide = torch.randn(200, k + 1, dtype=torch.bfloat16, device="cuda")[:, 1:]  # rows 2 bytes off 16-byte alignment
    assert rel_err(nf4_matmul(wide, w, bias, config=cfg), reference(wide, members, bias)) < TOLERANCE[torch.bfloat16]
    assert _replayed_error(members, w, 176, bias, cfg) < TOLERANCE[torch.bfloat16]


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


@pytest.mark.parametrize("shape", ["qkv", "gate_up", "down"])
def test_gpu_matmul_sums_its_own_splits(shape, monkeypatch):
    """The split-K sums added up by the matmul itself (_nf4_sums_triton.fixup_wanted: the last slice's program once the
    others counted in) at real sizes, bf16, every split bucket of the recorded configs (tails and x by TMA among them),
    with bias: bit for bit the reduce kernel's result, eagerly several times over (a lost or doubled count would show)
    and replayed from a CUDA graph after other launches used the counts; the counts end at zero."""
    k, widths = LLAMA[shape]
    members = quantize(widths, k, torch.bfloat16, "cuda")
    w = packed_group(members)
    bias = torch.randn(sum(widths), dtype=torch.bfloat16, device="cuda")
    ms = (1, 4, 16, 32, 64, 96, 128, 176, 256)
    assert sum(pick_config(m, *w.shape).split_k > 1 for m in ms) >= 5
    for m in ms:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        monkeypatch.setenv("HOTLORA_NF4_FIXUP", "0")
        want = nf4_matmul(x, w, bias)
        monkeypatch.setenv("HOTLORA_NF4_FIXUP", "1")
        for _ in range(3):
            assert torch.equal(nf4_matmul(x, w, bias), want), m
        out = torch.empty_like(want)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            nf4_matmul(x, w, bias, out=out)
        for _ in range(3):
            out.zero_()
            graph.replay()
            assert torch.equal(out, want), m
    torch.cuda.synchronize()
    assert not SPLIT_COUNTS[torch.device("cuda", torch.cuda.current_device())].any()


def _regs_configs(m: int, n: int) -> list[Nf4Config]:
    """nf4_regs_kernel configs for M = m: 1 and 2 tiles a warp over 4 warps (and 8 warps from 16 rows), 1-4 K
    slices (3: some slices end past the last group), cp.async rings of 2-4 groups (group counts that are and are
    not multiples of the ring's: the loop's unrolled steps and the remainder after them)."""
    bm = max(8, 1 << (m - 1).bit_length())
    eight = [Nf4Config(bm, 128, 2, warps=8, stages=3, regs=True, lookup=LOOKUP_PRMT)] if bm >= 16 else []
    return eight + [Nf4Config(bm, 64 * t, s, stages=st, regs=True, lookup=LOOKUP_PRMT)
                    for t, s, st in ((1, 1, 2), (2, 2, 3), (1, 4, 4), (1, 3, 3))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["qkv", "gate_up", "down", "ragged"])
def test_gpu_regs_kernel(shape, dtype):
    """nf4_regs_kernel (the looked-up weights as the MMA's register operand) at M = 1-32, every tile shape and K
    slices (odd counts leave some slices a partial step), with bias: within the tolerance of the fp32 reference,
    and equal to the tl.dot kernel's SCALE_PARTIALS result but for fp32 summation order (a wrong k or row in an
    operand would be off by ~100%)."""
    _matches_reference_and_dot(shape, dtype, (1, 3, 8, 13, 16, 32), _regs_configs,
                               lambda m: Nf4Config(16 if m <= 16 else 32, 64, lookup=LOOKUP_PRMT))


def _matches_reference_and_dot(shape: str, dtype: torch.dtype, ms: tuple[int, ...], configs, dot) -> None:
    """For each M in ms, nf4_matmul with bias under every config in configs(m, n): within the tolerance of the fp32
    reference, and within 1e-3 of the tl.dot kernel under dot(m) (same rounding, another fp32 summation order). The
    "ragged" shape has K = 4.5 groups and N not a tile multiple."""
    k, widths = (576, (1536, 192)) if shape == "ragged" else LLAMA[shape]
    n = sum(widths)
    members = quantize(widths, k, dtype, "cuda")
    w = packed_group(members)
    bias = torch.randn(n, dtype=dtype, device="cuda")
    for m in ms:
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        ref = reference(x, members, bias)
        want = nf4_matmul(x, w, bias, config=dot(m)).float()
        for cfg in configs(m, n):
            y = nf4_matmul(x, w, bias, config=cfg)
            assert rel_err(y, ref) < TOLERANCE[dtype], (m, cfg)
            assert rel_err(y, want) < 1e-3, (m, cfg)


def test_gpu_regs_kernel_graph_capture_and_replay():
    """nf4_regs_kernel with and without K slices (the reduce launch after it) captured and replayed."""
    members = quantize((1024, 256, 256), 2048, torch.bfloat16, "cuda")
    w = packed_group(members)
    bias = torch.randn(1536, dtype=torch.bfloat16, device="cuda")
    for m, split, stages in ((1, 1, 2), (5, 4, 3), (16, 2, 4), (32, 8, 3)):
        cfg = Nf4Config(max(8, 1 << (m - 1).bit_length()), 64, split, stages=stages, regs=True, lookup=LOOKUP_PRMT)
        assert _replayed_error(members, w, m, bias, cfg) < TOLERANCE[torch.bfloat16], (m, split)


_SS_CONFIGS = [Nf4Config(bm, 16 * warps, split, warps, scale=SCALE_VALUES, lookup=LOOKUP_PRMT, ss=True)
               for bm, warps, split in ((128, 8, 1), (256, 8, 1), (256, 8, 3), (128, 4, 2), (64, 4, 1), (256, 4, 4))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["qkv", "down", "ragged"])
def test_gpu_ss_kernel(shape, dtype):
    """nf4_ss_kernel (both wgmma operands in shared memory, the weights looked up by a warpgroup of their own) at
    M = 33-600 (tiles past M, x's rows past the last tile), 64-256-row tiles by 64 and 128 weight rows, 1-4 K slices
    (3: uneven, the last slice shorter), with bias (q/k/v at M = 600 over 256x128 tiles: 144 programs, whose last 12
    go to launch_ss's second launch of 64-row programs): within the tolerance of the fp32 reference, and equal to
    the tl.dot kernel with the same rounding (SCALE_VALUES) but for fp32 summation order (a wrong k or row would be
    off by ~100%)."""
    _matches_reference_and_dot(shape, dtype, (33, 100, 256, 600), lambda m, n: _SS_CONFIGS,
                               lambda m: Nf4Config(64, 64, scale=SCALE_VALUES, lookup=LOOKUP_PRMT))


def test_gpu_ss_kernel_graph_capture_and_replay():
    """nf4_ss_kernel with and without K slices (the reduce launch after it) captured and replayed."""
    members = quantize((1024, 256, 256), 2048, torch.bfloat16, "cuda")
    w = packed_group(members)
    bias = torch.randn(1536, dtype=torch.bfloat16, device="cuda")
    for m, cfg in ((70, _SS_CONFIGS[0]), (300, _SS_CONFIGS[2]), (512, _SS_CONFIGS[1])):
        assert _replayed_error(members, w, m, bias, cfg) < TOLERANCE[torch.bfloat16], (m, cfg)
