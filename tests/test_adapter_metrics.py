"""Residency metrics through /metrics of a real server: load, use, eviction, pin, unpin, unload, hot swap, delete."""

from __future__ import annotations

import shutil

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import AUTH, ServerThread, server_settings, upload


def _scrape(http: httpx.Client) -> dict[str, list]:
    text = http.get("/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _loaded(m: dict[str, list]) -> dict[tuple[str, str], tuple[str, str]]:
    """(adapter, level) -> (pinned, rank) for every resident adapter."""
    return {(s.labels["adapter_name"], s.labels["level"]): (s.labels["pinned"], s.labels["rank"])
            for s in m["vllm:lora_adapter_loaded"] if s.value == 1}


def _value(m: dict[str, list], family: str, sample: str | None = None, **labels: str) -> float:
    return next(s.value for s in m[family] if s.name == (sample or family) and labels.items() <= s.labels.items())


def _loads(m: dict[str, list], transition: str) -> float:
    return _value(m, "vllm:lora_adapter_load_seconds", "vllm:lora_adapter_load_seconds_count", transition=transition)


def _generate(http: httpx.Client, model: str) -> None:
    r = http.post("/v1/completions", json={"model": model, "prompt": [100, 200, 300], "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.timeout(300)
def test_residency_metrics_follow_the_adapter_lifecycle(tmp_path, hotlora_cache, peft_dirs):
    store = tmp_path / "store"
    for name in ("a", "c", "x"):  # r=4, r=2, r=4
        shutil.copytree(peft_dirs[name], store / name)
    srv = ServerThread(server_settings(store, hotlora_cache, max_loras=2)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            m = _scrape(http)
            assert _loaded(m) == {} and _value(m, "vllm:max_gpu_lora_adapters") == 2
            assert _value(m, "vllm:num_gpu_loaded_lora_adapters") == 0 and _loads(m, "disk_to_cpu") == 0

            _generate(http, "a")  # load: disk -> host -> device
            m = _scrape(http)
            assert _loaded(m) == {("a", "gpu"): ("false", "4"), ("a", "cpu"): ("false", "4")}
            assert _loads(m, "disk_to_cpu") == 1 and _loads(m, "cpu_to_gpu") == 1
            assert _value(m, "hotlora_adapter_loads", "hotlora_adapter_loads_total", adapter="a") == 1
            _generate(http, "a")  # use: a hit, no load
            m = _scrape(http)
            assert _value(m, "hotlora_adapter_hits", "hotlora_adapter_hits_total", adapter="a") == 1
            assert _loads(m, "cpu_to_gpu") == 1

            _generate(http, "c")
            _generate(http, "x")  # two slots: "a", least recently used, is evicted to the host tier
            m = _scrape(http)
            assert {k for k in _loaded(m) if k[1] == "gpu"} == {("c", "gpu"), ("x", "gpu")}
            assert ("a", "cpu") in _loaded(m) and _value(m, "vllm:num_gpu_loaded_lora_adapters") == 2
            assert _value(m, "hotlora_adapter_evictions", "hotlora_adapter_evictions_total", adapter="a") == 1

            assert http.post("/admin/adapters/a/load", headers=AUTH).status_code == 200  # pin: evicts "c"
            m = _scrape(http)
            assert _loaded(m)[("a", "gpu")] == ("true", "4") and ("c", "gpu") not in _loaded(m)
            srv.call(srv.engine.registry.unpin, "a")
            assert _loaded(_scrape(http))[("a", "gpu")] == ("false", "4")

            r = http.post("/admin/adapters/x/unload", headers=AUTH)
            assert r.status_code == 200 and r.json()["slot_freed"] and r.json()["residency"] == "host"
            m = _scrape(http)
            assert ("x", "gpu") not in _loaded(m) and _value(m, "vllm:num_gpu_loaded_lora_adapters") == 1

            assert upload(http, "a", peft_dirs["c"]).status_code == 200  # hot swap to an r=2 adapter
            m = _scrape(http)
            # the old version left the device; the upload's copy is in host memory already
            assert {k: v for k, v in _loaded(m).items() if k[0] == "a"} == {("a", "cpu"): ("false", "2")}
            _generate(http, "a")
            assert _loaded(_scrape(http))[("a", "gpu")] == ("false", "2")

            assert http.delete("/admin/adapters/a", headers=AUTH).status_code == 200
            m = _scrape(http)
            assert not {k for k in _loaded(m) if k[0] == "a"}
            assert _value(m, "vllm:num_gpu_loaded_lora_adapters") == 0

            _generate(http, "c*0.5+x")  # a mix holds a device slot of its own: a router must see it taken
            m = _scrape(http)
            assert not {k for k in _loaded(m) if k[1] == "gpu"} and _value(m, "vllm:num_gpu_loaded_lora_adapters") == 1
    finally:
        srv.stop()


def test_load_phase_summary_median():
    """LoadStats.summary: the p50 of an even count is the mean of the middle two, the max the largest."""
    from hotlora.adapters.loadstats import LoadStats

    stats = LoadStats()
    for seconds in (0.004, 0.001, 0.002, 0.003):
        stats.record("parse", seconds)
    assert stats.summary() == {"parse": {"n": 4, "p50_ms": 2.5, "max_ms": 4.0}}


def test_lora_requests_info_labels_every_mix_as_one_value():
    """A client may name a mix with any weights: one label value per mix would make a series per request."""
    from hotlora.server.api.metrics import Metrics
    from hotlora.server.engine.engine import EngineStats

    stats = EngineStats(num_running=3, num_waiting=1, kv_blocks_total=8, kv_blocks_used=1, max_loras=4,
                        running_adapters=["a", "a*0.11+c*1.0", "a*0.12+c*1.0"], waiting_adapters=["b*0.5+c"],
                        num_preemptions=0)
    text = Metrics().render(stats, [], True).decode()
    assert 'running_lora_adapters="(mix),a"' in text and 'waiting_lora_adapters="(mix)"' in text
