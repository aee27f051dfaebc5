"""Launch parameters and launches of the LoRA Triton kernels (kernels in _lora_triton.py, API in lora.py)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ._meta import LoraMeta, LoraSlice


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Launch parameters; ``None`` fields take the defaults of ``kernel_config``.

    fused: one persistent launch (shrink items, then expand items that wait for their tile's shrink) instead
    of a shrink launch and an expand launch; programs: its grid size (one program per SM at most, else the
    wait could deadlock); fused_warps: its warps; shrink_block_k: in_features per K step; expand_block_n:
    output columns per expand item; *_block_r: rank rows per step of each loop over a slot's own rank
    (ranks up to it take one step).
    """

    fused: bool | None = None
    programs: int | None = None
    fused_warps: int | None = None
    shrink_block_k: int | None = None
    shrink_warps: int | None = None
    shrink_stages: int | None = None
    expand_block_n: int | None = None
    expand_block_r: int | None = None
    expand_warps: int | None = None
    expand_stages: int | None = None


def block_r(meta: LoraMeta) -> int:
    """One rank step covers ranks up to 64 (x and B rows loaded once); larger ranks loop in steps of 64."""
    return min(max(16, 1 << (meta.max_rank - 1).bit_length()), 64)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def kernel_config(meta: LoraMeta, widths: Sequence[int] = (), override: KernelConfig | None = None) -> KernelConfig:
    """Defaults by tile height, rank and output width (tuned on the H100 with bench/lora_kernels.py --sweep),
    then the override's fields. Decode-sized batches (tiles of <= 16 tokens) take the fused launch."""
    small = meta.block_m <= 16
    br = block_r(meta)
    wide = max(widths, default=0) >= 8192 or br > 16 or not small
    device = meta.token_slots.device
    base = KernelConfig(
        fused=small,
        programs=_sm_count(device.index or 0) if device.type == "cuda" else 1,
        fused_warps=4,
        shrink_block_k=128,
        shrink_warps=2 if small else 8,
        shrink_stages=3 if small else 4,
        expand_block_n=128 if wide else 256,
        expand_block_r=br,
        expand_warps=4,
        expand_stages=2,
    )
    if override is not None:
        base = replace(
            base, **{f: getattr(override, f) for f in KernelConfig.__slots__ if getattr(override, f) is not None}
        )
    if interpreted():  # the interpreter runs programs one after another: a waiting program would spin forever
        base = replace(base, programs=1)
    return base


def pdl(t: torch.Tensor) -> bool:
    """Programmatic dependent launch: compiled CUDA on Hopper or newer, unless HOTLORA_NO_PDL=1."""
    if not t.is_cuda or interpreted() or os.environ.get("HOTLORA_NO_PDL") == "1":
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def _pad3(items: Sequence, fill=None) -> list:
    items = list(items)
    return items + [items[0] if fill is None else fill] * (3 - len(items))


def _k_per_split(in_features: int, meta: LoraMeta, cfg: KernelConfig) -> int:
    bk, per_split = cfg.shrink_block_k, -(-in_features // meta.split_k)
    return -(-per_split // bk) * bk


def _column_blocks(widths: Sequence[int], block_n: int) -> list[int]:
    """End of each slice's run of column blocks (slice i owns [ends[i - 1], ends[i]))."""
    return [sum(-(-n // block_n) for n in widths[: i + 1]) for i in range(len(widths))]


def _ws_args(meta: LoraMeta) -> tuple:
    ws = meta.workspace
    return ws, ws.stride(0), ws.stride(1), ws.stride(2)


def launch_shrink(x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta, cfg: KernelConfig, pdl: bool) -> None:
    from ._lora_triton import lora_shrink_kernel

    a, ranks = _pad3([sl.a for sl in slices]), _pad3([sl.rank for sl in slices])
    lora_shrink_kernel[(meta.max_tiles, meta.split_k, len(slices))](
        x, x.stride(0),
        *a, *(t.stride(0) for t in a),
        *ranks,
        *_ws_args(meta),
        meta.sorted_tokens, meta.tile_info,
        x.shape[1], _k_per_split(x.shape[1], meta, cfg),
        BLOCK_M=meta.block_m, BLOCK_R=block_r(meta), BLOCK_K=cfg.shrink_block_k,
        IEEE=x.dtype == torch.float32, PDL=pdl,
        num_warps=cfg.shrink_warps, num_stages=cfg.shrink_stages,
    )  # fmt: skip


def launch_expand(
    ys: Sequence[torch.Tensor], slices: Sequence[LoraSlice], meta: LoraMeta, cfg: KernelConfig, pdl: bool
) -> None:
    from ._lora_triton import lora_expand_kernel

    widths = [sl.b.shape[1] for sl in slices]
    nb_end = _column_blocks(widths, cfg.expand_block_n)
    b, yp, ranks = _pad3([sl.b for sl in slices]), _pad3(ys), _pad3([sl.rank for sl in slices])
    lora_expand_kernel[(meta.max_tiles, nb_end[-1])](
        *_ws_args(meta),
        *b, *(t.stride(0) for t in b),
        *yp, *(t.stride(0) for t in yp),
        *ranks,
        *_pad3(widths, 0), *_pad3(nb_end, nb_end[-1])[:2],
        meta.sorted_tokens, meta.tile_info, meta.scale,
        SPLIT_K=meta.split_k, BLOCK_M=meta.block_m, BLOCK_N=cfg.expand_block_n, BLOCK_R=cfg.expand_block_r,
        IEEE=slices[0].b.dtype == torch.float32, PDL=pdl,
        num_warps=cfg.expand_warps, num_stages=cfg.expand_stages, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip


def launch_fused(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    slices: Sequence[LoraSlice],
    meta: LoraMeta,
    cfg: KernelConfig,
    pdl: bool,
) -> None:
    """Shrink and expand in one persistent launch of min(programs, work items) programs."""
    from ._lora_triton import lora_fused_kernel

    widths = [sl.b.shape[1] for sl in slices]
    nb_end = _column_blocks(widths, cfg.expand_block_n)
    a, b, yp = _pad3([sl.a for sl in slices]), _pad3([sl.b for sl in slices]), _pad3(ys)
    items = meta.max_tiles * max(meta.split_k * len(slices), nb_end[-1])
    lora_fused_kernel[(max(1, min(cfg.programs, items)),)](
        x, x.stride(0),
        *a, *(t.stride(0) for t in a),
        *b, *(t.stride(0) for t in b),
        *yp, *(t.stride(0) for t in yp),
        *_pad3([sl.rank for sl in slices]),
        *_pad3(widths, 0), *_pad3(nb_end, nb_end[-1])[:2], nb_end[-1],
        *_ws_args(meta),
        meta.flags, meta.sorted_tokens, meta.tile_info, meta.scale,
        x.shape[1], _k_per_split(x.shape[1], meta, cfg), meta.max_tiles,
        NUM_SLICES=len(slices), SPLIT_K=meta.split_k, BLOCK_M=meta.block_m, BLOCK_R=block_r(meta),
        BLOCK_K=cfg.shrink_block_k, BLOCK_N=cfg.expand_block_n,
        IEEE=x.dtype == torch.float32, PDL=pdl,
        num_warps=cfg.fused_warps, num_stages=cfg.shrink_stages, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
