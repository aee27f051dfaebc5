"""The fused NF4 dequant-GEMM (hotlora.kernels.nf4) against bitsandbytes and an fp32 reference.

On the CPU the Triton kernel runs under TRITON_INTERPRET=1 (CI sets it) at small sizes in fp16/fp32: the
interpreter rounds bf16 wrongly (triton-lang/triton#11584), so bf16 and real sizes run on the GPU
(tests/test_nf4_kernel_gpu.py).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace

import bitsandbytes.functional as bnbF
import pytest
import torch
from nf4_cases import TOLERANCE, packed_group, quantize, reference, rel_err

from hotlora.kernels import _nf4_configs as configs_mod
from hotlora.kernels import _nf4_sums_triton as sums_mod
from hotlora.kernels._nf4_sums_triton import SPLIT_COUNTS
from hotlora.kernels.nf4 import (
    MAX_GEMV_M,
    SCALE_EXACT,
    SCALE_VALUES,
    Nf4Config,
    nf4_dequantize,
    nf4_matmul,
    pack_nf4,
    pick_config,
)
from hotlora.kernels.reference import NF4_CODE, nf4_dequantize_ref

interpret = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1 (set by make test)"
)


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
    w = packed_group(members)
    got = nf4_dequantize(w)
    want = torch.cat([bnbF.dequantize_4bit(p, s) for p, s in members])
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    rows = torch.full((2 * 64, 576), 7.0, dtype=dtype)[::2]  # a strided row view of a larger buffer
    assert nf4_dequantize(w.rows(24, 64), out=rows[:40]) is not None and torch.equal(rows[:40], want[24:])
    assert torch.equal(rows[40:], torch.full((24, 576), 7.0, dtype=dtype))  # nothing written past out
    with pytest.raises(ValueError, match="out must be"):
        nf4_dequantize(w, out=torch.empty(64, 576, dtype=dtype).T.contiguous().T)


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
    "swap-ab-16-rows": Nf4Config(16, 32, split_k=2, warps=2, swap_ab=True),  # bench/nf4_gemm.py --small-warps
    "prefetch-split3": Nf4Config(16, 16, split_k=3, prefetch=True),
    "prefetch-swap-ab": Nf4Config(64, 32, swap_ab=True, prefetch=True),
    # weight bytes through a tensor descriptor; K slices and rows past the weight's end read as zeros
    "tma-split3": Nf4Config(16, 32, split_k=3, tma=True),
    "tma-swap-ab-values": Nf4Config(64, 64, split_k=2, swap_ab=True, scale=SCALE_VALUES, tma=True),
    # a second row tile per program on the same weights: 37 rows as 16 + 16, 32 + 16 (one program) and 8 + 8
    "tail-swap-ab-values": Nf4Config(16, 32, split_k=2, swap_ab=True, scale=SCALE_VALUES, tail_m=16),
    "tail-one-program-exact": Nf4Config(32, 16, scale=SCALE_EXACT, tail_m=16, group_m=2),
    "tail-tma-swap-ab": Nf4Config(8, 64, split_k=3, swap_ab=True, scale=SCALE_VALUES, tma=True, tail_m=8),
}
# x's tiles through tensor descriptors too (16-bit x only; rows past M and columns past K read as zeros): with a tail,
# and not
X_TMA_CONFIGS = {
    "x-tma-tail": Nf4Config(16, 32, split_k=3, swap_ab=True, scale=SCALE_VALUES, tma=True, tail_m=8, x_tma=True),
    "x-tma-exact": Nf4Config(32, 16, split_k=2, scale=SCALE_EXACT, tma=True, x_tma=True),
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
@pytest.mark.parametrize("name", list(X_TMA_CONFIGS))
def test_triton_x_by_tma_matches_reference(triton_cpu, name):
    members = quantize((48,), 640, torch.float16)
    x = torch.randn(37, 640, dtype=torch.float16)
    bias = torch.randn(48, dtype=torch.float16)
    y = nf4_matmul(x, packed_group(members), bias, config=X_TMA_CONFIGS[name])
    assert y.dtype == torch.float16 and rel_err(y, reference(x, members, bias)) < TOLERANCE[torch.float16]


@interpret
@pytest.mark.parametrize("large", [False, True])
def test_triton_recorded_configs_between_64_and_256_rows(triton_cpu, monkeypatch, large):
    """The 129-256 bucket's recorded configs (SCALE_VALUES, weights-first, K split by SMs), and its large-weight
    config (LARGE_WEIGHT lowered so that a small weight takes it), through nf4_matmul's own pick."""
    if large:
        monkeypatch.setattr(configs_mod, "LARGE_WEIGHT", 0)
    k, widths = SHAPES["kv"]
    members = quantize(widths, k, torch.float16)
    x = torch.randn(200, k, dtype=torch.float16)
    bias = torch.randn(sum(widths), dtype=torch.float16)
    cfg = pick_config(200, sum(widths), k)
    assert cfg.scale == SCALE_VALUES and cfg.swap_ab and cfg.split_k > 1 and (cfg.block_m == 256) == large
    y = nf4_matmul(x, packed_group(members), bias)
    assert rel_err(y, reference(x, members, bias)) < TOLERANCE[torch.float16]


