"""Open-loop serving benchmark against hotlora's HTTP server (in the style of vLLM's benchmark_serving).

Requests arrive on a Poisson clock (--rate, requests/s; 0 sends them all at once), each with a random
prompt of token ids (--prompt-len LO:HI, uniform), a completion of exactly --output-len LO:HI tokens
(ignore_eos, which the server honours as vLLM does), optionally after one of --shared-prefixes K
system prompts of --prefix-len tokens (for prefix caching), and an adapter drawn from --adapters (uniform, or
Zipf(--zipf S) over the order given; the base model when none are given). Every request is streamed
from /v1/completions; one JSON object is printed (and written to --out):

    requests, completed, errors, duration_s, req_per_s, output_tok_per_s,
    ttft_ms {p50, p99, mean}, tpot_ms {p50, p99}, itl_ms {p99, p100}, the server counters read from /metrics (gc<G>_s,
    gc<G>_c: seconds and count of the server's garbage collections of generation G);
    steps, step_ms, step_tokens_mean, step_phases_ms {phase: mean ms per step}, step_phase_share {phase:
    share of the step wall time}, host_share (all but device_wait): the engine's step timer over the timed run;
    client_cpu_share: this process's CPU seconds over the run's (near 1: the client limits what it measures; a
    server in the same process counts too);
    ttft_parts_ms {queue, prefill, delivery: {p50, p99, mean, n}}: where the server's TTFT went, from its
    request-phase histograms over the timed run (percentiles interpolated inside the buckets, means exact;
    see bench/serve_metrics.py)

TPOT is per request: (latency - TTFT) / (output tokens - 1); ITL is the gap between streamed chunks.

Untimed first: --warmup N short requests over the adapters in order (compilations and the hottest loads), and
--warmup-workload N, the workload's own first N requests at once with 2 output tokens each (a server in steady
state, e.g. with the shared prefixes cached, before the timed requests that follow them in the same draw).

The client is aiohttp (as vLLM's benchmark_serving): against a bare uvicorn SSE app on loopback, a request's time to
its first chunk took 0.27-0.29 ms with it and 0.60-0.68 ms with httpx on the 2-core dev CPU (bench/http_overhead.py),
time that the measured TTFT would otherwise carry. httpx stays for the untimed calls (/ready, /v1/models, /metrics).

Why a thin client and not aiperf or guidellm: neither draws a per-request adapter (model) from a
Zipf popularity (aiperf picks uniformly or round-robin among --model names, guidellm benchmarks one
model per run), both build synthetic prompts with a tokenizer fetched from the Hugging Face hub, which
the GPU machine cannot reach, and neither reads hotlora's own counters from /metrics.

    # against a running server
    python bench/serve.py --url http://127.0.0.1:8000 --requests 200 --rate 6 \
        --prompt-len 64:1024 --output-len 32:256 --adapters $(python bench/serve.py --list-adapters DIR) --zipf 1.1
    # start the server too (arguments of `hotlora serve`); it is stopped at the end
    python bench/serve.py --launch "--model random:llama-3-8b --adapter-dir /tmp/adapters --max-loras 64" ...
    # write adapters first (see bench/make_adapters.py)
    python bench/serve.py --make-adapters 1000 --rank 8 --targets q,v,o --model random:llama-3-8b --adapter-dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
from serve_metrics import read_counters, step_profile, ttft_parts

# hotlora counters worth reporting with the latencies: output key -> Prometheus sample name
TOKEN_RANGE = (100, 5000)  # prompt token ids: past the special tokens, inside every supported vocabulary


def span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


@dataclass(slots=True)
class Planned:
    arrival: float  # seconds after the start
    prompt: list[int]
    max_tokens: int
    model: str


@dataclass(slots=True)
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)


def plan(n: int, rate: float, prompt_len: tuple[int, int], output_len: tuple[int, int], models: list[str],
         zipf: float | None, seed: int, shared: tuple[int, int] = (0, 0)) -> list[Planned]:
    """The requests, in arrival order. shared = (K, L): every prompt starts with one of K fixed L-token
    prefixes (a system prompt, chosen uniformly) and --prompt-len is the length of the part after it."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** zipf for k in range(len(models))] if zipf else None
    prefixes = [[rng.randrange(*TOKEN_RANGE) for _ in range(shared[1])] for _ in range(shared[0])]
    t, out = 0.0, []
    for _ in range(n):
        if rate > 0:
            t += rng.expovariate(rate)
        head = rng.choice(prefixes) if prefixes else []
        prompt = head + [rng.randrange(*TOKEN_RANGE) for _ in range(rng.randint(*prompt_len))]
        model = rng.choices(models, weights=weights)[0]
        out.append(Planned(t, prompt, rng.randint(*output_len), model))
    return out


