"""Argument checks of the LoRA wrappers (shapes, dtypes, strides, devices), raised before any launch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._meta import LoraMeta, LoraSlice

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def check_rows(t: torch.Tensor, name: str) -> None:
    """t is 2-D with unit column stride (rows of a matrix), else a ValueError naming it."""
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"{name} must be 2-D with unit column stride, got shape {tuple(t.shape)} strides {t.stride()}")


def check_slices(slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    """1 to 3 slices on the meta's device, one float dtype, pools [pool_rows, in] / [pool_rows, out]."""
    if not 1 <= len(slices) <= min(3, meta.max_slices):
        raise ValueError(f"1 to {min(3, meta.max_slices)} slices per launch, got {len(slices)}")
    dtype, in_features, device = slices[0].a.dtype, slices[0].a.shape[-1], meta.token_slots.device
    if dtype not in FLOATS:
        raise TypeError(f"LoRA weights must be fp16, bf16 or fp32, got {dtype}")
    for i, sl in enumerate(slices):
        check_rows(sl.a, f"slices[{i}].a")
        check_rows(sl.b, f"slices[{i}].b")
        if sl.a.dtype != dtype or sl.b.dtype != dtype:
            raise TypeError(f"slices[{i}] a/b must be {dtype}, got {sl.a.dtype}/{sl.b.dtype}")
        if sl.a.shape[1] != in_features or sl.a.shape[0] != sl.b.shape[0]:
            raise ValueError(f"slices[{i}]: pools a {tuple(sl.a.shape)} and b {tuple(sl.b.shape)} do not fit")
        if sl.rank.dtype != torch.int32 or sl.rank.shape != (meta.num_slots,):
            raise ValueError(f"slices[{i}].rank must be int32 [{meta.num_slots}]")
        if not (sl.a.device == sl.b.device == sl.rank.device == device):
            raise ValueError(f"slices[{i}] must be on the meta's device {device}")


def check_x(x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    check_rows(x, "x")
    if x.dtype != slices[0].a.dtype:
        raise TypeError(f"x must have the weights' dtype {slices[0].a.dtype}, got {x.dtype}")
    if x.shape != (meta.num_tokens, slices[0].a.shape[1]) or x.device != meta.token_slots.device:
        raise ValueError(f"x must be [{meta.num_tokens}, {slices[0].a.shape[1]}] on the meta's device")


def check_ys(ys: Sequence[torch.Tensor], slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    if len(ys) != len(slices):
        raise ValueError(f"{len(ys)} outputs for {len(slices)} slices")
    for i, (y, sl) in enumerate(zip(ys, slices, strict=True)):
        check_rows(y, f"ys[{i}]")
        if y.dtype not in FLOATS or y.dtype != ys[0].dtype:
            raise TypeError(f"ys must share one float dtype (fp16, bf16, fp32), ys[{i}] is {y.dtype}")
        if y.shape != (meta.num_tokens, sl.b.shape[1]) or y.device != meta.token_slots.device:
            raise ValueError(f"ys[{i}] must be [{meta.num_tokens}, {sl.b.shape[1]}], got {tuple(y.shape)}")


def check_all(ys: Sequence[torch.Tensor], x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    check_slices(slices, meta)
    check_x(x, slices, meta)
    check_ys(ys, slices, meta)
