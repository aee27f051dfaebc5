"""Host time the engine thread spends detokenizing one decode step: the incremental detokenizer against a
full decode of every sequence's output (what it did before), with the default model's tokenizer.

    python bench/detok_cost.py --batch 64 --tokens 256

Prints one JSON object: per-step milliseconds at the last token, both ways, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from hotlora.server.engine.detokenizer import Detokenizer, DetokState
from hotlora.server.engine.sequence import Sequence
from hotlora.server.engine.types import SamplingParams
from hotlora.server.model.presets import default_tokenizer_dir
from hotlora.server.model.tokenizer import load_tokenizer


def step_ms(detok: Detokenizer, seqs: list[Sequence], pending: list[list[int]], full: bool) -> float:
    """Mean milliseconds per step over the `pending` tokens (each sequence gets one token per step)."""
    total = 0.0
    steps = len(pending[0])
    for k in range(steps):
        for s, ids in zip(seqs, pending, strict=True):
            s.token_ids.append(ids[k])
        t0 = time.perf_counter()
        for s in seqs:
            if full:
                detok.decode(s.generated_ids)
            else:
                detok.update(s, final=False, drop_last=False)
        total += time.perf_counter() - t0
    return 1000 * total / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256, help="output length at which the step is timed")
    p.add_argument("--steps", type=int, default=16, help="steps timed (the last ones)")
    a = p.parse_args(argv)
    detok = Detokenizer(load_tokenizer(default_tokenizer_dir(Path.home() / ".cache" / "hotlora")))
    rng = random.Random(0)
    out = {"batch": a.batch, "tokens": a.tokens}
    for mode in ("full", "incremental"):
        seqs, pending = [], []
        for i in range(a.batch):
            s = Sequence(f"r{i}", [1], SamplingParams())
            s.detok = DetokState()
            ids = [rng.randrange(100, 49152) for _ in range(a.tokens)]
            pending.append(ids[a.tokens - a.steps :])
            for t in ids[: a.tokens - a.steps]:  # the output so far, detokenized as the engine would have
                s.token_ids.append(t)
                if mode == "incremental":
                    detok.update(s, final=False, drop_last=False)
            seqs.append(s)
        out[f"{mode}_ms_per_step"] = round(step_ms(detok, seqs, pending, mode == "full"), 3)
    out["ratio"] = round(out["full_ms_per_step"] / out["incremental_ms_per_step"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
