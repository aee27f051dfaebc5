"""Prometheus metrics (prometheus-client), one registry per app so several servers can share a process.

Request-level series are recorded by the API as outputs arrive; engine and adapter state is read from
the engine at scrape time. Besides hotlora_* names, the few series that LoRA-aware routers read from
vLLM are exported under vLLM's names too (vllm:lora_requests_info, vllm:num_requests_running,
vllm:num_requests_waiting, vllm:kv_cache_usage_perc, vllm:cache_config_info, vllm:prefix_cache_queries,
vllm:prefix_cache_hits),
with adapter residency in the shape vLLM proposes for routers (vllm:lora_adapter_loaded,
vllm:num_gpu_loaded_lora_adapters, vllm:max_gpu_lora_adapters, vllm:lora_adapter_load_seconds), and
vLLM's request-phase histograms (vllm:request_queue_time_seconds, vllm:request_prefill_time_seconds,
vllm:request_decode_time_seconds, vllm:request_inference_time_seconds, vllm:time_to_first_token_seconds,
vllm:e2e_request_latency_seconds).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from hotlora.adapters.mixspec import is_mix
from hotlora.server.api.gcheap import GcPauses

MIX_LABEL = "(mix)"  # hotlora_adapter_requests' label for every adapter mix: '(' never occurs in a name
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_E2E = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
# vLLM's buckets (vllm/v1/metrics/buckets.py) for the series exported under its names
_VLLM_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
              40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_VLLM_REQUEST = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# the request phases: every boundary of vLLM's (whose first is 0.3 s, so a dashboard's le="..." still
# matches), with vLLM's TTFT ones and a few more below a second, where queue and prefill times of an
# interactive workload lie (bench/serve.py interpolates percentiles inside these buckets)
_PHASE = tuple(sorted({*_VLLM_REQUEST, *_VLLM_TTFT, 0.0005, 0.002, 0.003, 0.0075, 0.015, 0.025, 0.03, 0.05, 0.07,
                       0.125, 0.15, 0.2}))  # fmt: skip
_DELIVERY = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1,
             0.25, 0.5, 1.0, 2.5, 5.0)  # fmt: skip


class _EngineCollector(Collector):
    """Yields the snapshot that Metrics.render() took from the engine just before the scrape."""

    def __init__(self) -> None:
        self.stats: Any = None
        self.adapters: list[Any] = []
        self.ready = False

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("hotlora_ready", "1 once the model is loaded and serving", value=float(self.ready))
        s = self.stats
        if s is None:
            return
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        for prefix, sep in (("hotlora", "_"), ("vllm", ":")):
            yield GaugeMetricFamily(
                f"{prefix}{sep}num_requests_running", "sequences in the running batch", value=s.num_running
            )
            yield GaugeMetricFamily(
                f"{prefix}{sep}num_requests_waiting", "sequences waiting to be scheduled", value=s.num_waiting
            )
            yield GaugeMetricFamily(
                f"{prefix}{sep}kv_cache_usage_perc", "fraction of KV-cache blocks in use", value=usage
            )
        cache_info = GaugeMetricFamily(  # the EPP's prefix-cache scorer sizes its index from this
            "vllm:cache_config_info",
            "KV-cache configuration (value: 1)",
            labels=["block_size", "cache_dtype", "num_gpu_blocks"],
        )
        cache_info.add_metric(
            [str(getattr(s, "block_size", 0)), getattr(s, "kv_cache_dtype", "auto"), str(s.kv_blocks_total)], 1.0
        )
        yield cache_info
        yield GaugeMetricFamily("hotlora_kv_cache_blocks_total", "KV-cache blocks", value=s.kv_blocks_total)
        yield GaugeMetricFamily("hotlora_kv_cache_blocks_used", "KV-cache blocks in use", value=s.kv_blocks_used)
        yield GaugeMetricFamily(
            "hotlora_num_preemptions", "sequences preempted so far", value=getattr(s, "num_preemptions", 0)
        )
        yield from self._prefix_cache_metrics(s)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "running/waiting LoRA adapters (value: timestamp)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric([_adapter_list(s.running_adapters), _adapter_list(s.waiting_adapters), str(s.max_loras)],
                        time.time())
        yield info
        yield CounterMetricFamily(
            "hotlora_steps_blocked_on_adapters",
            "engine steps with room in the batch where every waiting request awaited its adapter",
            value=getattr(s, "num_adapter_blocked_steps", 0),
        )
        yield CounterMetricFamily("hotlora_eager_steps", "engine steps run eagerly (no CUDA graph fitted)",
                                  value=getattr(s, "num_eager_steps", 0))
        yield CounterMetricFamily("hotlora_graph_steps", "engine steps replayed from CUDA graphs",
                                  value=getattr(s, "num_graph_steps", 0))
        yield from self._adapter_metrics()
        yield from self._residency_metrics(s)
        yield from self._step_metrics(s)

    @staticmethod
    def _step_metrics(s: Any) -> Iterable[Metric]:
        """Where each model step's wall time goes on the host (server/engine/steptimer.py), and its size."""
        phases = HistogramMetricFamily(
            "hotlora_step_phase_seconds", "engine step wall time by phase (host clock; device_wait is the sync "
            "on the step's results)", labels=["phase"],
        )
        for phase, h in getattr(s, "step_phase_seconds", {}).items():
            buckets, total = h.cumulative()
            phases.add_metric([phase], buckets, total)
        yield phases
        tokens = getattr(s, "step_tokens", None)
        if tokens is not None:
            buckets, total = tokens.cumulative()
            yield HistogramMetricFamily("hotlora_step_tokens", "tokens scheduled per model step", buckets=buckets,
                                        sum_value=total)

    def _residency_metrics(self, s: Any) -> Iterable[Metric]:
        """The shape vLLM proposes for residency-aware routing (vllm-project/vllm#54830)."""
        loaded = GaugeMetricFamily(
            "vllm:lora_adapter_loaded",
            "1 while the adapter is resident at this level (gpu: a device slot; cpu: a host copy)",
            labels=["adapter_name", "level", "pinned", "rank"],
        )
        for a in self.adapters:
            levels = [level for level, here in (("gpu", a.residency == "device"), ("cpu", a.on_host)) if here]
            for level in levels:
                loaded.add_metric([a.name, level, str(a.pinned).lower(), str(a.rank)], 1.0)
        yield loaded
        yield GaugeMetricFamily(
            "vllm:num_gpu_loaded_lora_adapters", "device slots holding (or loading) an adapter or a mix",
            value=getattr(s, "lora_slots_used", 0),
        )
        yield GaugeMetricFamily("vllm:max_gpu_lora_adapters", "device slots for adapters", value=s.max_loras)
        hist = HistogramMetricFamily(
            "vllm:lora_adapter_load_seconds", "adapter load time by transition", labels=["transition"]
        )
        for transition, h in sorted(getattr(s, "adapter_load_seconds", {}).items()):
            buckets, total = h.cumulative()
            hist.add_metric([transition], buckets, total)
        yield hist

    @staticmethod
    def _prefix_cache_metrics(s: Any) -> Iterable[Metric]:
        """Counters in tokens, as vLLM names them: hit rate = hits / queries."""
        for prefix, sep in (("hotlora", "_"), ("vllm", ":")):
            yield CounterMetricFamily(
                f"{prefix}{sep}prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                value=getattr(s, "prefix_cache_queries", 0),
            )
            yield CounterMetricFamily(
                f"{prefix}{sep}prefix_cache_hits", "prompt tokens found in the prefix cache",
                value=getattr(s, "prefix_cache_hits", 0),
            )

    def _adapter_metrics(self) -> Iterable[Metric]:
        loads = CounterMetricFamily("hotlora_adapter_loads", "adapter loads onto the device", labels=["adapter"])
        hits = CounterMetricFamily(
            "hotlora_adapter_hits", "requests that found their adapter resident", labels=["adapter"]
        )
        evictions = CounterMetricFamily(
            "hotlora_adapter_evictions", "adapter evictions from the device", labels=["adapter"]
        )
        resident = GaugeMetricFamily(
            "hotlora_adapter_resident", "1 where the adapter is resident, by place", labels=["adapter", "residency"]
        )
        pinned = GaugeMetricFamily("hotlora_adapter_pinned", "1 when the adapter is pinned", labels=["adapter"])
        for a in self.adapters:
            loads.add_metric([a.name], a.loads)
            hits.add_metric([a.name], a.hits)
            evictions.add_metric([a.name], a.evictions)
            for place in ("device", "host", "disk"):
                resident.add_metric([a.name, place], float(a.residency == place))
            pinned.add_metric([a.name], float(a.pinned))
        yield from (loads, hits, evictions, resident, pinned)
        yield GaugeMetricFamily("hotlora_adapters_registered", "adapters registered", value=len(self.adapters))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = Counter(
            "hotlora_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.requests = Counter(
            "hotlora_request_success", "finished generation requests by finish reason", ["finished_reason"], registry=r
        )
        self.adapter_requests = Counter(
            "hotlora_adapter_requests", f"generation requests by adapter ('' = base, {MIX_LABEL!r} = any mix)",
            ["adapter"], registry=r,
        )
        self.prompt_tokens = Counter("hotlora_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("hotlora_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "hotlora_time_to_first_token_seconds", "time to first token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "hotlora_inter_token_latency_seconds", "time between two output chunks", buckets=_LATENCY, registry=r
        )
        self.e2e = Histogram(
            "hotlora_e2e_request_latency_seconds", "request latency, arrival to last token", buckets=_E2E, registry=r
        )
        self.phases = RequestPhaseHistograms(r)
        self.uploads = Counter("hotlora_adapter_uploads", "admin adapter uploads by result", ["result"], registry=r)
        self.engine = _EngineCollector()
        r.register(self.engine)
        self.gc_pauses = GcPauses(r)  # installed while the app runs (create_app's lifespan)

    def timer(self, adapter: str | None, start: float = 0.0) -> RequestTimer:
        """start: when the request was handed to the engine (time.monotonic(); 0: now)."""
        # a mix counts under one label: any client can spell endless mixes, and each label is a series kept forever
        self.adapter_requests.labels(MIX_LABEL if adapter and is_mix(adapter) else adapter or "").inc()
        return RequestTimer(self, start)

    def render(self, stats: Any, adapters: list[Any], ready: bool) -> bytes:
        self.engine.stats, self.engine.adapters, self.engine.ready = stats, adapters, ready
        return generate_latest(self.registry)


