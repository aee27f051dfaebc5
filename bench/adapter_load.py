"""Where a cold adapter load spends its time, and what of it the engine thread waits for.

Cache mode (default): only the adapter slot pools for the model's shape are built (no base weights), N
distinct peft-format adapters are written (bench/make_adapters.py) and read once into the page cache,
then each is loaded cold through the registry as the engine does it: `acquire` is polled between
"steps" until the slot is usable. Reported per load: wall time from the request to a usable slot, and
the engine thread's own time inside `acquire`/`poll` (what a step would wait for); per phase: disk
read, parse + validation, staging (dtype cast into pinned memory), copy issue, device copy, slot-table
writes.

Engine mode (--engine): the real engine on the model decodes --batch base requests; between steps a
cold adapter is loaded as above, one after another, and the step times during loads are compared with
those of the same batch without loads (a stall shows as a longer step). On CUDA the engine thread issues
each copy right after the next step's launch (adapters/cache.py), so its host time shows in the step time
only if the GPU does not cover it; the `copythread` variant issues from the copy thread instead (as before).
Each variant reports its first load apart (`first_load`): on one engine only the first variant's first load is
the first after a start. The engine warms the copy path at start (adapters/warmcopy.py); the `nowarm` variant
turns that off (HOTLORA_WARM_ADAPTER_COPY=0). What the warm-up pays for stays loaded in the process, so with
--fresh (implied when the variants differ in `nowarm`) each variant runs in a process of its own, on a fresh
engine, over all --loads adapters.

    python bench/adapter_load.py --model random:llama-3-8b --rank 16 --targets all --loads 20
    python bench/adapter_load.py --model random:llama-3-8b --rank 16 --targets all --loads 10 --engine --batch 32
    python bench/adapter_load.py --model random:llama-3-8b --rank 16 --targets all --loads 8 --engine \
        --variants default,copythread
    python bench/adapter_load.py --model random:llama-3-8b --rank 16 --targets all --loads 4 --engine \
        --variants nowarm,default
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).parent))
from make_adapters import model_shapes, parse_targets, write_adapters

from hotlora.adapters.cache import LoraSlotCache
from hotlora.adapters.registry import AdapterRegistry

if TYPE_CHECKING:
    from hotlora.server.engine.engine import LLMEngine


def _pct_ms(s: list[float], qs: tuple[int, ...]) -> dict[str, float]:
    """Percentiles (nearest rank) of sorted seconds, in ms."""
    return {f"p{q}_ms": round(s[min(len(s) - 1, int(len(s) * q / 100))] * 1000, 3) for q in qs}


def _ms(values: list[float], over: float | None = None) -> dict[str, float]:
    """p50, max and count; with `over`: also p90, p99 and how many exceed it (the no-load control of _gaps)."""
    s = sorted(values)
    out = {"p50_ms": round(statistics.median(s) * 1000, 3), "max_ms": round(s[-1] * 1000, 3), "n": len(s)}
    if over is not None:
        out |= _pct_ms(s, (90, 99))
        out["over_1.2x"] = sum(t > over for t in s)
    return out


class PhaseTrace:
    """Wall-clock intervals of the load phases, to tell what ran during a slow step. LoadStats.record is wrapped:
    a phase recorded at time t with duration d ran over [t - d, t], except disk_read, which the registry records
    just before the parse that followed it on the same thread (its interval ends where that parse began). The
    device copy (timed with CUDA events) has no host interval and is left out."""

    def __init__(self, stats) -> None:
        self.calls: list[tuple[str, float, float, int]] = []  # (phase, recorded at, seconds, thread id)
        record = stats.record

        def traced(phase: str, seconds: float) -> None:
            self.calls.append((phase, time.perf_counter(), seconds, threading.get_ident()))
            record(phase, seconds)

        stats.record = traced

    def intervals(self) -> list[tuple[str, float, float]]:
        out, pending = [], {}
        for phase, at, sec, tid in self.calls:
            if phase == "disk_read":
                pending[tid] = sec
            elif phase == "parse":
                read = pending.pop(tid, None)
                if read is not None:
                    out.append(("disk_read", at - sec - read, at - sec))
                out.append(("parse", at - sec, at))
            elif phase != "h2d_copy":
                out.append((phase, at - sec, at))
        return out

    def during(self, start: float, end: float) -> dict[str, float]:
        """phase -> ms of it inside [start, end]."""
        out: dict[str, float] = {}
        for phase, a, b in self.intervals():
            overlap = min(b, end) - max(a, start)
            if overlap > 0:
                out[phase] = round(out.get(phase, 0.0) + overlap * 1000, 2)
        return out


def _gaps(steps: list[tuple[int, float, float]], base_p50: float, trace: PhaseTrace) -> dict:
    """Step times during loads (each step gives every running sequence one token, so a step time is their
    inter-token gap), as (load index, start, seconds): percentiles, how many exceed 1.2x the no-load median, and
    the slowest with the index of the load that ran then and the load phases (ms) that overlapped them."""
    s = sorted(t for _, _, t in steps)
    pct = _pct_ms(s, (50, 90, 99))
    worst = sorted(steps, key=lambda x: -x[2])[:5]
    return pct | {"max_ms": round(s[-1] * 1000, 3), "n": len(s),
                  "over_1.2x": sum(t > 1.2 * base_p50 for t in s),
                  "slowest": [(i, round(t * 1000, 2), trace.during(at, at + t)) for i, at, t in worst]}


def load_one(registry: AdapterRegistry, name: str, between: callable) -> tuple[float, float]:
    """Load `name` cold as admission does; (wall seconds to a usable slot, engine-thread seconds)."""
    v = registry.resolve(name)
    start = time.perf_counter()
    engine_time = 0.0
    while True:
        t = time.perf_counter()
        registry.poll()
        slot = registry.acquire(v)
        engine_time += time.perf_counter() - t
        if slot is not None:
            break
        between()
    wall = time.perf_counter() - start
    registry.release(v, slot)
    registry.unload(name)
    v.host = None  # the next load of anything starts from the page cache again
    return wall, engine_time


def cache_mode(a: argparse.Namespace, folder: Path, names: list[str], device: torch.device,
               dtype: torch.dtype) -> dict:
    shapes, layers = model_shapes(a.model)
    cache = LoraSlotCache(shapes, layers, a.slots, a.slots * a.rank, device, dtype)
    registry = AdapterRegistry(cache, shapes, layers, a.rank, 64 << 30)
    for n in names:
        registry.register(n, folder / n)
    time.sleep(0.5)  # the registration-time sha256 reads finish (they also warm the page cache)
    def between() -> None:  # no engine here: issue the reserved copy where its step would
        cache.issue_pending()
        time.sleep(0.0002)

    walls, engine = [], []
    for n in names:
        wall, eng = load_one(registry, n, between)
        walls.append(wall)
        engine.append(eng)
    registry.close()
    return {"cold_load": _ms(walls), "engine_thread": _ms(engine), "phases": cache.stats.summary()}


@dataclass(frozen=True)
class Variant:
    interval: float = 0.005  # sys.setswitchinterval
    pin: bool = True  # pinned staging buffers
    copy_thread: bool = False  # copies issued by the copy thread rather than the engine thread
    warm_copy: bool = True  # the engine warms the copy path at start


_PARTS = {"nopin": {"pin": False}, "copythread": {"copy_thread": True}, "nowarm": {"warm_copy": False}}


def _variant(spec: str) -> Variant:
    """'default' or parts joined by '+': 'switch=S', 'nopin', 'copythread', 'nowarm'."""
    v = Variant()
    for part in spec.split("+"):
        if part.startswith("switch="):
            v = replace(v, interval=float(part.split("=", 1)[1]))
        elif part in _PARTS:
            v = replace(v, **_PARTS[part])
        elif part != "default":
            raise SystemExit(f"unknown variant part {part!r}")
    return v


def _set_pinning(pin: bool) -> None:
    """Staging buffers pinned (as served) or pageable: the registry's disk read, rebound for this bench."""
    from hotlora.adapters import registry, staging

    registry.read_raw = lambda folder, pin=True, lock=None, keep=pin: staging.read_raw(folder, keep and pin, lock)


