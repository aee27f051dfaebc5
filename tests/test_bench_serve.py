"""bench/serve.py against a real uvicorn server on the default model, and bench/make_adapters.py's folders
(read by hotlora's own loader and by peft itself)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from server_harness import ServerThread, server_settings

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))  # serve.py imports make_adapters as a sibling
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_made_adapters_load_in_hotlora_and_peft(tmp_path):
    from lora_factory import preset_llama
    from peft import PeftModel

    from hotlora.adapters.peft_format import check_compatible, load_peft_adapter
    from hotlora.server.model.presets import preset_config

    make = _bench_module("make_adapters")
    names = make.write_adapters(tmp_path, 3, rank=4, targets=make.parse_targets("q,v,o"), model="random:tiny")
    assert names == ["lora-0000", "lora-0001", "lora-0002"]
    cfg = preset_config("tiny")
    loaded = [load_peft_adapter(tmp_path / n, n) for n in names]
    for a in loaded:
        check_compatible(a, cfg.linear_shapes(), cfg.num_layers, 16)
        assert a.config.rank == 4 and a.config.target_modules == {"q_proj", "v_proj", "o_proj"}
    assert len({a.sha256 for a in loaded}) == 3  # distinct weights
    model = PeftModel.from_pretrained(preset_llama("tiny"), str(tmp_path / names[1]))
    a, b = loaded[1].weights[(0, "v_proj")]
    got = model.base_model.model.model.layers[0].self_attn.v_proj
    assert torch.equal(got.lora_A["default"].weight.to(a.dtype), a)
    assert torch.equal(got.lora_B["default"].weight.to(b.dtype), b)


@pytest.mark.timeout(300)
def test_serve_bench_smoke(tmp_path, hotlora_cache, default_model_dir, capsys):
    make = _bench_module("make_adapters")
    store = tmp_path / "store"
    names = make.write_adapters(store, 3, rank=4, targets=make.parse_targets("q,v"), model=str(default_model_dir))
    serve = _bench_module("serve")
    srv = ServerThread(server_settings(store, hotlora_cache, max_loras=2)).start()
    try:
        out = tmp_path / "bench.json"
        serve.main(["--url", srv.url, "--requests", "6", "--rate", "20", "--prompt-len", "4:12",
                    "--output-len", "3:5", "--adapters", ",".join(names), "--zipf", "1.1", "--out", str(out),
                    "--warmup", "1"])
        base = json.loads(capsys.readouterr().out)
        serve.main(["--url", srv.url, "--requests", "3", "--rate", "0", "--prompt-len", "4:4", "--output-len", "2:2"])
        base_only = json.loads(capsys.readouterr().out)
        # steady state: the workload's own first 2 requests (untimed) cache the shared 32-token prefix
        serve.main(["--url", srv.url, "--requests", "3", "--rate", "0", "--shared-prefixes", "1", "--prefix-len", "32",
                    "--prompt-len", "4:4", "--output-len", "2:2", "--warmup-workload", "2", "--seed", "7"])
        steady = json.loads(capsys.readouterr().out)
    finally:
        srv.stop()
    assert steady["completed"] == 3 and steady["config"]["warmup_workload"] == 2
    assert steady["server"]["prefix_cache_hits"] >= 3 * 16 and steady["server"]["prefix_cache_hit_rate"] > 0.4
    assert json.loads(out.read_text()) == base
    for r in (base, base_only):
        assert r["errors"] == 0 and r["completed"] == r["requests"], r
        assert r["duration_s"] > 0 and r["req_per_s"] > 0 and r["output_tok_per_s"] > 0
        assert r["ttft_ms"]["p50"] > 0 and r["ttft_ms"]["p99"] >= r["ttft_ms"]["p50"]
        assert r["tpot_ms"]["p50"] > 0 and r["tpot_ms"]["p99"] >= r["tpot_ms"]["p50"]
        assert r["itl_ms"]["p99"] > 0
    assert base["requests"] == 6 and base_only["requests"] == 3
    assert all(r["client_cpu_share"] > 0 for r in (base, base_only, steady))
    assert base["config"]["models"] == 3 and base_only["config"]["models"] == 1
    # 6 requests of 3..5 tokens each; the counters come from the server's /metrics
    assert 18 / base["duration_s"] <= base["output_tok_per_s"] <= 30 / base["duration_s"]
    assert base["server"]["adapter_loads"] >= 1 and base["config"]["warmup"] == 1
    assert base["server"]["load_disk_to_cpu_n"] >= 1 and base["server"]["load_disk_to_cpu_mean_ms"] > 0
    assert base["server"]["load_cpu_to_gpu_n"] >= 1 and base["server"]["load_cpu_to_gpu_mean_ms"] > 0
    # every step counted once, eager (CPU) or replayed; prompts looked up in the prefix cache, with a hit rate
    assert base["server"]["eager_steps"] + base["server"]["graph_steps"] >= 5
    assert base["server"]["prefix_cache_queries"] > 0
    assert 0.0 <= base["server"].get("prefix_cache_hit_rate", 0.0) <= 1.0
    # the step timer over the timed run only (the warm-up's steps excluded): phases in ms per step, shares of
    # the step wall time summing to 1, and the host's share (on the CPU the forward itself is host time)
    for r in (base, base_only):
        assert r["steps"] == r["server"]["eager_steps"] + r["server"]["graph_steps"]
        phases = r["step_phases_ms"]
        assert set(phases) == {"loop", "schedule", "prepare", "launch", "device_wait", "sample", "postprocess"}
        assert all(v >= 0 for v in phases.values()) and phases["launch"] > 0 and phases["postprocess"] > 0
        assert sum(phases.values()) == pytest.approx(r["step_ms"], rel=1e-3, abs=0.01)
        assert sum(r["step_phase_share"].values()) == pytest.approx(1.0, abs=1e-3)
        assert r["host_share"] == pytest.approx(1 - r["step_phase_share"]["device_wait"], abs=1e-3)
        assert 0.5 < r["host_share"] <= 1.0 and r["step_tokens_mean"] >= 1
    assert not any(k.startswith("step_") for k in base["server"])
    # where the server's TTFT went over the timed run, from its request-phase histograms: one observation per
    # timed request (the warm-up's excluded), bucket-interpolated percentiles, exact means
    for r in (base, base_only, steady):
        parts = r["ttft_parts_ms"]
        assert set(parts) == {"queue", "prefill", "delivery"}
        for p in parts.values():
            assert p["n"] == r["completed"] and 0 <= p["p50"] <= p["p99"] and p["mean"] >= 0
        assert parts["prefill"]["mean"] > 0
    assert not any(k.startswith("ttft_") for k in base["server"])


def test_serve_plan_shared_prefixes():
    serve = _bench_module("serve")
    planned = serve.plan(40, 5.0, (3, 6), (2, 4), ["a", "b"], 1.1, seed=1, shared=(2, 16))
    heads = {tuple(p.prompt[:16]) for p in planned}
    assert len(heads) == 2  # every prompt starts with one of the two system prompts, and both occur
    assert all(19 <= len(p.prompt) <= 22 for p in planned)
    assert all(b.arrival > a.arrival for a, b in itertools.pairwise(planned))
    plain = serve.plan(40, 5.0, (3, 6), (2, 4), ["a", "b"], 1.1, seed=1)
    assert all(3 <= len(p.prompt) <= 6 for p in plain)


def test_made_tokenizer_streams_a_word_per_id(tmp_path, hotlora_cache):
    """Every id of a random model's vocabulary decodes to text, through the engine's own detokenizer."""
    from hotlora.server.engine.config import EngineConfig
    from hotlora.server.engine.engine import LLMEngine
    from hotlora.server.model.presets import preset_config

    serve = _bench_module("serve")
    vocab = preset_config("tiny").vocab_size
    serve.main(["--make-tokenizer", str(tmp_path), "--vocab", str(vocab)])
    eng = LLMEngine(EngineConfig(model="random:tiny", quant="none", cache_dir=hotlora_cache, kv_cache_memory=0.01,
                                 tokenizer=tmp_path))
    assert len(eng.tokenizer) == vocab
    assert eng.detokenizer.decode([5, vocab - 1, 3]) == f"w5 w{vocab - 1} w3"
    assert eng.tokenizer.encode("w7 w9", add_special_tokens=False) == [7, 9]


def test_step_profile_names_every_kernel_family():
    """bench/step_profile.py sorts device kernels into families by name: every Triton kernel of hotlora.kernels
    that a step launches lands in a family (a renamed kernel would drop into "other" and leave the table)."""
    prof = _bench_module("step_profile")
    source = "\n".join(p.read_text() for p in (BENCH.parent / "kernels").glob("*.py"))
    launched = set(re.findall(r"^def (\w+_kernel)\(", source, re.MULTILINE)) - {"lora_meta_kernel"}
    assert {"nf4_matmul_kernel", "lora_shrink_kernel", "paged_attention_kernel"} <= launched
    assert {k: prof.family(k) for k in launched if prof.family(k) == "other"} == {}
    assert prof.family("_norm_shrink_kernel") == "norm (+ shrink)"
    assert prof.family("nvjet_sm90_tst_128x232_64x4_2x1_v_bz_coopA_TNT") == "cuBLAS GEMM"


def test_step_profile_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    """The profile's CPU smoke run: both workloads finish, each prints its rate and a family table."""
    monkeypatch.setenv("HOTLORA_CACHE", str(tmp_path))
    prof = _bench_module("step_profile")
    monkeypatch.setattr(sys, "argv", ["step_profile.py", "--preset", "tiny", "--requests", "3", "--adapters", "2",
                                      "--skip", "1", "--steps", "2"])
    prof.main()
    out = capsys.readouterr().out
    assert re.search(r"^base: \d+ output tok/s, \d+ steps$", out, re.MULTILINE)
    assert re.search(r"^Zipf\(1\.1\) over 2: \d+ output tok/s", out, re.MULTILINE)
    assert out.count("device time a step by kernel family, over 2 profiled steps") == 2