def _adapter_list(names: list[str]) -> str:
    """vllm:lora_requests_info's label: the adapters' names, every mix as MIX_LABEL (a client names a mix with
    any weights it likes: one label value, and one series, per mix would be unbounded)."""
    return ",".join(sorted({MIX_LABEL if is_mix(n) else n for n in names}))


class RequestPhaseHistograms:
    """Where a request's time goes, as vLLM's request-phase histograms (vllm/v1/metrics/stats.py), from the
    engine's timestamps (types.RequestTiming) on the request's finished output, plus the hand-over of the first
    token to the API. The queue clock starts when the API hands the request to the engine, so for every
    request: time to first token = queue + prefill + delivery."""

    def __init__(self, r: CollectorRegistry) -> None:
        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        self.queue = hist("vllm:request_queue_time_seconds", "time waiting to be scheduled: handed to the engine "
                          "to the first step that computes any of its prompt (adapter loads included)", _PHASE)
        self.prefill = hist("vllm:request_prefill_time_seconds", "first scheduled to the first output token on "
                            "the engine's host (every prefill chunk, and any preemption meanwhile)", _PHASE)
        self.decode = hist("vllm:request_decode_time_seconds", "first output token to the end of the request, "
                           "in the engine", _PHASE)
        self.inference = hist("vllm:request_inference_time_seconds", "first scheduled to the end of the request, "
                              "in the engine (prefill + decode)", _PHASE)
        self.delivery = hist("hotlora_request_first_token_delivery_seconds", "the first output token on the "
                             "engine's host to the API holding it (engine thread hand-off, event loop)", _DELIVERY)
        self.ttft = hist("vllm:time_to_first_token_seconds", "time to first token (as hotlora_time_to_first_token_"
                         "seconds, in vLLM's buckets)", _VLLM_TTFT)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "request latency, arrival to last token (as "
                        "hotlora_e2e_request_latency_seconds, in vLLM's buckets)", _VLLM_REQUEST)

    def observe(self, t: Any, first_seen: float) -> None:
        """A finished request's phases, as far as it got (vLLM's rule: a request never scheduled has none, one
        scheduled but without a token only its queue time). first_seen: when the API got its first token."""
        if not t.scheduled:
            return
        self.queue.observe(t.scheduled - t.queued)
        if not t.first_token:
            return
        self.prefill.observe(t.first_token - t.scheduled)
        self.decode.observe(t.finished - t.first_token)
        self.inference.observe(t.finished - t.scheduled)
        if first_seen:
            self.delivery.observe(first_seen - t.first_token)


