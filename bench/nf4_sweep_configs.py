"""The launch configs bench/nf4_gemm.py --sweep times: per M, a grid of tiles, or variants of the recorded config
(--lookups, --even, --scales, --splits, --small-warps, --tma, --tails, --x-tma), each next to the config it varies."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hotlora.kernels.nf4 import (
    LOOKUP_PRMT,
    LOOKUP_PRMT_IMM,
    SCALE_VALUES,
    Nf4Config,
    pick_config,
    regs_config,
    split_for_sms,
)

GEMV_SWEEP_MAX_M = 8  # sweep M up to here over GEMV configs (the bucket may grow to 8 if it wins)


def _filling_split(m: int, rows: int, n: int, block_n: int, k: int) -> int:
    """split_for_sms for a tile of `rows` x rows (a program's, tail included) by `block_n` weight rows."""
    return split_for_sms(-(-m // rows) * -(-n // block_n), k)


def gemv_configs(m: int, n: int, k: int) -> list[Nf4Config]:
    """GEMV configs worth timing: 16-32 weight bytes per thread per step (more spills or limits occupancy:
    ptxas gives ~120 registers at 64 bytes, M=1) and 256-2048 programs (2-16 per H200 SM)."""
    out = []
    for bn, split, warps, groups in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4)):
        per_thread, programs = bn * 64 * groups // (32 * warps), -(-n // bn) * split
        if 16 <= per_thread <= 32 and 256 <= programs <= 2048 and split * groups <= -(-k // 128):
            out.append(Nf4Config(m, bn, split, warps, gemv=True, k_groups=groups, lookup=LOOKUP_PRMT))
    return out


def occupancy_configs(m: int) -> list[Nf4Config]:
    """M <= 64, the tl.dot path: the register cap (programs per SM), tile width and K slices, 4 warps. ncu on the
    H200 (gate/up, M=16) found the kernel issue-bound on integer work at 25% occupancy (103 registers)."""
    bm = max(16, 1 << (m - 1).bit_length())
    grid = itertools.product((None, 96, 72), (32, 64), (1, 2, 4))
    return [Nf4Config(bm, bn, split, 4, 3, lookup=LOOKUP_PRMT, maxnreg=regs) for regs, bn, split in grid]


_REGISTER_LOOKUPS = ((LOOKUP_PRMT, True), (LOOKUP_PRMT, False), (LOOKUP_PRMT_IMM, False))  # (lookup, table_regs)


def _fused(rec: Nf4Config) -> bool:
    """The recorded config runs the tl.dot kernel (not dense + cuBLAS, not the GEMV): its variants apply."""
    return not (rec.dense or rec.gemv)


def lookup_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """The recorded tile and the same tile with the other operand order, each with the three register lookups:
    table words in registers (Nf4Config.table_regs: nine registers, may spill at large tiles), the same loaded as
    uniform values, and LOOKUP_PRMT_IMM (immediates, the four-instruction mask: session 3's kernel)."""
    if not _fused(rec):
        return [rec]
    return [replace(c, lookup=lookup, table_regs=regs) for c in (rec, replace(rec, swap_ab=not rec.swap_ab))
            for lookup, regs in _REGISTER_LOOKUPS]


def even_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """The recorded config with and without the unmasked path for shapes that tile evenly (EVEN); at M <= 16 also
    128-wide tiles over 4 warps and 64-wide over 2 (fewer loop instructions per weight value in sm_90 SASS, more
    registers per thread)."""
    if not _fused(rec):
        return [rec]
    out = [replace(rec, even=True), replace(rec, even=False)]
    if rec.block_m <= 16:
        out += [replace(rec, block_n=128), replace(rec, warps=2)]
    return out


def scale_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """The recorded config (and dense + cuBLAS above 64) against the code values scaled before the dot
    (SCALE_VALUES: one packed multiply per two values, the dot accumulating in place), over tiles whose sm_90 SASS
    neither spills nor exceeds ~7 instructions per weight value (bench/nf4_sass.py), both register lookups."""
    tiles = [(32, 64, 4, False)] if m <= 32 else [(64, 64, 4, True), (64, 128, 8, True)]
    if m > 64:
        tiles += [(128, 64, 4, True), (128, 128, 8, True), (256, 128, 8, True)]
    out = [rec] + ([Nf4Config(128, 128, dense=True)] if m > 64 and not rec.dense else [])
    for (bm, bn, warps, swap), lookup in itertools.product(tiles, (LOOKUP_PRMT, LOOKUP_PRMT_IMM)):
        splits = {_filling_split(m, bm, n, bn, k)} | ({rec.split_k} if m <= 64 else set())
        out += [Nf4Config(bm, bn, split, warps, swap_ab=swap, lookup=lookup, scale=SCALE_VALUES,
                          table_regs=lookup == LOOKUP_PRMT) for split in sorted(splits)]
    return out


def split_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """The recorded tile with K in 1-16 slices (as many as K's 128-column groups allow) and in the fewest that
    give every SM a program: with programmatic dependent launch the reduce that follows costs less than when the
    recorded splits were swept (ninth session), and at M <= 64 more slices mean more programs per SM."""
    if not _fused(rec):
        return [rec]
    tiles = -(-m // rec.rows) * -(-n // rec.block_n)
    splits = {s for s in (1, 2, 4, 8, 16) if s <= k // 128} | {split_for_sms(tiles, k)}
    return [replace(rec, split_k=s) for s in sorted(splits)]


def warp_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """The recorded config against weights-first tiles over 2 warps, which Triton compiles to mma.sync (wgmma
    needs a warpgroup of 4): in sm_90 SASS, M=1, 16x64 over 2 warps loops at 4.30 instructions per weight value
    and 16x32 at 4.83, against 5.33 for the recorded 16x64 (x first) and 5.75 for weights-first over 4 warps
    (wgmma), with none of the recorded tile's register moves for x (bench/nf4_sass.py --swap-ab --tile ...).
    Each tile with half, the same and twice the recorded K slices."""
    if not _fused(rec):
        return [rec]
    # above 32 rows these tiles need 255 registers and loop at 13-14 instructions per value (64x32, 64x64); 16x128
    # and one warp lost at M = 1-16 (eleventh session)
    tiles = [32, 64] if m <= 16 else [64] if m <= 32 else []
    return [rec] + [replace(rec, block_n=bn, warps=2, swap_ab=True, split_k=split)
                    for bn, split in itertools.product(tiles, (rec.split_k // 2, rec.split_k, 2 * rec.split_k))
                    if 1 <= split <= k // 128]


def _at_stages(cfg: Nf4Config, stages: int) -> Nf4Config:
    """cfg at `stages` pipeline stages, x by pointer loads where x by TMA is not verified at that depth
    (Nf4Config.x_tma_verified)."""
    plain = replace(cfg, x_tma=False, stages=stages)
    return replace(plain, x_tma=cfg.x_tma and plain.x_tma_verified)


def tma_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """The recorded config against the same tile with its weight bytes read by TMA into shared memory (Nf4Config.tma)
    at 3 and 5 pipeline stages: the copy engine keeps groups in flight without holding registers, where the plain
    loads hold ~4 KB per program (one group) in registers until its math starts."""
    out = [rec] + ([_at_stages(replace(rec, tma=True), s) for s in (3, 5)] if _fused(rec) else [])
    if m > 64:  # the mid-M tiles again, now that the weights need no registers in flight
        tiles = [(128, 64, 4), (128, 128, 8), (256, 64, 8), (256, 128, 8), (64, 128, 4)]
        for (bm, bn, warps), stages in itertools.product(tiles, (2, 3, 4)):
            split = _filling_split(m, bm, n, bn, k)
            out.append(Nf4Config(bm, bn, split, warps, stages, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES,
                                 tma=True))
    return list(dict.fromkeys(out))


def tail_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """The recorded config against tiles that cover M with a row tile plus a smaller tail tile on the same
    dequantized weights (Nf4Config.tail_m: 176 rows as 128 + 64 rather than one 256-row tile), by TMA, 2-3 stages."""
    out = [rec]
    heads = [(64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8)]
    for (bm, bn, warps), tail, stages in itertools.product(heads, (16, 32, 64, 128), (2, 3)):
        if tail <= bm and m <= bm + tail < 2 * m:
            split = _filling_split(m, bm + tail, n, bn, k)
            out.append(Nf4Config(bm, bn, split, warps, stages, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES,
                                 tma=True, tail_m=tail))
    return list(dict.fromkeys(out))


def x_tma_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """The recorded config against the same with x's tiles by TMA (Nf4Config.x_tma: sm_90 SASS at M = 176 drops from
    255 to 167 registers, no LDGSTS), at its stages and one more; from 129 rows also the tiles that lost to it with x
    by pointer loads (128 + 128 rows) or to dense at 257-512 (128x64), with x by TMA. Only the tiles verified with it
    (Nf4Config.x_tma_verified: the 256x128 tile at 3 stages raced)."""
    out = [replace(rec, x_tma=False)]  # the baseline, whether or not the served config takes x by TMA
    if rec.tma:
        out += [replace(rec, x_tma=True, stages=s) for s in (rec.stages, rec.stages + 1)
                if replace(rec, x_tma=False, stages=s).x_tma_verified]
    tiles = []
    if 128 < m <= 256:  # one program's rows cover M
        tiles = [(128, 64, 4, 128, 2), (128, 64, 4, 64, 2)]
    elif 256 < m <= 512:  # two or more row programs: against dense for q/k/v and o, the recorded tile for the rest
        tiles = [(128, 64, 4, 0, 3), (128, 64, 4, 0, 2)]
    for bm, bn, warps, tail, stages in tiles:
        if m > 256 or m <= bm + tail:
            split = _filling_split(m, bm + tail, n, bn, k)
            out.append(Nf4Config(bm, bn, split, warps, stages, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES,
                                 tma=True, tail_m=tail, x_tma=True))
    return list(dict.fromkeys(out))


def mid_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """Mid M (65-256 rows: a prefix-cache hit's step), 64- and 128-row tiles over 4 warps with x by TMA (all
    verified with it: Nf4Config.x_tma_verified), each weight tile 64 or 128 wide, with a tail of 0-128 rows, at 2
    stages (3 lost with x by TMA at every M, twenty-seventh session), at the fewest K slices that give every SM a
    program and twice that: against the recorded config. Row covers that compute more than a third over M are
    left out."""
    out = [rec]
    for (bm, bn), tail, more in itertools.product(((64, 64), (128, 64), (64, 128), (128, 128)), (0, 32, 64, 128),
                                                  (1, 2)):
        rows = bm + tail
        if tail > bm or -(-m // rows) * rows - m > m // 3:
            continue
        split = min(more * _filling_split(m, rows, n, bn, k), k // 128)
        out.append(Nf4Config(bm, bn, split, 4, 2, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=True,
                             tail_m=tail, x_tma=True))
    return list(dict.fromkeys(out))


def regs_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """M <= 32: nf4_regs_kernel (the looked-up weights as mma.sync's register operand) over 4 warps at its served
    tile and K slices: 2-4-group cp.async rings, with no register cap and with a cap of 72 (7 programs per SM);
    against the recorded config (at M = 1 also the one with no LoRA shrink beside it) and nf4_matmul's served config
    (regs_config, where M is in its bucket). (The thirty-second session's sweep of 128-row tiles and more K slices
    lost everywhere; --regs-grid sweeps tiles and slices at M <= 8.)"""
    served = regs_config(m, n, k)
    out = [rec, *([pick_config(m, n, k, gemv=False, alone=True)] if m == 1 else []), *([served] if served else [])]
    if m > 32:
        return out
    bm = max(8, 1 << (m - 1).bit_length())
    split = (served or regs_config(1, n, k) or rec).split_k
    if bm == 16:  # 114 registers uncapped (4 programs an SM): K slices and caps that change the waves
        for more, cap in itertools.product((0.5, 1, 2), (None, 80, 96)):
            out.append(Nf4Config(bm, 64, max(int(split * more), 1), 4, 3, regs=True, lookup=LOOKUP_PRMT, maxnreg=cap))
        return list(dict.fromkeys(out))
    for stages, cap in itertools.product((2, 3, 4), (None, 72)):
        out.append(Nf4Config(bm, 64, split, 4, stages, regs=True, lookup=LOOKUP_PRMT, maxnreg=cap))
    return list(dict.fromkeys(out))


def regs_grid_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """M <= 8: nf4_regs_kernel's served config against its tile over 1, 2 and 4 warps (16-128 weight rows a
    program) and K slices of 2-16 groups (as many slices as that takes, powers of two or not): how many programs,
    and how long each, fill the H200's 132 SMs at 6 programs each (served: 512-1,792 programs of 4-14 groups)."""
    served = regs_config(m, n, k)
    if served is None:
        return [rec]
    groups = -(-k // 128)
    out = [served]
    # (warps, block_n); 8 warps need block_m 16 (Nf4Config). One warp a program: its CTA barrier a group holds no
    # other warp back (sm_90: 90 registers at 16 rows, ~22 programs an SM; 145 at 32)
    tiles = ((4, 64), (2, 32), (2, 64), (4, 128), (1, 16), (1, 32))
    for (warps, bn), iters in itertools.product(tiles, (2, 3, 4, 5, 6, 8, 10, 12, 16)):
        if iters <= groups:
            out.append(replace(served, block_n=bn, warps=warps, split_k=-(-groups // iters)))
    return list(dict.fromkeys(out))


def ss_configs(rec: Nf4Config, m: int, n: int, k: int) -> list[Nf4Config]:
    """M >= 65: nf4_ss_kernel (both wgmma operands in shared memory, a lookup warpgroup beside the MMA ones): 128 or
    256 rows of x (128 below 512 rows only: at M = 512 it lost 1.5x to 256 on every shape, H200, thirty-fourth
    session) by 64 or 128 weight rows, 0.5, 1 and 2x the fewest K slices that give every SM a program (one program
    per SM: its rings take ~170-210 KB); against the recorded config."""
    out = [rec]
    for bm, warps, more in itertools.product((128, 256), (4, 8), (0.5, 1, 2)):
        if bm > 2 * max(m, 64) or (bm == 128 and m >= 512):
            continue
        split = min(max(int(more * split_for_sms(-(-m // bm) * -(-n // (16 * warps)), k)), 1), max(k // 512, 1))
        out.append(Nf4Config(bm, 16 * warps, split, warps, scale=SCALE_VALUES, lookup=LOOKUP_PRMT, ss=True))
    return list(dict.fromkeys(out))


# --lookups / --even / --scales / --splits / --small-warps: variants of each M's recorded tl.dot config, and the
# fields that tell them apart
VARIANTS = {
    "lookups": (lookup_configs, ("swap_ab", "lookup", "table_regs")),
    "even": (even_configs, ("even", "block_n", "warps")),
    "splits": (split_configs, ("split_k",)),
    "small-warps": (warp_configs, ("swap_ab", "block_n", "warps", "split_k")),
    "tma": (tma_configs, ("tma", "stages", "block_m", "block_n", "warps", "split_k", "dense")),
    "tails": (tail_configs, ("block_m", "tail_m", "block_n", "warps", "stages", "split_k", "dense")),
    "mid": (mid_configs, ("block_m", "tail_m", "block_n", "stages", "split_k", "x_tma", "dense")),
    "x-tma": (x_tma_configs, ("block_m", "tail_m", "block_n", "warps", "stages", "x_tma", "split_k", "dense")),
    "regs": (regs_configs, ("regs", "block_m", "stages", "maxnreg", "lookup", "split_k")),
    "regs-grid": (regs_grid_configs, ("regs", "block_n", "warps", "split_k")),
    "ss": (ss_configs, ("ss", "block_m", "block_n", "split_k", "dense")),
    "scales": (scale_configs, ("scale", "block_m", "block_n", "split_k", "warps", "lookup", "dense")),
}


def variant_configs(variants: str, m: int, n: int, k: int) -> list[Nf4Config]:
    return VARIANTS[variants][0](pick_config(m, n, k, gemv=False), m, n, k)


def sweep_configs(m: int, n: int, k: int, occupancy: bool = False, variants: str | None = None
                  ) -> list[Nf4Config]:
    if variants:
        return variant_configs(variants, m, n, k)
    if occupancy and m <= 64:
        return occupancy_configs(m)
    if m <= GEMV_SWEEP_MAX_M:
        return gemv_configs(m, n, k)
    prmt = LOOKUP_PRMT
    if m > 64:
        grid = itertools.product((64, 128), (64, 128, 256), (4, 8), (1, 2), (False, True))
        return [Nf4Config(bm, bn, split, w, 3, swap_ab=swap, lookup=prmt) for bm, bn, w, split, swap in grid
                if not (swap and bn < 64)] + [Nf4Config(128, 128, dense=True)]
    bm = max(16, 1 << (m - 1).bit_length())
    grid = itertools.product((64, 128, 256), (4, 8), (2, 4, 8), (False, True))
    return [Nf4Config(bm, bn, split, w, 3, swap_ab=swap, lookup=prmt) for bn, w, split, swap in grid]
