"""What the sampler's processors cost per step, on the logits alone (no model): the batched penalties
(presence/frequency/repetition with their [rows, vocab] token counts), logit_bias + the min_tokens mask,
and the structured-output bitmask: its fill on the host (every row's matcher at a different point of a JSON
schema, with the default model's tokenizer: the Llama-3 tokenizer is not on this machine, so the mask is
padded to --vocab), its apply on the device, and the whole of apply_grammars as the sampler calls it.

    python bench/sampler_cost.py --batch 32 --vocab 128256 --history 640    # the Llama-3-8B vocab

--sample times sample() itself instead (no processors, no grammar) at batch 32 and 64, for greedy rows,
temperature 1, top_p 0.95, top_k 50 and temperature 1 with 5 logprobs, beside the sampler it replaced (a
copy kept here only: every drawn row's logits copied to the host and drawn in a Python loop with its own CPU
generator, logprobs as whole host rows), so one run gives both columns:

    python bench/sampler_cost.py --sample --vocab 128256
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
import xgrammar as xgr

from hotlora.server.engine.types import SamplingParams, StructuredSpec
from hotlora.server.model.grammar import GrammarCache, apply_grammars
from hotlora.server.model.logits import temperature_min_p
from hotlora.server.model.sampler import SampleRequest, process, sample
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


def _legacy_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(-1)
        logits = logits.clone()
        logits[order[(probs.cumsum(-1) - probs) >= top_p]] = float("-inf")
    return logits


def _legacy_sample(logits: torch.Tensor, requests: list[SampleRequest], gens: list[torch.Generator]) -> list:
    """The sampler before it ran on the device (the same processors; logprobs left out of its loop below)."""
    logits = process(logits, requests, {2})
    tokens = torch.argmax(logits, dim=-1).tolist()
    drawn = [i for i, r in enumerate(requests) if not r.params.greedy]
    if drawn:
        scaled = temperature_min_p(logits[drawn], [requests[i].params for i in drawn]).cpu()
        for row, i in enumerate(drawn):
            p = requests[i].params
            probs = _legacy_filter(scaled[row], p.top_k, p.top_p).softmax(-1)
            tokens[i] = int(torch.argmax(probs / torch.empty_like(probs).exponential_(generator=gens[i])))
    asked = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if asked:
        lp = torch.log_softmax(logits[asked].float(), dim=-1).cpu()
        for row, i in enumerate(asked):
            values, ids = torch.topk(lp[row], requests[i].params.logprobs)
            tokens[i] = (tokens[i], float(lp[row, tokens[i]]), ids.tolist(), values.tolist())
    return tokens


def _median_ms(fn, device: torch.device, iters: int) -> float:
    """The median of single timed calls: robust to the other processes of a shared host."""
    times = []
    for _ in range(iters + 2):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times[2:])[iters // 2]


def _sample_section(args: argparse.Namespace, dev: torch.device) -> dict:
    """Median ms per sample() call, "now" and "before", per batch and mode."""
    modes = {"greedy": SamplingParams(temperature=0.0), "temperature_1": SamplingParams(temperature=1.0),
             "top_p_0.95": SamplingParams(temperature=1.0, top_p=0.95),
             "top_k_50": SamplingParams(temperature=1.0, top_k=50),
             "logprobs_5": SamplingParams(temperature=1.0, logprobs=5)}
    out: dict = {}
    for batch in (32, 64):
        logits = torch.randn(batch, args.vocab, device=dev) * 3
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        for name, params in modes.items():
            reqs = [SampleRequest(params, seed) for seed in range(batch)]
            out[f"b{batch}_{name}"] = {
                "now_ms": round(_median_ms(partial(sample, logits, reqs), dev, args.iters), 2),
                "before_ms": round(_median_ms(partial(_legacy_sample, logits, reqs, gens), dev, args.iters), 2),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--history", type=int, default=640, help="prompt + generated tokens per row")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer folder for the grammar (default: the default model's; the GPU machine has no "
                         "copy of it: bring its tokenizer.json + tokenizer_config.json in a folder)")
    ap.add_argument("--sample", action="store_true", help="time sample() against the sampler it replaced")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.sample:
        device = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(json.dumps({"device": device, "vocab": args.vocab, "iters": args.iters, **_sample_section(args, dev)}))
        return
    logits = torch.randn(args.batch, args.vocab, device=dev)
    hist = torch.randint(0, args.vocab, (args.batch, args.history)).tolist()
    def reqs(params: SamplingParams) -> list[SampleRequest]:
        return [SampleRequest(params, 0, 0, h[: args.history // 2], h[args.history // 2 :]) for h in hist]

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
