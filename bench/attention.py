"""Benchmark of the paged varlen attention kernel against the torch path it replaced, on one CUDA device.

    python bench/attention.py [--quick] [--sweep] [--json out.json]

Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128), bf16, 16-token blocks, one layer's call.
Batches: decode rows (one query each), prefill chunks (a chunk of n queries ending a context of c tokens), and
both mixed. Times are medians of triton.testing.do_bench over replays of one CUDA graph that runs the call on
P rotating sets of block tables into disjoint parts of one KV cache (P * KV bytes >= 4x L2, so K/V come from
HBM), divided by P. Columns:
- triton: hotlora.kernels.attention.paged_attention with its default split-KV choice (splits shown);
- triton 1 split: the same kernel without split-KV (what split-KV buys at small batch);
- torch before: the path the kernel replaced (server/model/attention.py before issue 11): decodes gathered into
  a tensor padded to the longest context and one masked SDPA, then one SDPA per prefill chunk, in a graph too;
- KV GB/s: K and V bytes of every context read once, over the triton time; % floor: against the 4.27 TB/s of a
  device copy (DESIGN.md).
--sweep instead times the decode and mixed cases over split counts, warps, stages and key-tile widths and
prints the best configs per case beside the default's time (the defaults in kernels/attention.py come from it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random

import torch
import torch.nn.functional as F
from graph_timing import graph_time_us

from hotlora.kernels.attention import BLOCK_N, AttentionConfig, launch_plan, paged_attention

H, KVH, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
COPY_GBPS = 4270.0
L2_BYTES = 4 * 60 * 2**20
SCALE = D**-0.5


def cases(quick: bool) -> dict[str, list[tuple[int, int]]]:
    """name -> (query count, context length) per sequence."""
    rng = random.Random(0)
    rng_hit = random.Random(1)
    hit_ctx = [rng_hit.randint(1100, 1500) for _ in range(14)]
    out = {
        "decode B=1 ctx=128": [(1, 128)],
        "decode B=1 ctx=2048": [(1, 2048)],
        "decode B=1 ctx=8192": [(1, 8192)],
        "decode B=32 ctx=128": [(1, 128)] * 32,
        "decode B=32 ctx=2048": [(1, 2048)] * 32,
        "decode B=64 ctx=U[64,2048]": [(1, rng.randint(64, 2048)) for _ in range(64)],
        "mixed 31 decodes U[64,1024] + chunk 256@768": [(1, rng.randint(64, 1024)) for _ in range(31)]
        + [(256, 768)],
        "mixed 16 decodes + chunks 512@512, 512@2048": [(1, rng.randint(64, 1024)) for _ in range(16)]
        + [(512, 512), (512, 2048)],
        "hit 14 decodes U[64,1024] + chunk 160@1184": [(1, rng.randint(64, 1024)) for _ in range(14)]
        + [(160, 1184)],
        # issue 13's hit as its workload has it (every decode row past the 1,024-token shared prompt), and its parts
        "hit 14 decodes U[1100,1500] + chunk 160@1184": [(1, c) for c in hit_ctx] + [(160, 1184)],
        "decode B=14 ctx=U[1100,1500]": [(1, c) for c in hit_ctx],
        "decode B=8 ctx=U[1100,1500]": [(1, c) for c in hit_ctx[:8]],
        "decode B=32 ctx=U[1100,1500]": [(1, c) for c in (hit_ctx * 3)[:32]],
        "decode B=64 ctx=U[1100,1500]": [(1, c) for c in (hit_ctx * 5)[:64]],
        "chunk 160@1184": [(160, 1184)],
        # a 128-token mixed bucket full of decode rows (a prompt's last chunk joining a busy batch)
        "mixed 100 decodes U[1100,1500] + chunk 28@1184": [(1, c) for c in (hit_ctx * 8)[:100]] + [(28, 1184)],
        "miss 14 decodes U[64,1024] + chunk 1184@1184": [(1, rng.randint(64, 1024)) for _ in range(14)]
        + [(1184, 1184)],
        "prefill 1 x 2048": [(2048, 2048)],
        "prefill 4 x 512": [(512, 512)] * 4,
    }
    if quick:
        keep = ("decode B=1 ctx=8192", "decode B=32 ctx=2048", "mixed 31 decodes U[64,1024] + chunk 256@768")
        out = {k: v for k, v in out.items() if k in keep}
    return out


class Batch:
    """One case's tensors: P rotating block-table sets over one cache, and the old path's metadata."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        self.spans = spans
        need = [-(-c // BS) for _, c in spans]
        self.kv_bytes = sum(c for _, c in spans) * KVH * D * 2 * 2
        self.sets = max(1, min(32, -(-L2_BYTES // self.kv_bytes)))
        blocks = sum(need) * self.sets
        self.k = torch.randn(blocks, BS, KVH, D, device="cuda", dtype=DT)
        self.v = torch.randn_like(self.k)
        self.q = torch.randn(sum(n for n, _ in spans), H, D, device="cuda", dtype=DT)
        cu = [0]
        for n, _ in spans:
            cu.append(cu[-1] + n)
        self.cu = torch.tensor(cu, dtype=torch.int32, device="cuda")
        self.ctx = torch.tensor([c for _, c in spans], dtype=torch.int32, device="cuda")
        width = max(need)
        perm = torch.randperm(blocks, device="cuda").int()
        self.tables = []
        for p in range(self.sets):
            rows, used = [], p * sum(need)
            for n in need:
                rows.append(torch.cat([perm[used : used + n], perm[:1].expand(width - n)]))
                used += n
            self.tables.append(torch.stack(rows))
        dec = [s for s, (n, _) in enumerate(spans) if n == 1]  # the old path's metadata, on the device
        self.dec = torch.tensor(dec, dtype=torch.int64, device="cuda")
        self.dec_rows, self.dec_lens = self.cu[self.dec].long(), self.ctx[self.dec].long()
        self.dec_width = max((need[s] for s in dec), default=0)
        self.max_q = max(n for n, _ in spans)
        self.max_ctx = 1 << (max(c for _, c in spans) - 1).bit_length()

    def triton(self, i: int, num_splits: int | None = None, config: AttentionConfig | None = None) -> torch.Tensor:
        return paged_attention(self.q, self.k, self.v, self.cu, self.ctx, self.tables[i], SCALE,
                               max_q_len=self.max_q, max_ctx_len=self.max_ctx, num_splits=num_splits,
                               config=config)  # fmt: skip

    def torch_before(self, i: int) -> torch.Tensor:
        """The replaced path: padded decode gather + masked SDPA, then a loop of per-chunk SDPAs."""
        out = torch.empty_like(self.q)
        tables = self.tables[i].long()
        if self.dec_width:
            dec_tables = tables[self.dec, : self.dec_width]
            k = self.k[dec_tables].flatten(1, 2).transpose(1, 2)  # [B, KVH, L, D]
            v = self.v[dec_tables].flatten(1, 2).transpose(1, 2)
            mask = torch.arange(k.shape[2], device="cuda")[None, :] < self.dec_lens[:, None]
            rows = self.dec_rows
            o = F.scaled_dot_product_attention(self.q[rows].unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                               scale=SCALE, enable_gqa=True)  # fmt: skip
            out[rows] = o.squeeze(2)
        start = 0
        for s, (n, c) in enumerate(self.spans):
            if n > 1:
                k = self.k[tables[s]].flatten(0, 1)[:c].transpose(0, 1)
                v = self.v[tables[s]].flatten(0, 1)[:c].transpose(0, 1)
                qs = self.q[start : start + n].transpose(0, 1)
                if n == c:
                    o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
                else:
                    pos = torch.arange(c - n, c, device="cuda")
                    mask = torch.arange(c, device="cuda")[None, :] <= pos[:, None]
                    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=SCALE, enable_gqa=True)
                out[start : start + n] = o.transpose(0, 1)
            start += n
        return out


def bench(name: str, spans: list[tuple[int, int]]) -> dict:
    b = Batch(spans)
    ref = b.torch_before(0)
    torch.testing.assert_close(b.triton(0).float(), ref.float(), atol=2.5e-2, rtol=2.5e-2)
    _, splits = launch_plan(b.q.device, b.q.shape[0], len(spans), KVH, H // KVH, b.max_q, b.max_ctx)
    res = {"case": name, "tokens": b.q.shape[0], "seqs": len(spans), "splits": splits, "kv_mb": b.kv_bytes / 1e6}
    res["triton_us"] = graph_time_us(b.triton, b.sets)
    res["triton_1split_us"] = graph_time_us(lambda i: b.triton(i, 1), b.sets)
    res["torch_before_us"] = graph_time_us(b.torch_before, b.sets)
    res["kv_gbps"] = b.kv_bytes / res["triton_us"] / 1e3
    return res


def sweep(name: str, spans: list[tuple[int, int]], grid: argparse.Namespace) -> dict:
    """Every (splits, key tile, warps, stages) of the grid for one case; the best five and the default's time."""
    b = Batch(spans)
    default = graph_time_us(b.triton, b.sets)
    times = []
    for splits, block_n, warps, stages in itertools.product(grid.splits, grid.block_n, grid.warps, grid.stages):
        if splits > 1 and b.max_ctx < 2 * block_n * splits:
            continue
        cfg = AttentionConfig(block_n, warps, stages)
        try:
            us = graph_time_us(lambda i, c=cfg, n=splits: b.triton(i, n, c), b.sets, rep=100)
        except Exception as exc:  # e.g. out of shared memory: not a candidate
            print(f"  {name} splits={splits} {cfg}: {type(exc).__name__}", flush=True)
            continue
        times.append((us, splits, block_n, warps, stages))
    times.sort()
    best = times[:5]
    plain = next((us for us, n, bn, w, st in times if (n, bn, w, st) == (1, BLOCK_N, 4, 2)), float("nan"))
    print(f"## {name}: default {default:.1f} us, unsplit {plain:.1f} us, KV {b.kv_bytes / 1e6:.0f} MB; best "
          + "; ".join(f"{us:.1f} us (splits {n}, block_n {bn}, warps {w}, stages {st})" for us, n, bn, w, st in best),
          flush=True)  # fmt: skip
    return {"case": name, "default_us": default, "kv_mb": b.kv_bytes / 1e6, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three cases")
    parser.add_argument("--sweep", action="store_true", help="sweep launch configs of the decode and mixed cases")
    parser.add_argument("--sweep-cases", nargs="+", help="the cases --sweep times",
                        default=["decode B=1 ctx=8192", "decode B=32 ctx=2048", "decode B=64 ctx=U[64,2048]",
                                 "mixed 31 decodes U[64,1024] + chunk 256@768"])
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8], help="--sweep's split counts")
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128], help="--sweep's key tiles")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="--sweep's warps")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="--sweep's stages")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.sweep:
        names = args.sweep_cases
        swept = [sweep(name, spans, args) for name, spans in cases(False).items() if name in names]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(swept, f, indent=1)
        return
    print(f"# paged attention, {torch.cuda.get_device_name()}, Llama-3-8B heads {H}/{KVH}, head_dim {D}, bf16, "
          f"block {BS}, key tile {BLOCK_N}")  # fmt: skip
    print("| case | tokens | splits | triton us | triton 1 split us | torch before us | speed-up | KV GB/s | % floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, spans in cases(args.quick).items():
        r = bench(name, spans)
        results.append(r)
        print(f"| {name} | {r['tokens']} | {r['splits']} | {r['triton_us']:.1f} | {r['triton_1split_us']:.1f} | "
              f"{r['torch_before_us']:.1f} | {r['torch_before_us'] / r['triton_us']:.1f}x | {r['kv_gbps']:.0f} | "
              f"{100 * r['kv_gbps'] / COPY_GBPS:.0f}% |", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