def test_the_timed_clock_starts_with_the_first_request():
    import serve

    planned = serve.plan(5, 6.0, (4, 4), (2, 2), ["m"], None, 0)
    assert planned[0].arrival > 0  # a Poisson gap before the first request
    again = serve.rebased(planned)
    assert again[0].arrival == 0 and [p.arrival - planned[0].arrival for p in planned] == [p.arrival for p in again]
    assert serve.rebased([]) == []


def test_hit_profile_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    """bench/hit_profile.py's CPU smoke run: every case prints its engine TTFT, the profile its family table,
    and the hits did find their prefixes cached (whole 16-token blocks of each 32-token prefix)."""
    monkeypatch.setenv("HOTLORA_CACHE", str(tmp_path))
    hit = _bench_module("hit_profile")
    monkeypatch.setattr(sys, "argv", ["hit_profile.py", "--preset", "tiny", "--decoders", "2", "--adapters", "2",
                                      "--hits", "2", "--prefix-len", "32", "--user", "8", "--profile"])
    bench = hit.main()
    out = capsys.readouterr().out
    for case in ("hit, 8 new tokens", "cold, 160 + prefix"):
        assert float(re.search(rf"^{re.escape(case)}: engine TTFT p50 ([\d.]+) ms", out, re.MULTILINE)[1]) > 0
    assert re.search(r"^decode step: [\d.]+ device ms; a hit \(160 new tokens\) adds", out, re.MULTILINE)
    assert float(re.search(r"^decode step \(2 rows, prompt 128\): p50 ([\d.]+) ms wall", out, re.MULTILINE)[1]) > 0
    hits = bench.engine.stats().prefix_cache_hits
    assert hits >= 32 * (2 + 4)  # the two timed hits and the profile's four, 32 cached tokens each


