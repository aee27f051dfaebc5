"""Host (Python) cost of one eager ``lora_apply`` and of its parts, on one CUDA device.

    python bench/lora_host.py

Decode shape of the engine bench: 32 tokens x 32 distinct r=16 adapters, q/k/v of Llama-3-8B (4096 ->
4096 + 1024 + 1024), bf16, max_rank 64 as the engine sizes it. Each part is called N times without a device
sync in between (the GPU work is far shorter than the host work, so the launch queue never fills); the time
to issue the N calls, divided by N, is the host cost. A plain torch.add launch is the yardstick.
"""

from __future__ import annotations

import time

import torch

from hotlora.kernels import lora as L
from hotlora.kernels._checks import check_all

N = 400


def host_us(fn) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(N):
        fn()
    issued = time.perf_counter() - t
    torch.cuda.synchronize()
    return issued / N * 1e6


def main() -> None:
    dev, dt, rank, slots = "cuda", torch.bfloat16, 16, 32
    outs = (4096, 1024, 1024)
    x = torch.randn(32, 4096, device=dev, dtype=dt)
    ranks = torch.full((slots,), rank, dtype=torch.int32, device=dev)
    slices = [
        L.LoraSlice(torch.randn(slots * 64, 4096, device=dev, dtype=dt) * 0.01,
                    torch.randn(slots * 64, n, device=dev, dtype=dt) * 0.01, ranks)
        for n in outs
    ]  # fmt: skip
    ys = list(torch.zeros(32, sum(outs), device=dev, dtype=dt).split(list(outs), dim=1))
    row_start = torch.arange(slots, dtype=torch.int32, device=dev) * 64
    meta = L.build_lora_meta(torch.arange(32, dtype=torch.int32, device=dev), row_start,
                             torch.ones(slots, device=dev), 64)  # fmt: skip
    widths = list(outs)
    cfg = L.kernel_config(meta, widths)
    pdl = L._launch.pdl(x)
    a, b = torch.zeros(256, device=dev), torch.zeros(256, device=dev)
    parts = {
        "torch.add (one plain launch)": lambda: a.add_(b),
        "check_all": lambda: check_all(ys, x, slices, meta),
        "kernel_config": lambda: L.kernel_config(meta, widths),
        "_pdl": lambda: L._launch.pdl(x),
        "shrink launch": lambda: L._launch_shrink(x, slices, meta, cfg, pdl),
        "expand launch": lambda: L._launch_expand(ys, slices, meta, cfg, pdl),
        "refresh_lora_meta (once per step)": lambda: L.refresh_lora_meta(meta),
        "lora_apply (all of it)": lambda: L.lora_apply(ys, x, slices, meta),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; host us per call, {N} calls\n")
    print("| part | host us |\n|---|---|")
    for name, fn in parts.items():
        print(f"| {name} | {host_us(fn):.1f} |", flush=True)


if __name__ == "__main__":
    main()
