"""Prefix caching on CPU: summed prefill time of 16 requests that share a 512-token prefix, caching on vs off.

Each request is a fresh random 512-token prefix (new every repetition, so the cache starts cold) plus its own
16 random tokens, greedy, one output token: every engine step is prefill work, and the wall time of the
steps is the prefill time. Two arrival patterns, both engines in the same process, interleaved:
- sequential: one request after another (each alone in the engine); summed over the 16;
- burst: the first request alone (it fills the cache), then the other 15 together.
Outputs must be equal token for token; the hit counters are read from the engine.

    .venv/bin/python bench/prefix_cpu.py --repeat 3
    .venv/bin/python bench/prefix_cpu.py --quant none nf4 --requests 16 --prefix 512 --suffix 16
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections.abc import Callable

import torch

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams
from hotlora.server.model.weights import DEFAULT_MODEL

ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def prompts(rng: random.Random, n: int, prefix: int, suffix: int) -> list[list[int]]:
    shared = [rng.randrange(100, 40000) for _ in range(prefix)]
    return [shared + [rng.randrange(100, 40000) for _ in range(suffix)] for _ in range(n)]


def sequential(engine: LLMEngine, work: list[list[int]], tag: str) -> tuple[float, list[list[int]]]:
    total, outs = 0.0, []
    for i, p in enumerate(work):
        t0 = time.perf_counter()
        (out,) = engine.generate([Request(f"{tag}-{i}", p, ONE)])
        total += time.perf_counter() - t0
        outs.append(out.new_token_ids)
    return total, outs


def burst(engine: LLMEngine, work: list[list[int]], tag: str) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    first = engine.generate([Request(f"{tag}-0", work[0], ONE)])
    rest = engine.generate([Request(f"{tag}-{i}", p, ONE) for i, p in enumerate(work[1:], 1)])
    return time.perf_counter() - t0, [o.new_token_ids for o in first + rest]


def measure(engines: dict[str, LLMEngine], pattern: Callable, args: argparse.Namespace) -> dict[str, float]:
    """Best of --repeat for each side; both sides get the same prompts, in alternating order."""
    best = {"off": float("inf"), "on": float("inf")}
    rng = random.Random(pattern.__name__)  # fresh prefixes per pattern: each starts cold
    hits0 = engines["on"].stats()
    for rep in range(args.repeat):
        work = prompts(rng, args.requests, args.prefix, args.suffix)
        outs = {}
        for side in ("off", "on") if rep % 2 == 0 else ("on", "off"):
            dt, outs[side] = pattern(engines[side], work, f"{pattern.__name__}{rep}{side}")
            best[side] = min(best[side], dt)
        assert outs["on"] == outs["off"], "prefix caching changed an output"
    s = engines["on"].stats()
    best["queries"] = s.prefix_cache_queries - hits0.prefix_cache_queries
    best["hits"] = s.prefix_cache_hits - hits0.prefix_cache_hits
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--quant", nargs="+", default=["none"])
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs for each side (each a fresh prefix)")
    args = ap.parse_args()
    print(f"\nCPU: {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.requests} requests = {args.prefix}-token shared prefix + "
          f"{args.suffix} own tokens, 1 output token, best of {args.repeat}\n")
    print("| base | arrivals | caching off s | caching on s | speed-up | hit rate (tokens) |")
    print("|---|---|---|---|---|---|")
    for quant in args.quant:
        engines = {side: LLMEngine(EngineConfig(model=DEFAULT_MODEL, quant=quant, kv_cache_memory=0.5,
                                                enable_prefix_caching=side == "on")) for side in ("off", "on")}
        for e in engines.values():  # warm-up: first-call allocations stay out of the timings
            e.generate([Request("warm", list(range(100, 164)), ONE)])
        for pattern in (sequential, burst):
            r = measure(engines, pattern, args)
            print(f"| {quant} | {pattern.__name__} | {r['off']:.2f} | {r['on']:.2f} | {r['off'] / r['on']:.1f}x "
                  f"| {r['hits'] / r['queries']:.1%} ({int(r['hits'])} / {int(r['queries'])}) |", flush=True)


if __name__ == "__main__":
    main()
