"""Batched multi-adapter LoRA (punica-style gather-matmul): every adapter of a batch in one or two launches.

Weight layout (the "row pool", no padding to a maximum rank) and the per-step metadata are defined and
documented in hotlora.kernels._meta and re-exported here:

    LoraSlice(a [pool_rows, in], b [pool_rows, out] (= lora_B.weight.T rows), rank int32 [S])
    LoraMeta  = build_lora_meta(token_slots int32 [T], row_start int32 [S], scale float32 [S], max_rank)

Semantics of ``lora_apply(ys, x, slices, meta)`` (in place, fp32 accumulation, one rounding per element):

    for t in range(T):
        s = token_slots[t]
        if s < 0: continue                          # no adapter: ys untouched, no work
        for i in range(len(slices)):
            r = slices[i].rank[s]
            if r == 0: continue                     # slot s does not target this module
            rows = slice(row_start[s], row_start[s] + r)
            ys[i][t] = (ys[i][t].float()
                        + scale[s] * (x[t].float() @ slices[i].a[rows].float().T) @ slices[i].b[rows].float()
                        ).to(ys[i].dtype)

Dispatch: CUDA tensors go to the Triton kernels, up to three slices (e.g. q/k/v or gate/up) per launch:
decode-sized batches (tiles of <= 16 tokens) take one persistent launch that does the shrink then the
expand, larger batches a shrink launch and an expand launch (``KernelConfig.fused`` overrides). CPU tensors
go to the torch reference, unless HOTLORA_TRITON_CPU=1 (used with TRITON_INTERPRET=1 to run the Triton
kernels on the CPU). ``lora_apply_triton``, ``lora_shrink`` and ``lora_expand`` always take the Triton path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ._checks import check_all, check_slices, check_x, check_ys
from ._launch import KernelConfig, kernel_config, launch_expand, launch_fused, launch_shrink, pdl
from ._meta import LoraMeta, LoraSlice, build_lora_meta, refresh_lora_meta, refresh_lora_meta_triton
from .reference import lora_apply_ref

__all__ = [
    "KernelConfig",
    "LoraMeta",
    "LoraSlice",
    "build_lora_meta",
    "kernel_config",
    "lora_apply",
    "lora_apply_triton",
    "lora_expand",
    "lora_shrink",
    "refresh_lora_meta",
    "refresh_lora_meta_triton",
]


def lora_shrink(
    x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta, config: KernelConfig | None = None
) -> None:
    """Shrink of all slices in one Triton launch; writes meta.workspace in place (fp32).

    x: [T, in] fp16/bf16/fp32, unit column stride; slices[i].a: [pool_rows, in], x's dtype.
    For each slot s with tokens and each i with r = slices[i].rank[s] > 0, at the sorted positions
    p in slot_bounds[s] : slot_bounds[s + 1] (token t = sorted_tokens[p]):
        meta.workspace[:, i, p, :r].sum(0) == x[t].float() @ slices[i].a[row_start[s] : row_start[s] + r].float().T
    where workspace[j] holds the partial product over the j-th of meta.split_k ranges of in_features
    (other workspace entries are left as they were).
    """
    check_slices(slices, meta)
    check_x(x, slices, meta)
    launch_shrink(x, slices, meta, kernel_config(meta, override=config), False)


def lora_expand(
    ys: Sequence[torch.Tensor], slices: Sequence[LoraSlice], meta: LoraMeta, config: KernelConfig | None = None
) -> None:
    """Expand of all slices in one Triton launch, reading meta.workspace as written by ``lora_shrink``.

    ys[i]: [T, out_i] fp16/bf16/fp32 (one dtype for all), unit column stride (may be column slices of one
    fused output); slices[i].b: [pool_rows, out_i]. For every token t of slot s and i with r > 0 (p its
    sorted position):
        h = meta.workspace[:, i, p, :r].sum(0)                 # the splits summed in order, in fp32
        ys[i][t] = (ys[i][t].float() + scale[s] * h @ slices[i].b[rows].float()).to(ys[i].dtype)   # in place
    bf16/fp16 weights: h is rounded to the weight dtype for the tensor-core product (fp32 accumulate).
    """
    check_slices(slices, meta)
    check_ys(ys, slices, meta)
    launch_expand(ys, slices, meta, kernel_config(meta, [sl.b.shape[1] for sl in slices], config), False)


def lora_apply_triton(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    slices: Sequence[LoraSlice],
    meta: LoraMeta,
    config: KernelConfig | None = None,
) -> None:
    """``lora_apply`` through the Triton kernels: one fused or two launches, no allocation, no host sync.

    On Hopper the launches are programmatic dependent launches: the expand launch starts during the shrink
    launch, the fused launch during the preceding kernel (and waits for it before reading anything).
    """
    check_all(ys, x, slices, meta)
    cfg = kernel_config(meta, [sl.b.shape[1] for sl in slices], config)
    use_pdl = pdl(x)
    if cfg.fused:
        launch_fused(ys, x, slices, meta, cfg, use_pdl)
    else:
        launch_shrink(x, slices, meta, cfg, use_pdl)
        launch_expand(ys, slices, meta, cfg, use_pdl)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("HOTLORA_TRITON_CPU") == "1"


def lora_apply(ys: Sequence[torch.Tensor], x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    """Add every token's adapter delta into ys in place; semantics in the module docstring.

    x: [T, in]; ys[i]: [T, out_i]; slices: 1 to 3 target modules sharing x (q/k/v, gate/up, o, down).
    CUDA (or HOTLORA_TRITON_CPU=1): Triton; otherwise the grouped torch reference.
    """
    if _use_triton(x):
        lora_apply_triton(ys, x, slices, meta)
    else:
        check_all(ys, x, slices, meta)
        lora_apply_ref(ys, x, slices, meta)
