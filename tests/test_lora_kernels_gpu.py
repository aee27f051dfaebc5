"""LoRA kernels on a CUDA device at real sizes (bf16 included), and under CUDA-graph capture and replay.

Skipped without CUDA. The oracle here is the grouped fp32 torch reference, itself checked against the
per-token float64 oracle in tests/test_lora_kernels.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from lora_cases import POPULARITY, TOLERANCE, assert_matches, make_case

from hotlora.kernels import lora as lora_mod
from hotlora.kernels import lora_project as lora_project_mod
from hotlora.kernels.lora import build_lora_meta, lora_apply, lora_project, refresh_lora_meta
from hotlora.kernels.reference import lora_apply_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Llama-3-8B: q/k/v (GQA 8 kv heads), gate/up, down; plus a size off every block multiple
SIZES = {
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
    "odd": (1000, (1100, 300, 300)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def reference(case, meta) -> torch.Tensor:
    fused = case.fused.clone()
    lora_apply_ref(case.ys(fused), case.x, case.slices, meta)
    return fused


def _reference_grid() -> list[tuple]:
    """bf16, the serving dtype, over every combination of size, ranks, token count and popularity; fp16 and fp32
    (the same kernels with another element type, fp32 with IEEE dots) over 72 of its 240 cases each: 384
    instead of 720. This file took ~430 s of the ~575-s GPU suite (thirteenth session), a third of a
    session's device time; the interpreter tests cover both dtypes at small sizes in CI."""
    full = itertools.product(["bf16"], SIZES, [16, "mixed"], [1, 7, 32, 300, 2048], POPULARITY)
    part = itertools.product(["fp16", "fp32"], SIZES, [16, "mixed"], [7, 300, 2048], ["distinct", "zipf", "some_none"])
    return [*full, *part]


@pytest.mark.parametrize(("dtype", "size", "ranks", "num_tokens", "popularity"), _reference_grid())
def test_gpu_matches_reference(dtype, size, ranks, num_tokens, popularity):
    in_features, outs = SIZES[size]
    case = make_case(DTYPES[dtype], in_features, outs, ranks, num_tokens, popularity, device="cuda", seed=num_tokens)
    meta = case.meta()
    got = case.fused.clone()
    lora_apply(case.ys(got), case.x, case.slices, meta)
    assert_matches(case, got, reference(case, meta), TOLERANCE[DTYPES[dtype]])


