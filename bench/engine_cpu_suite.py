"""Issue 16's CPU cases (run through `bench/engine_cpu.py --suite`): batch 1 and batch 8 with and without
adapters, single-request latency, and the mixed batches against transformers + peft in the same run.

Every case is the best of `repeat` runs on one warm engine per base format; greedy, EOS ignored, adapters
r=12 (alpha 16) on all seven projections with random non-zero B.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from engine_cpu import make_adapters, run_peft, workload

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams
from hotlora.server.model.weights import DEFAULT_MODEL, resolve_checkpoint

Work = list[tuple[list[int], str | None, int]]


def _requests(tag: str, work: Work) -> list[Request]:
    return [Request(f"{tag}-{i}", ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), a)
            for i, (ids, a, n) in enumerate(work)]


def batch_tok_s(engine: LLMEngine, work: Work, repeat: int, tag: str) -> float:
    """Generated tokens / wall time of the whole batch (prefill included), best of `repeat`."""
    best = 0.0
    for rep in range(repeat):
        t0 = time.perf_counter()
        outs = engine.generate(_requests(f"{tag}{rep}", work))
        best = max(best, sum(len(o.new_token_ids) for o in outs) / (time.perf_counter() - t0))
    return best


def single_latency(engine: LLMEngine, work: Work, repeat: int, tag: str) -> tuple[float, float, float]:
    """One request stepped alone: (tok/s, TTFT ms, TPOT ms), each the best of `repeat`."""
    tok_s, ttft, tpot = 0.0, float("inf"), float("inf")
    for rep in range(repeat):
        (req,) = _requests(f"{tag}{rep}", work)
        t0 = time.perf_counter()
        engine.add_request(req)
        first, count, done = None, 0, False
        while not done:
            for out in engine.step():
                count += len(out.new_token_ids)
                if first is None and out.new_token_ids:
                    first = time.perf_counter()
                done = done or out.finished
        end = time.perf_counter()
        tok_s = max(tok_s, count / (end - t0))
        ttft = min(ttft, (first - t0) * 1e3)
        tpot = min(tpot, (end - first) * 1e3 / max(count - 1, 1))
    return tok_s, ttft, tpot


def _row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)  # as each case ends: partial runs count


def _suite_one(quant: str, tokenizer, folder: Path, paths: dict[str, Path], max_tokens: int, repeat: int) -> None:
    names = list(paths)
    engine = LLMEngine(EngineConfig(model=DEFAULT_MODEL, quant=quant, max_loras=len(paths), max_lora_rank=16))
    for name, path in paths.items():
        engine.registry.register(name, path)
    one_base, one_lora = (workload(tokenizer, 1, a, max_tokens, False) for a in ([], names[:1]))
    mixed8, base8 = workload(tokenizer, 8, names[:3], max_tokens, False), workload(tokenizer, 8, [], max_tokens, False)
    mixed32, base32 = workload(tokenizer, 32, names, max_tokens, False), workload(tokenizer, 32, [], max_tokens, False)
    engine.generate(_requests("warm", mixed32[:9]))  # every adapter resident, every code path once
    q = {"nf4": "NF4", "none": "fp32"}.get(quant, quant)
    b1, b1_ttft, b1_tpot = single_latency(engine, one_base, repeat, "b1")
    _row(q, "1 request, base", f"{b1:.1f}", "", "", f"TTFT {b1_ttft:.0f} ms, TPOT {b1_tpot:.1f} ms")
    a1, a1_ttft, a1_tpot = single_latency(engine, one_lora, repeat, "a1")
    _row(q, "1 request, one adapter", f"{a1:.1f}", "", "",
         f"{a1 / b1:.0%} of base; TTFT {a1_ttft:.0f} ms, TPOT {a1_tpot:.1f} ms")
    b8 = batch_tok_s(engine, base8, repeat, "b8")
    _row(q, "8 requests, base", f"{b8:.1f}", "", "", "")
    m8 = batch_tok_s(engine, mixed8, repeat, "m8")
    m32 = batch_tok_s(engine, mixed32, repeat, "m32")
    b32 = batch_tok_s(engine, base32, repeat, "b32")  # the base model alone: the floor the mixed cases share
    _row(q, "32 requests, base", f"{b32:.1f}", "", "", "")
    del engine
    pad = tokenizer.pad_token_id or 0
    p8_dt, p8_tok = run_peft(quant, folder, mixed8, paths, pad, repeat)
    p8 = p8_tok / p8_dt
    _row(q, "8 requests, 3 adapters + base", f"{m8:.1f}", f"{p8:.1f}", f"{m8 / p8:.2f}x",
         f"{m8 / b8:.0%} of 8 base; 8 base = {b8 / p8:.2f}x peft's mixed")
    p32_dt, p32_tok = run_peft(quant, folder, mixed32, paths, pad, repeat)
    p32 = p32_tok / p32_dt
    _row(q, "32 requests, 8 adapters + base", f"{m32:.1f}", f"{p32:.1f}", f"{m32 / p32:.2f}x",
         f"{m32 / b32:.0%} of 32 base; 32 base = {b32 / p32:.2f}x peft's mixed")


def run_suite(quants: list[str], max_tokens: int, repeat: int) -> None:
    from transformers import AutoTokenizer

    ckpt = resolve_checkpoint(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir), local_files_only=True)
    print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{max_tokens} new tokens per request, greedy, EOS ignored, best of {repeat}\n")
    print("| base weights | case | hotlora tok/s | transformers + peft tok/s | speed-up | notes |")
    print("|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(ckpt.path, Path(tmp), 8, rank=12)
        for quant in quants:
            _suite_one(quant, tokenizer, ckpt.path, paths, max_tokens, repeat)
