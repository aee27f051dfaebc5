"""Large-M NF4: dequantize + cuBLAS in chunks of the weight's rows, against the whole-weight path and bf16 cuBLAS.

    python bench/nf4_dense_chunks.py [--ms 256 512 2048] [--chunks 2 4 8 16] [--shapes ...] [--json out.json]

nf4_matmul serves M > 256 by dequantizing the whole weight to bf16 (nf4_dequantize) and calling cuBLAS: on the
H200 that is 1.56-1.59x cuBLAS at M = 512 (eighth session), the dequantization's write and cuBLAS's re-read of
the bf16 weight (2 bytes a value each way, ~235 MB for gate/up) on top of the GEMM. Two variants, timed here:
- "seq c": c chunks of rows, each dequantized into one reused bf16 buffer and multiplied at once
  (torch.mm into y's column slice): a chunk of <= ~30 MB may stay in L2 (60 MB) from its write to its read.
- "overlap c": the same with two buffers, chunk i+1 dequantized on a second stream while chunk i's GEMM runs
  (events order each buffer's reuse), so the memory-bound dequantization can hide under the compute-bound GEMM.
Timing as bench/nf4_gemm.py (CUDA-graph replays over rotating weight copies; the Llama-3-8B shapes); rel err
is against the whole-weight path's output.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from graph_timing import graph_time_us
from nf4_gemm import DT, SHAPES, Case

from hotlora.kernels.nf4 import Nf4Config, NF4Weight, nf4_dequantize, nf4_matmul


def bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    step = -(-n // chunks)
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def chunked(x: torch.Tensor, w: NF4Weight, chunks: int, overlap: bool,
            side: torch.cuda.Stream | None = None) -> torch.Tensor:
    """y = x @ dequant(w).T, dequantized `chunks` row-chunks at a time (see the module docstring)."""
    n, k = w.shape
    spans = bounds(n, chunks)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    bufs = [torch.empty(spans[0][1], k, dtype=w.dtype, device=x.device) for _ in range(2 if overlap else 1)]
    if not overlap:
        for a, b in spans:
            buf = bufs[0][: b - a]
            torch.mm(x, nf4_dequantize(w.rows(a, b), out=buf).T, out=y[:, a:b])
        return y
    main = torch.cuda.current_stream()
    side.wait_stream(main)  # x and the buffers exist before the side stream writes
    freed: list[torch.cuda.Event] = []
    for i, (a, b) in enumerate(spans):
        buf = bufs[i % 2][: b - a]
        ready = torch.cuda.Event()
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(freed[i - 2])  # the GEMM that last read this buffer is done
            nf4_dequantize(w.rows(a, b), out=buf)
            ready.record(side)
        main.wait_event(ready)
        torch.mm(x, buf.T, out=y[:, a:b])
        done = torch.cuda.Event()
        done.record(main)
        freed.append(done)
    main.wait_stream(side)
    return y


DENSE = Nf4Config(128, 128, dense=True)


def bench_m(case: Case, m: int, chunk_counts: list[int], side: torch.cuda.Stream) -> dict:
    xs = [torch.randn(m, case.k, device="cuda", dtype=DT) for _ in range(case.count)]
    xd = [torch.randn(m, case.k, device="cuda", dtype=DT) for _ in range(case.dense_count)]
    ref = nf4_matmul(xs[0], case.packed[0], config=DENSE).float()
    row = {"M": m, "cublas_us": graph_time_us(lambda i: torch.matmul(xd[i], case.dense[i].T), case.dense_count),
           "whole_us": graph_time_us(lambda i: nf4_matmul(xs[i], case.packed[i], config=DENSE), case.count)}
    for c, overlap in itertools.product(chunk_counts, (False, True)):
        key = f"{'overlap' if overlap else 'seq'} {c}"
        y = chunked(xs[0], case.packed[0], c, overlap, side).float()
        row[key + " err"] = ((y - ref).norm() / ref.norm()).item()
        row[key + " us"] = graph_time_us(lambda i, c=c, o=overlap: chunked(xs[i], case.packed[i], c, o, side),
                                         case.count)
    return row


def run_shape(name: str, ms: list[int], chunk_counts: list[int]) -> list[dict]:
    case = Case(*SHAPES[name])
    side = torch.cuda.Stream()
    out = []
    for m in ms:
        row = {"shape": name} | bench_m(case, m, chunk_counts, side)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def table(results: list[dict], chunk_counts: list[int]) -> str:
    keys = [f"{kind} {c}" for c in chunk_counts for kind in ("seq", "overlap")]
    lines = ["| projection | M | cuBLAS bf16 us | whole-weight dequant + cuBLAS us | " + " | ".join(keys) + " |",
             "|---" * (4 + len(keys)) + "|"]
    for r in results:
        cells = [f"{r[k + ' us']:.1f} ({r[k + ' us'] / r['cublas_us']:.2f}x)" for k in keys]
        lines.append(f"| {r['shape']} | {r['M']} | {r['cublas_us']:.1f} | {r['whole_us']:.1f} "
                     f"({r['whole_us'] / r['cublas_us']:.2f}x) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", type=int, nargs="+", default=[256, 512, 2048])
    ap.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="subset of: " + ", ".join(SHAPES))
    ap.add_argument("--json")
    args = ap.parse_args()
    results = [r for name in args.shapes for r in run_shape(name, args.ms, args.chunks)]
    print(f"Device: {torch.cuda.get_device_name()}. bf16 x; us (x bf16 cuBLAS); CUDA-graph replay medians.\n")
    print(table(results, args.chunks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
