"""CPU lora_apply per engine step: the grouped reference against kernels/lora_cpu.py at SmolLM2-135M's shapes.

30 layers x 4 projection groups (q/k/v, o, gate/up, down), pools of 8 slots x 16 rows, 3 busy adapters
(r = 16, 8, 16) and the base mixed round-robin; single-thread CPU time (steadier than wall time on a shared
machine), best of --repeat:

    .venv/bin/python bench/lora_cpu.py --tokens 1 8 32
"""

from __future__ import annotations

import argparse
import time

import torch

from hotlora.kernels.lora import LoraSlice, build_lora_meta
from hotlora.kernels.lora_cpu import lora_apply_cpu
from hotlora.kernels.reference import lora_apply_ref

GROUPS = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])]
SLOTS, ROWS, LAYERS = 8, 16, 30


def step_ms(fn, layers, ranks, num_tokens: int, repeat: int) -> float:
    slots = torch.tensor(([0, 1, 2, -1] * num_tokens)[:num_tokens], dtype=torch.int32)
    row_start = torch.arange(SLOTS, dtype=torch.int32) * ROWS
    scale = torch.full((SLOTS,), 2.0)
    xs = {n: torch.randn(num_tokens, n) for n in (576, 1536)}
    ys = [[torch.zeros(num_tokens, o) for o in outs] for _, outs in GROUPS]
    best = float("inf")
    for _ in range(repeat + 1):  # the first run fills the caches
        meta = build_lora_meta(slots.clone(), row_start, scale, ROWS)
        t0 = time.thread_time()
        for layer in layers:
            for (n, _), slices, y in zip(GROUPS, layer, ys, strict=True):
                fn(y, xs[n], slices, meta)
        best = min(best, time.thread_time() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pool = SLOTS * ROWS
    rank = [16, 8, 16, 0, 0, 0, 0, 0]
    ranks = [[torch.tensor(rank, dtype=torch.int32) for _ in outs] for _, outs in GROUPS]  # shared by layers
    layers = [[[LoraSlice(torch.randn(pool, n) * 0.05, torch.randn(pool, o) * 0.05, r)
                for o, r in zip(outs, rk, strict=True)] for (n, outs), rk in zip(GROUPS, ranks, strict=True)]
              for _ in range(LAYERS)]
    print("| tokens | reference ms/step | lora_cpu ms/step |\n|---|---|---|")
    for t in args.tokens:
        ref, cpu = (step_ms(fn, layers, ranks, t, args.repeat) for fn in (lora_apply_ref, lora_apply_cpu))
        print(f"| {t} | {ref:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
