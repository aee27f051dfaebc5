"""Where a request's time to first token goes outside the engine, on this machine's CPU: sequential streaming
requests against real servers on loopback, every boundary stamped on one clock (time.monotonic, which is
clock_gettime(CLOCK_MONOTONIC) on Linux: the same clock in every process of the machine).

Servers, each a subprocess (its own GIL, as in production): a hotlora server on random:tiny (the CPU, no
quantization) per --build, and a bare uvicorn + httptools ASGI app that drains the body and answers one SSE chunk
(the floor of the HTTP stack itself). Rounds alternate over every (server, route, client) combination, N requests
each, after a few untimed ones. The hotlora servers' stamps are taken by hooks installed only in those
subprocesses (http_stamps.py: wrappers around the functions named below), never by the server's own code.

Boundaries of a hotlora request (a `key` in the output):
  send      client, before the request is written (body JSON encoding included, as bench/serve.py does it)
  recv      the server's HTTP parser sees the request's first byte (httptools on_message_begin)
  body_in   the parser has the whole body (on_message_complete)
  asgi      the ASGI app is called (uvicorn's task for the request runs)
  route     the matched route's app is called (the middlewares and routing passed)
  handler   the route handler runs (body read, JSON parsed, pydantic validated)
  add       AsyncEngine.add_all is called (the route's work: model, prompt, choices, sampling params)
  eng_add   the engine thread executes the add (engine.add_requests)
  added     add_all returns on the event loop
  queued/scheduled/first_token   the engine's own RequestTiming (the server's ttft_parts: queue, prefill)
  seen      the API holds the first token (RequestTimer.first_seen: the end of `delivery`)
  sent      the SSE chunk with the first token is written to the transport
  got       the client has that chunk

Output: one JSON object, per (server, route, client): n, and for each segment {p50, mean, min} in ms, the
per-round medians' spread (min/max of the round medians) for the totals. --out writes it to a file too.

    python bench/http_overhead.py --requests 200 --rounds 4
    # A/B: two builds side by side (a folder holding hotlora/{server,kernels,adapters} links to a checkout)
    python bench/http_overhead.py --build base=/tmp/base-pkgs --build new=
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serve import wait_ready

HERE = Path(__file__).resolve().parent
PROMPT_TOKENS = 1184
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# segments of a hotlora request: name -> (from, to)
SEGMENTS = {
    "client_to_recv": ("send", "recv"), "recv_to_body_in": ("recv", "body_in"), "recv_to_asgi": ("recv", "asgi"),
    "asgi_to_route": ("asgi", "route"), "route_to_body_read": ("route", "body_read"),
    "body_read_to_json": ("body_read", "json"), "json_to_handler": ("json", "handler"),
    "handler_to_add": ("handler", "add"), "add_to_eng_add": ("add", "eng_add"), "add_to_added": ("add", "added"),
    "queue": ("queued", "scheduled"), "prefill": ("scheduled", "first_token"), "delivery": ("first_token", "seen"),
    "seen_to_sent": ("seen", "sent"), "sent_to_got": ("sent", "got"),
    "outside_before": ("send", "add"), "outside_after": ("seen", "got"), "ttft": ("send", "got"),
}  # fmt: skip
BARE_SEGMENTS = {"client_to_recv": ("send", "recv"), "recv_to_asgi": ("recv", "asgi"), "asgi_to_sent": ("asgi", "sent"),
                 "sent_to_got": ("sent", "got"), "ttft": ("send", "got")}  # fmt: skip


def bodies(seed: int = 0) -> dict[str, dict]:
    rng = random.Random(seed)
    ids = [rng.randrange(100, 5000) for _ in range(PROMPT_TOKENS)]
    text = " ".join(f"word{rng.randrange(1000)}" for _ in range(PROMPT_TOKENS // 3))
    common = {"model": "m", "max_tokens": 1, "temperature": 0.0, "ignore_eos": True, "stream": True}
    return {"completions": common | {"prompt": ids}, "chat": common | {"messages": [{"role": "user", "content": text}]}}


# --- clients --------------------------------------------------------------------------------------------------


def _token_chunk(line: str) -> bool:
    """Whether an SSE line carries generated text (not the chat's role chunk, not [DONE])."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("text") or (choices[0].get("delta") or {}).get("content"))


async def httpx_one(client: httpx.AsyncClient, path: str, body: dict) -> dict[str, float]:
    t = {"send": time.monotonic()}
    async with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            now = time.monotonic()
            if "got" not in t and _token_chunk(line):
                t["got"] = now
    return t


async def aiohttp_one(session, path: str, body: dict) -> dict[str, float]:
    t = {"send": time.monotonic()}
    async with session.post(path, json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            now = time.monotonic()
            if "got" not in t and _token_chunk(raw.decode().rstrip("\n")):
                t["got"] = now
    return t


async def drive(client_kind: str, url: str, path: str, body: dict, n: int, warmup: int) -> list[dict[str, float]]:
    """n timed sequential requests (after `warmup` untimed ones) over one keep-alive connection."""
    if client_kind == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=None))
        one = aiohttp_one
    else:
        session = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None, connect=30))
        one = httpx_one
    async with session:
        for _ in range(warmup):
            await one(session, path, body)
        return [await one(session, path, body) for _ in range(n)]


