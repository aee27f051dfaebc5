"""Where a prefix-cache hit's time to first token goes inside the engine (issue 13), no HTTP.

The engine decodes --decoders requests (prompt --decoder-prompt, over adapters a0, a1, ...), as under issue 13's
serving run (about 14 decode rows a step at 6 req/s), and times decode-only steps. Then, one at a time, a request
arrives made of one of 8 cached 1,024-token system prompts plus --user new tokens on a cached adapter, or a cold one
(no cached prefix), and the engine steps until its first token. Per case it prints:

- the engine's TTFT: from the add to the output on the host (asynchronous scheduling on, as served), p50/mean;
- with --profile, the device time a step by kernel family, of the steps around the hits less as many decode-only
  steps: what the hit's mixed step adds over a decode step.

    HOTLORA_NO_PDL=1 python bench/hit_profile.py --profile   # per-kernel times need plain launches
    python bench/hit_profile.py --preset tiny --hits 4       # CPU smoke test
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from engine_gpu import DEV, write_adapter
from step_profile import activities, by_family, kernel_times

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams

TOKENS = (1000, 30000)


def request(rid: str, prompt: list[int], adapter: str | None, max_tokens: int) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), adapter)


def until_first(engine: LLMEngine, rid: str) -> float:
    """Step until `rid` has its first token; seconds from now."""
    t0 = time.perf_counter()
    while True:
        for out in engine.step():
            if out.request_id == rid and out.new_token_ids:
                return time.perf_counter() - t0


def profiled(engine: LLMEngine, steps: int, add=None) -> dict[str, float]:
    """Device ms by family over `steps` steps, `add()` called first (a hit arriving)."""
    from torch.profiler import profile

    with profile(activities=activities()) as prof:
        if add is not None:
            add()
        for _ in range(steps):
            engine.step()
        if DEV == "cuda":
            torch.cuda.synchronize()
    return {fam: us / 1e3 for fam, us in by_family(kernel_times(prof)).items()}


def main() -> HitBench:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--decoders", type=int, default=14)
    ap.add_argument("--decoder-prompt", type=int, default=128,
                    help="the background decodes' prompt (issue 13's serving run: ~1,100-1,300 tokens of context)")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--hits", type=int, default=16, help="hits per case")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--user", type=int, nargs="+", default=[64, 160, 256], help="new tokens after the prefix")
    ap.add_argument("--profile", action="store_true", help="also the device time by kernel family (160 tokens)")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=f"random:{args.preset}", quant="nf4", max_loras=64, max_lora_rank=16))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_adapter(Path(tmp) / "lora", args.preset, 16)
        bench = HitBench(engine, args, folder)
        bench.cases()
        if args.profile:
            bench.profile()
    engine.registry.close()
    return bench


class HitBench:
    """The engine with its prefixes cached and its background decodes running."""

    def __init__(self, engine: LLMEngine, args: argparse.Namespace, folder: Path) -> None:
        self.engine, self.args, self.rng, self.n = engine, args, random.Random(0), 0
        self.names = [f"a{i}" for i in range(args.adapters)]
        self.prefixes = [self.tokens(args.prefix_len) for _ in range(8)]
        for n in self.names:
            engine.registry.register(n, folder)
        for i, p in enumerate(self.prefixes):  # cache each prefix on two adapters; warm the graphs
            for a in self.names[:2]:
                engine.add_request(request(f"prime-{i}-{a}", p + self.tokens(1), a, 2))
        while engine.has_unfinished():
            engine.step()
        for i in range(args.decoders):  # the background decodes, long enough to outlast every case
            engine.add_request(request(f"bg-{i}", self.tokens(args.decoder_prompt), self.names[i % len(self.names)],
                                       100_000))  # fmt: skip
        for _ in range(8):
            engine.step()
        steps = []
        for _ in range(32):  # decode-only steps, wall time each (asynchronous scheduling: one step in flight)
            t0 = time.perf_counter()
            engine.step()
            steps.append(1e3 * (time.perf_counter() - t0))
        print(f"decode step ({args.decoders} rows, prompt {args.decoder_prompt}): p50 {statistics.median(steps):.3f} "
              "ms wall", flush=True)

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(*TOKENS) for _ in range(n)]

    def arrival(self, user: int, cached: bool = True) -> Request:
        self.n += 1
        head = self.rng.choice(self.prefixes) if cached else self.tokens(self.args.prefix_len)
        return request(f"hit-{self.n}", head + self.tokens(user), self.rng.choice(self.names[:2]), 1)

    def cases(self) -> None:
        cases = [(f"hit, {u} new tokens", u, True) for u in self.args.user] + [("cold, 160 + prefix", 160, False)]
        for label, user, cached in cases:
            times = []
            for _ in range(self.args.hits):
                req = self.arrival(user, cached)
                self.engine.add_request(req)
                times.append(until_first(self.engine, req.request_id))
                for _ in range(2):
                    self.engine.step()
            ms = sorted(1e3 * t for t in times)
            print(f"{label}: engine TTFT p50 {statistics.median(ms):.2f} ms, mean {statistics.mean(ms):.2f}, "
                  f"min {ms[0]:.2f}, max {ms[-1]:.2f}", flush=True)

    def profile(self, w: int = 6) -> None:
        """Windows of w steps with a hit (160 new tokens) arriving first, against windows of w decode steps."""
        k = max(4, self.args.hits // 2)
        base: dict[str, float] = defaultdict(float)
        hit: dict[str, float] = defaultdict(float)
        for _ in range(k):
            for fam, t in profiled(self.engine, w).items():
                base[fam] += t / k
            req = self.arrival(160)
            for fam, t in profiled(self.engine, w, lambda r=req: self.engine.add_request(r)).items():
                hit[fam] += t / k
        print(f"\ndecode step: {sum(base.values()) / w:.3f} device ms; a hit (160 new tokens) adds "
              f"{sum(hit.values()) - sum(base.values()):.3f} ms over {w} steps, by family (decode step, hit's extra):")
        for fam in sorted(set(base) | set(hit), key=lambda f: -(hit[f] - base[f])):
            print(f"  {fam:30s} {base[fam] / w:7.3f}  {hit[fam] - base[fam]:+7.3f}")

if __name__ == "__main__":
    main()