def test_the_client_keeps_a_url_path_and_reads_errors():
    """bench/serve.py's client against a real aiohttp server behind a path prefix (a proxy's /api): the stream's
    chunks are timed and counted, a 503 and an error chunk are reported, not raised."""
    import asyncio

    from aiohttp import web

    serve = _bench_module("serve")

    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if body["model"] == "broken":
            await resp.write(b'data: {"error": {"message": "engine failed"}}\n\n')
            return resp
        for text in ("a", "b"):
            await resp.write(f"data: {json.dumps({'choices': [{'text': text}]})}\r\n\r\n".encode())
        await resp.write(b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n')
        return resp

    async def main() -> list:
        app = web.Application()
        app.router.add_post("/api/v1/completions", stream)
        app.router.add_post("/down/v1/completions", lambda r: web.Response(status=503, text="overloaded"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            plan = [serve.Planned(0.0, [1, 2], 2, model) for model in ("m", "broken")]
            ok, _ = await serve.run(base + "/api", plan)
            down, _ = await serve.run(base + "/down", plan[:1])
            return ok + down
        finally:
            await runner.cleanup()

    good, broken, down = asyncio.run(main())
    assert good.ok and good.ttft > 0 and len(good.gaps) == 1 and good.output_tokens == 2, good
    assert not broken.ok and broken.error == "engine failed"
    assert not down.ok and down.error.startswith("HTTP 503") and "overloaded" in down.error
