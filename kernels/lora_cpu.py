"""The CPU serving path of ``lora_apply``: a few large fp32 matmuls per projection group, no gathers.

Same semantics as ``hotlora.kernels.reference.lora_apply_ref`` (see hotlora.kernels.lora). Small matmuls on
a CPU pay a fixed cost per op that dwarfs their arithmetic, so instead of two matmuls per (adapter, module)
over gathered tokens, every token runs against the contiguous span of pool rows that covers the batch's
adapters, and a per-token mask (holding the adapter's scale) zeroes the rows that are not its own:

    lo, hi = span of pool rows covering row_start[s] : row_start[s] + rank_i[s] for every slot s in the batch
    h      = x @ cat_i(a_i[lo:hi]).T                        # [T, n * (hi - lo)], one matmul per group
    h     *= mask                                           # mask[t, i, j] = scale[s_t] if row lo + j is s_t's
    h[mask == 0] = 0                                        # inf * 0 is NaN: another adapter's overflow stays its own
    ys[i] += h[:, i] @ b_i[lo:hi]                           # one addmm per slice, in place

Tokens without an adapter get an all-zero mask row, so their outputs gain exactly +0. The adapter cache checks
finiteness at load, but finite weights can still overflow in x @ A (an uploaded A of 3e38): the second line
keeps that overflow out of every other token's output. Rows inside the span that belong to adapters not in
the batch are read but masked, so the span costs at most the rows between the busy adapters. The masks are
built once per step and rank table (shared by every layer); the span's A rows (concatenated, transposed)
and B rows of a group are copied once and kept across steps while the span and the pools' contents
(tensor versions) are unchanged. fp32 only: other dtypes take the reference. Not thread-safe: one engine
thread per process calls it, as the engine loop does.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._checks import check_slices
from ._meta import LoraMeta, LoraSlice
from .reference import lora_apply_ref

__all__ = ["lora_apply_cpu"]


_Group = tuple[tuple[int, int], "torch.Tensor | None", "torch.Tensor | None"]  # (span, mask, off): see _group


@dataclass(slots=True)
class _StepPlan:
    """What one step's metadata implies for every layer: the busy slots, and per group kind the span and mask."""

    meta: LoraMeta  # held, so that the ids and versions below cannot be reused by another step's tensors
    versions: tuple[int, int, int]  # of token_slots, row_start, scale
    slots: torch.Tensor  # int64 [T], -1 = no adapter
    busy: list[int]  # slots with at least one token
    row_start: list[int]
    scale: torch.Tensor  # float32 [T]: each token's scale, 0 without adapter
    start: torch.Tensor  # int64 [T]: each token's row_start (0 without adapter)
    groups: dict[tuple[int, ...], _Group] = field(default_factory=dict)


@dataclass(slots=True)
class _LayerRows:
    """One layer's group, kept across steps: the span's A rows transposed side by side, and its B rows.

    Copies (not views), so that no pool of a dropped engine is kept alive; valid while the same pool and rank
    tensors (weak references) keep their versions and the span does not move.
    """

    refs: tuple[weakref.ref, ...]  # a, b and rank of every slice
    versions: tuple[int, ...]  # the meta's slot count, then every a and b pool's tensor version
    span: tuple[int, int] = (0, 0)
    a_cols: torch.Tensor | None = None  # [in, n * (hi - lo)] contiguous
    b_rows: tuple[torch.Tensor, ...] = ()  # b_i[lo:hi], contiguous


_plan: _StepPlan | None = None
_layers: dict[int, _LayerRows] = {}  # by id of the group's first a pool


def _versions(meta: LoraMeta) -> tuple[int, int, int]:
    return meta.token_slots._version, meta.row_start._version, meta.scale._version


def _step_plan(meta: LoraMeta) -> _StepPlan:
    """The plan of this step, rebuilt when the metadata or its slot tables change (tensor versions)."""
    global _plan
    plan = _plan
    if plan is not None and plan.meta is meta and plan.versions == _versions(meta):
        return plan
    slots = meta.token_slots.long()
    slots = torch.where((slots >= 0) & (slots < meta.num_slots), slots, -1)
    has = slots >= 0
    safe = slots.clamp(min=0)
    _plan = _StepPlan(
        meta=meta,
        versions=_versions(meta),
        slots=slots,
        busy=sorted(set(slots[has].tolist())),
        row_start=meta.row_start.tolist(),
        scale=torch.where(has, meta.scale[safe], 0.0),
        start=meta.row_start.long()[safe],
    )
    return _plan


