"""What the sampler's processors cost per step, on the logits alone (no model): the batched penalties
(presence/frequency/repetition with their [rows, vocab] token counts), logit_bias + the min_tokens mask,
and the structured-output bitmask: its fill on the host (every row's matcher at a different point of a JSON
schema, with the default model's tokenizer: the Llama-3 tokenizer is not on this machine, so the mask is
padded to --vocab), its apply on the device, and the whole of apply_grammars as the sampler calls it.

    python bench/sampler_cost.py --batch 32 --vocab 128256 --history 640    # the Llama-3-8B vocab
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import xgrammar as xgr

from hotlora.server.engine.types import SamplingParams, StructuredSpec
from hotlora.server.model.grammar import GrammarCache, apply_grammars
from hotlora.server.model.sampler import SampleRequest, process
from hotlora.server.model.tokenizer import load_tokenizer
from hotlora.server.model.weights import DEFAULT_MODEL, resolve_checkpoint

SCHEMA = {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                     "required": ["id", "tag", "name"],
                                     "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                    "tag": {"enum": ["red", "green", "blue"]},
                                                    "name": {"type": "string", "maxLength": 16}}}}
VALID = '[{"id": 17, "tag": "green", "name": "a short name"}, {"id": 3, "tag": "red", "name": "x y"}]'


def _matchers(batch: int, vocab: int, tokenizer: Path | None) -> list:
    """batch matchers of SCHEMA, row i advanced through i tokens of a valid output (so rows sit in strings,
    numbers, enums, between keys). tokenizer: a tokenizer folder, else the default model's (converted here)."""
    tok = load_tokenizer(tokenizer or resolve_checkpoint(DEFAULT_MODEL).tokenizer_dir)
    cache = GrammarCache(tok, vocab, {tok.eos_token_id})
    spec = StructuredSpec("json", json.dumps(SCHEMA))
    ids = tok.encode(VALID, add_special_tokens=False)
    matchers = []
    for i in range(batch):
        m = cache.matcher(spec)
        for t in ids[: i % len(ids)]:
            assert m.accept_token(t)
        matchers.append(m)
    return matchers


def _timed(fn, device: torch.device, iters: int) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--history", type=int, default=640, help="prompt + generated tokens per row")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer folder for the grammar (default: the default model's; the GPU machine has no "
                         "copy of it: bring its tokenizer.json + tokenizer_config.json in a folder)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits = torch.randn(args.batch, args.vocab, device=dev)
    hist = torch.randint(0, args.vocab, (args.batch, args.history)).tolist()
    gen = torch.Generator()

    def reqs(params: SamplingParams) -> list[SampleRequest]:
        return [SampleRequest(params, gen, h[: args.history // 2], h[args.history // 2 :]) for h in hist]

    penalties = reqs(SamplingParams(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5))
    bias = reqs(SamplingParams(logit_bias={i: 1.0 for i in range(300)}, min_tokens=16, max_tokens=32))
    # an all-ones bitmask costs the same to apply as a real grammar's; the host fill is measured apart
    bitmask = xgr.allocate_token_bitmask(args.batch, args.vocab)
    rows = list(range(args.batch))

    def apply_bitmask() -> None:
        out = logits.clone()
        xgr.apply_token_bitmask_inplace(out, bitmask.to(dev, non_blocking=True), indices=rows)

    matchers = _matchers(args.batch, args.vocab, args.tokenizer)

    def fill() -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    result = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "batch": args.batch, "vocab": args.vocab, "history": args.history,
        "penalties_ms": _timed(lambda: process(logits, penalties, {2}), dev, args.iters),
        "logit_bias_min_tokens_ms": _timed(lambda: process(logits, bias, {2}), dev, args.iters),
        "bitmask_apply_ms": _timed(apply_bitmask, dev, args.iters),
        "bitmask_fill_host_ms": _timed(fill, torch.device("cpu"), args.iters),
        "apply_grammars_ms": _timed(lambda: apply_grammars(logits, matchers), dev, args.iters),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