def rebased(planned: list[Planned]) -> list[Planned]:
    """The timed requests with the first one at 0: the clock (duration_s, hence req/s and tok/s) starts with the
    first send, not a Poisson gap before it (0.6% of a 300-request run at 6/s)."""
    t0 = planned[0].arrival if planned else 0.0
    return [Planned(p.arrival - t0, p.prompt, p.max_tokens, p.model) for p in planned]


async def one(session: aiohttp.ClientSession, url: str, p: Planned) -> Result:
    body = {"model": p.model, "prompt": p.prompt, "max_tokens": p.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res, start = Result(), time.perf_counter()
    last = start
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return res
            async for raw in r.content:  # one line at a time, "\n" included
                now = time.perf_counter()  # when the chunk arrived, before this client parses it
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.gaps.append(now - last)
                    last = now
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - start
    res.ok = res.ttft > 0
    res.error = "" if res.ok else "no tokens streamed"
    return res


async def run(url: str, planned: list[Planned]) -> tuple[list[Result], float]:
    # no limit on connections (limit=0), as many at once as the arrivals ask for; lines up to 16 MiB (a chunk of
    # many logprobs is one line)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    # the full URL per request, no base_url: aiohttp would refuse a --url with a path, or drop its path
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=1 << 24) as session:
        start = time.perf_counter()

        async def at(p: Planned) -> Result:
            await asyncio.sleep(max(0.0, start + p.arrival - time.perf_counter()))
            return await one(session, url, p)

        results = await asyncio.gather(*(at(p) for p in planned))
        return list(results), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(values: list[float], *qs: int) -> dict[str, float | None]:
    out = {}
    for q in qs:
        v = percentile(values, q)
        out[f"p{q}"] = None if v is None else round(v * 1000, 3)
    return out


def mean_ms(values: list[float]) -> dict[str, float]:
    """{"mean": ms} ({} for none): against the server's exact TTFT-part means, what lies outside the engine."""
    return {"mean": round(1000 * sum(values) / len(values), 3)} if values else {}


def summarize(results: list[Result], duration: float) -> dict:
    done = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = [r.error for r in results if not r.ok]
    return {
        "requests": len(results), "completed": len(done), "errors": len(errors),
        "duration_s": round(duration, 3), "req_per_s": round(len(done) / duration, 3) if duration else 0.0,
        "output_tok_per_s": round(tokens / duration, 2) if duration else 0.0,
        "ttft_ms": ms([r.ttft for r in done], 50, 99) | mean_ms([r.ttft for r in done]), "tpot_ms": ms(tpot, 50, 99),
        "itl_ms": ms([g for r in done for g in r.gaps], 99, 100),
        "first_errors": sorted(set(errors))[:3],
    }  # fmt: skip


def base_model(url: str) -> str:
    models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    return next((m["id"] for m in models if m.get("parent") is None), models[0]["id"])


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float, path: str = "/ready") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} was not ready after {timeout:.0f} s")


def launch(args_text: str, url: str) -> subprocess.Popen:
    """`hotlora serve <args>` on the --url's host and port, in this Python."""
    parsed = httpx.URL(url)
    cmd = [sys.executable, "-m", "hotlora.server.cli", "serve", *shlex.split(args_text),
           "--host", parsed.host, "--port", str(parsed.port or 80)]
    print("launching:", shlex.join(cmd), file=sys.stderr)
    return subprocess.Popen(cmd)


def make_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer whose every id decodes to its own word (" w123"), for random-weight models.

    A random model samples over its whole vocabulary; with a smaller real tokenizer most ids decode to
    nothing and stream no text, which would hide tokens from the client's clock. Give it to the server
    with `hotlora serve --tokenizer DIR`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


def list_adapters(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file())


