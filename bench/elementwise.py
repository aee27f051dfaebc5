"""The decoder layer's fused small ops: hotlora's Triton kernels against torch.compile (inductor) of the same
torch reference, and the reference run eagerly (issue 11, item 3: "torch.compile or your own Triton kernels,
whichever measures faster").

    python bench/elementwise.py [--tokens 1 32 256 2048] [--json out.json]
    python bench/elementwise.py --device cpu --tokens 4        # smoke: compiles and compares, no timing

Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 query heads and 8 KV heads of 128), bf16:
- add_rms_norm: h += delta, then RMSNorm(h) * weight (kernels.elementwise.add_rms_norm vs add_rms_norm_ref);
- silu_mul: silu(gate) * up, gate and up views of one fused [T, 2 x 14336] output, as the engine has them;
- rope_kv: rotate q and k in place and write k and v into a paged cache (16-token blocks) at each token's slot.
Each variant is timed as bench/graph_timing.py does: replays of one CUDA graph holding one call per rotating input
set, divided by the sets. inductor compiles the reference with fullgraph=True and static shapes, once per T,
before the capture. Outputs are compared against the eager reference (max abs difference) in the same run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from hotlora.kernels.elementwise import add_rms_norm, rope_kv_, silu_mul
from hotlora.kernels.reference import add_rms_norm_ref, rope_kv_ref, silu_mul_ref

D, INTER, H, KVH, DH, BLOCK = 4096, 14336, 32, 8, 128, 16
EPS = 1e-5
SETS = 8  # rotating input sets per graph


def _norm_inputs(t: int, dev: str, dt: torch.dtype) -> dict:
    return {"h": torch.randn(t, D, device=dev, dtype=dt), "delta": torch.randn(t, D, device=dev, dtype=dt),
            "weight": torch.rand(D, device=dev, dtype=dt) + 0.5}


def _silu_inputs(t: int, dev: str, dt: torch.dtype) -> dict:
    fused = torch.randn(t, 2 * INTER, device=dev, dtype=dt)
    return {"gate": fused[:, :INTER], "up": fused[:, INTER:]}


def _rope_inputs(t: int, dev: str, dt: torch.dtype) -> dict:
    qkv = torch.randn(t, (H + 2 * KVH) * DH, device=dev, dtype=dt)
    q, k, v = qkv.split([H * DH, KVH * DH, KVH * DH], dim=1)
    max_len = 8192
    inv = 1.0 / (500000.0 ** (torch.arange(0, DH, 2, device=dev, dtype=torch.float32) / DH))
    angles = torch.outer(torch.arange(max_len, device=dev, dtype=torch.float32), inv)
    emb = torch.cat([angles, angles], dim=-1)
    blocks = max(4, 2 * -(-t // BLOCK))
    return {"q": q.view(t, H, DH), "k": k.view(t, KVH, DH), "v": v.view(t, KVH, DH),
            "positions": torch.randint(0, max_len, (t,), device=dev),
            "cos": emb.cos().to(dt), "sin": emb.sin().to(dt),
            "k_cache": torch.zeros(blocks, BLOCK, KVH, DH, device=dev, dtype=dt),
            "v_cache": torch.zeros(blocks, BLOCK, KVH, DH, device=dev, dtype=dt),
            "slots": torch.randperm(blocks * BLOCK, device=dev)[:t]}


def _norm(fn: Callable) -> Callable:
    return lambda a: fn(a["h"], a["delta"], a["weight"], EPS)


def _silu(fn: Callable) -> Callable:
    return lambda a: fn(a["gate"], a["up"])


def _rope(fn: Callable) -> Callable:
    def call(a: dict) -> torch.Tensor:
        fn(a["q"], a["k"], a["v"], a["positions"], a["cos"], a["sin"], a["k_cache"], a["v_cache"], a["slots"])
        return a["k_cache"]
    return call


# name: (inputs, hotlora's op, the reference), each op wrapped to take the input dict and return what it wrote
OPS = {
    "add_rms_norm": (_norm_inputs, _norm(add_rms_norm), _norm(add_rms_norm_ref)),
    "silu_mul": (_silu_inputs, _silu(silu_mul), _silu(silu_mul_ref)),
    "rope_kv": (_rope_inputs, _rope(rope_kv_), _rope(rope_kv_ref)),
}


def _clone(a: dict) -> dict:
    """Copies of every input, so that the in-place ops start from the same values (views become separate
    tensors: every op accepts either)."""
    return {k: v.clone() for k, v in a.items()}


def variants(op: str) -> dict[str, Callable]:
    _, ours, ref = OPS[op]
    return {"triton": ours, "inductor": torch.compile(ref, fullgraph=True, dynamic=False), "eager": ref}


def compare(op: str, fns: dict[str, Callable], t: int, dev: str, dt: torch.dtype) -> dict[str, float]:
    """Max abs difference of each variant's output from the eager reference's, on the same inputs."""
    base = OPS[op][0](t, dev, dt)
    want = fns["eager"](_clone(base)).float()
    return {name: (fn(_clone(base)).float() - want).abs().max().item() for name, fn in fns.items() if name != "eager"}


def time_op(op: str, fns: dict[str, Callable], t: int) -> dict[str, float]:
    from graph_timing import graph_time_us

    sets = [OPS[op][0](t, "cuda", torch.bfloat16) for _ in range(SETS)]
    return {name: graph_time_us(lambda i, fn=fn: fn(sets[i]), SETS) for name, fn in fns.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 256, 2048])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--device", default="cuda", help="cpu: compare only (inductor's C++ path), no timing")
    ap.add_argument("--json")
    args = ap.parse_args()
    dt = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    for op in args.ops:
        for t in args.tokens:
            torch._dynamo.reset()  # a fresh compile per shape: static, as a graph bucket would have it
            fns = variants(op)
            row = {"op": op, "T": t, "max_abs_diff": compare(op, fns, t, args.device, dt)}
            if args.device == "cuda":
                row["us"] = time_op(op, fns, t)
                row["inductor_over_triton"] = row["us"]["inductor"] / row["us"]["triton"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.device == "cuda":
        print(f"\n{torch.cuda.get_device_name()}, bf16, us per call (CUDA-graph replay, {SETS} rotating sets)\n")
        print("| op | T | Triton (hotlora) | inductor | eager torch | inductor / Triton |\n|---|---|---|---|---|---|")
        for r in rows:
            us = r["us"]
            print(f"| {r['op']} | {r['T']} | {us['triton']:.2f} | {us['inductor']:.2f} | {us['eager']:.2f} | "
                  f"{r['inductor_over_triton']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
