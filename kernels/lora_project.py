"""A projection's base output and its LoRA delta together (``lora_project``), and the base matmul's split-K sums
with the LoRA expand in one launch (``lora_finish``); re-exported by hotlora.kernels.lora, whose launchers it
calls through that module."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch

from . import _launch
from . import lora as _lora
from ._checks import check_slices, check_x, check_ys
from ._meta import LoraMeta, LoraSlice


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _overlap(x: torch.Tensor) -> bool:
    """Shrink beside the base matmul (CUDA; off with HOTLORA_LORA_OVERLAP=0)."""
    return x.is_cuda and os.environ.get("HOTLORA_LORA_OVERLAP", "1") != "0"


class _Finish:
    """The finish hook lora_project hands base() for kernels.nf4.nf4_matmul: the split-K sums and the expand in
    one launch when the output is exactly the slices' (after the join with the side stream, if any).

    parts: workspace parts holding the shrink (see _launch_expand); alone: no shrink runs beside the matmul (the
    shrink already ran in the producer, kernels.lora_fused), so nf4_matmul may pick its `alone` config."""

    def __init__(self, slices: Sequence[LoraSlice], meta: LoraMeta,
                 join: tuple[torch.cuda.Stream, torch.cuda.Stream] | None, parts: int = 1,
                 alone: bool = False) -> None:  # fmt: skip
        self.slices, self.meta, self.join, self.parts, self.alone = slices, meta, join, parts, alone
        self.joined = self.finished = False

    def takes(self, tokens: int, y: torch.Tensor) -> bool:
        """Whether it sums the splits of a step of `tokens` tokens writing y (else nf4_matmul sums them)."""
        return _fuse_finish(tokens, y, self.slices) or _fuse_tile_finish(tokens, y, self.slices)

    def __call__(self, part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> bool:
        if part.stride(2) != 1:
            return False
        if _fuse_finish(part.shape[1], y, self.slices):
            launch = _launch_finish
        elif _fuse_tile_finish(part.shape[1], y, self.slices):
            launch = _launch_tile_finish
        else:
            return False
        if self.join is not None:
            main, side = self.join
            main.wait_stream(side)  # the shrink's workspace is complete
            self.joined = True
        launch(part, bias, y, self.slices, self.meta, self.parts)
        self.finished = True
        return True


# Steps of up to this many tokens run their LoRA shrinks in the producers (kernels.lora_fused). On the H200
# (bench/engine_gpu.py, one adapter, decode tok/s, against the side stream in the same call, twelfth session):
# batch 1 261-262 against 256-257 (twice); with a limit of 4, batches 2 and 4 lost 4-5% (503 / 957 against
# 522 / 1,003).
# HOTLORA_LORA_PRODUCER=K lets steps of up to K tokens (at most the finish's limit) take it; 0 turns it off.
PRODUCER_MAX_TOKENS = 1


def shrink_in_producer(x: torch.Tensor, meta: LoraMeta | None) -> bool:
    """Whether a step's LoRA shrinks run inside the kernels that write their inputs (kernels.lora_fused, with
    ``lora_project(..., shrunk=True)``): Triton steps of up to PRODUCER_MAX_TOKENS tokens (HOTLORA_LORA_PRODUCER
    overrides it) that the finish also takes."""
    if meta is None or not _launch.use_triton(x):
        return False
    limit = _token_limit("HOTLORA_LORA_PRODUCER", PRODUCER_MAX_TOKENS)
    return 0 < meta.num_tokens <= min(limit, _finish_limit())


def lora_project(base: Callable[..., list[torch.Tensor]], x: torch.Tensor, slices: Sequence[LoraSlice],
                 meta: LoraMeta, shrunk: bool = False) -> list[torch.Tensor]:
    """ys = base(finish) (the projections' base outputs from x, as column views of one output when fused), then
    ``lora_apply(ys, x, slices, meta)``; returns ys.

    On CUDA, while a graph is captured, the shrink, which needs only x, runs on a side stream beside base()
    (both are memory-bound and neither fills the GPU at decode sizes) and the expand follows the join; the
    fork and join are graph edges. Eagerly (a graph's warm-up, or the eager fallback) the same kernels run
    one after another on the current stream: two event calls per projection would cost more host time than
    the overlap saves, and the warm-up must compile exactly the variants the capture launches. The expand
    is a dependent launch of base()'s last kernel: its prologue reads its tile, B rows and scale, and only
    after the wait the ys that base() wrote (+2.6% with 32 distinct adapters at batch 32, +1.8% with one, on the
    H200 against a plain launch: BENCHMARKS.md, fifteenth session). Measured on the H200 (BENCHMARKS.md, ninth
    session), the side stream beat two single-stream orders chained by programmatic dependent launch: the
    shrink before the matmul, the matmul launched early beside it (+3.5% with 32 distinct adapters, 5-7%
    slower with one), and the matmul first, the shrink launched early beside it (2-7% slower everywhere).

    `finish`: base() passes it to the NF4 matmul (kernels.nf4.nf4_matmul), which calls it in place of its
    split-K reduce; if the whole output is one with the slices, the join (if any) moves before it and
    ``lora_finish`` sums the splits and adds the delta in one launch, and no expand follows
    (HOTLORA_LORA_FINISH: see there); past its limit ``lora_tile_finish`` does, where HOTLORA_LORA_TILE_FINISH
    turns it on (TILE_FINISH_MAX_TOKENS says why it is off by default).

    shrunk: x was written by kernels.lora_fused, which left the shrink in meta.workspace as meta.split_k parts
    (``shrink_in_producer`` says when the layer does that): no shrink launch and no side stream, and the finish
    or the expand sums the parts.
    """
    if shrunk:
        return _project_shrunk(base, x, slices, meta)
    if not _overlap(x):
        ys = base(None)
        _lora.lora_apply(ys, x, slices, meta)
        return ys
    check_slices(slices, meta)
    check_x(x, slices, meta)
    cfg = _lora.kernel_config(meta, [sl.b.shape[1] for sl in slices])
    pdl = _launch.pdl(x)  # the shrink waits for its predecessor (kernels._launch), on either stream
    if not torch.cuda.is_current_stream_capturing():
        hook = _Finish(slices, meta, None)
        _lora._launch_shrink(x, slices, meta, cfg, pdl)
        ys = base(hook)
    else:
        main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
        hook = _Finish(slices, meta, (main, side))
        side.wait_stream(main)  # x and the workspace's previous readers are done
        with torch.cuda.stream(side):
            _lora._launch_shrink(x, slices, meta, cfg, pdl)
        ys = base(hook)
        if not hook.joined:
            main.wait_stream(side)  # nothing on main reuses x's memory or the workspace before the shrink is done
    check_ys(ys, slices, meta)
    if not hook.finished:
        _lora._launch_expand(ys, slices, meta, cfg, pdl, after_base=True)
    return ys


def _project_shrunk(base: Callable[..., list[torch.Tensor]], x: torch.Tensor, slices: Sequence[LoraSlice],
                    meta: LoraMeta) -> list[torch.Tensor]:
    check_slices(slices, meta)
    check_x(x, slices, meta)
    hook = _Finish(slices, meta, None, parts=meta.split_k, alone=True)
    ys = base(hook)
    check_ys(ys, slices, meta)
    if not hook.finished:
        cfg = _lora.kernel_config(meta, [sl.b.shape[1] for sl in slices])
        _lora._launch_expand(ys, slices, meta, cfg, _launch.pdl(x), parts=meta.split_k, after_base=True)
    return ys


# One program per token, B read once per token and no tensor cores. On the H200 (bench/engine_gpu.py, one
# adapter, decode tok/s, the finish up to 16 tokens against up to 1 in one call): batch 1 244 either way (244
# against 234 with the finish off, sixth session), batch 2 470 against 456, batch 4 911 against 900, batch 8
# 1,700 against 1,748, batch 16 3,001 against 3,318; batch 32 lost 11-17% (sixth session). Steps of up to 4
# tokens take it. HOTLORA_LORA_FINISH overrides it: 0 turns the finish off, K lets steps of up to K tokens take it.
FINISH_MAX_TOKENS = 4


def _token_limit(name: str, default: int) -> int:
    """The token count in environment variable `name` (0: off), or `default` when it is unset."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a token count (0: off), got {raw!r}") from None


def _finish_limit() -> int:
    return _token_limit("HOTLORA_LORA_FINISH", FINISH_MAX_TOKENS)


# Steps of more tokens than the finish takes, up to this many, may sum the base matmul's splits in the expand
# (lora_tile_finish): one launch fewer per projection. Off by default: on the H200 (bench/engine_gpu.py, decode
# tok/s, on against off in one call, twenty-ninth session) one adapter gains (batch 32 6,035-6,042 against 5,963,
# batch 16 3,697 against 3,593) but distinct adapters lose (batch 32 with 32: 4,833-4,835 against 5,161; batch 16
# with 16: 3,115 against 3,200): the split sums then wait for the shrink on the side stream, which with many
# adapters ends after the matmul, where the reduce ran beside it (bench/lora_finish.py times the kernels alone).
# HOTLORA_LORA_TILE_FINISH=K: steps of up to K tokens take it; 0: off.
TILE_FINISH_MAX_TOKENS = 0


def _fits(y: torch.Tensor, slices: Sequence[LoraSlice]) -> bool:
    """The matmul's output is exactly the slices' columns, unit-strided."""
    return y.shape[1] == sum(sl.b.shape[1] for sl in slices) and y.stride(1) == 1


def _fuse_finish(tokens: int, y: torch.Tensor, slices: Sequence[LoraSlice]) -> bool:
    return tokens <= _finish_limit() and _fits(y, slices)


def _fuse_tile_finish(tokens: int, y: torch.Tensor, slices: Sequence[LoraSlice]) -> bool:
    limit = _token_limit("HOTLORA_LORA_TILE_FINISH", TILE_FINISH_MAX_TOKENS)
    return tokens <= limit and _fits(y, slices)


def lora_finish(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, slices: Sequence[LoraSlice],
                meta: LoraMeta) -> None:
    """A base matmul's split-K sums and the LoRA expand in one Triton launch, reading meta.workspace as written
    by ``lora_shrink``. part: fp32 [split, T, N], N = sum(out_i) (slice i's columns follow slice i - 1's);
    bias [N] or None; y [T, N], unit column stride. For every token t (p its sorted position, s its slot):
        y[t] = part[:, t].sum(0) (+ bias)                        in fp32
        for each slice i with s >= 0 and r = rank_i[s] > 0 (cols: slice i's columns, rows: slot s's rows):
            y[t, cols] += scale[s] * meta.workspace[0, i, p, :r] @ slices[i].b[rows].float()
        y[t] rounded to y's dtype once
    """
    _check_finish(part, bias, y, slices, meta)
    _launch_finish(part, bias, y, slices, meta)


def lora_tile_finish(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, slices: Sequence[LoraSlice],
                     meta: LoraMeta) -> None:
    """``lora_finish``'s result (same arguments and semantics) from programs over the tiles of ``LoraMeta`` (each
    slot's tokens, up to block_m at a time) rather than over tokens: an adapter's B rows are read once per tile,
    as the expand reads them, so it serves steps of many tokens; tokens without an adapter get the plain sums."""
    _check_finish(part, bias, y, slices, meta)
    _launch_tile_finish(part, bias, y, slices, meta)


def _check_finish(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, slices: Sequence[LoraSlice],
                  meta: LoraMeta) -> None:
    check_slices(slices, meta)
    widths = [sl.b.shape[1] for sl in slices]
    if part.dim() != 3 or part.dtype != torch.float32 or part.shape[1:] != (meta.num_tokens, sum(widths)):
        raise ValueError(f"part must be fp32 [split, {meta.num_tokens}, {sum(widths)}], got "
                         f"{tuple(part.shape)} {part.dtype}")
    if y.shape != part.shape[1:] or y.stride(1) != 1 or (bias is not None and bias.shape != (y.shape[1],)):
        raise ValueError(f"y [{meta.num_tokens}, {sum(widths)}] with unit column stride and bias [N] expected")
    if part.stride(2) != 1:
        raise ValueError("part needs unit column stride")


def _launch_finish(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, slices: Sequence[LoraSlice],
                   meta: LoraMeta, parts: int = 1) -> None:
    from ._lora_triton import lora_finish_kernel

    widths = [sl.b.shape[1] for sl in slices]
    block_n = 128
    nb_end = _lora._column_blocks(widths, block_n)
    ws, b, ranks = meta.workspace, _lora._pad3([sl.b for sl in slices]), _lora._pad3([sl.rank for sl in slices])
    if y.shape[0]:
        lora_finish_kernel[(y.shape[0], nb_end[-1])](
            part, part.stride(0), part.stride(1), bias if bias is not None else y, y, y.stride(0),
            ws, ws.stride(0), ws.stride(1), ws.stride(2),
            *b, *(t.stride(0) for t in b),
            *ranks,
            *_lora._pad3(widths, 0), *_lora._pad3(nb_end, nb_end[-1])[:2],
            meta.token_slots, meta.token_pos, meta.row_start, meta.scale, meta.num_slots,
            HAS_BIAS=bias is not None, SPLIT_K=part.shape[0], BLOCK_N=block_n, BLOCK_R=meta.rank_class,
            PARTS=parts, **_launch.pdl_args(y),
        )  # fmt: skip


def _launch_tile_finish(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                        slices: Sequence[LoraSlice], meta: LoraMeta, parts: int = 1,
                        config: _lora.KernelConfig | None = None) -> None:  # fmt: skip
    """config: the expand's fields (block_n, warps, stages) override kernel_config's (bench/lora_finish.py)."""
    from triton import cdiv

    from ._lora_triton import lora_tile_finish_kernel

    widths = [sl.b.shape[1] for sl in slices]
    cfg = _lora.kernel_config(meta, widths, config)
    nb_end = _lora._column_blocks(widths, cfg.expand_block_n)
    ws, b, ranks = meta.workspace, _lora._pad3([sl.b for sl in slices]), _lora._pad3([sl.rank for sl in slices])
    tokens = y.shape[0]
    if tokens:
        lora_tile_finish_kernel[(meta.max_tiles + cdiv(tokens, meta.block_m), nb_end[-1])](
            part, part.stride(0), part.stride(1), bias if bias is not None else y, y, y.stride(0),
            ws, ws.stride(0), ws.stride(1), ws.stride(2),
            *b, *(t.stride(0) for t in b),
            *ranks,
            *_lora._pad3(widths, 0), *_lora._pad3(nb_end, nb_end[-1])[:2],
            meta.sorted_tokens, meta.tile_info, meta.slot_bounds, meta.scale, meta.num_slots, tokens, meta.max_tiles,
            HAS_BIAS=bias is not None, SPLIT_K=part.shape[0], BLOCK_M=meta.block_m, BLOCK_N=cfg.expand_block_n,
            BLOCK_R=meta.rank_class, IEEE=slices[0].b.dtype == torch.float32, PARTS=parts, **_launch.pdl_args(y),
            num_warps=cfg.expand_warps, num_stages=cfg.expand_stages,
        )  # fmt: skip