def benchmark(a: argparse.Namespace) -> dict:
    url = a.url.rstrip("/")
    proc = launch(a.launch, url) if a.launch is not None else None
    try:
        wait_ready(url, proc, a.ready_timeout)
        models = [m for m in a.adapters.split(",") if m] if a.adapters else [base_model(url)]
        planned = plan(a.warmup_workload + a.requests, a.rate, a.prompt_len, a.output_len, models, a.zipf,
                       a.seed, (a.shared_prefixes, a.prefix_len))
        warm, planned = planned[: a.warmup_workload], planned[a.warmup_workload :]
        planned = rebased(planned)
        if warm:  # steady state: the workload's own first requests, at once and cut to 2 tokens, untimed
            failed = [r.error for r in asyncio.run(run(url, [Planned(0.0, p.prompt, 2, p.model) for p in warm]))[0]
                      if not r.ok]
            if failed:
                raise SystemExit(f"warm-up requests failed: {failed[:3]}")
        if a.warmup:  # first compilations and the most popular adapters' loads stay out of the numbers
            warm = [Planned(0.0, [TOKEN_RANGE[0] + i] * 8, 2, models[i % len(models)]) for i in range(a.warmup)]
            failed = [r.error for r in asyncio.run(run(url, warm))[0] if not r.ok]
            if failed:
                raise SystemExit(f"warm-up requests failed: {failed[:3]}")
        before = read_counters(url)
        cpu = time.process_time()
        results, duration = asyncio.run(run(url, planned))
        cpu = time.process_time() - cpu
        after = read_counters(url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    summary = summarize(results, duration)
    # this client's own CPU over the run: near 1 it is the bottleneck (one event loop parses every chunk), and
    # ITL tails and burst throughput then measure it rather than the server
    summary["client_cpu_share"] = round(cpu / duration, 3) if duration else 0.0
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    summary.update(step_profile(delta))
    summary["ttft_parts_ms"] = ttft_parts(delta)
    summary["server"] = server = {k: v for k, v in delta.items() if not k.startswith(("step_", "ttft_"))}
    for t in ("disk_to_cpu", "cpu_to_gpu"):  # mean seconds per adapter load, by tier boundary
        if server.get(f"load_{t}_n"):
            server[f"load_{t}_mean_ms"] = 1000 * server[f"load_{t}_s"] / server[f"load_{t}_n"]
    if server.get("prefix_cache_queries"):
        server["prefix_cache_hit_rate"] = server.get("prefix_cache_hits", 0.0) / server["prefix_cache_queries"]
    summary["config"] = {"rate": a.rate, "prompt_len": a.prompt_len, "output_len": a.output_len,
                         "models": len(models), "zipf": a.zipf, "seed": a.seed, "warmup": a.warmup,
                         "warmup_workload": a.warmup_workload,
                         "shared_prefixes": a.shared_prefixes, "prefix_len": a.prefix_len}
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second; 0 = all at once")
    p.add_argument("--prompt-len", type=span, default=(64, 1024), metavar="LO:HI")
    p.add_argument("--output-len", type=span, default=(32, 256), metavar="LO:HI")
    p.add_argument("--adapters", default="", help="a,b,...: adapter names (default: the base model)")
    p.add_argument("--zipf", type=float, default=None, help="Zipf exponent over --adapters (default uniform)")
    p.add_argument("--shared-prefixes", type=int, default=0, metavar="K",
                   help="prompts start with one of K shared --prefix-len-token prefixes (system prompts)")
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="first send N short requests (untimed), on the adapters in --adapters order")
    p.add_argument("--warmup-workload", type=int, default=0, metavar="N",
                   help="first send the workload's own first N requests (all at once, 2 output tokens each, "
                        "untimed): a server in steady state, e.g. with its shared prefixes cached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--launch", default=None, metavar="SERVE_ARGS", help="start `hotlora serve SERVE_ARGS` first")
    p.add_argument("--ready-timeout", type=float, default=1800.0)
    p.add_argument("--list-adapters", type=Path, default=None, metavar="DIR",
                   help="print the adapter names in DIR, comma-separated, and exit")
    p.add_argument("--make-tokenizer", type=Path, default=None, metavar="DIR",
                   help="write a word-level tokenizer of --vocab ids into DIR (for random:<preset>) and exit")
    p.add_argument("--vocab", type=int, default=128256)
    g = p.add_argument_group("writing adapters (bench/make_adapters.py), then exit")
    g.add_argument("--make-adapters", type=int, default=None, metavar="N")
    g.add_argument("--adapter-dir", type=Path, default=Path("bench-adapters"))
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--targets", default="q,v,o")
    g.add_argument("--model", default="default")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.list_adapters is not None:
        print(",".join(list_adapters(a.list_adapters)))
        return
    if a.make_tokenizer is not None:
        make_tokenizer(a.make_tokenizer, a.vocab)
        return
    if a.make_adapters is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from make_adapters import main as make

        make(["--out", str(a.adapter_dir), "--count", str(a.make_adapters), "--rank", str(a.rank),
              "--targets", a.targets, "--model", a.model, "--seed", str(a.seed)])
        return
    summary = benchmark(a)
    text = json.dumps(summary, indent=2)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
