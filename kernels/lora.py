"""Batched multi-adapter LoRA (punica-style gather-matmul): every adapter of a batch in two launches.

Weight layout (the "row pool", no padding to a maximum rank) and the per-step metadata are defined and
documented in hotlora.kernels._meta and re-exported here:

    LoraSlice(a [pool_rows, in], b [pool_rows, out] (= lora_B.weight.T rows), rank int32 [S])
    LoraMeta  = build_lora_meta(token_slots int32 [T], row_start int32 [S], scale float32 [S], max_rank,
                                rank_class=rank_class_of(largest rank of the step's adapters))

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

Dispatch: CUDA tensors go to the Triton kernels (one shrink launch and one expand launch for up to three
slices, e.g. q/k/v or gate/up); CPU tensors go to ``lora_apply_cpu`` (kernels/lora_cpu.py, tested against
the torch reference), unless HOTLORA_TRITON_CPU=1 (used with TRITON_INTERPRET=1 to run the Triton kernels
on the CPU). ``lora_apply_triton``, ``lora_shrink`` and
``lora_expand`` always take the Triton path. ``lora_project`` computes a projection's base output and its
LoRA delta together, with the shrink beside the base matmul while a CUDA graph is captured, and, for a
step whose base matmul splits K, its split-K sums and the expand in one launch (``lora_finish`` per token for a
few tokens, ``lora_tile_finish`` per adapter tile beyond).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from . import _launch
from ._checks import check_all, check_slices, check_x, check_ys
from ._meta import (
    RANK_CLASSES,
    LoraMeta,
    LoraSlice,
    build_lora_meta,
    rank_class_of,
    rank_classes,
    refresh_lora_meta,
    refresh_lora_meta_triton,
)
from .lora_cpu import lora_apply_cpu

__all__ = [
    "RANK_CLASSES",
    "KernelConfig",
    "LoraMeta",
    "LoraSlice",
    "build_lora_meta",
    "kernel_config",
    "lora_apply",
    "lora_apply_triton",
    "lora_expand",
    "lora_finish",
    "lora_project",
    "lora_shrink",
    "lora_tile_finish",
    "rank_class_of",
    "rank_classes",
    "refresh_lora_meta",
    "refresh_lora_meta_triton",
    "shrink_in_producer",
]


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Launch parameters of the two kernels; ``None`` fields take the defaults of ``kernel_config``.

    shrink_block_k: in_features per K step; expand_block_n: output columns per program;
    *_block_r: rank rows per step of each kernel's loop over a slot's own rank (ranks up to it take one step).
    """

    shrink_block_k: int | None = None
    shrink_warps: int | None = None
    shrink_stages: int | None = None
    expand_block_n: int | None = None
    expand_block_r: int | None = None
    expand_warps: int | None = None
    expand_stages: int | None = None


def _block_r(meta: LoraMeta) -> int:
    """The step's rank class (16, 32 or 64): one rank step covers the batch's ranks (x and B rows loaded once);
    larger ranks loop in steps of it. Sized by the batch, not the pool: r=16 tiles are 16 rows, not 64."""
    return meta.rank_class


def kernel_config(meta: LoraMeta, widths: Sequence[int] = (), override: KernelConfig | None = None) -> KernelConfig:
    """Defaults by tile height, rank and output width (tuned on the H100 with bench/lora_kernels.py --sweep),
    then the override's fields."""
    small = meta.block_m <= 16
    block_r = _block_r(meta)
    wide = max(widths, default=0) >= 8192 or block_r > 16 or not small
    base = KernelConfig(
        shrink_block_k=128,
        shrink_warps=2 if small else 8,
        shrink_stages=3 if small else 4,
        expand_block_n=128 if wide else 256,
        expand_block_r=block_r,
        expand_warps=4,
        expand_stages=2,
    )
    if override is None:
        return base
    return replace(
        base, **{f: getattr(override, f) for f in KernelConfig.__slots__ if getattr(override, f) is not None}
    )


def _pad3(items: Sequence, fill=None) -> list:
    items = list(items)
    return items + [items[0] if fill is None else fill] * (3 - len(items))


def lora_shrink(
    x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta, config: KernelConfig | None = None
) -> None:
    """Shrink of all slices in one Triton launch; writes meta.workspace in place (fp32).

    x: [T, in] fp16/bf16/fp32, unit column stride; slices[i].a: [pool_rows, in], x's dtype.
    For each slot s with tokens and each i with r = slices[i].rank[s] > 0, at the sorted positions
    p in slot_bounds[s] : slot_bounds[s + 1] (token t = sorted_tokens[p]):
        meta.workspace[0, i, p, :r] == x[t].float() @ slices[i].a[row_start[s] : row_start[s] + r].float().T
    (computed as meta.split_k partial sums over in_features in workspace[:, i, p, :r], added up into
    workspace[0] by the last split to finish; other workspace entries are left as they were).
    """
    check_slices(slices, meta)
    check_x(x, slices, meta)
    _launch_shrink(x, slices, meta, kernel_config(meta, override=config))


