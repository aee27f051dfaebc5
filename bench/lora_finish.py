"""What follows an NF4 matmul that splits K in a LoRA projection, per Llama-3-8B shape, on one CUDA device.

    python bench/lora_finish.py [--tokens 8 16 32 64] [--json out.json]

Variants, each timed as CUDA-graph replays over rotating input sets (graph_timing.graph_time_us; P sets whose
bytes pass 4x L2, so they come from HBM), with programmatic dependent launch as served:
- reduce+expand: the NF4 split-K reduce writing y, then the LoRA expand adding the delta (the path served past
  the finish's token limit before the tile finish);
- tile: lora_tile_finish (split sums and expand in one launch, per adapter tile) on the expand's kernel_config;
  tile bnX[wY]: blocks of X columns (and Y warps). A loop over 2 or 4 column blocks a program was slower at every
  size (twenty-ninth session) and was removed;
- token: lora_finish (the same, one program per token), served up to 4 tokens;
- copy: a plain device copy of the minimal bytes (the split sums read once, each distinct adapter's B rows once,
  y written once), timed the same way.
The shrink's result (the workspace) is filled once, outside the timing. Token t uses adapter t % A: "distinct"
is A = tokens, "one" is A = 1. The split count is the one kernels.nf4.pick_config gives the shape at that M.
The last lines sum the four shapes per layer and over 32 layers (ms a decode step).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from graph_timing import graph_time_us, same_bytes_copy_us

from hotlora.kernels import lora as lora_mod
from hotlora.kernels import lora_project as project_mod
from hotlora.kernels import nf4 as nf4_mod
from hotlora.kernels.lora import KernelConfig, LoraSlice, build_lora_meta
from hotlora.kernels.nf4 import pick_config

DT = torch.bfloat16
RANK = 16
SHAPES = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
          "down": (14336, (4096,))}  # fmt: skip


def _case(shape: str, tokens: int, adapters: int):
    k, outs = SHAPES[shape]
    n = sum(outs)
    split = pick_config(tokens, n, k, alone=False).split_k
    meta = build_lora_meta((torch.arange(tokens, device="cuda") % adapters).to(torch.int32),
                           torch.arange(adapters, device="cuda", dtype=torch.int32) * RANK,
                           torch.full((adapters,), 2.0, device="cuda"), RANK)  # fmt: skip
    meta.workspace.normal_()
    ranks = torch.full((adapters,), RANK, dtype=torch.int32, device="cuda")
    bytes_ = split * tokens * n * 4 + adapters * RANK * n * 2 + tokens * n * 2
    count = max(2, min(64, math.ceil(4 * (50 << 20) / bytes_)))
    sets = []
    for _ in range(count):
        slices = [LoraSlice(torch.empty(adapters * RANK, k, device="cuda", dtype=DT),
                            torch.randn(adapters * RANK, o, device="cuda", dtype=DT) * 0.1, ranks) for o in outs]
        part = torch.randn(split, tokens, n, device="cuda")
        y = torch.empty(tokens, n, device="cuda", dtype=DT)
        sets.append((slices, part, y))
    return meta, sets, count, bytes_, split


# the tile finish's variants: None is the expand's kernel_config, as served
TILE_CONFIGS = {"tile": None, "tile bn256": KernelConfig(expand_block_n=256),
                "tile bn256w8": KernelConfig(expand_block_n=256, expand_warps=8),
                "tile bn64w2": KernelConfig(expand_block_n=64, expand_warps=2)}  # fmt: skip


def _reduce_expand(meta, slices, part, y, pdl: bool) -> None:
    """The reduce writing y, then the expand adding the delta into it (the path without a finish)."""
    widths = [sl.b.shape[1] for sl in slices]
    nf4_mod._reduce(part, None, y)
    lora_mod._launch_expand(list(y.split(widths, dim=1)), slices, meta, lora_mod.kernel_config(meta, widths), pdl=pdl,
                            after_base=True)


def _variants(meta, sets) -> dict:
    count = len(sets)
    out = {"reduce+expand": graph_time_us(lambda i: _reduce_expand(meta, *sets[i], pdl=True), count)}
    for name, cfg in TILE_CONFIGS.items():
        out[name] = graph_time_us(
            lambda i, c=cfg: project_mod._launch_tile_finish(sets[i][1], None, sets[i][2], sets[i][0], meta, config=c),
            count)
    if meta.num_tokens <= 64:
        out["token"] = graph_time_us(lambda i: project_mod._launch_finish(sets[i][1], None, sets[i][2], sets[i][0],
                                                                          meta), count)
    return out


def _check(meta, sets) -> float:
    """Largest relative difference of the tile finish from reduce+expand on set 0 (the two round differently)."""
    slices, part, y = sets[0]
    project_mod._launch_tile_finish(part, None, y, slices, meta)
    got = y.float().clone()
    _reduce_expand(meta, slices, part, y, pdl=False)
    return ((got - y.float()).norm() / y.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[8, 16, 32, 64])
    ap.add_argument("--json", help="write all numbers here")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; us a launch (graph replays)", flush=True)
    rows, totals = [], {}
    for tokens in args.tokens:
        for mix, adapters in (("distinct", tokens), ("one", 1)):
            for shape in SHAPES:
                meta, sets, count, bytes_, split = _case(shape, tokens, adapters)
                res = _variants(meta, sets)
                res["copy"] = same_bytes_copy_us(bytes_, count)
                err = _check(meta, sets)
                assert err < 1e-2, (shape, tokens, mix, err)
                rows.append({"tokens": tokens, "mix": mix, "shape": shape, "split": split, **res})
                key = (tokens, mix)
                for v, us in res.items():
                    totals.setdefault(key, {}).setdefault(v, 0.0)
                    totals[key][v] += us
                print(f"T={tokens:3d} {mix:8s} {shape:8s} split {split}: "
                      + "  ".join(f"{v} {us:6.1f}" for v, us in res.items()) + f"  (rel diff {err:.1e})",
                      flush=True)
                del sets
                torch.cuda.empty_cache()
    for (tokens, mix), res in totals.items():
        print(f"layer T={tokens:3d} {mix:8s}: " + "  ".join(f"{v} {us:6.1f}" for v, us in res.items())
              + "  | x32 layers (ms): " + "  ".join(f"{v} {us * 32e-3:.2f}" for v, us in res.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
