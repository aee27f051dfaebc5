"""How fast the NF4 matmul's read pattern alone can stream the packed codes, on one CUDA device.

    python bench/nf4_read.py [--shapes gate/up down]

The small-M NF4 kernels read a weight as programs of BLOCK_N rows x one K slice, each loop step taking 64 bytes of
every row (one 128-column group). This bench reads the same bytes (as int32 words, xor-folded: next to no compute)
with that pattern and with variants: WIDTH bytes per row a step, K slices, pipeline stages, and a tile-major layout
in which each program's step is one contiguous BLOCK_N x WIDTH block (a re-layout pack_nf4 could make). Each time
is a CUDA-graph replay median over rotating copies (bench/graph_timing.py), beside a plain device copy of the same
bytes timed the same way (which also writes them: the NF4 tables' floor).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl
from graph_timing import graph_time_us, same_bytes_copy_us

SHAPES = {"gate/up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096)}  # N, K
L2_BYTES = 60 * 2**20


@triton.jit
def read_kernel(w_ptr, out_ptr, stride, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr, ITERS: tl.constexpr,
                TILED: tl.constexpr):
    """xor of program (pid_n, pid_k)'s words: rows pid_n * BLOCK_N.., ITERS steps of WIDTH words from word
    pid_k * ITERS * WIDTH (TILED: step s of the program is the contiguous block at ((pid_n * steps + s) *
    BLOCK_N) * WIDTH, steps = the grid's ITERS * slices)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_N)[:, None]
    c = tl.arange(0, WIDTH)[None, :]
    acc = tl.zeros([BLOCK_N, WIDTH], tl.int32)
    for i in range(ITERS):
        s = pid_k * ITERS + i
        if TILED:
            ptrs = w_ptr + ((pid_n * tl.num_programs(1) * ITERS + s) * BLOCK_N + r) * WIDTH + c
        else:
            ptrs = w_ptr + (pid_n * BLOCK_N + r) * stride + s * WIDTH + c
        acc ^= tl.load(ptrs)
    tl.store(out_ptr + pid_k * tl.num_programs(0) * BLOCK_N + pid_n * BLOCK_N + tl.arange(0, BLOCK_N),
             tl.xor_sum(acc, 1))


def bench_shape(name: str) -> None:
    n, k = SHAPES[name]
    words = k // 8  # int32 words per row (4-bit codes)
    nbytes = n * words * 4
    count = max(2, -(-4 * L2_BYTES // nbytes))
    ws = [torch.randint(-2**31, 2**31 - 1, (n, words), dtype=torch.int32, device="cuda") for _ in range(count)]
    floor = same_bytes_copy_us(nbytes, count)
    print(f"## {name} {n}x{k}: {nbytes / 1e6:.1f} MB of codes; same-bytes copy {floor:.1f} us", flush=True)
    for block_n, width_b, split, stages, tiled in itertools.product((64, 128), (64, 128, 256), (1, 2, 4), (1, 3),
                                                                      (False, True)):
        width = width_b // 4
        out = torch.empty(split * n, dtype=torch.int32, device="cuda")

        def call(i: int, bn=block_n, w=width, sp=split, st=stages, t=tiled, out=out) -> None:
            read_kernel[(n // bn, sp)](ws[i], out, words, BLOCK_N=bn, WIDTH=w, ITERS=words // w // sp, TILED=t,
                                       num_warps=4, num_stages=st)

        us = graph_time_us(call, count, rep=50)
        print(f"   block_n {block_n} width {width_b} B split {split} stages {stages} "
              f"{'tile-major' if tiled else 'row-major'}: {us:.1f} us ({us / floor:.2f}x the copy, "
              f"{nbytes / us / 1e6:.2f} TB/s read)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["gate/up", "down"], choices=list(SHAPES))
    args = ap.parse_args()
    print(f"Device: {torch.cuda.get_device_name()}", flush=True)
    for name in args.shapes:
        bench_shape(name)


if __name__ == "__main__":
    main()
