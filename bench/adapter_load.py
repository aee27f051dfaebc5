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

    python bench/adapter_load.py --model random:llama-3-8b --rank 16 --targets all --loads 20
    python bench/adapter_load.py --model random:llama-3-8b --rank 16 --targets all --loads 10 --engine --batch 32
    python bench/adapter_load.py --model random:llama-3-8b --rank 16 --targets all --loads 8 --engine \
        --variants default,copythread
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from make_adapters import model_shapes, parse_targets, write_adapters

from hotlora.adapters.cache import LoraSlotCache
from hotlora.adapters.registry import AdapterRegistry


def _ms(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"p50_ms": round(statistics.median(s) * 1000, 3), "max_ms": round(s[-1] * 1000, 3), "n": len(s)}


def _gaps(steps: list[tuple[int, float]], base_p50: float) -> dict:
    """Step times during loads (each step gives every running sequence one token, so a step time is their
    inter-token gap): percentiles, how many exceed 1.2x the no-load median, and the slowest with the index of
    the load that ran then."""
    s = sorted(t for _, t in steps)
    pct = {f"p{q}_ms": round(s[min(len(s) - 1, int(len(s) * q / 100))] * 1000, 3) for q in (50, 90, 99)}
    worst = sorted(steps, key=lambda x: -x[1])[:5]
    return pct | {"max_ms": round(s[-1] * 1000, 3), "n": len(s),
                  "over_1.2x": sum(t > 1.2 * base_p50 for t in s),
                  "slowest": [(i, round(t * 1000, 2)) for i, t in worst]}


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


def _variant(spec: str) -> tuple[float, bool, bool]:
    """'default' or parts joined by '+': 'switch=S', 'nopin', 'copythread' -> (GIL switch interval, pinned
    staging, copies issued by the copy thread rather than the engine thread)."""
    interval, pin, copy_thread = 0.005, True, False
    for part in spec.split("+"):
        if part.startswith("switch="):
            interval = float(part.split("=", 1)[1])
        elif part == "nopin":
            pin = False
        elif part == "copythread":
            copy_thread = True
        elif part != "default":
            raise SystemExit(f"unknown variant part {part!r}")
    return interval, pin, copy_thread


def _set_pinning(pin: bool) -> None:
    """Staging buffers pinned (as served) or pageable: the registry's disk read, rebound for this bench."""
    from hotlora.adapters import registry, staging

    registry.read_raw = lambda folder, pin=True, lock=None, keep=pin: staging.read_raw(folder, keep and pin, lock)


def engine_mode(a: argparse.Namespace, folder: Path, names: list[str]) -> dict:
    from hotlora.server.engine.config import EngineConfig
    from hotlora.server.engine.engine import LLMEngine
    from hotlora.server.engine.types import Request, SamplingParams

    eng = LLMEngine(EngineConfig(model=a.model, max_loras=a.slots, max_lora_rank=a.rank,
                                 max_num_seqs=max(a.batch, 1), max_model_len=4096))
    for n in names:
        eng.registry.register(n, folder / n)
    if a.warm:  # as `hotlora serve` does at startup
        eng.registry.warm_staging()
    params = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    for i in range(a.batch):
        eng.add_request(Request(f"d{i}", list(range(100, 100 + a.prompt)), params, None))
    steps: list[float] = []

    def step() -> None:
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)

    for _ in range(a.batch + 20):  # prefills, graph captures, warm-up
        step()
    out = {"batch": a.batch}
    per = len(names) // len(a.variants)
    for k, spec in enumerate(a.variants):  # one engine, the variants one after another on fresh adapters
        interval, pin, copy_thread = _variant(spec)
        sys.setswitchinterval(interval)
        _set_pinning(pin)
        eng.registry.cache.copy_thread = copy_thread or eng.registry.cache.device.type != "cuda"
        for kept in eng.registry.cache.stats.phases.values():
            kept.clear()
        steps.clear()
        for _ in range(100):
            step()
        base = list(steps)
        during: list[tuple[int, float]] = []
        walls, engine = [], []
        for i, n in enumerate(names[k * per : (k + 1) * per]):
            steps.clear()
            wall, thread = load_one(eng.registry, n, step)
            during += [(i, t) for t in steps]
            walls.append(wall)
            engine.append(thread)
        out[spec] = {"step_no_load": _ms(base),
                     "step_during_load": _gaps(during, statistics.median(base)) if during else None,
                     "cold_load": _ms(walls), "engine_thread": _ms(engine),
                     "phases": eng.registry.cache.stats.summary()}
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
                        "staging), copythread (copies issued by the copy thread, not the engine thread)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.dir or Path(tmp)
        names = write_adapters(folder, a.loads, a.rank, parse_targets(a.targets), a.model, prefix="cold-")
        size = (folder / names[0] / "adapter_model.safetensors").stat().st_size
        out = {"model": a.model, "device": str(device), "rank": a.rank, "targets": a.targets,
               "adapter_bytes": size}
        out |= engine_mode(a, folder, names) if a.engine else cache_mode(a, folder, names, device, dtype)
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
