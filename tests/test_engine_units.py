"""Pure-Python engine parts: block manager, scheduler, detokenizer (no model)."""

from __future__ import annotations

import random

import pytest

from hotlora.server.engine.block_manager import BlockManager
from hotlora.server.engine.detokenizer import Detokenizer, DetokState, _held_back
from hotlora.server.engine.scheduler import Scheduler
from hotlora.server.engine.sequence import Sequence, SequenceStatus
from hotlora.server.engine.types import SamplingParams


def _seq(i: int, n: int, max_tokens: int = 8) -> Sequence:
    return Sequence(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), arrival=i)


def _scheduler(blocks: int, block_size: int = 4, max_seqs: int = 8, budget: int = 64, admit=None):
    released: list[str] = []
    bm = BlockManager(blocks, block_size)
    s = Scheduler(bm, max_seqs, budget, admit=admit or (lambda seq: True),
                  release=lambda seq: released.append(seq.request_id))
    return s, bm, released


def test_block_manager_refcounts_and_free():
    bm = BlockManager(4, 2)
    a, b = _seq(0, 3), _seq(1, 1)
    bm.allocate(a, 3)
    assert len(a.block_table) == 2 and bm.num_free == 2
    bm.fork(a, b)
    bm.release(a)
    assert bm.num_free == 2  # still referenced by b
    bm.release(b)
    assert bm.num_free == 4 and all(c == 0 for c in bm.ref_counts)
    with pytest.raises(RuntimeError):
        bm.allocate(a, 9)


def _run_step(s: Scheduler):
    """Pretend the model ran: computed tokens advance, finished prefills get a token."""
    batch = s.schedule()
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        seq.num_computed += n
        if seq.num_computed == len(seq):
            seq.token_ids.append(7)
            if seq.num_generated >= seq.params.max_tokens:
                s.finish(seq)
    return batch


def test_token_budget_chunks_prefill_and_mixes_decodes():
    s, bm, _ = _scheduler(blocks=64, budget=10)
    long, short = _seq(0, 25), _seq(1, 3)
    s.add(long)
    s.add(short)
    first = _run_step(s)
    assert first.num_tokens == [10]  # the long prompt's first chunk takes the whole budget
    second = _run_step(s)
    assert second.seqs == [long] and second.num_tokens == [10]  # no budget left to admit the short one
    third = _run_step(s)
    assert third.seqs == [long, short] and third.num_tokens == [5, 3]  # last chunk + a whole prompt
    fourth = _run_step(s)
    assert fourth.num_tokens == [1, 1]  # two decodes
    while s.has_unfinished():
        b = _run_step(s)
        assert b.total_tokens <= 10
    assert bm.num_free == 64


def test_preemption_by_recompute_frees_and_restores():
    s, bm, released = _scheduler(blocks=6, block_size=4, budget=64)
    seqs = [_seq(i, 8, max_tokens=8) for i in range(3)]
    for q in seqs:
        s.add(q)
    steps = 0
    while s.has_unfinished():
        _run_step(s)
        steps += 1
        assert bm.num_used <= 6
        assert steps < 200
    assert s.num_preemptions > 0
    assert all(q.status is SequenceStatus.FINISHED and q.num_generated == 8 for q in seqs)
    assert bm.num_free == 6 and all(c == 0 for c in bm.ref_counts)
    assert sorted(set(released)) == ["r0", "r1", "r2"]


def test_admit_hook_skips_without_blocking_others():
    ready = {"r1"}
    s, _, _ = _scheduler(blocks=16, admit=lambda seq: seq.request_id in ready)
    a, b = _seq(0, 4), _seq(1, 4)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert batch.seqs == [b]
    assert list(s.waiting) == [a]  # a keeps its place at the head
    ready.add("r0")
    assert s.schedule().seqs[-1] is a


def test_abort_of_running_frees_blocks():
    s, bm, released = _scheduler(blocks=8)
    a = _seq(0, 6)
    s.add(a)
    _run_step(s)
    assert bm.num_used == 2
    s.finish(a)
    assert bm.num_used == 0 and released == ["r0"] and not s.has_unfinished()


class _ByteTokenizer:
    """Each token is one UTF-8 byte; undecodable tails show as U+FFFD, as HF tokenizers do."""

    def decode(self, ids, **_):
        return bytes(ids).decode("utf-8", errors="replace")


