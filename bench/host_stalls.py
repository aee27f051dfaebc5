"""Host stalls that delay the engine thread: Python's full garbage collections, and a reading thread's parse
holding the GIL. Runs on the CPU (no GPU needed: both are host effects).

    python bench/host_stalls.py [--adapter DIR] [--ticks 3000]

1. Full collection: builds an LLMEngine on the default model and times gc.collect() three times, then after
   gc.collect(); gc.freeze() (what `hotlora serve --gc-freeze` does once ready).
2. A ticker thread that wakes every 0.5 ms (standing in for the engine thread waking after its device sync)
   while a reading thread parses an adapter file in a loop (adapters.staging.parse_staged, as a cold load
   does): how late each wake-up is, with the parse loops offering the GIL every adapters.gilyield.EVERY items
   and without (EVERY set past any loop's length). The heap is frozen first so that no full collection lands in
   this part; --no-freeze keeps it, and the collections then show in the ticker's tail.
--adapter: a PEFT folder (default: one r=16 adapter on all seven projections of the Llama-3-8B shape, written
to a temp dir by bench/make_adapters.py, 84 MB).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hotlora.adapters import gilyield
from hotlora.adapters.staging import parse_staged, read_raw


def full_collections() -> dict:
    from hotlora.server.engine.config import EngineConfig
    from hotlora.server.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="default", device="cpu"))
    out = {"objects": len(gc.get_objects()), "full_ms": []}
    for _ in range(3):
        t = time.perf_counter()
        gc.collect()
        out["full_ms"].append(round((time.perf_counter() - t) * 1000, 1))
    gc.freeze()
    t = time.perf_counter()
    gc.collect()
    out["frozen"], out["full_ms_after_freeze"] = gc.get_freeze_count(), round((time.perf_counter() - t) * 1000, 2)
    gc.unfreeze()
    del engine
    return out


def ticker_beside_parse(folder: Path, ticks: int, every: int) -> dict:
    """Lateness of a 0.5 ms ticker while another thread parses `folder`'s file in a loop."""
    gilyield.EVERY = every
    raw = read_raw(folder, pin=False)
    for _ in range(3):
        parse_staged(raw, folder, "bench")
    stop, parses, late = threading.Event(), [], []

    def reader() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            parse_staged(raw, folder, "bench")
            parses.append(time.perf_counter() - t)
            time.sleep(0.001)

    thread = threading.Thread(target=reader)
    thread.start()
    wake = threading.Event()
    for _ in range(ticks):
        t = time.perf_counter()
        wake.wait(0.0005)
        late.append(time.perf_counter() - t - 0.0005)
    stop.set()
    thread.join()
    s, p = sorted(late), sorted(parses)

    def q(v: list[float], f: float) -> float:
        return round(v[min(len(v) - 1, int(len(v) * f))] * 1000, 2)

    return {"every": every, "late_ms": {"p50": q(s, 0.5), "p99": q(s, 0.99), "p99.9": q(s, 0.999), "max": q(s, 1.0)},
            "parse_ms_p50": q(p, 0.5), "parses": len(p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--ticks", type=int, default=3000)
    ap.add_argument("--no-freeze", action="store_true", help="leave the heap unfrozen in part 2")
    args = ap.parse_args()
    out = {"full_collection": full_collections(), "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.adapter
        if folder is None:
            subprocess.run([sys.executable, str(Path(__file__).with_name("make_adapters.py")), "--out", tmp,
                            "--count", "1", "--rank", "16", "--targets", "all", "--model", "random:llama-3-8b"],
                           check=True, stdout=subprocess.DEVNULL)
            folder = Path(tmp) / "lora-0000"
        if not args.no_freeze:
            gc.collect()
            gc.freeze()
        out["ticker"] = [ticker_beside_parse(folder, args.ticks, every) for every in (gilyield.EVERY, 1 << 30)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
