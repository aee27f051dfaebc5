"""NF4 launch configs: what one nf4_matmul launch runs, and the configs recorded per M bucket from sweeps on the
H200 (bench/nf4_gemm.py). hotlora.kernels.nf4 re-exports everything public here."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import triton

from ._nf4_triton import LOOKUP_PRMT, LOOKUP_PRMT_IMM, LOOKUP_TABLE

# Where nf4_matmul_kernel applies each 64-block's absmax: to the dot's partial sums (one fp32 multiply per output
# element and group), to the looked-up code values in x's dtype (one multiply per weight value; the dot then
# accumulates in place), or to the fp32 code values, rounded to the weight's dtype as dequantize_4bit does.
SCALE_PARTIALS, SCALE_VALUES, SCALE_EXACT = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Nf4Config:
    """One launch: output tile BLOCK_M x BLOCK_N (plus a TAIL_M x BLOCK_N tail tile with `tail_m`: a program covers
    `rows` = block_m + tail_m rows of x), K split into `split_k` slices (fp32 partials + a reduce),
    `scale`: where absmax applies (SCALE_PARTIALS, SCALE_VALUES, SCALE_EXACT); `dense`: dequantize the
    whole weight then cuBLAS (large M, where that measures faster); `gemv`: nf4_gemv_kernel for M <=
    block_m (it runs the rows as the next power of two of M), `k_groups` 128-column groups per loop step."""

    block_m: int
    block_n: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3
    scale: int = SCALE_PARTIALS
    group_m: int = 8
    dense: bool = False
    swap_ab: bool = False  # weights as the dot's first operand (y.T = W @ x.T)
    lookup: int = LOOKUP_TABLE  # LOOKUP_PRMT: in-register lookup (not SCALE_EXACT; 16-bit x, CUDA only)
    prefetch: bool = False  # load group i+1 before group i's math
    gemv: bool = False
    k_groups: int = 1  # gemv: groups loaded together per loop step (more bytes in flight per program)
    maxnreg: int | None = None  # cap on registers per thread: more programs per SM (ptxas may spill)
    table_regs: bool = True  # LOOKUP_PRMT: its table words in ordinary registers (_nf4_triton._prmt_table)
    even: bool = True  # drop the weight and K masks where the shape allows (N % block_n, K % 128, groups % split)
    tma: bool = False  # weight bytes by TMA into shared memory, `stages` groups in flight (CUDA, not prefetch)
    tail_m: int = 0  # a second row tile of x per program on the same dequantized weights (SCALE_VALUES/EXACT)
    x_tma: bool = False  # with tma: x's tiles by TMA too (where x's base and row stride are 16-byte aligned)
    regs: bool = False  # nf4_regs_kernel (Gluon, CUDA, 16-bit x): M <= block_m (8, 16 or 32), block_n = 16 * warps *
    # tiles a warp; `stages` groups in its cp.async rings
    ss: bool = False  # nf4_ss_kernel (Gluon, Hopper, 16-bit x; both wgmma operands in shared memory, a lookup
    # warpgroup beside the MMA ones): block_m rows of x (64-256) by block_n = 16 * warps weight rows (4 or 8 warps)

    def __post_init__(self) -> None:
        if self.tail_m < 0 or self.tail_m & (self.tail_m - 1):
            raise ValueError(f"tail_m must be 0 or a power of two (a Triton block), got {self.tail_m}")
        if self.tail_m and (self.scale == SCALE_PARTIALS or self.prefetch or self.gemv or self.dense):
            raise ValueError("a config with tail_m scales the weights before the dot (SCALE_VALUES or SCALE_EXACT) "
                             "in nf4_matmul_kernel, without prefetch")

        if self.regs and (self.block_m not in (8, 16, 32) or self.block_n % (16 * self.warps) or self.dense
                          or self.block_m < 2 * self.warps or not 2 <= self.stages <= 4
                          or self.gemv or self.swap_ab or self.tma or self.tail_m or self.scale != SCALE_PARTIALS):
            raise ValueError("a regs config has block_m 8, 16 or 32 (at least 2 * warps), block_n a multiple of 16 * "
                             "warps, 2-4 stages, and scales the partial sums (no dense, gemv, swap_ab, tma, "
                             "tail)")
        if self.ss and (self.block_m not in (64, 128, 256) or self.warps not in (4, 8)
                        or self.block_n != 16 * self.warps or self.scale != SCALE_VALUES or self.dense or self.gemv
                        or self.regs or self.swap_ab or self.tma or self.tail_m):
            raise ValueError("an ss config has block_m 64, 128 or 256, 4 or 8 warps with block_n = 16 * warps, and "
                             "scales the code values (no dense, gemv, regs, swap_ab, tma, tail)")
        if self.x_tma and not self.tma:
            raise ValueError("x_tma needs tma (x's tiles by TMA beside the weight bytes)")
        if self.x_tma and not self.x_tma_verified:
            raise ValueError("x_tma serves the tiles verified on the GPU: at most 3 stages, and at most 2 for 256-row "
                             "tiles (the 256x128 tile over 8 warps at 3 stages raced with it)")

    @property
    def x_tma_verified(self) -> bool:
        """Whether this tile may take x by TMA: those verified on the H200 (twenty-seventh and twenty-eighth sessions,
        see _CONFIGS): up to 128 rows at 1-3 stages over 4 warps and 2-3 over 8, 256 rows at 2 stages over 8."""
        return self.stages <= 3 and (self.block_m <= 128 or self.stages <= 2)

    @property
    def rows(self) -> int:
        """Rows of x one program covers."""
        return self.block_m + self.tail_m


# (max M, config, config for large weights) by M bucket, swept on the H200 with bench/nf4_gemm.py --sweep, --lookups and
# --scales (bf16, Llama-3-8B shapes; BENCHMARKS.md): x-first small tiles up to 32 rows (weights-first over 2 warps for
# large weights at 17-32), weights-first (swap_ab) up to 256, then dequantize + cuBLAS. The large-weight config serves
# N * K >= LARGE_WEIGHT (gate/up and down, not q/k/v or o). Wide outputs (gate/up, N >= 16384) fill the GPU with fewer K
# slices; BY_SMS picks the fewest slices that give every SM a program (split_for_sms). The lookup per bucket
# (--lookups): table words in registers at M <= 16 (4-8% faster than the immediates), loaded uniform at 33-64. At 17-32
# weights-first over 4 warps with uniform words ran gate/up 10% faster alone, but the engine's batch-32 decode with
# adapters (LoRA shrink beside the matmul) lost 11%: q/k/v and o keep session 3's tile and lookup there (with the xor
# merge since the fortieth session: q/k/v 15.3 -> 14.6 us at M = 24, 15.6 -> 15.4 at 32; o 12.1 -> 11.8 and 12.2 ->
# 11.9). Large weights scale the code values before the dot there (SCALE_VALUES: gate/up 61.6 -> 57.8 us at M=32; q/k/v,
# o and down 1-3% slower). From 65 rows on SCALE_VALUES wins with the split by SMs (M=128: gate/up 108 -> 102 us, down
# 63 -> 53, o 22 -> 20; M=256 with 256x128 tiles for large weights: gate/up 192 -> 147, down 98 -> 87); at 33-64 it lost
# 5-15%. The unmasked loads (even, --even) measured 1-2% faster at M <= 16, 5-12% at 65-256 and 4-12% slower at 17-64,
# with fewer SASS instructions everywhere (bench/nf4_sass.py): on only where they won.
# Large weights at 17-32: weights-first tiles over 2 warps (--small-warps, eleventh session), which Triton
# compiles to mma.sync (wgmma needs 4 warps): down 32.6 -> 28.6 us, gate/up 57.1 -> 56.7 at M = 32 (q/k/v and o
# lost 25-35%). At M <= 16 such tiles loop at fewer sm_90 instructions per weight value than the recorded x-first
# 16x64 over 4 warps (4.3-4.8 against 5.3 at M = 1: none of its register moves that assemble x's fragments) and
# ran 3-9% faster alone (M = 1, 32-wide: q/k/v 12.2 -> 11.7, gate/up 42.7 -> 40.1, down 23.7 -> 22.5; M = 2-16,
# 64-wide, 8 slices: q/k/v 12.2-13.2 -> 11.6-12.0, gate/up 42.8-44.1 -> 40.4-42.4), but in the engine batch 1
# with an adapter lost 2% (244-245 against 249-250 tok/s) and batches 2-16 gained nothing: that bucket keeps its
# tile. Batch 1 on the base model gained 3% (294 -> 302-303 tok/s): at M = 1 a matmul with no LoRA shrink
# beside it (nf4_matmul with no finish hook) takes the 32-wide 2-warp tiles (_ALONE_M1).
# From 65 rows the weight bytes go by TMA into shared memory (tma, --tma, sixteenth session): the pipeliner then
# keeps 3 groups in flight with no registers held. M = 128-256: gate/up 100.0 -> 92.2-93.0 us and 145 -> 129-131,
# down 53.5 -> 47.2 and 88.6 -> 78.2, o 20.7 -> 19.9 and 29.7 -> 28.6; 5 stages lost (fewer programs per SM). It
# also makes the 256x128 tile beat dense + cuBLAS for large weights at 257-512 rows (M = 512: gate/up 285 -> 260
# us, down 141 -> 131; o stays dense, 42 against 48). At M <= 64 it gained nothing or lost (the 2-warp tiles at 17-32:
# gate/up 56.5 -> 66.2 us). At 257-384 rows the 256-row tile computes 512 rows anyway: dequantize + cuBLAS took
# gate/up 236.3 us against its 266.3 at M = 384, down 128.0 against 130.1 (seventeenth session), so the tile
# serves large weights from 385 rows only.
# Tails (tail_m, --tails, twenty-third session): a power-of-two tile computes up to twice M (a 176-token step ran the
# 256-row tile, or two 128-row tiles that dequantize the weights twice). A program covering a row tile plus a smaller
# tail tile on the same dequantized weights does 192 rows for one lookup. Best per M (us, H200, the recorded config
# before in brackets): M = 176 q/k/v 38.0 (47.5), o 25.7 (28.7), gate/up 128.4 (137.8), down 64.8 (77.3) with
# 128 + 64 rows over 4 warps at 2 stages (3 stages: 7-19% slower; 128-wide tiles over 8 warps: gate/up 130.1, down
# 74.9); M = 160 128 + 32 (gate/up 120.8, down 61.3); M = 96 64 + 32 at 1-10% faster. At 224, 128 + 128 lost to the
# recorded tiles (gate/up 144.6 against 136.5). Gate/up gains least: at 160-192 rows it is not bound by the MMAs.
# x by TMA (x_tma, --x-tma, twenty-sixth and twenty-seventh sessions): x's tiles came by pointer loads (cp.async
# into shared memory, 28 LDGSTS a loop at M = 176) and held registers (255 a thread at M = 176). By TMA, as the
# weight bytes: 167 registers, ~3-5% fewer loop instructions (sm_90 SASS, bench/nf4_sass.py --x-tma), and every
# 64- and 128-row tile faster (us, H200, same tile without -> with; a layer's four matmuls): M = 96 180.4 -> 170.2,
# M = 128 187.7 -> 162.6, M = 160 242.6 -> 221.3, M = 176 255.4 -> 231.6; at M = 256 q/k/v 46.6 -> 39.6 and o
# 28.6 -> 25.2. One more stage lost everywhere. 16-bit x only (nf4._launch). The 256x128 tile (8 warps, 3 stages)
# raced with x by TMA: a few output columns of every row came out non-finite, different ones each run (so the
# twenty-sixth session's gate/up and down timings at 200-512 rows timed wrong results). The 64- and 128-row tiles
# over 4 warps (tails, 1-3 stages) matched the pointer loads bit for bit. Twenty-eighth session (H200, gate/up and
# down at M = 208, 256 and 512, three runs each against the pointer loads): the race is the 256x128 tile's at 3
# stages only; at 2 stages it, 256x64 over 8 warps and 128x128 over 8 warps at 2-3 stages were bit-equal every
# time. Nf4Config refuses x_tma outside what was verified (Nf4Config.x_tma_verified). None of those tiles is served:
# at 2 stages the 256x128 tile with x by TMA ran slower than at 3 with pointer loads (gate/up M = 208: 148.1 against
# 139.4 us), and the 128-row tiles over 8 warps lose to the recorded ones.
# GEMV bucket (block_m = its max M; move both to change MAX_GEMV_M): defaults chosen by reasoning, not swept
# yet. 64 rows x 2 groups per step over 8 warps is 32 weight bytes per thread and compiles (ptxas, sm_90) to
# 77 registers at M=1, 128 at M=4, with no shared-memory layout round trip in the loop. split_k is the most K
# slices it may use: pick_config takes the fewest that reach _GEMV_PROGRAMS programs (o, down: 8; q/k/v: 4;
# gate/up: 1, i.e. 448 programs and no reduce launch). Its K loop is ~18 SASS instructions per weight byte
# per thread at M=1 (half of them the prmt lookup), ~23 at M=2, ~33 at M=4 (each row adds an FMA per weight
# and an x conversion): instruction issue, not bandwidth, bounds it, so the sweep decides where the bucket ends.
BY_SMS = 0  # split_k: chosen per shape by split_for_sms
LARGE_WEIGHT = 1 << 25  # N * K from which a bucket's large-weight config applies
_SMS = 132  # H200
_CONFIGS: tuple[tuple[int, Nf4Config, Nf4Config | None], ...] = (
    (4, Nf4Config(4, 64, 8, warps=8, gemv=True, k_groups=2, lookup=LOOKUP_PRMT), None),
    (16, Nf4Config(16, 64, 4, lookup=LOOKUP_PRMT), None),
    (32, Nf4Config(32, 64, 4, lookup=LOOKUP_PRMT_IMM, even=False),
     Nf4Config(32, 64, 8, warps=2, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES)),
    (64, Nf4Config(64, 64, 4, swap_ab=True, lookup=LOOKUP_PRMT, table_regs=False, even=False), None),
    (96, Nf4Config(64, 64, BY_SMS, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=True, tail_m=32,
                   x_tma=True), None),
    (128, Nf4Config(128, 64, BY_SMS, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=True, x_tma=True),
     None),
    (160, Nf4Config(128, 64, BY_SMS, stages=2, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=True,
                    tail_m=32, x_tma=True), None),
    (192, Nf4Config(128, 64, BY_SMS, stages=2, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=True,
                    tail_m=64, x_tma=True), None),
    (256, Nf4Config(128, 64, BY_SMS, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=True, x_tma=True),
     Nf4Config(256, 128, BY_SMS, warps=8, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=True)),
    (384, Nf4Config(128, 128, dense=True), None),
    (512, Nf4Config(128, 128, dense=True),
     Nf4Config(256, 128, BY_SMS, warps=8, swap_ab=True, lookup=LOOKUP_PRMT, scale=SCALE_VALUES, tma=True)),
    (1 << 62, Nf4Config(128, 128, dense=True), None),
)


# Deep K (down, 14336) at 17-32 rows where M is a multiple of 16 (Triton compiles such an M apart): the weights-first
# 2-warp tile with the xor lookup (thirty-ninth session) took 34.9 us at M = 32 against 26.0 at 24, with the same
# registers and fewer instructions (a ptxas schedule); x first took 28.6 (H200, nf4_gemm.py --sweep --lookups).
# gate/up keeps weights first at 32 (51.1 against 55.9).
_X_FIRST_K = 8192


_ALONE_M1 = (Nf4Config(16, 32, 4, warps=2, swap_ab=True, lookup=LOOKUP_PRMT),
             Nf4Config(16, 32, 8, warps=2, swap_ab=True, lookup=LOOKUP_PRMT))  # (config, for large weights)


MAX_GEMV_M = max((hi for hi, c, _ in _CONFIGS if c.gemv), default=0)
# Decode sizes (M <= 16, and M <= 64 for large weights): the recorded K slices, doubled until there are
# _MIN_PROGRAMS programs. Swept under programmatic dependent launch on the H200 (bench/nf4_gemm.py --splits,
# tenth session): o and down (64 column tiles, 256 programs at 4 slices) ran 5-10% faster at M <= 16 with 8
# slices, down 16-23% at M = 32-64; q/k/v (384 programs) and gate/up (896) were fastest as recorded, and o at
# M = 32 lost 9% with 8 (hence large weights only above 16 rows).
_MIN_PROGRAMS = 5 * _SMS // 2
_GEMV_PROGRAMS = 2 * _SMS  # two programs per H200 SM: enough weight loads in flight to stream at full bandwidth
# Whether nf4_matmul takes the GEMV bucket by default. Off: measured on the H200 (bench/nf4_gemm.py --sweep
# --sweep-m 1, gate/up 4096->28672), the default GEMV config took 57.4 us against 48.9 for the tl.dot path and
# the best of the GEMV sweep 46.1 (floor 17.1); batch-1 decode took 191 tok/s with it against 194 without.
SERVE_GEMV = False


# Whether the recorded configs' x_tma is served: yes since the twenty-seventh session, when the GPU tests passed with
# it (tests/test_nf4_kernel_gpu.py, bit-equal to the pointer loads) and the sweep timed the 64- and 128-row tiles
# faster with it at every M and shape (M = 96-160: 2-12%; M = 128 down 47.2 -> 41.0 us). HOTLORA_NF4_X_TMA=1 / 0
# overrides.
SERVE_X_TMA = True


def x_tma_served() -> bool:
    flag = os.environ.get("HOTLORA_NF4_X_TMA")
    return SERVE_X_TMA if flag is None else flag == "1"


def pick_config(m: int, n: int, k: int, gemv: bool | None = None, alone: bool = False) -> Nf4Config:
    """The launch config for x [m, k] @ W[n, k].T. gemv: take the GEMV bucket for m <= MAX_GEMV_M (True), or
    the tl.dot path (False); None: SERVE_GEMV. alone: no LoRA shrink runs beside the matmul (_ALONE_M1)."""
    gemv = SERVE_GEMV if gemv is None else gemv
    cfg, large = next((c, big) for hi, c, big in _CONFIGS if m <= hi and (gemv or not c.gemv))
    if os.environ.get("HOTLORA_NF4_TAIL") == "0" and cfg.tail_m:  # the configs before tails (bench comparisons)
        cfg, large = next((c, big) for hi, c, big in _CONFIGS if m <= hi and not c.tail_m and not c.gemv)
    if os.environ.get("HOTLORA_NF4_TMA") == "0":  # the configs before TMA (bench comparisons in one build)
        cfg, large = (cfg, None) if m > 256 else (replace(cfg, tma=False, x_tma=False),
                                                   large and replace(large, tma=False, x_tma=False))
    if not x_tma_served():  # x by pointer loads (the recorded configs before x_tma)
        cfg, large = replace(cfg, x_tma=False), large and replace(large, x_tma=False)
    if alone and m == 1 and not cfg.gemv:
        cfg, large = _ALONE_M1
    if large is not None and n * k >= LARGE_WEIGHT:
        cfg = large
        if m % 16 == 0 and k >= _X_FIRST_K and cfg.swap_ab and cfg.warps == 2:
            cfg = replace(cfg, swap_ab=False)
    if cfg.gemv:
        chunks = triton.cdiv(triton.cdiv(k, 128), cfg.k_groups)
        return replace(cfg, split_k=_fewest_splits(triton.cdiv(n, cfg.block_n), _GEMV_PROGRAMS, chunks, cfg.split_k))
    if cfg.split_k == BY_SMS:
        return replace(cfg, split_k=split_for_sms(triton.cdiv(m, cfg.rows) * triton.cdiv(n, cfg.block_n), k))
    if n >= 16384 and cfg.split_k > 1 and not cfg.dense:
        cfg = replace(cfg, split_k=cfg.split_k // 2)
    while cfg.split_k > 1 and cfg.split_k > triton.cdiv(k, 128):  # small K: no more slices than groups
        cfg = replace(cfg, split_k=cfg.split_k // 2)
    if not cfg.dense and (m <= 16 or (m <= 64 and n * k >= LARGE_WEIGHT)):
        tiles = triton.cdiv(m, cfg.rows) * triton.cdiv(n, cfg.block_n)
        cfg = replace(cfg, split_k=_fewest_splits(tiles, _MIN_PROGRAMS, k // 128, least=cfg.split_k))
    return cfg


# nf4_regs_kernel (the looked-up weights as mma.sync's register operand, Gluon) for M <= MAX_REGS_M. Up to 8 rows: 8
# x-rows and 64 weight rows over 4 warps, 3-group cp.async rings, the fewest K slices (of at least 4 groups) that make
# 512 programs, twice that for wide outputs (9-16 rows: the forty-first session's note below). Swept on the H200
# (bench/nf4_gemm.py --regs, thirty-second session, us, recorded tl.dot config -> this): M = 4 and 8 q/k/v 13.0-13.2 ->
# 12.1-12.2, gate/up 43.4-43.5 -> 39.8-40.1, down 23.9-24.2 -> 22.6-22.8, o 9.3-9.5 -> 9.4-9.6; M = 1 (the matmul beside
# a LoRA shrink) q/k/v 12.3 -> 11.5, gate/up 43.1 -> 40.2, down 23.7 -> 22.9, o 9.3 -> 8.9. At M = 16 it lost (q/k/v
# 13.1 -> 13.9, down 24.4 -> 26.2). Its loop has 12% fewer sm_90 instructions than the tl.dot kernel's (4.69 against
# 5.33 per weight value, bench/nf4_sass.py), and both stay near 2.2x their read pattern's time (bench/nf4_read.py:
# gate/up's codes stream in ~18.8 us read alone). Engine (Llama-3-8B shape, decode tok/s): batch 4 986 -> 1,014-1,018,
# batch 8 1,909 -> 1,961-1,973, batch 1 259 -> 259-261.
# Thirty-fifth session, the group steps unrolled (one CTA barrier a group, no masks on even shapes, 80 registers;
# _nf4_regs_gluon): M = 1 / 4 / 8 q/k/v 11.7 / 12.1 / 12.1 -> 10.9 / 11.5 / 11.5, o 8.9 / 9.4 / 9.5 -> 8.4 / 9.0 / 9.0,
# gate/up 39.8 / 39.4 / 39.6 -> 36.2 / 35.6 / 36.0, down 22.8 / 22.5 / 22.4 -> 20.3 / 21.0 / 21.2; 2- and 4-group
# rings and a 72-register cap lost against the served 3 groups and no cap.
# Thirty-sixth session (--regs-grid, M = 1 and 8): 2 warps by 32 or 64 rows, 4 warps by 128, and slices of 2-16 groups
# (any count, not only powers of two) lost or tied everywhere; e.g. q/k/v at M = 1, 4-group slices (served) 10.9,
# 5-group 13.0, 2-group 15.1, 8-group 11.3; gate/up 8-group (served) 36.3, 4-group 37.6, 16-group 39.9. 16 x-rows
# (--regs, M = 16) against the tl.dot tile: q/k/v 13.5 against 12.6, o 9.6 / 9.6, gate/up 44.1 / 44.4, down 23.5 / 24.3,
# so MAX_REGS_M stays 8.
# Thirty-ninth session, the lookup's halves merged by xor (_nf4_triton._prmt_asm; 152 ALU instructions a group against
# 168): M = 1 / 4 / 8 q/k/v 10.9 / 11.6 / 11.6 -> 10.6 / 11.2 / 11.1, o 8.5 / 8.9 / 9.1 -> 8.3 / 8.6 / 8.7, gate/up
# 36.3 / 35.2 / 35.6 -> 35.6 / 35.0 / 35.4, down 20.5 / 21.2 / 21.6 -> 20.0 / 20.2 / 20.7.
# Fortieth session, the first fill's code bytes copied before the PDL wait (_nf4_regs_gluon): M = 1 / 4 / 8 q/k/v
# 10.7 / 11.1 / 11.1 -> 10.5 / 10.7 / 10.7, o 8.3 / 8.6 / 8.7 -> 8.1 / 8.3 / 8.3-8.4, gate/up 35.8 / 35.3 / 35.8 ->
# 34.9 / 34.4 / 34.9, down 19.9 / 20.1 / 20.3 -> 19.5 / 19.7 / 19.8.
# Forty-first session, 9-16 rows (--regs at M = 12 and 16, then the table at 9 / 12 / 16, us, tl.dot tile -> 16
# x-rows): q/k/v 12.3 / 12.4 / 12.4 -> 11.7 / 12.0 / 11.9, o 9.5 / 9.5 / 9.6 -> 9.5 / 9.5 / 9.4, gate/up 43.0 / 43.2 /
# 43.5 -> 42.3 / 41.1 / 41.1, down 24.0 / 24.2 / 24.2 -> 22.0 / 22.1 / 22.0. 16 x-rows take 114 registers (4 programs
# an SM, 528 on the H200), so the K slices are the fewest that make _REGS16_PROGRAMS programs (q/k/v 4: 8 took
# 13.3-13.8, 768 programs in 1.5 waves) of at most _REGS_STRAIGHT_GROUPS groups (gate/up 2: 41.0 against 41.9 at 4; one
# slice would run as a loop); caps of 80 and 96 registers lost 5-60%. Engine at batch 16 (decode tok/s, two runs
# against one): base 4,340-4,372 against 4,230, one adapter 3,791-3,802 against 3,736, 16 distinct 3,353-3,365 against
# 3,196.
# HOTLORA_NF4_REGS=0 / 1 overrides SERVE_REGS.
MAX_REGS_M = 16
SERVE_REGS = True
_REGS_PROGRAMS = 512
_REGS16_PROGRAMS = 384
_REGS_STRAIGHT_GROUPS = 16  # _nf4_regs_gluon.UNROLL_ITERS: slices up to this many groups are straight-line code


def regs_served() -> bool:
    flag = os.environ.get("HOTLORA_NF4_REGS")
    return SERVE_REGS if flag is None else flag == "1"


def regs_config(m: int, n: int, k: int) -> Nf4Config | None:
    """nf4_regs_kernel's config for x [m, k] @ W[n, k].T where it is served (m <= MAX_REGS_M), else None: 8 x-rows
    up to 8, 16 above."""
    if m > MAX_REGS_M or not regs_served():
        return None
    if m > 8:
        split = _fewest_splits(triton.cdiv(n, 64), _REGS16_PROGRAMS, k // 512)
        while triton.cdiv(triton.cdiv(k, 128), split) > _REGS_STRAIGHT_GROUPS and 2 * split <= k // 512:
            split *= 2
        return Nf4Config(16, 64, split, warps=4, stages=3, regs=True, lookup=LOOKUP_PRMT)
    split = _fewest_splits(triton.cdiv(n, 64), _REGS_PROGRAMS, k // 512)
    if n >= 16384 and 2 * split <= k // 512:
        split *= 2
    return Nf4Config(8, 64, split, warps=4, stages=3, regs=True, lookup=LOOKUP_PRMT)


# nf4_ss_kernel (both wgmma operands in shared memory; a lookup warpgroup fills a bf16 weight ring beside two MMA
# warpgroups, Hopper) for large weights at SS_MIN_M-SS_MAX_M rows, in place of the 256x128 tl.dot tile (385-512) and
# of dense + cuBLAS (384, 513-768): 256 rows of x by 128 weight rows, the fewest K slices whose waves are 90% full
# (a grid of 1.4 waves takes 2 waves' time: launch_ss sends a last wave at most half full to 64-row programs). Swept
# on the H200 (bench/nf4_ss.py and nf4_gemm.py, thirty-fourth session, us; before -> this, cuBLAS bf16 in
# brackets): M = 512 gate/up 262-263 -> 203-224 (175-182), down 130-133 -> 110-112 (89-90, 2 slices; 4 took
# 124-127); M = 384 gate/up 244 -> 218 (140), down 130 -> 105 (73). At 288-320 rows gate/up lost to dense + cuBLAS
# (273 and 256 against 219 and 224; down still won, 106-114 against 117), so it starts at 384. q/k/v and o lost to
# dense + cuBLAS at 512 (65.1 against 59.6, 46.1 against 42.4), and at M = 2048 every shape did (gate/up 871 against
# 768, down 427 against 389).
# Served again (thirty-eighth session) after one session off: the engine replays prefill steps from CUDA graphs
# (server/model/graphs.py), and from graphs it made them faster (bench/prefill_steps.py --graphs, H200): steps of
# 384 tokens 16.7 ms against 17.9, 448-512 (the 512-token graph) 17.0-17.3 against 19.8-20.0, 256 (not reached)
# 11.5 against 11.6. Run eagerly, as the thirty-seventh session measured, it made them 1.2-1.7x slower: each call
# builds two tensor descriptors and their layouts and makes two Gluon launches, ~180 us of host time for gate/up
# against ~57 (dense + cuBLAS), and an eager step is bound by the host. HOTLORA_NF4_SS=0 / 1 overrides SERVE_SS.
# At 768 and 1024 rows (thirty-eighth session, H200, us, against dense + cuBLAS; cuBLAS bf16 in brackets):
# bench/nf4_ss.py timed gate/up 320 against 372 (280) and 414 against 462 (363), down 175 (4 slices) against 188 (144)
# and 213 (1 slice) against 226 (175); bench/nf4_gemm.py, served, gate/up 350 and 450, down 192 and 219 (its usual
# 5-10% above nf4_ss.py's). In the engine (bench/prefill_steps.py --graphs) steps of 768 tokens took 26.0 ms against
# 26.5 (min 25.5 against 26.2), of 1024 33.1 against 32.9 (512: 17.9 against 20.6, same run): served to 768. Down at
# 768 rows took 203 us with the 2 slices of "the fewest that make 90% of a wave" (1.45 waves): the slices are now the
# fewest whose waves are 90% full (or whose last wave the tail launch takes). At 1536-2048 only down at 1536 won (314
# against 334, 2 slices).
SS_MIN_M, SS_MAX_M = 384, 768
SERVE_SS = True


def ss_served() -> bool:
    flag = os.environ.get("HOTLORA_NF4_SS")
    return SERVE_SS if flag is None else flag == "1"


def ss_config(m: int, n: int, k: int) -> Nf4Config | None:
    """nf4_ss_kernel's config for x [m, k] @ W[n, k].T where it is served (large weights at SS_MIN_M-SS_MAX_M rows),
    else None."""
    if not SS_MIN_M <= m <= SS_MAX_M or n * k < LARGE_WEIGHT or not ss_served():
        return None
    rows, cols, split = triton.cdiv(m, 256), triton.cdiv(n, 128), 1
    while 2 * split <= k // 128:  # one program an SM: a grid of 1.4 waves takes 2 waves' time
        programs = rows * cols * split
        if 10 * programs >= 9 * triton.cdiv(programs, _SMS) * _SMS or (split == 1 and ss_tail_cols(rows, cols, _SMS)):
            break
        split *= 2
    return Nf4Config(256, 128, split, warps=8, scale=SCALE_VALUES, lookup=LOOKUP_PRMT, ss=True)


def ss_tail_cols(rows: int, cols: int, sms: int) -> int:
    """Where one launch of rows x cols nf4_ss_kernel programs (one K slice) would leave a last wave at most half full,
    the column tiles its full waves cover (launch_ss sends the rest to a second launch of 64-row programs); else 0."""
    full = rows * cols // sms * sms // rows
    return full if full and 0 < rows * (cols - full) <= sms // 2 else 0


def split_for_sms(tiles: int, k: int) -> int:
    """The fewest K slices (a power of two, at most K's 128-column groups) that give every SM a program."""
    return _fewest_splits(tiles, _SMS, k // 128)


def _fewest_splits(tiles: int, programs: int, chunks: int, most: int | None = None, least: int = 1) -> int:
    """The fewest K slices (`least` doubled, each with a chunk, at most `most`) that make `programs` programs."""
    split = least
    while (most is None or split < most) and tiles * split < programs and 2 * split <= chunks:
        split *= 2
    return split
