"""Weighted adapter mixes (PEFT's add_weighted_adapter, combination_type="cat") on the device and offline.

A mix is served as ONE device slot of the components' summed rank, not as several slots per token.
The gather kernels (kernels/lora.py) give every token exactly one slot and add its delta into the
output in place; a token in several slots would need a multi-slot token map and a second pass (or
atomics) in the expand kernel. One slot needs no kernel change at all, because the "cat" mix is
itself a LoRA: per module m, with the components that target m in order,

    A_mix[m] = cat_i(A_i * w_i * scale_i)   (rows)        B_mix[m] = cat_i(B_i)   (columns)
    rank_mix[m] = sum_i r_i                                scale_mix = 1.0

which is what PEFT builds (the weight and scale folded into A, in that order, as PEFT does) and costs
the same FLOPs and bytes per token as running the components separately. The slot tables already hold
a rank per (module, slot), so a module targeted by only some components reads only their rows. The
price: the mix's rows are a second copy of its components' weights in the pools.

No host copy of a mix is ever built: `StagedMix` points at the components' host copies, and the
cache's copy thread writes each component into its rows of the mix's slot (cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hotlora.adapters.peft_format import TARGET_MODULES, AdapterConfig

if TYPE_CHECKING:
    from hotlora.adapters.staging import StagedAdapter

Weights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def module_ranks(configs: list[AdapterConfig]) -> dict[str, int]:
    """Rows of the mix per module: the summed rank of the components that target it."""
    return {m: sum(c.rank for c in configs if m in c.target_modules) for m in TARGET_MODULES}


@dataclass(slots=True)
class StagedMix:
    """What the slot cache copies for a mix: the components' host copies, each with its mix weight w_i.

    rank: rows the slot takes (the summed rank); ranks: rows per module (module_ranks)."""

    parts: list[tuple[StagedAdapter, float]]
    rank: int
    ranks: dict[str, int]
    scale: float = 1.0

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(m for m, r in self.ranks.items() if r > 0)


def staged_mix(hosts: list[StagedAdapter], weights: list[float]) -> StagedMix:
    parts = list(zip(hosts, weights, strict=True))
    configs = [h.config for h in hosts]
    return StagedMix(parts, sum(c.rank for c in configs), module_ranks(configs))


def fold(a: torch.Tensor, weight: float, scale: float) -> torch.Tensor:
    """A * weight * scale in float32, left to right as PEFT's cat computes it (PEFT holds fp32 adapter
    weights on an fp32 base): bit-identical rows there."""
    return a.float() * weight * scale


def cat_lora(parts: list[tuple[Weights, AdapterConfig, float]], key: tuple[int, str]
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mix's (A [R_m, in], B [out, R_m]) at (layer, module) in float32, None if no component has it.
    parts: (weights, config, mix weight) of each component, in mix order."""
    a_rows, b_cols = [], []
    for weights, config, w in parts:
        ab = weights.get(key)
        if ab is not None:
            a_rows.append(fold(ab[0], w, config.scale))
            b_cols.append(ab[1].float())
    if not a_rows:
        return None
    return torch.cat(a_rows, dim=0), torch.cat(b_cols, dim=1)
