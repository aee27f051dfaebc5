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


COPY_ALIGN = 64 * 1024  # bytes (same_bytes_copy_us)


def same_bytes_copy_us(nbytes: int, count: int, align: int = COPY_ALIGN) -> float:
    """graph_time_us of a plain device copy that reads and writes nbytes in all (bf16, rotating buffers): what
    moving an op's minimal bytes costs at this size, launch and DRAM latency included. nbytes is first rounded up
    to a multiple of `align` (at most 64 KB more): torch's copy_ of same-dtype tensors is a device memcpy, and on the
    H200 (thirty-fifth and thirty-sixth sessions) the two floors whose halves were no multiple of 4 KB (down's and
    q/k/v's at M = 1) came out 27-38% above the same shapes' at M = 4-8, whose halves were."""
    n = max(1, -(-nbytes // align) * align // 4)  # bf16 elements: n * 2 bytes read + n * 2 bytes written
    bufs = [(torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_(),
             torch.empty(n, device="cuda", dtype=torch.bfloat16)) for _ in range(count)]
    return graph_time_us(lambda i: bufs[i][1].copy_(bufs[i][0]), count)