def _detok_stream(text: str, stops: list[str]) -> tuple[list[str], bool]:
    d = Detokenizer(_ByteTokenizer())
    seq = Sequence("r", [0], SamplingParams(stop=stops))
    seq.detok = DetokState()
    pieces, stopped = [], False
    data = text.encode()
    for i, byte in enumerate(data):
        seq.token_ids.append(byte)
        piece, stopped = d.update(seq, final=i == len(data) - 1, drop_last=False)
        pieces.append(piece)
        if stopped:
            break
    return pieces, stopped


def test_detokenizer_never_splits_multibyte_characters():
    pieces, _ = _detok_stream("héllo €uro 😀!", [])
    assert "".join(pieces) == "héllo €uro 😀!"
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_holds_back_partial_stop_strings():
    pieces, stopped = _detok_stream("abc END def", ["END"])
    assert stopped and "".join(pieces) == "abc "
    pieces, stopped = _detok_stream("abc EN", ["END"])
    assert not stopped and "".join(pieces) == "abc EN"  # released at the end, when it cannot complete
    pieces, _ = _detok_stream("xx ENxEND", ["END"])
    assert "".join(pieces) == "xx ENx"


def _held_back_by_every_length(text: str, stops: list[str]) -> int:
    """_held_back's definition, tried at every length (its former code)."""
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)


def test_held_back_equals_its_definition():
    rng = random.Random(0)
    for _ in range(5000):
        alphabet = rng.choice(["a", "ab", "abc", "abcdefgh"])  # one letter: "aaaa" against "aaa" and the like
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 25))) for _ in range(rng.randint(0, 3))]
        assert _held_back(text, stops) == _held_back_by_every_length(text, stops), (text, stops)


class _CountedSlices(str):
    """A str that counts the characters sliced out of it."""

    sliced = 0

    def __getitem__(self, key):
        piece = super().__getitem__(key)
        _CountedSlices.sliced += len(piece)
        return piece


def test_held_back_work_is_linear_in_long_stop_strings():
    """16 stops of 20,000 characters: trying every length sliced ~16 * 20,000**2 / 2 characters a step; now each
    start of a candidate suffix is probed on a few characters."""
    rng = random.Random(1)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(1, 8))) for _ in range(200)]
    stops = [_CountedSlices("".join(rng.choices("abcdefghij ", k=20_000))) for _ in range(16)]
    text = _CountedSlices(" ".join(rng.choices(words, k=20_000)) + stops[5][:5000])
    _CountedSlices.sliced = 0
    assert _held_back(text, stops) == 5000
    assert _CountedSlices.sliced < 20 * 20_000 * len(stops)  # linear: a few characters per candidate


def test_detokenizer_is_incremental_and_matches_a_full_decode(default_model_dir):
    """With the default model's byte-level BPE tokenizer: the streamed pieces join to the full decode of
    the ids (emoji and accented words split over several tokens included), and no step decodes more
    than a few ids however long the sequence gets."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)
    rng = random.Random(0)
    ids = tok.encode("Grüße 😀 naïve café — 東京 " * 3) + [rng.randrange(100, 49152) for _ in range(200)]
    rng.shuffle(ids)
    lengths: list[int] = []
    d = Detokenizer(tok)
    full_decode = d.decode

    def decode(window: list[int]) -> str:
        lengths.append(len(window))
        return full_decode(window)

    d.decode = decode
    seq = Sequence("r", [0], SamplingParams())
    seq.detok = DetokState()
    pieces = []
    for i, t in enumerate(ids):
        seq.token_ids.append(t)
        pieces.append(d.update(seq, final=i == len(ids) - 1, drop_last=False)[0])
    assert "".join(pieces) == full_decode(ids)
    assert max(lengths) <= 8, max(lengths)


def test_tokenizer_option_replaces_the_models_tokenizer(hotlora_cache, default_model_dir, tmp_path):
    """--tokenizer DIR: a random-weight model gets DIR's tokenizer (here the default one with an extra token)."""
    from transformers import AutoTokenizer

    from hotlora.server.engine.config import EngineConfig
    from hotlora.server.engine.engine import LLMEngine

    tok = AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)
    tok.add_tokens(["<|hotlora-marker|>"])
    tok.save_pretrained(str(tmp_path))
    eng = LLMEngine(EngineConfig(model="random:tiny", quant="none", cache_dir=hotlora_cache, kv_cache_memory=0.01,
                                 tokenizer=str(tmp_path)))
    assert eng.tokenizer.convert_tokens_to_ids("<|hotlora-marker|>") == len(tok) - 1
    with pytest.raises(OSError):
        LLMEngine(EngineConfig(model="random:tiny", quant="none", cache_dir=hotlora_cache, kv_cache_memory=0.01,
                               tokenizer=str(tmp_path / "missing")))
