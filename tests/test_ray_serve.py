"""hotlora behind Ray Serve on a local Ray cluster: 2 replicas of the default model, adapters in a shared
S3-compatible store (moto's server mode). One cluster for the module: starting it and loading the model
twice is most of the time these tests take."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_harness import AUTH, TOKEN, free_port, until, upload

pytest.importorskip("ray.serve")

PROMPT = "The three primary colors are"
TTL = 1.0


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory, hotlora_cache, default_checkpoint):
    """`hotlora serve-ray` itself, in a subprocess that starts its local Ray cluster (stopped with it). The model
    is converted first (default_checkpoint, once under conftest's lock), not by both replicas at once."""
    port, log = free_port(), tmp_path_factory.mktemp("serve-ray") / "serve-ray.log"
    # 2 device slots per replica: 4 adapters fit on 2 replicas only if routing keeps each on one replica
    flags = dict(model="default", quant="none", cache_dir=hotlora_cache, adapter_dir=tmp_path_factory.mktemp("cache"),
                 max_loras=2, max_lora_rank=16, max_model_len=512, kv_cache_memory=0.25, max_upload_bytes="64M",
                 adapter_store=s3.url("ray"), s3_endpoint_url=s3.endpoint, adapter_store_ttl_s=TTL, replicas=2,
                 cpus_per_replica=0.5, replica_host="127.0.0.1", replica_port=free_port(), host="127.0.0.1", port=port)
    argv = [sys.executable, "-m", "hotlora.server.cli", "serve-ray", "--no-ray-dashboard"]
    argv += [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    # Ray Serve kills a proxy that misses 3 ready checks of 5 s each; on 2 cores shared with another xdist worker
    # (make test) it can take longer than that to start, and serve.start then fails; 30 s a check is patience only
    env = os.environ | {"HOTLORA_ADMIN_TOKEN": TOKEN, "RAY_ADDRESS": "", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: proc.poll() is not None or len(replicas(url)) == 2, timeout=600,
              what="2 replicas up")
        assert proc.poll() is None, log.read_text()[-4000:]
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _die_with_parent() -> None:
    """SIGTERM to the child when pytest dies (a timeout, a kill): no Ray cluster outlives the test run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)


def replicas(url: str) -> list[dict]:
    try:
        r = httpx.get(url + "/-/replicas", timeout=10)
    except httpx.HTTPError:
        return []
    return [t["labels"] for t in r.json()] if r.status_code == 200 else []


def complete(url: str, model: str, n: int = 6) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def text(url: str, model: str, n: int = 6) -> str:
    r = complete(url, model, n)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def stream_text(url: str, model: str, n: int, started: threading.Event, out: list[str],
                done: threading.Event) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "stream": True, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["text"])
                started.set()
    done.set()


def test_upload_swap_and_delete_reach_both_replicas(cluster, peft_dirs):
    with httpx.Client(base_url=cluster, timeout=300) as http:
        for name, spec in (("swap", "x"), ("y-ref", "y")):
            r = upload(http, name, peft_dirs[spec])
            assert r.status_code == 201, r.text
    urls = [r["url"] for r in replicas(cluster)]
    n = 48  # the in-flight requests outlast the upload on a busy machine
    old, new = text(urls[0], "swap", n), text(urls[0], "y-ref", n)
    assert old != new and [text(u, "swap", n) for u in urls] == [old, old]  # served by both replicas
    outs: list[list[str]] = [[], []]
    events, done = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]
    streams = [threading.Thread(target=stream_text, args=(u, "swap", n, e, o, d))
               for u, e, o, d in zip(urls, events, outs, done, strict=True)]
    for t in streams:
        t.start()
    assert all(e.wait(120) for e in events)
    with httpx.Client(base_url=cluster, timeout=300) as http:  # the hot swap, through the ingress
        assert upload(http, "swap", peft_dirs["y"]).json()["replaced"] is True
    assert not any(d.is_set() for d in done), "an in-flight request finished before the swap"
    time.sleep(TTL)  # past the TTL, every replica serves the new version to new requests
    assert [text(u, "swap", n) for u in urls] == [new, new]
    for t in streams:
        t.join(120)
    assert ["".join(o) for o in outs] == [old, old]  # in-flight requests finished on the old version
    with httpx.Client(base_url=cluster, timeout=300) as http:
        assert http.delete("/admin/adapters/swap", headers=AUTH).status_code == 200
    time.sleep(TTL)
    assert [complete(u, "swap").status_code for u in [*urls, cluster]] == [404, 404, 404]


def metric(url: str, name: str) -> dict[str, float]:
    """adapter label -> value of one labelled counter in a replica's /metrics."""
    body = httpx.get(url + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(rf'^{name}_total{{adapter="([^"]*)"}} (\S+)$', body, re.M)}


def test_requests_stick_to_replicas_with_their_adapter(cluster, peft_dirs):
    names = [f"aff{i}" for i in range(4)]
    with httpx.Client(base_url=cluster, timeout=300) as http:
        for name, spec in zip(names, ("a", "b", "c", "x"), strict=True):
            assert upload(http, name, peft_dirs[spec]).status_code == 201
    for name in names:  # warm-up: each adapter's first request loads it somewhere
        text(cluster, name, 1)
    urls = [r["url"] for r in replicas(cluster)]
    before = [metric(u, "hotlora_adapter_hits") for u in urls]
    rounds = 10
    for _ in range(rounds):
        for name in names:
            text(cluster, name, 1)
    after = [metric(u, "hotlora_adapter_hits") for u in urls]
    hits = sum(a.get(n, 0) - b.get(n, 0) for a, b in zip(after, before, strict=True) for n in names)
    assert hits >= 0.9 * rounds * len(names), f"{hits} of {rounds * len(names)} hits: {before} -> {after}"


def test_killing_a_replica_fails_only_its_in_flight_requests(cluster):
    base = httpx.get(cluster + "/v1/models", timeout=30).json()["data"][0]["id"]
    victim = replicas(cluster)[0]
    results: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                results.append(complete(cluster, base, 4).status_code)
            except httpx.HTTPError:
                results.append(-1)

    clients = [threading.Thread(target=client) for _ in range(2)]
    for t in clients:
        t.start()
    until(lambda: len(results) >= 4, timeout=120, what="requests before the kill")
    os.kill(int(victim["pid"]), signal.SIGKILL)
    killed_at = len(results)
    until(lambda: len(replicas(cluster)) == 2 and victim["pid"] not in {r["pid"] for r in replicas(cluster)},
          timeout=600, what="Ray to bring the replica back")
    until(lambda: len(results) >= killed_at + 4, timeout=120, what="requests after the restart")
    stop.set()
    for t in clients:
        t.join(120)
    failures = [s for s in results if s != 200]
    assert len(failures) <= len(clients), results  # at most what was in flight on the killed replica


def test_routing_keys_and_the_shared_store_requirement():
    from hotlora.server.api.state import ServerSettings
    from hotlora.server.ray_serve import build_app, routing_key

    assert routing_key("POST", "v1/completions", b'{"model": "lora-7", "prompt": "x"}') == "lora-7"
    assert routing_key("POST", "/v1/chat/completions", b'{"model": "base"}') == "base"
    assert routing_key("POST", "v1/completions", b"not json") == ""
    assert routing_key("DELETE", "admin/adapters/lora-7", b"") == "lora-7"
    assert routing_key("POST", "admin/adapters/lora-7/load", b"") == "lora-7"
    assert routing_key("GET", "v1/models", b"") == ""
    with pytest.raises(ValueError, match="shared adapter store"):
        build_app(ServerSettings(), replicas=2)
    assert build_app(ServerSettings(adapter_store="s3://bucket/prefix"), replicas=2) is not None


def test_the_single_process_server_never_imports_ray():
    code = ("import sys, hotlora.server.cli, hotlora.server.api.app; "
            "from hotlora.server.cli import build_parser; build_parser().parse_args(['serve-ray', '--replicas', '3']); "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_two_replicas_binding_at_once_get_different_ports():
    """Replicas on one host bind from the same base port; the second must not share the first's port (with
    SO_REUSEADDR both binds succeed until one socket listens, and the loser registered the winner's URL)."""
    from hotlora.server.ray_serve import _bind

    first = _bind("127.0.0.1", 0)
    base = first.getsockname()[1]
    second = _bind("127.0.0.1", base)
    try:
        assert second.getsockname()[1] != base
    finally:
        first.close()
        second.close()


def test_serve_ray_hands_the_gil_switch_interval_to_its_replicas():
    """--gil-switch-interval is a `serve` flag serve-ray takes too: it must reach the replicas' processes (where
    the engine thread runs), not be parsed and dropped."""
    from hotlora.server.cli import build_parser
    from hotlora.server.cli_ray import ray_app_kwargs
    from hotlora.server.ray_serve import build_app

    args = build_parser().parse_args(["serve-ray", "--gil-switch-interval", "0.002", "--gpus-per-replica", "0",
                                      "--replicas", "1"])
    kwargs = ray_app_kwargs(args)
    assert kwargs["gil_switch_interval"] == 0.002
    replica = build_app(**kwargs)._bound_deployment.init_args[0]  # the ingress is bound to the replica deployment
    assert replica._bound_deployment.init_args[-1] == 0.002


def test_the_ingress_refuses_large_bodies_and_odd_methods_in_openai_shape(cluster):
    """A body past --max-body-bytes is a 413 from the ingress (it was a plain-text 500 once the whole body had
    crossed to a replica); OPTIONS reaches the replica's own 405 (it was FastAPI's {"detail": ...})."""
    r = httpx.post(cluster + "/v1/completions", content=b"x" * (9 << 20), timeout=120,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    r = httpx.options(cluster + "/v1/completions", timeout=60)
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    assert httpx.get(cluster + "/v1/models", timeout=60).status_code == 200  # the ingress still serves
