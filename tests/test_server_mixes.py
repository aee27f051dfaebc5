"""Adapter mixes through the HTTP API: served by name from the openai client, cached, invalidated by a
hot swap or delete of a component, refused with the right status, absent from /v1/models; and
POST /admin/adapters/{name}/export streaming the merged model as a .tar."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import shutil
import socket
import tarfile
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from server_harness import (
    AUTH,
    GREEDY,
    ServerThread,
    assert_openai_error,
    complete,
    server_settings,
    stream_across_swap,
    until,
    upload,
)

from hotlora.adapters.peft_format import load_peft_adapter

MIX = "a*0.5+c"  # r4 on q/v plus r2 on o/down: each module gets only its own component's rows


@pytest.fixture(scope="module")
def server(tmp_path_factory, peft_dirs, hotlora_cache):
    root = tmp_path_factory.mktemp("mix-store")
    for name in ("a", "c", "x", "y"):
        shutil.copytree(peft_dirs[name], root / name)
    shutil.copytree(peft_dirs["tiny"], root / "broken")  # refused at start-up
    srv = ServerThread(server_settings(root, hotlora_cache)).start()
    srv.peft_dirs = peft_dirs
    yield srv
    srv.stop()


def test_a_mix_is_served_by_name_cached_and_not_listed(http, client, server):
    registry = server.engine.registry
    base = server.state.model_name
    outs = {m: complete(client, m) for m in (MIX, "a", "c", base)}
    assert len(set(outs.values())) == 4, outs  # the mix is neither its components nor the base
    mix = server.call(registry.resolve, MIX)
    slot = server.call(registry.cache.lookup, mix)
    assert slot is not None, "the mix's slot was dropped after its request finished"
    # another spelling of the same mix is the same mix: the same cached slot, the same tokens
    assert complete(client, " a * 0.5 + c*1.0 ") == outs[MIX]
    assert server.call(registry.resolve, "a*0.5+c*1") is mix and server.call(registry.cache.lookup, mix) == slot
    chat = client.chat.completions.create(model=MIX, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          **GREEDY)
    assert chat.model == MIX and chat.usage.completion_tokens == 2
    ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert {"a", "c"} <= ids and not any("*" in i or "+" in i for i in ids)


@pytest.mark.parametrize(("model", "status", "match"), [
    ("a*0.5+nope", 404, "`nope`"),
    ("broken+a", 404, "`broken`"),
    ("y+x+a+c", 400, "summed rank 18"),  # 8 + 4 + 4 + 2 > --max-lora-rank 16
    ("a*", 400, "malformed"),
    ("a*x+c", 400, "malformed"),
    ("a++c", 400, "malformed"),
    ("a**2", 400, "malformed"),
    ("a*0.5c", 400, "malformed"),
    ("+a", 400, "malformed"),
    ("a*1e999", 400, "not a finite number"),
    ("a+c+a", 400, "more than once"),
    ("+".join(f"n{i}" for i in range(9)), 400, "at most 8"),
])
def test_bad_mixes_are_refused(model, status, match, http, server):
    for route, body in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = http.post(route, json={"model": model, "max_tokens": 1, **body})
        err = assert_openai_error(r, status, match)
        assert err["param"] == "model"
    assert server.call(server.engine.stats).num_waiting == 0


def test_hot_swap_and_delete_of_a_component_while_a_mix_runs(http, client, server):
    dirs = server.peft_dirs
    assert upload(http, "swap", dirs["x"]).status_code == 201
    assert upload(http, "yref", dirs["y"]).status_code == 201
    n = 32  # long enough that the swap lands while the request runs
    mix, mix_new = "swap*0.8+a*-1", "yref*0.8+a*-1"
    old, new = complete(client, mix, n), complete(client, mix_new, n)
    assert old != new
    registry = server.engine.registry
    before = server.call(registry.resolve, mix)
    assert stream_across_swap(http, server, mix, n, "swap", dirs["y"]) == old  # it finished on the old component
    assert complete(client, mix, n) == new  # the next request mixes the new one
    assert server.call(registry.resolve, mix) is not before
    assert server.call(registry.cache.lookup, before) is None, "the retired mix kept its device slot"
    assert http.delete("/admin/adapters/swap", headers=AUTH).status_code == 200
    with pytest.raises(openai.NotFoundError, match="swap"):
        complete(client, mix)


def _expected(base: dict[str, torch.Tensor], folder: Path, weight: float, layer: int, module: str) -> torch.Tensor:
    """W + B @ (A * w * scale) of one component, computed here by hand (float32)."""
    adapter = load_peft_adapter(folder, folder.name)
    a, b = adapter.weights[(layer, module)]
    parent = "mlp" if module.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
    w = base[f"model.layers.{layer}.{parent}.{module}.weight"]
    return w + b.float() @ (a.float() * weight * adapter.config.scale)


def test_export_streams_the_merged_model_as_a_tar(http, server, default_model_dir):
    crashed = server.state.adapter_dir.parent / "exports" / "0123abcd"  # as an export's process that died leaves it
    (crashed / "merged").mkdir(parents=True)
    (crashed / ".lock").touch()  # held by no one: the export's sweep removes the folder
    r = http.post(f"/admin/adapters/{MIX}/export", params={"dtype": "bfloat16"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-tar" and int(r.headers["content-length"]) == len(r.content)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files.keys()
    assert json.loads(files["config.json"])["dtype"] == "bfloat16"
    got = load_safetensors(files["model.safetensors"])
    base = load_file(str(default_model_dir / "model.safetensors"))
    dirs = server.peft_dirs
    for layer, module, folder, w in ((0, "q_proj", dirs["a"], 0.5), (3, "o_proj", dirs["c"], 1.0)):
        want = _expected(base, folder, w, layer, module).to(torch.bfloat16)
        name = f"model.layers.{layer}.{'self_attn'}.{module}.weight"
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"]
                       .to(torch.bfloat16))  # untargeted: the base's own weights
    assert not list((server.state.adapter_dir.parent / "exports").iterdir()), "the export left files behind"


def test_mix_spellings_do_not_grow_the_metrics(http, server):
    """Any client can spell endless mixes ("a*0.1+c", "a*0.11+c", ...): requests for mixes count under one
    label, never one Prometheus series per spelling."""
    def mix_requests() -> tuple[float, list[str]]:
        lines = [x for x in http.get("/metrics").text.splitlines() if x.startswith("hotlora_adapter_requests_total")]
        count = sum(float(x.rsplit(" ", 1)[1]) for x in lines if 'adapter="(mix)"' in x)
        return count, [x for x in lines if "*" in x or "+" in x]

    before, _ = mix_requests()
    for weight in ("0.1", "0.11", " 0.111 "):
        body = {"model": f"a*{weight}+c", "prompt": "Hi", "max_tokens": 1}
        assert http.post("/v1/completions", json=body).status_code == 200
    after, spelled = mix_requests()
    assert after == before + 3 and spelled == [], spelled


def test_an_export_whose_client_left_during_the_merge_leaves_nothing_behind(server):
    """The client sends the request and goes away while the model is merged: the response never starts, so the
    tar stream's own clean-up never runs; the merged folder (the size of the base model) must still go."""
    request = (f"POST /admin/adapters/{MIX}/export HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}"
               "\r\nContent-Length: 0\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(request)
    exports = server.state.adapter_dir.parent / "exports"
    until(lambda: exports.is_dir() and any(exports.iterdir()), 30, "the export's merge")
    until(lambda: not any(exports.iterdir()), 30, "the abandoned export's folder removed")


@pytest.mark.parametrize(("name", "params", "status", "match"), [
    ("a*0.5+nope", {}, 404, "'nope'"),
    ("nope", {}, 404, "'nope'"),
    ("y+x+a+c", {}, 400, "summed rank"),
    ("a*", {}, 400, "malformed"),
    ("a", {"dtype": "int8"}, 400, "dtype"),
])
def test_export_refusals(name, params, status, match, http):
    assert_openai_error(http.post(f"/admin/adapters/{name}/export", params=params, headers=AUTH), status, match)


def test_an_adapter_deleted_while_its_export_waits_is_a_404(http, server):
    """One merge at a time: an export waits for the one before it (here the test holds the lock), and an adapter
    deleted meanwhile is a 404 once the export's turn comes (it was a 500), with nothing left in exports/."""
    assert upload(http, "gone", server.peft_dirs["c"]).status_code == 201
    loop, lock = server.state.engine._loop, server.state.export_lock
    asyncio.run_coroutine_threadsafe(lock.acquire(), loop).result(10)  # another export merging
    held = True
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, f"{server.url}/admin/adapters/gone/export", headers=AUTH, timeout=60)
            until(lambda: len(lock._waiters or ()) == 1, 30, "the export waiting for its turn")
            assert http.delete("/admin/adapters/gone", headers=AUTH).status_code == 200
            loop.call_soon_threadsafe(lock.release)
            held = False
            assert_openai_error(waiting.result(), 404, "'gone'")
    finally:
        if held:
            loop.call_soon_threadsafe(lock.release)
    until(lambda: not any((server.state.adapter_dir.parent / "exports").iterdir()), 30, "the export's folder gone")


def test_export_needs_the_admin_token(http):
    assert_openai_error(http.post(f"/admin/adapters/{MIX}/export"), 401, "bearer")
