"""Prefill step time on the GPU: Llama-3-8B shape (random weights), NF4 base, one request whose whole prompt is one
engine step, with nf4_ss_kernel served (HOTLORA_NF4_SS=1) against not (=0), in one run.

    python bench/prefill_steps.py [--tokens 288 320 384 448 512] [--rounds 6] [--graphs] [--ops] [--host-profile]
                                  [--no-engine] [--profile T]

At 384-768 rows gate/up and down take nf4_ss_kernel where it is served (kernels/_nf4_configs.ss_config); with it off
they take the tl.dot tile or dense + cuBLAS. There is one engine per setting, built (and with --graphs, its CUDA
graphs captured) under that setting, and each request runs under its engine's setting, alternating round by round.
--graphs is how the engine serves on CUDA (server/model/graphs.py: prefill steps too are replayed from graphs, padded
to a token bucket: 288-320 tokens take the 384-token graph, 448 the 512-token one); without it every step runs
eagerly, where the host's launch cost shows. Each timed request has a fresh random prompt (no prefix-cache hit) and
max_tokens=1, so it ends with its prefill step; the time is add_request to its output, device synchronized, the
median and the minimum over rounds. On a machine without CUDA it runs (--preset tiny) as a smoke test of the script
only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest.mock import patch

import torch

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prefill_ms(engine: LLMEngine, tokens: int, g: torch.Generator) -> float:
    """Wall time of one request of `tokens` random prompt tokens and one output token, in ms."""
    ids = torch.randint(3, 49152, (tokens,), generator=g).tolist()
    _sync()
    t = time.perf_counter()
    engine.add_request(Request(f"p{time.monotonic_ns()}", ids, SamplingParams(max_tokens=1, temperature=0.0)))
    while engine.has_unfinished():
        engine.step()
    _sync()
    return 1e3 * (time.perf_counter() - t)


def _packed(k: int, widths: tuple[int, ...]):
    from nf4_gemm import nf4_members

    from hotlora.kernels.nf4 import pack_nf4, pack_nf4_group

    return pack_nf4_group([pack_nf4(p, s) for p, s in nf4_members(k, widths)])


def host_profile(tokens: int = 384, calls: int = 30) -> None:
    """cProfile of `calls` eager gate/up calls at `tokens` rows, ss served and not: where the host time goes (the
    twelve functions with the most time of their own, and the eighteen with the most in all)."""
    import cProfile
    import pstats

    from hotlora.kernels.nf4 import nf4_matmul

    w = _packed(4096, (14336, 14336))
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    for flag in ("1", "0"):
        with patch.dict(os.environ, {"HOTLORA_NF4_SS": flag}):
            nf4_matmul(x, w)
            _sync()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                nf4_matmul(x, w)
            prof.disable()
            _sync()
        print(f"## host profile, gate/up, {tokens} rows, HOTLORA_NF4_SS={flag}, {calls} calls", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(18)


def op_times(tokens: list[int], calls: int = 50) -> None:
    """gate/up (4096 -> 28672) and down (14336 -> 4096) alone at each T, ss served and not: the host time of `calls`
    eager calls back to back (until the last returns, not synchronized: what launching costs the host), their wall
    time (synchronized; the GPU idles if the host is slower) and the device time of one call replayed from a CUDA
    graph (bench/graph_timing; one weight copy, so down's 29 MB may sit in L2), in us per call."""
    from graph_timing import graph_time_us

    from hotlora.kernels.nf4 import nf4_matmul

    print("\n| op | T | ss host | ss eager | ss graph | off host | off eager | off graph |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, k, widths in (("gate/up", 4096, (14336, 14336)), ("down", 14336, (4096,))):
        w = _packed(k, widths)
        for t in tokens:
            x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
            cells = []
            for flag in ("1", "0"):
                with patch.dict(os.environ, {"HOTLORA_NF4_SS": flag}):
                    nf4_matmul(x, w)
                    _sync()
                    start = time.perf_counter()
                    for _ in range(calls):
                        nf4_matmul(x, w)
                    host = 1e6 * (time.perf_counter() - start) / calls
                    _sync()
                    eager = 1e6 * (time.perf_counter() - start) / calls
                    cells += [host, eager, graph_time_us(lambda i, x=x, w=w: nf4_matmul(x, w), 1)]
            print(f"| {name} | {t} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


def profile_step(engines: dict[str, LLMEngine], tokens: int, g: torch.Generator) -> None:
    """torch.profiler over two prefill steps of `tokens` tokens, ss served and not: the ten kernels with the most
    device time (a kernel's total / 2 is its time a step), and the step's device and host totals."""
    from torch.profiler import ProfilerActivity, profile

    for flag in ("1", "0"):
        with patch.dict(os.environ, {"HOTLORA_NF4_SS": flag}):
            prefill_ms(engines[flag], tokens, g)  # warm
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    prefill_ms(engines[flag], tokens, g)
        print(f"## profile, two prefill steps of {tokens} tokens, HOTLORA_NF4_SS={flag}", flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[288, 320, 384, 448, 512])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--graphs", action="store_true", help="replay steps from CUDA graphs, as the engine serves")
    ap.add_argument("--ops", action="store_true", help="first time gate/up and down alone (op_times)")
    ap.add_argument("--host-profile", action="store_true", help="first profile the host side (host_profile)")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine's prefill steps")
    ap.add_argument("--profile", type=int, default=0, help="also profile prefill steps of this many tokens")
    args = ap.parse_args()
    if args.host_profile:
        host_profile()
    if args.ops:
        op_times(args.tokens)
    if args.no_engine:
        return
    engines = {}
    for flag in ("1", "0"):
        with patch.dict(os.environ, {"HOTLORA_NF4_SS": flag}):
            engines[flag] = LLMEngine(EngineConfig(
                model=f"random:{args.preset}", quant="nf4", max_num_seqs=8, max_num_batched_tokens=max(args.tokens),
                kv_cache_memory=0.1, cuda_graphs=args.graphs, lora_rank_classes=False))
    g = torch.Generator().manual_seed(0)
    if args.profile:
        profile_step(engines, args.profile, g)
    times: dict[tuple[int, str], list[float]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (Triton compiles every config once)
        for tokens in args.tokens:
            for flag in ("1", "0") if r % 2 else ("0", "1"):
                with patch.dict(os.environ, {"HOTLORA_NF4_SS": flag}):
                    ms = prefill_ms(engines[flag], tokens, g)
                if r:
                    times.setdefault((tokens, flag), []).append(ms)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test only)"
    mode = "CUDA graphs" if args.graphs else "eager"
    print(f"Device: {device}; {mode}. One prefill step of T tokens, ms over {args.rounds} rounds: median / min (the "
          "min is the step least disturbed by the host). Eagerly, rows below 384 tokens (ss never reached) show the "
          "run's noise; from graphs they are padded to the 384-token bucket.")
    print("\n| T | ss served (=1) | ss off (=0) | =1 / =0 (medians) |\n|---|---|---|---|")
    for tokens in args.tokens:
        on, off = (times[tokens, f] for f in ("1", "0"))
        print(f"| {tokens} | {statistics.median(on):.2f} / {min(on):.2f} | {statistics.median(off):.2f} / "
              f"{min(off):.2f} | {statistics.median(on) / statistics.median(off):.3f} |", flush=True)


if __name__ == "__main__":
    main()