@interpret
@pytest.mark.parametrize("cfg", [Nf4Config(32, 16, split_k=2, swap_ab=True, scale=SCALE_VALUES, tail_m=16, group_m=2),
                                 Nf4Config(16, 32, split_k=2, scale=SCALE_EXACT, tail_m=32, tma=True)],
                         ids=["32+16-grouped", "16+32-tma"])
def test_triton_tails_over_many_row_programs(triton_cpu, cfg):
    """Tails unlike their tiles over 3 or more row programs (a tail placed by the wrong stride would overlap the next
    program's rows and leave others unwritten), K split evenly (the unmasked path), bias; y starts as NaN."""
    members = quantize((48,), 512, torch.float32)
    x = torch.randn(100, 512)
    bias = torch.randn(48)
    y = torch.full((100, 48), float("nan"))
    nf4_matmul(x, packed_group(members), bias, out=y, config=cfg)
    assert rel_err(y, reference(x, members, bias)) < TOLERANCE[torch.float32]


@interpret
@pytest.mark.parametrize(("m", "rows"), [(70, 96), (150, 160), (161, 192)])
def test_triton_recorded_tail_buckets(triton_cpu, m, rows):
    """The buckets whose programs cover a row tile plus a tail tile (65-96, 129-160, 161-192 rows), through
    nf4_matmul's own pick: every row of x, the tail's included, is right."""
    k, widths = SHAPES["kv"]
    members = quantize(widths, k, torch.float16)
    x = torch.randn(m, k, dtype=torch.float16)
    cfg = pick_config(m, sum(widths), k)
    assert cfg.tail_m and cfg.rows == rows
    y = nf4_matmul(x, packed_group(members))
    assert rel_err(y, reference(x, members, None)) < TOLERANCE[torch.float16]
    assert rel_err(y[cfg.block_m:], reference(x[cfg.block_m:], members, None)) < TOLERANCE[torch.float16]


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


@interpret
def test_triton_matmul_alone_only_without_a_finish_hook(triton_cpu, monkeypatch):
    """nf4_matmul asks for the alone config when no finish hook (no LoRA shrink beside it) is given, and both
    configs match the reference."""
    import hotlora.kernels.nf4 as nf4_mod

    asked = []
    monkeypatch.setattr(nf4_mod, "pick_config", lambda *a, **kw: asked.append(kw.get("alone")) or pick_config(*a, **kw))
    members = quantize((96,), 512, torch.float16)
    x = torch.randn(1, 512, dtype=torch.float16)
    ref = reference(x, members, None)
    assert rel_err(nf4_matmul(x, packed_group(members)), ref) < TOLERANCE[torch.float16]
    y = nf4_matmul(x, packed_group(members), finish=lambda part, bias, y: False)
    assert rel_err(y, ref) < TOLERANCE[torch.float16]
    assert asked == [True, False]


SPLIT_CONFIGS = [name for name, cfg in CONFIGS.items() if cfg.split_k > 1 and not cfg.prefetch]


@interpret
@pytest.mark.parametrize("name", SPLIT_CONFIGS)
def test_triton_matmul_sums_its_own_splits(triton_cpu, monkeypatch, name):
    """A split-K launch with no finish hook that takes its sums adds them up in the matmul (the last slice's program,
    after the others counted in): bit-identical to the reduce kernel, no reduce launch, the counts left at zero for
    the next launch. A hook that takes the sums still gets them."""
    import hotlora.kernels.nf4 as nf4_mod

    members = quantize((48,), 640, torch.float16)
    w, x, bias = packed_group(members), torch.randn(37, 640, dtype=torch.float16), torch.randn(48, dtype=torch.float16)
    reduced = []
    real_reduce = nf4_mod._reduce
    monkeypatch.setattr(nf4_mod, "_reduce", lambda *a: reduced.append(1) or real_reduce(*a))
    monkeypatch.setenv("HOTLORA_NF4_FIXUP", "0")
    before = nf4_matmul(x, w, bias, config=CONFIGS[name])
    assert reduced == [1]
    monkeypatch.setenv("HOTLORA_NF4_FIXUP", "1")
    for _ in range(2):  # the second launch reuses the counts the first left behind
        assert torch.equal(nf4_matmul(x, w, bias, config=CONFIGS[name]), before)
    assert reduced == [1]
    assert not SPLIT_COUNTS[x.device].any()
    got = []
    nf4_matmul(x, w, bias, config=CONFIGS[name], finish=lambda part, b, y: got.append(part.shape) or False)
    assert got == [(CONFIGS[name].split_k, 37, 48)] and reduced == [1, 1]