def _group(plan: _StepPlan, ranks: Sequence[torch.Tensor]) -> _Group:
    """(span, mask, off) of a group kind in this step, computed once and shared by every layer.

    span: pool rows lo:hi covering every busy slot's rows in every slice ((0, 0): nothing to do);
    mask: float32 [T, n * (hi - lo)], scale[s_t] where row lo + j is token t's slot's in slice i, else 0;
    off: mask == 0.
    """
    key = tuple(id(r) for r in ranks)
    hit = plan.groups.get(key)
    if hit is not None:
        return hit
    lo, hi = None, 0
    for rank in ranks:
        rk = rank.tolist()
        for s in plan.busy:
            if rk[s] > 0:
                lo = plan.row_start[s] if lo is None else min(lo, plan.row_start[s])
                hi = max(hi, plan.row_start[s] + rk[s])
    if lo is None:
        plan.groups[key] = ((0, 0), None, None)
        return plan.groups[key]
    rows = torch.arange(lo, hi, dtype=torch.int64)
    parts = []
    for rank in ranks:
        end = plan.start + rank.long()[plan.slots.clamp(min=0)]
        inside = (rows >= plan.start[:, None]) & (rows < end[:, None])
        parts.append(torch.where(inside, plan.scale[:, None], 0.0))
    mask = torch.cat(parts, dim=1)
    plan.groups[key] = ((lo, hi), mask, mask == 0)
    return plan.groups[key]


def _tensors(slices: Sequence[LoraSlice]) -> list[torch.Tensor]:
    return [t for sl in slices for t in (sl.a, sl.b, sl.rank)]


def _layer_rows(slices: Sequence[LoraSlice], meta: LoraMeta) -> _LayerRows:
    """This layer's entry; new (and the slices checked) when a pool or rank table is new or was written."""
    versions = (meta.num_slots, *(t._version for sl in slices for t in (sl.a, sl.b)))
    entry = _layers.get(id(slices[0].a))
    tensors = _tensors(slices)
    if (
        entry is None
        or entry.versions != versions
        or len(entry.refs) != len(tensors)
        or any(ref() is not t for ref, t in zip(entry.refs, tensors, strict=True))
    ):
        check_slices(slices, meta)  # the slices change only here, so the other calls skip the checks
        if len(_layers) > 1024:  # entries of dropped pools (other engines): start over
            _layers.clear()
        entry = _layers[id(slices[0].a)] = _LayerRows(tuple(weakref.ref(t) for t in tensors), versions)
    return entry


def _span_rows(entry: _LayerRows, slices: Sequence[LoraSlice], span: tuple[int, int]) -> _LayerRows:
    if entry.span != span or entry.a_cols is None:
        lo, hi = span
        entry.a_cols = torch.cat([sl.a[lo:hi] for sl in slices]).T.contiguous()  # NN: the fastest small GEMM
        entry.b_rows = tuple(sl.b[lo:hi].clone() for sl in slices)
        entry.span = span
    return entry


def lora_apply_cpu(ys: Sequence[torch.Tensor], x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    """``lora_apply`` for CPU tensors (semantics in hotlora.kernels.lora); fp32 runs the masked-span path,
    other dtypes the grouped reference. x and ys are assumed checked (``check_x``, ``check_ys``); the slices
    are checked here, once per layer and change of its pools or rank tables, not on every call."""
    if x.dtype != torch.float32 or ys[0].dtype != torch.float32 or slices[0].a.dtype != torch.float32:
        check_slices(slices, meta)
        lora_apply_ref(ys, x, slices, meta)
        return
    entry = _layer_rows(slices, meta)
    plan = _step_plan(meta)
    span, mask, off = _group(plan, [sl.rank for sl in slices])
    if mask is None:
        return
    rows = _span_rows(entry, slices, span)
    h = torch.mm(x, rows.a_cols).mul_(mask).masked_fill_(off, 0.0)
    if len(ys) == 1:
        ys[0].addmm_(h, rows.b_rows[0])
        return
    for y, hs, b in zip(ys, h.split(span[1] - span[0], dim=1), rows.b_rows, strict=True):
        y.addmm_(hs, b)
