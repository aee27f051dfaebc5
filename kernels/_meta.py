"""LoRA slot tables and the per-step batch metadata shared by the reference and the Triton kernels.

Adapter weight layout ("row pool", no padding to a maximum rank)
-----------------------------------------------------------------
For one target module (say ``q_proj``) of one layer, every resident adapter's ``lora_A`` and ``lora_B``
live in two pools that share one row numbering:

    a: [pool_rows, in_features]   row row_start[s] + j  =  PEFT lora_A.weight[j, :]      (j < rank[s])
    b: [pool_rows, out_features]  row row_start[s] + j  =  PEFT lora_B.weight[:, j]      (B transposed)

Device slot ``s`` owns exactly ``rank[s]`` consecutive rows starting at ``row_start[s]``; ranks may differ per
slot and be any positive integer (8, 12, 16, 64, ...); ``rank[s] == 0`` means slot ``s`` does not target
this module. ``row_start`` and ``scale`` are per slot and shared by every module and layer (they live in
``LoraMeta``); ``rank`` is per module kind (the same tensor object for ``q_proj`` of all layers).
Both pools must be row-major with unit column stride. The adapter cache (hotlora.adapters.cache) fills and
evicts rows; the kernels only read them.

Rank classes
------------
The kernels walk a slot's rank in steps of ``BLOCK_R`` rank rows: one step for ranks up to it, more for larger
ranks. ``BLOCK_R`` is the step's *rank class* (``LoraMeta.rank_class``): the largest rank among the step's
adapters rounded up to a power of two, 16 at least (the smallest ``tl.dot`` width) and 64 at most (larger ranks
loop). Sizing the tiles by the pool's maximum rank instead would make every r=16 tile 64 rows tall: 4x the MMA
work and masked loads. Any class is correct for any rank (the loop covers it); a class below the batch's largest
rank only costs more steps, one above it only wasted tile rows. The workspace stays sized by ``max_rank``, so one
buffer serves every class.

Per-step metadata
-----------------
``build_lora_meta`` runs once per engine step, on the device, without host synchronisation. It sorts the
token indices by slot (tokens without adapter last, where no tile ever reaches them), cuts every slot's run
of tokens into tiles of ``block_m`` tokens (a tile never mixes slots, so each adapter's rows are read once
per tile), and allocates the fp32 shrink workspace, so that ``lora_apply`` allocates nothing and launches
a grid whose size depends only on ``T`` and the slot count (CUDA-graph safe; idle programs exit at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LoraSlice:
    """One target module (e.g. q_proj) of one layer: the A/B row pools and the per-slot rank.

    a:    [pool_rows, in_features]   rows of PEFT lora_A.weight; slot s uses rows row_start[s] : row_start[s] + rank[s]
    b:    [pool_rows, out_features]  rows of PEFT lora_B.weight transposed (B.T), same rows as ``a``
    rank: int32 [num_slots]          rank of slot s for this module; 0 = slot s does not target it
    """

    a: torch.Tensor
    b: torch.Tensor
    rank: torch.Tensor


@dataclass(slots=True)
class LoraMeta:
    """Per-step LoRA batch metadata, built once by ``build_lora_meta`` and shared by every layer and module.

    token_slots:  int32 [T]            slot of each token, -1 = no adapter
    row_start:    int32 [S]            first pool row of slot s (see the module docstring)
    scale:        float32 [S]          lora_alpha / r (or lora_alpha / sqrt(r) for rslora)
    max_rank:     int                  largest rank any slot may have (sizes the workspace)
    rank_class:   int                  BLOCK_R of the kernels, 16, 32 or 64 (see "Rank classes" above)
    block_m:      int                  tokens per tile
    split_k:      int                  shrink splits over in_features (the last split to finish sums them)
    max_slices:   int                  most slices one lora_apply call may fuse (q, k, v = 3)
    sorted_tokens: int32 [T]           token indices sorted by slot, no-adapter tokens last
    token_pos:    int32 [T]            sorted position of each token (sorted_tokens[token_pos[t]] == t)
    slot_bounds:  int32 [S + 1]        slot s owns sorted positions slot_bounds[s] : slot_bounds[s + 1]
    tile_info:    int32 [max_tiles, 4] per tile: slot (-1 = idle tile, its programs exit at once), first and
                                       end sorted position (end <= start + block_m), row_start[slot]
    workspace:    float32 [split_k, max_slices, T, max_rank]  shrink output, row = sorted position
    split_count:  int32 [max_tiles * 3]  shrink split-K arrival counters, zero between launches
    """

    token_slots: torch.Tensor
    row_start: torch.Tensor
    scale: torch.Tensor
    max_rank: int
    rank_class: int
    block_m: int
    split_k: int
    max_slices: int
    sorted_tokens: torch.Tensor
    token_pos: torch.Tensor
    slot_bounds: torch.Tensor
    tile_info: torch.Tensor
    workspace: torch.Tensor
    split_count: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def num_slots(self) -> int:
        return self.row_start.shape[0]

    @property
    def max_tiles(self) -> int:
        return self.tile_info.shape[0]

    @property
    def tile_slot(self) -> torch.Tensor:
        return self.tile_info[:, 0]

    @property
    def tile_start(self) -> torch.Tensor:
        return self.tile_info[:, 1]

    @property
    def tile_end(self) -> torch.Tensor:
        return self.tile_info[:, 2]


RANK_CLASSES = (16, 32, 64)


def rank_class_of(rank: int) -> int:
    """The rank class of a batch whose largest rank is ``rank``: the next power of two, clamped to 16..64."""
    return min(max(RANK_CLASSES[0], 1 << max(rank - 1, 0).bit_length()), RANK_CLASSES[-1])


def rank_classes(max_rank: int) -> tuple[int, ...]:
    """Every class a pool of adapters up to ``max_rank`` can need, ascending: (16,) for 16, (16, 32, 64) for 64+."""
    return tuple(c for c in RANK_CLASSES if c <= rank_class_of(max_rank))


def _default_block_m(num_tokens: int) -> int:
    return 16 if num_tokens < 512 else 64


def _default_split_k(device: torch.device, max_tiles: int, block_m: int) -> int:
    """Shrink splits over in_features: enough programs to cover the GPU when there are few tiles; 1 on CPU.

    Tuned on the H100 (bench/lora_kernels.py --sweep): decode-sized tiles want ~2 programs per SM,
    prefill-sized tiles (block_m 64) already carry enough work per program.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    target, cap = (2 * sms, 16) if block_m <= 16 else (sms, 4)
    split = 1
    while split < cap and max_tiles * split < target:
        split *= 2
    return split


