"""The paged varlen attention kernel (hotlora.kernels.attention) against its torch reference.

CPU: the Triton kernel under TRITON_INTERPRET=1 at small sizes (fp16/fp32: the interpreter computes bf16 dots
wrongly, triton-lang/triton#11584). GPU (`-m gpu`): bf16/fp16 at the Llama-3-8B attention shape, contexts to 8k.
"""

from __future__ import annotations

import os

import pytest
import torch
from attention_cases import make_case

from hotlora.kernels import attention
from hotlora.kernels.attention import (
    DECODE,
    MIXED_SPLIT,
    AttentionConfig,
    attention_tiles,
    default_num_splits,
    launch_plan,
    paged_attention,
)
from hotlora.kernels.reference import FP8_KV, paged_attention_ref, to_cache

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
SCALE = 0.3

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU: TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_test(fn):
    """Marked gpu (skipped by CPU CI) and skipped without a CUDA device."""
    return pytest.mark.gpu(needs_cuda(fn))


# (query count, context length) per sequence: decode rows, whole prompts, chunks continuing a context
BATCHES = {
    "decode": [(1, 1), (1, 17), (1, 40), (1, 5)],
    "prefill": [(9, 9), (23, 23), (1, 1)],
    "mixed": [(1, 33), (1, 2), (12, 12), (7, 30), (1, 64), (16, 40)],
}


def check(case, window: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    out = paged_attention(*case.args(), SCALE, max_q_len=case.max_q_len, max_ctx_len=case.max_ctx_len,
                          sliding_window=window, num_splits=num_splits)  # fmt: skip
    ref = paged_attention_ref(*case.args(), SCALE, sliding_window=window)
    tol = TOL[case.q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return out


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_matches_reference(dtype, group, block_size, batch):
    check(make_case(BATCHES[batch], 2 * group, 2, 32, block_size, dtype))


@interp
@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sliding_window(window, num_splits):
    # contexts longer than the window: decodes, a chunk continuing past it, a whole prompt spanning it
    case = make_case([(1, 70), (9, 50), (30, 30), (1, 3)], 8, 2, 32, 4, torch.float32)
    check(case, window, num_splits)


@interp
@pytest.mark.parametrize("num_splits", [2, 4, 7])
def test_split_kv(num_splits, monkeypatch):
    # splits outnumbering a short context's key tiles leave some splits empty: they write no partial, and the
    # merge must not read one (the workspace comes from torch.empty: NaN here, as uninitialized memory may be)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    case = make_case([(1, 200), (1, 3), (5, 140), (1, 65)], 4, 1, 64, 16, torch.float16)
    check(case, None, num_splits)


@interp
@pytest.mark.parametrize("config", [DECODE, MIXED_SPLIT, AttentionConfig(block_n=32, warps=2, stages=2)],
                         ids=["decode", "mixed-split", "narrow"])
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_launch_configs(config, window, num_splits):
    """The configs CUDA launches take (128-key tiles for decode rows, 32-key for a split launch with chunks) and
    others: contexts shorter and longer than a tile, a window, chunks of 6 and 17 queries (two blocks) between the
    decodes."""
    case = make_case([(1, 300), (6, 140), (1, 3), (17, 40), (1, 129)], 4, 1, 64, 16, torch.float16)
    out = paged_attention(*case.args(), SCALE, max_q_len=case.max_q_len, max_ctx_len=case.max_ctx_len,
                          sliding_window=window, num_splits=num_splits, config=config)  # fmt: skip
    ref = paged_attention_ref(*case.args(), SCALE, sliding_window=window)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.float16], rtol=TOL[torch.float16])


@interp
@pytest.mark.parametrize("num_splits", [1, 3])
def test_padding_sequences_and_rows(num_splits):
    # a static batch: empty sequences (no queries, no context), padding tokens as queries without context
    # (zeros), then rows no sequence covers (left as they were without splits)
    case = make_case([(1, 9), (0, 0), (4, 4), (0, 0), (3, 0)], 4, 2, 32, 4, torch.float32)
    q = torch.cat([case.q, torch.randn(2, 4, 32)])
    out = torch.full_like(q, 7.0)
    paged_attention(q, *case.args()[1:], SCALE, max_q_len=8, max_ctx_len=16, out=out, num_splits=num_splits)
    ref = paged_attention_ref(*case.args(), SCALE)
    assert torch.equal(ref[5:8], torch.zeros_like(ref[5:8]))
    torch.testing.assert_close(out[:8], ref, atol=1e-4, rtol=1e-4)
    if num_splits == 1:
        assert torch.equal(out[8:], torch.full_like(out[8:], 7.0))