class _Declines:
    """A finish hook that declines every step's sums before the launch (as kernels.lora_project's past its limits)."""

    alone = False

    def takes(self, tokens, y):
        return False

    def __call__(self, part, bias, y):
        raise AssertionError("a declining hook is never called")


@interpret
def test_triton_matmul_sums_its_splits_where_a_hook_declines(triton_cpu, monkeypatch):
    """By default only launches whose finish hook declines the sums add them up themselves; a launch with no hook
    (a base-model step: slower so on the H200) keeps the reduce kernel."""
    import hotlora.kernels.nf4 as nf4_mod

    monkeypatch.delenv("HOTLORA_NF4_FIXUP", raising=False)
    members = quantize((48,), 640, torch.float16)
    w, x = packed_group(members), torch.randn(5, 640, dtype=torch.float16)
    cfg = CONFIGS["split2"]
    reduced = []
    real_reduce = nf4_mod._reduce
    monkeypatch.setattr(nf4_mod, "_reduce", lambda *a: reduced.append(1) or real_reduce(*a))
    plain = nf4_matmul(x, w, config=cfg)
    assert reduced == [1]
    assert torch.equal(nf4_matmul(x, w, config=cfg, finish=_Declines()), plain)
    assert reduced == [1]
    monkeypatch.setenv("HOTLORA_NF4_FIXUP", "0")
    assert torch.equal(nf4_matmul(x, w, config=cfg, finish=_Declines()), plain)
    assert reduced == [1, 1]


@interpret
def test_triton_doubled_split_matches_reference(triton_cpu):
    """SmolLM2's down projection (1536 -> 576) at decode size: nf4_matmul's own pick doubles the K slices past
    what its 12 groups divide into (8 slices: some get one group), and the sums still match."""
    members = quantize((576,), 1536, torch.float16)
    assert pick_config(3, 576, 1536).split_k == 8
    x = torch.randn(3, 1536, dtype=torch.float16)
    y = nf4_matmul(x, packed_group(members))
    assert rel_err(y, reference(x, members, None)) < TOLERANCE[torch.float16]


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


@interpret
@pytest.mark.parametrize(("split", "m", "n"), [(3, 1, 200), (8, 3, 1000), (2, 5, 4096)])
def test_reduce_sums_the_slices_in_order(triton_cpu, split, m, n):
    """nf4_reduce_kernel (reduce_splits): y = the K slices' fp32 sums added in slice order, + bias, rounded to y's
    dtype: bit for bit the same additions in torch, over blocks that end inside a row and a last one past M * N."""
    g = torch.Generator().manual_seed(split * 100 + m)
    part = torch.randn(split, m, n, generator=g)
    bias = torch.randn(n, generator=g).half()
    want = part[0].clone()
    for s in range(1, split):
        want += part[s]
    want = (want + bias.float()).half()
    y = torch.full((m, n), float("nan"), dtype=torch.float16)
    assert torch.equal(sums_mod.reduce_splits(part, bias, y), want)
    assert sums_mod.reduce_block(m * n) < m * n or m * n <= sums_mod.REDUCE_MIN_BLOCK  # several blocks


def test_reduce_blocks_give_the_sms_a_program_each():
    """The reduce's blocks at the Llama-3-8B decode sizes (M = 1-16 rows of 4,096-28,672 outputs): powers of two
    within 128-1,024 outputs, and as many programs as SMs (REDUCE_PROGRAMS) where 128-output blocks allow it (at
    most twice that below 1,024-output blocks), not the 4-6 programs of 1,024-output blocks at M = 1."""
    for m, n in itertools.product((1, 4, 8, 16), (4096, 6144, 28672)):
        block = sums_mod.reduce_block(m * n)
        programs = -(-m * n // block)
        assert block & (block - 1) == 0 and 128 <= block <= 1024, (m, n)
        assert min(sums_mod.REDUCE_PROGRAMS, m * n // 128) <= programs, (m, n)
        assert programs <= 2 * sums_mod.REDUCE_PROGRAMS or block == 1024, (m, n)