def _launch_shrink(
    x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta, cfg: KernelConfig, pdl: bool = False
) -> None:
    from triton import cdiv

    from ._lora_triton import lora_shrink_kernel

    in_features = x.shape[1]
    k_per_split = cdiv(cdiv(in_features, meta.split_k), cfg.shrink_block_k) * cfg.shrink_block_k
    block_r = _block_r(meta)
    ws = meta.workspace
    a = _pad3([sl.a for sl in slices])
    ranks = _pad3([sl.rank for sl in slices])
    grid = (meta.max_tiles, meta.split_k, len(slices))
    lora_shrink_kernel[grid](
        x, x.stride(0),
        *a, *(t.stride(0) for t in a),
        *ranks,
        ws, ws.stride(0), ws.stride(1), ws.stride(2),
        meta.split_count, meta.sorted_tokens, meta.tile_info,
        in_features, k_per_split,
        SPLIT_K=meta.split_k, BLOCK_M=meta.block_m, BLOCK_R=block_r, BLOCK_K=cfg.shrink_block_k,
        IEEE=x.dtype == torch.float32, **_launch.pdl_kwargs(pdl),
        num_warps=cfg.shrink_warps, num_stages=cfg.shrink_stages,
    )  # fmt: skip


def lora_expand(
    ys: Sequence[torch.Tensor], slices: Sequence[LoraSlice], meta: LoraMeta, config: KernelConfig | None = None
) -> None:
    """Expand of all slices in one Triton launch, reading meta.workspace as written by ``lora_shrink``.

    ys[i]: [T, out_i] fp16/bf16/fp32 (one dtype for all), unit column stride (may be column slices of one
    fused output); slices[i].b: [pool_rows, out_i]. For every token t of slot s and i with r > 0 (p its
    sorted position):
        h = meta.workspace[0, i, p, :r]
        ys[i][t] = (ys[i][t].float() + scale[s] * h @ slices[i].b[rows].float()).to(ys[i].dtype)   # in place
    bf16/fp16 weights: h is rounded to the weight dtype for the tensor-core product (fp32 accumulate).
    """
    check_slices(slices, meta)
    check_ys(ys, slices, meta)
    _launch_expand(ys, slices, meta, kernel_config(meta, [sl.b.shape[1] for sl in slices], config))


def _column_blocks(widths: Sequence[int], block_n: int) -> list[int]:
    """Where each slice's column blocks end when all slices' blocks are numbered one after another (the expand
    and finish kernels' grid axis 1)."""
    ends, total = [], 0
    for n in widths:
        total += -(-n // block_n)
        ends.append(total)
    return ends


def _launch_expand(
    ys: Sequence[torch.Tensor], slices: Sequence[LoraSlice], meta: LoraMeta, cfg: KernelConfig, pdl: bool = False,
    parts: int = 1, after_base: bool = False,
) -> None:
    """parts: how many workspace parts hold the shrink (1: ``lora_shrink``'s; meta.split_k: kernels.lora_fused's).
    pdl: launched as a dependent of the kernel before it: the shrink, or (after_base) the base output's writer."""
    from ._lora_triton import lora_expand_kernel

    widths = [sl.b.shape[1] for sl in slices]
    block_n = cfg.expand_block_n
    nb_end = _column_blocks(widths, block_n)
    ws = meta.workspace
    b = _pad3([sl.b for sl in slices])
    yp = _pad3(ys)
    ranks = _pad3([sl.rank for sl in slices])
    grid = (meta.max_tiles, nb_end[-1])
    lora_expand_kernel[grid](
        ws, ws.stride(0), ws.stride(1), ws.stride(2),
        *b, *(t.stride(0) for t in b),
        *yp, *(t.stride(0) for t in yp),
        *ranks,
        *_pad3(widths, 0), *_pad3(nb_end, nb_end[-1])[:2],
        meta.sorted_tokens, meta.tile_info, meta.scale,
        BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_R=cfg.expand_block_r, PARTS=parts, WAIT_Y=after_base,
        IEEE=slices[0].b.dtype == torch.float32, **_launch.pdl_kwargs(pdl),
        num_warps=cfg.expand_warps, num_stages=cfg.expand_stages,
    )  # fmt: skip


def lora_apply_triton(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    slices: Sequence[LoraSlice],
    meta: LoraMeta,
    config: KernelConfig | None = None,
) -> None:
    """``lora_apply`` through the Triton kernels: two launches, no allocation, no host sync."""
    check_all(ys, x, slices, meta)
    cfg = kernel_config(meta, [sl.b.shape[1] for sl in slices], config)
    pdl = _launch.pdl(x)  # the expand starts during the shrink, which immediately precedes it
    _launch_shrink(x, slices, meta, cfg, pdl)
    _launch_expand(ys, slices, meta, cfg, pdl)


def lora_apply(ys: Sequence[torch.Tensor], x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    """Add every token's adapter delta into ys in place; semantics in the module docstring.

    x: [T, in]; ys[i]: [T, out_i]; slices: 1 to 3 target modules sharing x (q/k/v, gate/up, o, down).
    CUDA (or HOTLORA_TRITON_CPU=1): Triton; otherwise ``lora_apply_cpu`` (masked-span fp32 matmuls; its
    reference is ``hotlora.kernels.reference.lora_apply_ref``).
    """
    if _launch.use_triton(x):
        lora_apply_triton(ys, x, slices, meta)
    else:
        check_x(x, slices, meta)
        check_ys(ys, slices, meta)
        lora_apply_cpu(ys, x, slices, meta)  # checks the slices whenever it (re)reads a layer's pools


from .lora_project import lora_finish, lora_project, lora_tile_finish, shrink_in_producer  # noqa: E402 (uses this module)