# --- servers --------------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, pythonpath: str, cache: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, HOTLORA_CACHE=cache, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        p for p in (pythonpath, str(HERE), os.environ.get("PYTHONPATH", "")) if p))
    cmd = [sys.executable, str(HERE / "http_stamps.py"), kind, str(port)]
    return subprocess.Popen(cmd, env=env), f"http://127.0.0.1:{port}"


def server_stamps(url: str, path: str) -> list[dict[str, float]]:
    """The server's records of the requests to `path` since the last read (and forgets them)."""
    records = httpx.get(url + "/_bench/stamps", timeout=30).json()
    return [r for r in records if r.get("path") == path]


# --- the run --------------------------------------------------------------------------------------------------


def segments(records: list[dict[str, float]], spec: dict[str, tuple[str, str]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in spec}
    for r in records:
        for name, (a, b) in spec.items():
            if a in r and b in r:
                out[name].append(1000 * (r[b] - r[a]))
    return out


def run_combo(url: str, route: str, client: str, body: dict, a: argparse.Namespace, bare: bool) -> dict[str, list]:
    path = "/bare" if bare else ROUTES[route]
    server_stamps(url, path)  # forget anything earlier
    client_t = asyncio.run(drive(client, url, path, body, a.requests, a.warmup))
    server_t = server_stamps(url, path)[-len(client_t):]
    if len(server_t) != len(client_t):
        raise SystemExit(f"{url}{path}: {len(server_t)} server records for {len(client_t)} requests")
    merged = [s | c for s, c in zip(server_t, client_t, strict=True)]
    return segments(merged, BARE_SEGMENTS if bare else SEGMENTS)


def summarize(per_round: list[dict[str, list[float]]]) -> dict:
    names = per_round[0].keys()
    out = {"n": sum(len(r["ttft"]) for r in per_round)}
    for name in names:
        values = [v for r in per_round for v in r[name]]
        if not values:
            continue
        medians = [statistics.median(r[name]) for r in per_round if r[name]]
        out[name] = {"p50": round(statistics.median(values), 3), "mean": round(statistics.fmean(values), 3),
                     "min": round(min(values), 3), "round_p50s": [round(m, 3) for m in medians]}  # fmt: skip
    return out


def benchmark(a: argparse.Namespace) -> dict:
    builds = dict(b.split("=", 1) for b in a.build) if a.build else {"here": ""}
    procs: dict[str, tuple[subprocess.Popen, str]] = {f"hotlora:{n}": launch("hotlora", p, a.cache)
                                                      for n, p in builds.items()}  # fmt: skip
    procs["bare"] = launch("bare", "", a.cache)
    try:
        for name, (proc, url) in procs.items():
            wait_ready(url, proc, 600.0, "/bare-ready" if name == "bare" else "/ready")
        combos = [(name, route, client) for name in procs for route in (["completions"] if name == "bare" else
                  a.routes) for client in a.clients]  # fmt: skip
        all_bodies = bodies()
        results: dict[tuple, list] = {c: [] for c in combos}
        for r in range(a.rounds):
            order = combos if r % 2 == 0 else combos[::-1]  # alternate, so drift hits every combination alike
            for name, route, client in order:
                url = procs[name][1]
                results[(name, route, client)].append(
                    run_combo(url, route, client, all_bodies[route], a, bare=name == "bare"))
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(timeout=60)
    return {"config": {"requests": a.requests, "rounds": a.rounds, "warmup": a.warmup, "prompt_tokens": PROMPT_TOKENS,
                       "builds": builds, "cpus": os.cpu_count()},
            "results": {"/".join(k): summarize(v) for k, v in results.items()}}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100, help="timed requests per combination and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10, help="untimed requests before each combination's timed ones")
    p.add_argument("--routes", default="completions,chat", type=lambda s: s.split(","))
    p.add_argument("--clients", default="httpx,aiohttp", type=lambda s: s.split(","))
    p.add_argument("--build", action="append", default=[], metavar="NAME=PYTHONPATH",
                   help="a hotlora build to serve (its packages first on PYTHONPATH; empty: the installed one)")
    p.add_argument("--cache", default=os.environ.get("HOTLORA_CACHE", str(HERE.parent / ".cache" / "hotlora")),
                   help="model cache (random:tiny uses the default model's tokenizer)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def table(result: dict) -> str:
    """p50 (mean) of every segment, one line per combination."""
    lines = []
    for combo, segs in result["results"].items():
        cells = [f"{k} {v['p50']:.3f} ({v['mean']:.3f})" for k, v in segs.items() if k != "n"]
        lines.append(f"{combo} n={segs['n']}: " + ", ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    result = benchmark(a)
    text = json.dumps(result, indent=1)
    print(text)
    print(table(result), file=sys.stderr)
    if a.out is not None:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
