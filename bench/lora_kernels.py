"""Benchmark of the batched LoRA kernels (shrink + expand) against torch baselines, on one CUDA device.

    python bench/lora_kernels.py [--quick] [--sweep] [--markdown out.md]

Llama-3-8B shapes (hidden 4096; outputs 4096 = q/o, 1024 = k/v, 14336 = gate/up; down 14336 -> 4096),
bf16, r=16 unless said, tokens x distinct adapters. Times are medians of triton.testing.do_bench over
replays of one CUDA graph that applies the op to P rotating input sets (different x, pools and outputs,
P * bytes >= 4x L2, so the bytes come from HBM, not L2), divided by P. GB/s counts the minimal bytes:
x once, each distinct adapter's A and B rows once, y read and written once for tokens with an adapter.
"same-bytes copy" is a plain device copy moving the op's minimal bytes, timed the same way: the cost of
the bytes alone at this size. Baselines in the same run: a per-adapter torch loop (index_select, two
matmuls, index_add; eager and in a CUDA graph) and a padded-to-max-rank torch bmm (graph).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import triton
from graph_timing import graph_time_us, same_bytes_copy_us
from triton.testing import do_bench

from hotlora.kernels.lora import (
    KernelConfig,
    LoraSlice,
    build_lora_meta,
    lora_apply_triton,
)

DT = torch.bfloat16
L2_MULTIPLE = 4


@dataclass
class Spec:
    in_features: int
    outs: tuple[int, ...]
    tokens: int
    distinct: int
    ranks: list[int] = field(default_factory=list)  # per adapter; default r=16
    label: str = ""
    no_pdl: bool = False  # compare: expand launched after the shrink completes

    def __post_init__(self) -> None:
        self.ranks = self.ranks or [16] * self.distinct

    @property
    def name(self) -> str:
        outs = "+".join(map(str, self.outs))
        return self.label or f"{self.in_features}->{outs} T={self.tokens} A={self.distinct} r=16"


@dataclass
class Set:
    x: torch.Tensor
    slices: list[LoraSlice]
    fused: torch.Tensor
    ys: list[torch.Tensor]


def minimal_bytes(spec: Spec) -> int:
    w = sum(spec.ranks) * (spec.in_features + sum(spec.outs))
    return 2 * (spec.tokens * spec.in_features + w + 2 * spec.tokens * sum(spec.outs))


def make_sets(spec: Spec, meta_rows: torch.Tensor, count: int) -> list[Set]:
    pool_rows = sum(spec.ranks)
    sets = []
    for _ in range(count):
        x = torch.randn(spec.tokens, spec.in_features, device="cuda", dtype=DT)
        slices = [
            LoraSlice(
                a=torch.randn(pool_rows, spec.in_features, device="cuda", dtype=DT) * spec.in_features**-0.5,
                b=torch.randn(pool_rows, n, device="cuda", dtype=DT) * 0.1,
                rank=meta_rows,
            )
            for n in spec.outs
        ]
        fused = torch.randn(spec.tokens, sum(spec.outs), device="cuda", dtype=DT)
        sets.append(Set(x, slices, fused, list(fused.split(list(spec.outs), dim=1))))
    return sets


def eager_time_us(fn_per_set, count: int) -> float:
    state = {"i": 0}

    def step() -> None:
        fn_per_set(state["i"] % count)
        state["i"] += 1

    return do_bench(step, warmup=10, rep=100, return_mode="median") * 1e3


def torch_loop(spec: Spec, s: Set, groups, row_start: list[int], scale: list[float]) -> None:
    """Per-adapter loop as PEFT-style multi-adapter code does it (grouping precomputed on the host)."""
    for slot, idx in groups:
        xs = s.x.index_select(0, idx)
        rows = slice(row_start[slot], row_start[slot] + spec.ranks[slot])
        for y, sl in zip(s.ys, s.slices, strict=True):
            delta = (xs @ sl.a[rows].T) @ sl.b[rows]
            y.index_add_(0, idx, delta, alpha=scale[slot])


def padded_bmm(s: Set, pads, slots: torch.Tensor, scale_t: torch.Tensor) -> None:
    """Every adapter padded to the maximum rank, gathered per token, two batched matmuls."""
    for y, (a_pad, b_pad) in zip(s.ys, pads, strict=True):
        h = torch.bmm(s.x.unsqueeze(1), a_pad[slots].transpose(1, 2))
        y += (torch.bmm(h, b_pad[slots]).squeeze(1) * scale_t[slots, None]).to(y.dtype)


def setup(spec: Spec, split_k: int | None = None):
    """(meta, rotating sets, set count): adapter d owns rows sum(ranks[:d]) : ..., token t uses adapter t % A."""
    rank_t = torch.tensor(spec.ranks, dtype=torch.int32, device="cuda")
    row_start = [sum(spec.ranks[:i]) for i in range(spec.distinct)]
    token_slots = (torch.arange(spec.tokens, device="cuda") % spec.distinct).to(torch.int32)
    meta = build_lora_meta(
        token_slots,
        torch.tensor(row_start, dtype=torch.int32, device="cuda"),
        torch.full((spec.distinct,), 2.0, device="cuda"),
        max(spec.ranks),
        split_k=split_k,
    )
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    count = max(2, min(64, math.ceil(L2_MULTIPLE * l2 / minimal_bytes(spec))))
    return meta, make_sets(spec, rank_t, count), count


def bench_case(spec: Spec, config: KernelConfig | None = None, split_k: int | None = None) -> dict:
    os.environ["HOTLORA_NO_PDL"] = "1" if spec.no_pdl else "0"
    meta, sets, count = setup(spec, split_k)
    token_slots = meta.token_slots
    row_start, scale = meta.row_start.tolist(), meta.scale.tolist()
    set_bytes = minimal_bytes(spec)
    res = {"case": spec.name, "bytes": set_bytes, "sets": count, "split_k": meta.split_k}
    res["triton_us"] = graph_time_us(
        lambda i: lora_apply_triton(sets[i].ys, sets[i].x, sets[i].slices, meta, config), count
    )
    res["gbps"] = set_bytes / res["triton_us"] / 1e3
    res["copy_same_us"] = same_bytes_copy_us(set_bytes, count)
    res["triton_eager_us"] = eager_time_us(
        lambda i: lora_apply_triton(sets[i].ys, sets[i].x, sets[i].slices, meta, config), count
    )
    groups = [(s, torch.nonzero(token_slots == s).flatten()) for s in range(spec.distinct)]
    res["loop_eager_us"] = eager_time_us(lambda i: torch_loop(spec, sets[i], groups, row_start, scale), count)
    res["loop_graph_us"] = graph_time_us(lambda i: torch_loop(spec, sets[i], groups, row_start, scale), count)
    r_max = max(spec.ranks)
    if spec.tokens * r_max * (spec.in_features + max(spec.outs)) * 2 <= 256 << 20:
        pads = []
        for s in sets:
            per = []
            for sl in s.slices:
                a_pad = torch.zeros(spec.distinct, r_max, spec.in_features, device="cuda", dtype=DT)
                b_pad = torch.zeros(spec.distinct, r_max, sl.b.shape[1], device="cuda", dtype=DT)
                for d, (r0, r) in enumerate(zip(row_start, spec.ranks, strict=True)):
                    a_pad[d, :r] = sl.a[r0 : r0 + r]
                    b_pad[d, :r] = sl.b[r0 : r0 + r]
                per.append((a_pad, b_pad))
            pads.append(per)
        slots_l = token_slots.long()
        scale_t = meta.scale
        res["bmm_graph_us"] = graph_time_us(lambda i: padded_bmm(sets[i], pads[i], slots_l, scale_t), count)
    sets.clear()
    torch.cuda.empty_cache()
    return res


def bench_meta() -> str:
    """The per-step metadata step: the Triton kernel against the torch-ops version, eager and in a graph."""
    from hotlora.kernels.lora import refresh_lora_meta_triton
    from hotlora.kernels.reference import refresh_lora_meta_ref

    lines = ["| tokens | slots | Triton graph us | Triton eager us | torch graph us | torch eager us |"]
    lines.append("|---|---|---|---|---|---|")
    for tokens, slots in ((1, 32), (32, 32), (256, 32), (2048, 32), (8192, 128)):
        token_slots = torch.randint(-1, slots, (tokens,), dtype=torch.int32, device="cuda")
        meta = build_lora_meta(token_slots, torch.arange(slots, dtype=torch.int32, device="cuda") * 16,
                               torch.ones(slots, device="cuda"), 16)  # fmt: skip
        cells = []
        for fn in (refresh_lora_meta_triton, refresh_lora_meta_ref):
            cells.append(graph_time_us(lambda i, f=fn, m=meta: f(m), 1))
            cells.append(do_bench(lambda f=fn, m=meta: f(m), warmup=10, rep=100, return_mode="median") * 1e3)
        lines.append(f"| {tokens} | {slots} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def copy_bandwidth_gbps() -> float:
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 2 / ms / 1e6


def specs(quick: bool) -> list[Spec]:
    out = []
    for n in (4096, 1024, 14336):
        for t in (1, 8, 32, 128, 2048):
            for d in (1, 8, 32):
                if d <= t and not (quick and t in (8, 128)):
                    out.append(Spec(4096, (n,), t, d))
    mixed = [8, 16, 32, 64, 12, 24, 48, 40] * 4
    out += [
        Spec(4096, (4096,), 32, 32, mixed, label=f"4096->4096 T=32 A=32 mixed r=8..64 (sum {sum(mixed)})"),
        Spec(4096, (4096,), 32, 32, [64] * 32, label="4096->4096 T=32 A=32 r=64"),
        Spec(4096, (4096,), 32, 32, [int(sum(mixed) / 32)] * 32, label=f"4096->4096 T=32 A=32 r={sum(mixed) // 32}"),
        Spec(4096, (4096,), 32, 32, label="4096->4096 T=32 A=32 r=16, no PDL", no_pdl=True),
        Spec(4096, (14336,), 32, 32, label="4096->14336 T=32 A=32 r=16, no PDL", no_pdl=True),
        Spec(4096, (4096, 1024, 1024), 32, 32, label="qkv 4096->4096+1024+1024 T=32 A=32 r=16"),
        Spec(4096, (14336, 14336), 32, 32, label="gate+up 4096->2x14336 T=32 A=32 r=16"),
        Spec(14336, (4096,), 32, 32, label="down 14336->4096 T=32 A=32 r=16"),
        Spec(4096, (4096, 1024, 1024), 2048, 32, label="qkv 4096->4096+1024+1024 T=2048 A=32 r=16"),
    ]
    return out


def sweep(copy_gbps: float) -> list[dict]:
    """Launch parameters of the decode headline shapes, shrink + expand together (PDL overlaps them)."""
    cases = [Spec(4096, (4096,), 32, 32), Spec(4096, (14336,), 32, 32), Spec(4096, (14336,), 2048, 1)]
    rows = []
    for spec in cases:
        results = []
        for split in (1, 2, 4) if spec.tokens >= 512 else (4, 8, 16):
            meta, sets, count = setup(spec, split)
            for sw in (2, 4):
                for bn in (128, 256, 512):
                    for ew in (4, 8):
                        kw = dict(shrink_warps=sw, expand_block_n=bn, expand_warps=ew)
                        cfg = KernelConfig(**kw)
                        call = lambda i, c=cfg, s=sets, m=meta: lora_apply_triton(s[i].ys, s[i].x, s[i].slices, m, c)  # noqa: E731
                        try:
                            us = graph_time_us(call, count, rep=60)
                        except Exception as exc:  # a config may not fit (shared memory, registers)
                            print(f"  skip {kw}: {type(exc).__name__}", flush=True)
                            continue
                        results.append({"case": spec.name, "split_k": split, "us": us, "config": kw})
            sets.clear()
        results.sort(key=lambda r: r["us"])
        print(f"## sweep {spec.name} (copy {copy_gbps:.0f} GB/s, minimal bytes {minimal_bytes(spec) / 1e6:.1f} MB)")
        for r in results[:8]:
            print(f"  {r['us']:.2f} us split={r['split_k']} {r['config']}", flush=True)
        rows += results
    return rows


def markdown(rows: list[dict], copy_gbps: float, device: str) -> str:
    head = (
        f"Device: {device}; measured copy bandwidth {copy_gbps:.0f} GB/s (read + write of a 1 GiB buffer). "
        "bf16, CUDA-graph replay medians over rotating input sets (HBM, not L2).\n\n"
        "| case | Triton us | GB/s | % copy | same-bytes copy us | eager us | torch loop eager us "
        "| torch loop graph us | padded bmm graph us | x loop eager | x loop graph |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def f(r: dict, k: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(r[k]) if k in r else "-"

    lines = []
    for r in rows:
        t = r["triton_us"]
        lines.append(
            f"| {r['case']} | {t:.1f} | {r['gbps']:.0f} | {100 * r['gbps'] / copy_gbps:.0f}% "
            f"| {f(r, 'copy_same_us')} | {f(r, 'triton_eager_us')} | {f(r, 'loop_eager_us')} | {f(r, 'loop_graph_us')} "
            f"| {f(r, 'bmm_graph_us')} | {r.get('loop_eager_us', 0) / t:.1f}x | {r.get('loop_graph_us', 0) / t:.1f}x |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer token counts")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch parameters of the headline shapes")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--skip-main", action="store_true", help="only the sweep")
    ap.add_argument("--only", nargs="*", default=[], help="only the cases whose name contains one of these")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    device = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, triton {triton.__version__})"
    copy_gbps = copy_bandwidth_gbps()
    print(f"{device}: copy {copy_gbps:.0f} GB/s", flush=True)
    swept = sweep(copy_gbps) if args.sweep else []
    if args.json and swept:
        with open(args.json + ".sweep", "w") as fh:
            json.dump(swept, fh, indent=1)
    if args.skip_main:
        return
    rows = []
    for spec in specs(args.quick):
        if args.only and not any(o in spec.name for o in args.only):
            continue
        try:
            rows.append(bench_case(spec))
        except Exception as exc:
            print(f"FAILED {spec.name}: {exc!r}", flush=True)
            continue
        r = rows[-1]
        print(f"{r['case']}: {r['triton_us']:.1f} us {r['gbps']:.0f} GB/s loop {r['loop_eager_us']:.0f} us", flush=True)
    table = markdown(rows, copy_gbps, device) + "\nMetadata step (once per engine step, shared by all layers):\n\n"
    table += bench_meta()
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "copy_gbps": copy_gbps, "rows": rows, "sweep": swept}, fh, indent=1)


if __name__ == "__main__":
    main()