def engine_mode(a: argparse.Namespace, folder: Path, names: list[str]) -> dict:
    from hotlora.server.engine.config import EngineConfig
    from hotlora.server.engine.engine import LLMEngine
    from hotlora.server.engine.types import Request, SamplingParams

    variants = [_variant(spec) for spec in a.variants]
    if len({v.warm_copy for v in variants}) > 1:
        raise SystemExit("variants that differ in 'nowarm' need a process each: --fresh")
    if not variants[0].warm_copy:  # read by the engine's constructor
        os.environ["HOTLORA_WARM_ADAPTER_COPY"] = "0"
    eng = LLMEngine(EngineConfig(model=a.model, max_loras=a.slots, max_lora_rank=a.rank,
                                 max_num_seqs=max(a.batch, 1), max_model_len=4096))
    for n in names:
        eng.registry.register(n, folder / n)
    if a.warm:  # as `hotlora serve` does at startup
        eng.registry.warm_staging()
    params = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    for i in range(a.batch):
        eng.add_request(Request(f"d{i}", list(range(100, 100 + a.prompt)), params, None))
    steps: list[tuple[float, float]] = []  # (start, seconds)
    trace = PhaseTrace(eng.registry.cache.stats)

    def step() -> None:
        t = time.perf_counter()
        eng.step()
        steps.append((t, time.perf_counter() - t))

    for _ in range(a.batch + 20):  # prefills, graph captures, warm-up
        step()
    warm = eng.copy_warm_seconds
    out = {"batch": a.batch, "copy_warm_ms": None if warm is None else round(warm * 1000, 1)}
    per = len(names) // len(a.variants)
    for k, (spec, v) in enumerate(zip(a.variants, variants, strict=True)):  # the variants on fresh adapters
        sys.setswitchinterval(v.interval)
        _set_pinning(v.pin)
        eng.registry.cache.copy_thread = v.copy_thread or eng.registry.cache.device.type != "cuda"
        out[spec] = _run_variant(eng, names[k * per : (k + 1) * per], step, steps, trace)
    return out