@interp
def test_head_dim_and_group_not_powers_of_two():
    # SmolLM2-135M: 9 heads over 3 KV heads (group 3), head_dim 64; and head_dim 80 (padded to 128)
    check(make_case(BATCHES["mixed"], 9, 3, 64, 4, torch.float32))
    check(make_case([(1, 20), (6, 6)], 6, 2, 80, 16, torch.float16))


def test_q_view_of_fused_projection():
    # q may be a strided view (a column slice of a fused qkv output); the kernel honours its row stride
    case = make_case(BATCHES["mixed"], 4, 2, 32, 4, torch.float32)
    qkv = torch.cat([case.q.flatten(1), torch.randn(case.q.shape[0], 64)], dim=1)
    case.q = qkv[:, :128].view(-1, 4, 32)
    if os.environ.get("TRITON_INTERPRET") == "1":
        check(case)
    assert not case.q.is_contiguous()


def fp8_cache(case):
    """The case with its K/V caches stored as float8_e4m3fn (3 mantissa bits: every value moves)."""
    k, v = case.k_cache, case.v_cache
    case.k_cache, case.v_cache = to_cache(k, FP8_KV), to_cache(v, FP8_KV)
    assert not torch.equal(case.k_cache.to(k.dtype), k)
    return case


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_kv_cache(dtype, num_splits):
    """An fp8 cache is read as q's dtype (exact), against the reference on the same fp8 cache."""
    case = fp8_cache(make_case(BATCHES["mixed"], 8, 2, 32, 4, dtype))
    out = check(case, num_splits=num_splits)
    assert out.dtype == dtype


def test_argument_checks():
    case = make_case(BATCHES["decode"], 4, 2, 32, 4, torch.float32)
    kw = dict(max_q_len=1, max_ctx_len=64)
    with pytest.raises(TypeError):
        paged_attention(case.q.half(), *case.args()[1:], SCALE, **kw)
    with pytest.raises(ValueError, match="ctx_lens"):
        paged_attention(*case.args()[:4], case.ctx_lens.long(), case.block_tables, SCALE, **kw)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(*case.args()[:5], case.block_tables.long(), SCALE, **kw)
    with pytest.raises(ValueError, match="heads"):
        paged_attention(case.q[:, :3], *case.args()[1:], SCALE, **kw)
    with pytest.raises(TypeError, match="float8"):  # K fp8 with V not
        paged_attention(case.q, case.k_cache.to(FP8_KV), *case.args()[2:], SCALE, **kw)


def test_tiles_and_splits():
    assert attention_tiles(1, 4) == (1, 4)  # decode: one token, 16 rows with the padding
    assert attention_tiles(1, 3) == (1, 4)
    assert attention_tiles(300, 4) == (16, 4)  # prefill: 64 rows
    assert attention_tiles(5, 1) == (8, 1)
    assert default_num_splits(torch.device("cpu"), 1, 8192) == 1