class RequestTimer:
    """Latency bookkeeping of one engine request, on the event loop (the engine thread never waits for it)."""

    def __init__(self, metrics: Metrics, start: float = 0.0) -> None:
        self.m = metrics
        self.start = self.last = start or time.monotonic()
        self.first_seen = 0.0  # when the first output token reached the API
        self.seen: Any = None  # the latest output (its token counts are cumulative)
        self.ended = False

    def output(self, out: Any) -> None:
        now = time.monotonic()
        self.seen = out
        if out.new_token_ids:
            if self.first_seen:
                self.m.itl.observe(now - self.last)
            else:
                self.first_seen = now
                self.m.ttft.observe(now - self.start)
                self.m.phases.ttft.observe(now - self.start)
            self.last = now
        if out.finished:
            reason = "error" if out.error else (out.finish_reason.value if out.finish_reason else "unknown")
            self._end(now, reason)
            if out.timing is not None:
                self.m.phases.observe(out.timing, self.first_seen)

    def closed(self) -> None:
        """The stream was closed: if before its last output (the client left, and the API aborted it), the
        request ends here as an abort, with the tokens of the latest output it got."""
        if not self.ended:
            self._end(time.monotonic(), "abort")

    def _end(self, now: float, reason: str) -> None:
        self.ended = True
        self.m.e2e.observe(now - self.start)
        self.m.phases.e2e.observe(now - self.start)
        if self.seen is not None:
            self.m.prompt_tokens.inc(self.seen.prompt_tokens)
            self.m.generation_tokens.inc(self.seen.completion_tokens)
        self.m.requests.labels(reason).inc()
