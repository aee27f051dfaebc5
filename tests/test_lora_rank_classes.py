"""LoRA rank classes (issue 11, item 4): the kernels' rank tile sized by the step's largest adapter rank, not by
max_lora_rank.

The pure functions (a rank's class, a step's class, the graph count); the Triton kernels under TRITON_INTERPRET=1
giving the oracle's result with every class for one batch (ranks within the smallest class, and mixed ranks that
cross classes); and the engine's padded static path (graphs.py with capture=False; the Triton kernels on the CPU
under the interpreter) keying its buckets by class and matching the unpadded eager path token for token, the
eager path picking the same class. tests/test_engine_gpu.py checks that captured graphs of class 16 replay for
r <= 16 adapters under max_lora_rank 64.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from engine_reference import default_engine, drain
from lora_cases import TOLERANCE, assert_matches, make_case
from lora_factory import preset_llama, save_adapters_by_spec

from hotlora.kernels.lora import (
    RANK_CLASSES,
    KernelConfig,
    build_lora_meta,
    kernel_config,
    lora_apply_triton,
    rank_class_of,
    rank_classes,
)
from hotlora.server.cli import build_parser, engine_config
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams
from hotlora.server.model.graphs import graph_count, step_rank_class, token_buckets

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpret = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1 (set by make test)")
MIX = "qv8*0.5+all16*0.5"  # one slot: q/v rank 8 + 16 = 24, the other modules 16
N_NEW = 5  # tokens per request of the engine workload


def test_rank_class_of_a_rank():
    got = {r: rank_class_of(r) for r in (0, 1, 4, 15, 16, 17, 24, 32, 33, 63, 64, 65, 128)}
    assert all(c in RANK_CLASSES and c >= min(r, 64) for r, c in got.items()), got  # holds the rank (<= 64)
    assert all(c == 16 or c // 2 < r for r, c in got.items()), got  # the smallest class that does
    assert rank_classes(8) == rank_classes(16) == (16,)
    assert rank_classes(24) == (16, 32) and rank_classes(64) == rank_classes(256) == (16, 32, 64)


def test_step_rank_class():
    classes = (16, 32, 64)
    assert step_rank_class(0, classes) == 0  # no adapter, no LoRA
    assert [step_rank_class(r, classes) for r in (1, 16, 17, 32, 33, 64, 128)] == [16, 16, 32, 32, 64, 64, 64]
    assert step_rank_class(4, (64,)) == 64  # classes off: always max_lora_rank's class
    assert step_rank_class(4, (16,)) == 16 and step_rank_class(24, (16, 32)) == 32


def test_graph_count_formula():
    for seqs, tokens in ((64, 4096), (8, 64), (4, 8), (1, 1)):
        buckets = token_buckets(seqs, tokens)
        keys = len(buckets) + sum(t <= seqs for t in buckets)  # mixed keys, and decode-only ones where they fit
        extra = keys * 2  # classes 32 and 64 of every key
        assert graph_count(seqs, tokens, 3) == graph_count(seqs, tokens, 1) + extra
    assert (graph_count(64, 4096, 1), graph_count(64, 4096, 3)) == (68, 136)  # bench/engine_gpu.py's engine


def test_cli_switch():
    def parsed(*argv: str) -> bool:
        return engine_config(build_parser().parse_args(["serve", *argv])).lora_rank_classes

    assert parsed() and not parsed("--no-lora-rank-classes") and parsed("--lora-rank-classes")


# --- the kernels: every class gives the oracle's delta --------------------------------------------------------


@interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("ranks", ["small", "mixed"])
@pytest.mark.parametrize(("in_features", "outs"), [(72, (72, 24, 24)), (100, (40,))], ids=["qkv", "down"])
def test_every_rank_class_matches_the_oracle(dtype, ranks, in_features, outs):
    """r <= 16 adapters with tiles of 16, 32 and 64 rank rows (and mixed ranks up to 64 crossing classes: class 16
    loops four times over r=64), all in a workspace sized for max_rank 64 as the engine allocates it."""
    case = make_case(dtype, in_features, outs, ranks, 40, "some_none", seed=len(outs) + (ranks == "mixed"))
    expected = case.expected()
    results = {}
    for c in RANK_CLASSES:
        meta = build_lora_meta(case.token_slots, case.row_start, case.scale, 64, rank_class=c)
        assert meta.workspace.shape[-1] == 64 and kernel_config(meta).expand_block_r == c
        got = case.fused.clone()
        lora_apply_triton(case.ys(got), case.x, case.slices, meta, KernelConfig(shrink_block_k=32))
        assert_matches(case, got, expected, TOLERANCE[dtype])
        results[c] = got
    for c in RANK_CLASSES[1:]:
        torch.testing.assert_close(results[c], results[16], rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_rank_class_is_checked():
    case = make_case(torch.float32, 8, (8,), 8, 4, "uniform")
    assert case.meta().rank_class == 16  # default: the class of max_rank
    assert build_lora_meta(case.token_slots, case.row_start, case.scale, 128).rank_class == 64
    with pytest.raises(ValueError, match="rank_class"):
        build_lora_meta(case.token_slots, case.row_start, case.scale, 64, rank_class=8)


# --- the engine: class-keyed buckets on the padded static path, the same class eagerly -------------------------


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory) -> dict[str, Path]:
    specs = {
        "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "all16": dict(r=16, lora_alpha=16, target_modules="all-linear"),
        "all32": dict(r=32, lora_alpha=32, target_modules="all-linear"),
    }
    return save_adapters_by_spec(preset_llama("tiny"), tmp_path_factory.mktemp("rank-class-adapters"), specs)


def _engine(cache: Path, adapters: dict[str, Path], **kw) -> LLMEngine:
    # max_num_seqs 4: decode buckets 1, 2, 4; 8 tokens per step: prompts are chunked and mix with decodes
    return default_engine(cache, adapters, **({"model": "random:tiny", "max_loras": 5, "max_lora_rank": 64,
                                               "max_num_seqs": 4, "max_num_batched_tokens": 8, "block_size": 4} | kw))


def _workload(engine: LLMEngine) -> dict[str, list[int]]:
    """r <= 16 adapters decode alone first; r=32 and the mix (rank 24) join later, with a base request."""
    rng = random.Random(0)
    params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    names = ["qv8", "all16", None, "all32", MIX]
    reqs = [Request(f"c{i}", [rng.randrange(3, 4000) for _ in range(3 + 2 * i)], params, a)
            for i, a in enumerate(names)]  # fmt: skip
    return drain(engine, {0: reqs[:2], 5: reqs[2:4], 9: reqs[4:]})


def _check_classes(steps: list[tuple[bool, int, int]]) -> None:
    """Each step's class from its adapters' largest rank, rounded up, on decode-only and mixed steps alike."""
    for decode, c, rank in steps:
        assert c == (0 if rank == 0 else rank_class_of(rank)), (decode, c, rank)
    assert {rank for *_, rank in steps} >= {16, 32}
    seen = {(decode, c) for decode, c, _ in steps}
    assert seen >= {(True, 16), (True, 32)} and seen & {(False, 16), (False, 32)}, seen


def test_static_path_keys_buckets_by_rank_class(hotlora_cache, tiny_adapters, monkeypatch):
    # the Triton kernels (on the CPU, under the interpreter) are what the class changes; else the CPU path
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1" if INTERPRET else "0")
    engine = _engine(hotlora_cache, tiny_adapters)
    runner, cache = engine.runner, engine.runner.lora_cache
    assert runner.rank_classes == (16, 32, 64)
    eager_steps: list[tuple[bool, int, int]] = []  # (decode only, the meta's class, the adapters' largest rank)
    tensors = runner._tensors

    def recording_tensors(step):
        batch = tensors(step)
        c = batch.lora.rank_class if batch.lora is not None else 0
        assert c == step.lora_class
        eager_steps.append((all(q == 1 for q in step.q_lens), c, cache.batch_rank(set(step.lora_slots))))
        return batch

    monkeypatch.setattr(runner, "_tensors", recording_tensors)
    eager = _workload(engine)
    _check_classes(eager_steps)  # the unpadded eager path picks the class by the same rule

    graphs = runner.graphs = runner.step_graphs(capture=False)
    assert len(graphs.keys()) == len(set(graphs.keys())) == graph_count(4, 8, 3)
    static_steps: list[tuple[bool, int, int]] = []
    stage = graphs.stage

    def recording_stage(step):
        static_steps.append((all(q == 1 for q in step.q_lens), step.lora_class, cache.batch_rank(set(step.lora_slots))))
        return stage(step)

    graphs.stage = recording_stage
    static = _workload(engine)
    runner.graphs = None
    assert static == eager and all(len(t) == N_NEW for t in static.values())
    _check_classes(static_steps)
    used = {key for key, n in graphs.replays.items() if n}
    assert sum(graphs.replays.values()) == len(static_steps)  # every step fitted a bucket
    replayed = {(d, c) for _, d, c in used}
    assert {(True, 16), (True, 32)} <= replayed and replayed & {(False, 16), (False, 32)}, used
    assert all(b.batch.lora.rank_class == key[2] for key, b in graphs.buckets.items() if key[2])
    assert engine.blocks.num_used == 0
    assert cache.slot_rank[cache.lookup(engine.registry.resolve(MIX))] == 24  # a mix: one slot, its summed rank


def test_rank_classes_off_use_max_lora_rank(hotlora_cache, tiny_adapters):
    engine = _engine(hotlora_cache, tiny_adapters, lora_rank_classes=False)
    runner = engine.runner
    assert runner.rank_classes == (64,)
    graphs = runner.graphs = runner.step_graphs(capture=False)
    keys = graphs.keys()
    assert len(keys) == graph_count(4, 8, 1) and {c for *_, c in keys} == {0, 64}
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    drain(engine, {0: [Request("off", [5, 6, 7], params, "qv8")]})
    assert {key[2] for key, n in graphs.replays.items() if n} == {64}


@interpret
def test_shrink_in_producers_gives_the_same_tokens(hotlora_cache, tiny_adapters, monkeypatch):
    """Steps of up to 4 tokens with their LoRA shrinks inside the norm and SiLU*mul kernels (kernels.lora_fused;
    HOTLORA_LORA_PRODUCER=4) decode the tokens of the separate shrink kernel (=0), with every rank class of the
    workload; the Triton kernels on the CPU under the interpreter."""
    from hotlora.server.model import llama

    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1")
    fused_rows: list[int] = []
    real = llama.norm_shrink
    monkeypatch.setattr(llama, "norm_shrink", lambda h, *a: (fused_rows.append(h.shape[0]), real(h, *a))[1])
    outs = {}
    for limit in ("0", "4"):
        monkeypatch.setenv("HOTLORA_LORA_PRODUCER", limit)
        engine = _engine(hotlora_cache, tiny_adapters)
        outs[limit] = _workload(engine)
        assert engine.blocks.num_used == 0
        assert bool(fused_rows) == (limit == "4")
    assert set(fused_rows) <= {1, 2, 3, 4} and len(set(fused_rows)) > 1
    assert outs["4"] == outs["0"] and all(len(t) == N_NEW for t in outs["0"].values())