def _run_variant(eng: LLMEngine, names: list[str], step: Callable[[], None], steps: list[tuple[float, float]],
                 trace: PhaseTrace) -> dict:
    """100 steps without loads, then `names` loaded cold one after another between steps."""
    phases = eng.registry.cache.stats.phases
    for kept in phases.values():
        kept.clear()
    steps.clear()
    for _ in range(100):
        step()
    base = [t for _, t in steps]
    during: list[tuple[int, float, float]] = []
    walls, engine = [], []
    for i, n in enumerate(names):
        steps.clear()
        wall, thread = load_one(eng.registry, n, step)
        during += [(i, at, t) for at, t in steps]
        walls.append(wall)
        engine.append(thread)
    first = [t for i, _, t in during if i == 0]
    first_load = {"wall_ms": round(walls[0] * 1000, 2), "max_step_ms": round(max(first, default=0) * 1000, 2),
                  "steps": len(first)}
    first_load |= {f"{p}_ms": round(phases[p][0] * 1000, 2) for p in ("h2d_issue", "h2d_copy") if phases[p]}
    base_p50 = statistics.median(base)
    return {"step_no_load": _ms(base, over=1.2 * base_p50),
            "step_during_load": _gaps(during, base_p50, trace) if during else None,
            "first_load": first_load, "cold_load": _ms(walls), "engine_thread": _ms(engine),
            "phases": eng.registry.cache.stats.summary()}


def fresh_mode(a: argparse.Namespace, folder: Path) -> dict:
    """Each variant in a process of its own (a fresh engine: its first load is the first after a start), over
    all the adapters in `folder`; the children's results side by side."""
    out: dict = {"fresh": True}
    for spec in a.variants:
        argv = [sys.executable, __file__, "--engine", "--reuse", "--dir", str(folder), "--variants", spec,
                "--model", a.model, "--rank", str(a.rank), "--targets", a.targets, "--loads", str(a.loads),
                "--slots", str(a.slots), "--device", a.device, "--batch", str(a.batch), "--prompt", str(a.prompt),
                "--warm" if a.warm else "--no-warm"]  # fmt: skip
        child = json.loads(subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout)
        out["batch"] = child["batch"]
        key = spec if spec not in out else f"{spec}#{sum(k.split('#')[0] == spec for k in out) + 1}"  # repeats
        out[key] = child[spec] | {"copy_warm_ms": child["copy_warm_ms"]}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all")
    p.add_argument("--loads", type=int, default=10, help="distinct adapters, each loaded once, cold")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", type=Path, default=None, help="where to write the adapters (default: a temp dir)")
    p.add_argument("--engine", action="store_true", help="load while the real engine decodes --batch requests")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                   help="--engine: pin the staging blocks before the loads, as the server does at startup")
    p.add_argument("--variants", type=lambda v: v.split(","), default=["default"],
                   help="--engine: comma-separated runs on one engine, each on --loads / N fresh adapters: "
                        "default, or parts joined by '+': switch=S (sys.setswitchinterval), nopin (pageable "
                        "staging), copythread (copies issued by the copy thread, not the engine thread), nowarm "
                        "(no copy-path warm-up at engine start: HOTLORA_WARM_ADAPTER_COPY=0)")
    p.add_argument("--fresh", action="store_true",
                   help="--engine: each variant in a process of its own, on a fresh engine, over all --loads "
                        "adapters (implied when the variants differ in 'nowarm')")
    p.add_argument("--reuse", action="store_true", help="use the cold-* adapters already in --dir (--fresh's runs)")
    a = p.parse_args(argv)
    a.fresh = a.engine and len(a.variants) > 1 and (a.fresh or len({_variant(v).warm_copy for v in a.variants}) > 1)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.dir or Path(tmp)
        if a.reuse:
            names = sorted(d.name for d in folder.iterdir() if d.name.startswith("cold-"))[: a.loads]
        else:
            names = write_adapters(folder, a.loads, a.rank, parse_targets(a.targets), a.model, prefix="cold-")
        size = (folder / names[0] / "adapter_model.safetensors").stat().st_size
        out = {"model": a.model, "device": str(device), "rank": a.rank, "targets": a.targets,
               "adapter_bytes": size}
        if a.fresh:
            out |= fresh_mode(a, folder)
        else:
            out |= engine_mode(a, folder, names) if a.engine else cache_mode(a, folder, names, device, dtype)
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