def test_launch_plan_on_an_h200(monkeypatch):
    """What a launch of a CUDA graph bucket takes on an H200 (132 SMs; no GPU needed: shapes only): the padded
    bucket's empty sequences do not count, so a decode step of 9-16 rows splits; a caller's config is kept;
    HOTLORA_ATTN_GRID_SPLITS=1's former choice counts the whole grid."""
    monkeypatch.setattr(attention, "_sm_count", lambda index: 132)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")

    def plan(device, tokens, max_q_len, **kw):  # a graph bucket: rows min(tokens, 128) + 1, the engine's context
        return launch_plan(device, tokens, min(tokens, 128) + 1, 8, 4, max_q_len, 8192, **kw)

    # the H200 sweeps' best split counts (BENCHMARKS.md, twenty-fourth session; contexts 1,100-1,500)
    assert [plan(gpu, t, 1) for t in (8, 16, 32, 64)] == [(DECODE, 4), (DECODE, 2), (DECODE, 1), (DECODE, 1)]
    assert plan(gpu, 176, 176) == (MIXED_SPLIT, 2)  # a prefix-cache hit's step: 14 decode rows + a 160-query chunk
    assert plan(gpu, 1280, 1280) == (AttentionConfig(), 1)  # a cold prompt's step
    assert plan(gpu, 1, 1) == (DECODE, 16)  # batch 1: 4 key tiles a split at 8,192
    assert launch_plan(gpu, 1, 2, 8, 4, 1, 2048) == (DECODE, 4)
    narrow = AttentionConfig(block_n=32, warps=2, stages=2)
    assert plan(gpu, 16, 1, config=narrow) == (narrow, 2)
    assert plan(gpu, 16, 1, num_splits=3) == (DECODE, 3)
    assert plan(cpu, 16, 1) == (AttentionConfig(), 1)
    monkeypatch.setattr(attention, "GRID_SPLITS", True)
    assert [plan(gpu, t, 1) for t in (8, 16)] == [(AttentionConfig(), 2), (DECODE, 1)]
    assert plan(gpu, 176, 176) == (AttentionConfig(), 1)


# --- GPU, real sizes -------------------------------------------------------------------------------------

LLAMA3_8B = dict(heads=32, kv_heads=8, head_dim=128)
GPU_BATCHES = {
    "decode-long": [(1, 8192), (1, 8000)],
    "decode-32": [(1, 128 + 61 * i) for i in range(32)],
    "mixed": [(1, 8192), (1, 300), (1, 1), (512, 512), (256, 2048), (1, 4097), (77, 1000)],
    "prefill-8k": [(2048, 8192)],
}


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("batch", sorted(GPU_BATCHES))
@pytest.mark.parametrize("window", [None, 4096])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_gpu_llama3_8b_shape(dtype, block_size, batch, window, num_splits):
    case = make_case(GPU_BATCHES[batch], **LLAMA3_8B, block_size=block_size, dtype=dtype, device="cuda")
    check(case, window, num_splits)


@gpu_test
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_gqa_ratios(group):
    case = make_case(GPU_BATCHES["mixed"], 8 * group, 8, 128, 16, torch.bfloat16, device="cuda")
    check(case)


@gpu_test
@pytest.mark.parametrize("batch", ["decode-32", "mixed"])
def test_gpu_fp8_kv_cache(batch):
    check(fp8_cache(make_case(GPU_BATCHES[batch], **LLAMA3_8B, block_size=16, dtype=torch.bfloat16, device="cuda")))


@gpu_test
def test_gpu_cuda_graph_replay_sees_new_metadata():
    # capture once, then write new metadata, queries and cache contents in place: the replay follows them
    shape = dict(LLAMA3_8B, block_size=16, dtype=torch.bfloat16, device="cuda")
    cases = [make_case([(1, 900), (1, 40), (6, 70), (1, 2)], **shape, seed=1),
             make_case([(1, 30), (1, 1000), (3, 3), (4, 500)], **shape, seed=2)]  # fmt: skip
    blocks = max(c.k_cache.shape[0] for c in cases)
    width = max(c.block_tables.shape[1] for c in cases)
    static = make_case([(1, 900), (1, 40), (6, 70), (1, 2)], **shape, seed=1, min_blocks=blocks,
                       extra_width=width - cases[0].block_tables.shape[1] + 1)  # fmt: skip
    kw = dict(max_q_len=8, max_ctx_len=1024)
    out = paged_attention(*static.args(), SCALE, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(*static.args(), SCALE, **kw)
    for case in reversed(cases):
        static.q.copy_(case.q)
        static.k_cache[: case.k_cache.shape[0]].copy_(case.k_cache)
        static.v_cache[: case.v_cache.shape[0]].copy_(case.v_cache)
        static.cu_seqlens_q.copy_(case.cu_seqlens_q)
        static.ctx_lens.copy_(case.ctx_lens)
        static.block_tables[:, : case.block_tables.shape[1]].copy_(case.block_tables)
        graph.replay()
        ref = paged_attention_ref(*case.args(), SCALE)
        torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