def build_lora_meta(
    token_slots: torch.Tensor,
    row_start: torch.Tensor,
    scale: torch.Tensor,
    max_rank: int,
    *,
    block_m: int | None = None,
    split_k: int | None = None,
    max_slices: int = 3,
    rank_class: int | None = None,
) -> LoraMeta:
    """Group the tokens of one step by adapter slot, on the device, without host synchronisation.

    token_slots: int32 [T] (-1 = no adapter); row_start: int32 [S]; scale: float32 [S]; all on one device.
    The returned meta keeps references to these three tensors: after writing new contents into them
    (same shapes), ``refresh_lora_meta(meta)`` recomputes the grouping in place, so a captured CUDA graph
    that reads the meta replays correctly. Allocates the fp32 workspace [split_k, max_slices, T, max_rank].
    rank_class: the kernels' BLOCK_R, one of RANK_CLASSES (the step's largest rank through ``rank_class_of``);
    None = the class of max_rank (right for any batch; tiles as tall as the largest rank the pool allows).
    """
    if token_slots.dtype != torch.int32 or row_start.dtype != torch.int32:
        raise TypeError("token_slots and row_start must be int32")
    if scale.dtype != torch.float32:
        raise TypeError("scale must be float32")
    if token_slots.dim() != 1 or row_start.dim() != 1 or scale.shape != row_start.shape:
        raise ValueError("token_slots [T], row_start [S] and scale [S] expected")
    if not (token_slots.device == row_start.device == scale.device):
        raise ValueError("token_slots, row_start and scale must be on one device")
    if max_rank < 1:
        raise ValueError("max_rank must be >= 1")
    if rank_class is not None and rank_class not in RANK_CLASSES:
        raise ValueError(f"rank_class must be one of {RANK_CLASSES}, got {rank_class}")
    device, num_tokens, num_slots = token_slots.device, token_slots.shape[0], row_start.shape[0]
    block_m = block_m or _default_block_m(num_tokens)
    # each slot's last tile may be partial: at most ceil(T / block_m) full tiles + one partial per busy slot
    max_tiles = max(1, -(-num_tokens // block_m) + min(num_slots, num_tokens))
    split_k = split_k or _default_split_k(device, max_tiles, block_m)
    i32 = dict(dtype=torch.int32, device=device)
    meta = LoraMeta(
        token_slots=token_slots,
        row_start=row_start,
        scale=scale,
        max_rank=max_rank,
        rank_class=rank_class or rank_class_of(max_rank),
        block_m=block_m,
        split_k=split_k,
        max_slices=max_slices,
        sorted_tokens=torch.empty(num_tokens, **i32),
        token_pos=torch.empty(num_tokens, **i32),
        slot_bounds=torch.empty(num_slots + 1, **i32),
        tile_info=torch.empty(max_tiles, 4, **i32),
        workspace=torch.empty(split_k, max_slices, num_tokens, max_rank, dtype=torch.float32, device=device),
        split_count=torch.zeros(max_tiles * 3, **i32),
    )
    refresh_lora_meta(meta)
    return meta


def refresh_lora_meta(meta: LoraMeta) -> None:
    """Recompute the grouping of ``meta`` in place from the current contents of meta.token_slots.

    CUDA with up to 1024 tokens: one Triton launch (``refresh_lora_meta_triton``, ~10-18 us on an H100 against
    ~75-90 us for the torch ops in a CUDA graph); larger batches and CPU: torch (``refresh_lora_meta_torch``),
    since the single-program kernel's passes grow with T (77 us at 2048 tokens, 690 us at 8192).
    """
    if meta.token_slots.is_cuda and meta.num_tokens <= 1024:
        refresh_lora_meta_triton(meta)
    else:
        refresh_lora_meta_torch(meta)


def refresh_lora_meta_triton(meta: LoraMeta) -> None:
    """``refresh_lora_meta_torch`` as one single-program Triton kernel (no host sync, graph-capturable)."""
    from ._meta_triton import lora_meta_kernel

    s_pad = max(16, 1 << meta.num_slots.bit_length())  # > num_slots: room for the no-adapter bucket
    block_t = min(max(16, 8192 // s_pad), 256)
    lora_meta_kernel[(1,)](
        meta.token_slots, meta.row_start, meta.sorted_tokens, meta.token_pos, meta.slot_bounds, meta.tile_info,
        meta.num_tokens, meta.num_slots, meta.max_tiles,
        S_PAD=s_pad, BLOCK_T=block_t, BLOCK_M=meta.block_m, num_warps=8 if s_pad * block_t > 4096 else 4,
    )  # fmt: skip


def refresh_lora_meta_torch(meta: LoraMeta) -> None:
    """The metadata step in torch ops (the reference of the Triton kernel, and the CPU path).

    Torch pseudocode of what is written (S = num_slots; slot -1, or >= S, sorts last as S):
        key = where(token_slots < 0 | token_slots >= S, S, token_slots); sorted_tokens = argsort(key, stable=True)
        token_pos[sorted_tokens] = arange(T)
        slot_bounds[s] = number of tokens with key < s
        tiles: every slot's run of tokens cut into ceil(count / block_m) tiles, in slot order;
        tile_info[j] = (slot, start, min(start + block_m, slot_bounds[slot + 1]), row_start[slot]) for
        j < total tiles, (-1, 0, 0, 0) beyond.
    """
    device, num_slots, bm = meta.token_slots.device, meta.num_slots, meta.block_m
    key = torch.where((meta.token_slots < 0) | (meta.token_slots >= num_slots), num_slots, meta.token_slots)
    sorted_key, order = torch.sort(key, stable=True)
    meta.sorted_tokens.copy_(order)
    meta.token_pos[order] = torch.arange(order.shape[0], dtype=torch.int32, device=device)
    slot_ids = torch.arange(num_slots + 1, dtype=key.dtype, device=device)
    bounds = torch.searchsorted(sorted_key, slot_ids)  # int64 [S + 1]
    meta.slot_bounds.copy_(bounds)
    if num_slots == 0:
        meta.tile_info.zero_()
        meta.tile_slot.fill_(-1)
        return
    counts = bounds[1:] - bounds[:-1]
    tiles = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles, 0)  # inclusive prefix: slot s owns tiles tile_end[s] - tiles[s] : tile_end[s]
    j = torch.arange(meta.max_tiles, dtype=torch.int64, device=device)
    slot = torch.searchsorted(tile_end, j, right=True)  # == S for idle tiles
    valid = slot < num_slots
    slot_c = slot.clamp(max=num_slots - 1)
    start = bounds[slot_c] + (j - (tile_end - tiles)[slot_c]) * bm
    end = torch.minimum(start + bm, bounds[slot_c + 1])
    fields = (torch.where(valid, slot, -1), start, end, meta.row_start[slot_c].long())
    meta.tile_info.copy_(torch.stack([fields[0]] + [torch.where(valid, f, 0) for f in fields[1:]], dim=1))