@pytest.mark.parametrize("ranks", [8, 64, 128])
def test_gpu_ranks(ranks):
    in_features, outs = SIZES["qkv"]
    case = make_case(torch.bfloat16, in_features, outs, ranks, 50, "uniform", device="cuda")
    meta = case.meta()
    got = case.fused.clone()
    lora_apply(case.ys(got), case.x, case.slices, meta)
    assert_matches(case, got, reference(case, meta), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("rank_class", [16, 32, 64])
@pytest.mark.parametrize("ranks", ["small", "mixed"])
@pytest.mark.parametrize("num_tokens", [32, 2048])
@pytest.mark.parametrize("size", ["qkv", "gate_up", "down"])
def test_gpu_rank_classes(size, num_tokens, ranks, rank_class):
    """bf16 at real sizes with each rank tile in a workspace sized for max_rank 64, as the engine runs it: r <= 16
    adapters in tiles of 16, 32 or 64 rank rows, and mixed ranks up to 64 (classes below them loop)."""
    in_features, outs = SIZES[size]
    case = make_case(torch.bfloat16, in_features, outs, ranks, num_tokens, "distinct", device="cuda", seed=rank_class)
    meta = build_lora_meta(case.token_slots, case.row_start, case.scale, 64, rank_class=rank_class)
    got = case.fused.clone()
    lora_apply(case.ys(got), case.x, case.slices, meta)
    assert_matches(case, got, reference(case, meta), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("meta_in_graph", [True, False], ids=["meta-captured", "meta-eager"])
def test_cuda_graph_capture_and_replay(meta_in_graph):
    """Capture lora_apply (and the metadata step), then write new slots and inputs, replay, compare."""
    in_features, outs = SIZES["qkv"]
    case = make_case(torch.bfloat16, in_features, outs, "mixed", 64, "uniform", num_slots=32, device="cuda")
    meta = case.meta()
    fused = case.fused.clone()
    ys = case.ys(fused)

    def step() -> None:
        if meta_in_graph:
            refresh_lora_meta(meta)
        lora_apply(ys, case.x, case.slices, meta)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator(device="cuda").manual_seed(7)
    for popularity in ("zipf", "some_none", "all_none", "distinct"):
        other = make_case(torch.bfloat16, 8, (8,), "mixed", 64, popularity, num_slots=32, seed=3)
        case.token_slots.copy_(other.token_slots)
        case.x.copy_(torch.randn(case.x.shape, generator=gen, device="cuda").to(case.x.dtype))
        fused.copy_(case.fused)
        if not meta_in_graph:
            refresh_lora_meta(meta)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(case, fused, reference(case, meta), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("overlap", ["1", "0"])
def test_lora_project_in_graph(overlap, monkeypatch):
    """lora_project captured in a graph (the shrink on a side stream beside the base matmul, or after it with
    HOTLORA_LORA_OVERLAP=0) equals base + lora_apply_ref, replayed over new inputs."""
    monkeypatch.setenv("HOTLORA_LORA_OVERLAP", overlap)
    in_features, outs = SIZES["qkv"]
    case = make_case(torch.bfloat16, in_features, outs, "mixed", 32, "distinct", num_slots=32, device="cuda")
    meta = case.meta()
    w = torch.randn(sum(outs), in_features, device="cuda", dtype=torch.bfloat16) * in_features**-0.5
    result, shrink_streams = {}, []
    launch_shrink = lora_mod._launch_shrink

    def spy(*args, **kw) -> None:  # which stream each shrink is issued on
        shrink_streams.append(torch.cuda.current_stream())
        launch_shrink(*args, **kw)

    monkeypatch.setattr(lora_mod, "_launch_shrink", spy)

    def step() -> None:
        result["ys"] = lora_project(lambda finish: case.ys(case.x @ w.T), case.x, case.slices, meta)

    graph, warm, capture = _warm_up_and_capture(step)
    assert (shrink_streams[-1] != capture) == (overlap == "1")
    assert shrink_streams[0] == warm  # the eager warm-up never forks
    _assert_replays(case, meta, graph, result, lambda: case.x @ w.T)


def _warm_up_and_capture(step) -> tuple[torch.cuda.CUDAGraph, torch.cuda.Stream, torch.cuda.Stream]:
    """step() run once eagerly on a side stream, then captured: (graph, the warm-up stream, the capture stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        capture = torch.cuda.current_stream()
        step()
    return graph, stream, capture


def _assert_replays(case, meta, graph, result, base_of) -> None:
    """Three replays over new x: result["ys"] equals base_of() (the base outputs side by side) + lora_apply_ref."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    for _ in range(3):
        case.x.copy_(torch.randn(case.x.shape, generator=gen, device="cuda").to(case.x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        base = base_of()
        expected = base.clone()
        lora_apply_ref(case.ys(expected), case.x, case.slices, meta)
        got = torch.cat(result["ys"], dim=1).double()
        delta = (expected.double() - base.double()).norm().item()
        assert delta > 0
        assert (got - expected.double()).norm().item() / delta < TOLERANCE[torch.bfloat16]


def _spy(monkeypatch, module, name: str, calls: list[str]) -> None:
    real = getattr(module, name)

    def spy(*args, **kw):
        calls.append(name)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("tile", ["0", "4096"])
@pytest.mark.parametrize("finish", ["4", "0", "32"])
@pytest.mark.parametrize("num_tokens", [1, 4, 32, 96])
def test_lora_project_on_nf4_finishes_in_one_pass(finish, tile, num_tokens, monkeypatch):
    """On an NF4 base that splits K, with at most FINISH_MAX_TOKENS tokens, lora_project hands the split sums to
    lora_finish, and with more (up to HOTLORA_LORA_TILE_FINISH) to lora_tile_finish: no reduce and no expand
    launch, in a graph and eagerly (both off, or more tokens than their limits: the reduce, then the expand); all
    equal the base matmul plus lora_apply_ref, over replays with new inputs."""
    import bitsandbytes.functional as bnbF

    from hotlora.kernels.nf4 import nf4_matmul, pack_nf4

    monkeypatch.setenv("HOTLORA_LORA_FINISH", finish)
    monkeypatch.setenv("HOTLORA_LORA_TILE_FINISH", tile)
    in_features, outs = SIZES["qkv"]
    case = make_case(torch.bfloat16, in_features, outs, "mixed", num_tokens, "distinct", num_slots=32,
                     device="cuda")
    meta = case.meta()
    dense = torch.randn(sum(outs), in_features, device="cuda", dtype=torch.bfloat16) * in_features**-0.5
    w = pack_nf4(*bnbF.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4"))
    launches, result = [], {}
    _spy(monkeypatch, lora_project_mod, "_launch_finish", launches)
    _spy(monkeypatch, lora_project_mod, "_launch_tile_finish", launches)
    _spy(monkeypatch, lora_mod, "_launch_expand", launches)

    def step() -> None:
        base = lambda fin: list(nf4_matmul(case.x, w, finish=fin).split(list(outs), dim=1))  # noqa: E731
        result["ys"] = lora_project(base, case.x, case.slices, meta)

    graph, _, _ = _warm_up_and_capture(step)
    launch = ("_launch_finish" if num_tokens <= int(finish) else
              "_launch_tile_finish" if num_tokens <= int(tile) else "_launch_expand")
    assert launches == [launch] * 2
    _assert_replays(case, meta, graph, result, lambda: nf4_matmul(case.x, w))


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("split_k", [1, 3, 16])
def test_gpu_splits_and_counters(split_k, block_m):
    """Every split count sums right, twice in a row: the split-K counters go back to zero after a launch."""
    in_features, outs = SIZES["qkv"]
    case = make_case(torch.bfloat16, in_features, outs, "mixed", 100, "zipf", device="cuda")
    meta = case.meta(split_k=split_k, block_m=block_m)
    expected = reference(case, meta)
    for _ in range(2):
        got = case.fused.clone()
        lora_apply(case.ys(got), case.x, case.slices, meta)
        assert_matches(case, got, expected, TOLERANCE[torch.bfloat16])
        assert not meta.split_count.any()


@pytest.mark.parametrize("popularity", ["uniform", "zipf", "some_none", "all_none"])
@pytest.mark.parametrize(("num_tokens", "num_slots"), [(1, 8), (32, 32), (2048, 64), (8192, 300)])
def test_gpu_meta_triton_matches_torch(num_tokens, num_slots, popularity):
    from hotlora.kernels.lora import refresh_lora_meta_triton
    from hotlora.kernels.reference import refresh_lora_meta_ref

    case = make_case(torch.bfloat16, 8, (8,), 8, num_tokens, popularity, num_slots=num_slots, device="cuda")
    meta = case.meta()
    refresh_lora_meta_ref(meta)
    expected = {k: getattr(meta, k).clone() for k in ("sorted_tokens", "token_pos", "slot_bounds", "tile_info")}
    for k in expected:
        getattr(meta, k).fill_(-7)
    refresh_lora_meta_triton(meta)
    for k, v in expected.items():
        assert torch.equal(getattr(meta, k), v), k
