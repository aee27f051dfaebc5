"""CUDA-graph timing shared by the kernel benchmarks: one graph holds one call per rotating input set, so
launch gaps vanish and (with enough sets) the bytes come from HBM rather than L2."""

from __future__ import annotations

from collections.abc import Callable

import torch
from triton.testing import do_bench


def graph_time_us(fn_per_set: Callable[[int], object], count: int, rep: int = 200, warmup: int = 25) -> float:
    """Median microseconds of one call: replays of a graph holding fn_per_set(0 .. count-1), divided by count."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
        for i in range(count):
            fn_per_set(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(count):
            fn_per_set(i)
    return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") * 1e3 / count
