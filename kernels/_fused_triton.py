"""One launch for a projection's NF4 matmul and its LoRA shrink (kernels.nf4.nf4_matmul with a claimed shrink).

The shrink and the matmul both read only x; run apart they need a second stream (a fork and a join per
projection: cross-stream graph edges) or a second launch on the critical path. Here the grid's first
``shrink_programs`` programs are the shrink's (tile, split, slice) programs, in lora_shrink_kernel's order, and
the rest are the matmul's (tile, split) programs, so the two share the GPU inside one kernel; the kernel after
it (the split-K reduce or the LoRA finish) sees both done.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import pdl_enter
from ._lora_triton import shrink_program
from ._nf4_triton import nf4_program


@triton.jit
def nf4_shrink_kernel(
    x_ptr, w_ptr, absmax_ptr, lut_ptr, bias_ptr, y_ptr, part_ptr,
    M, N, K, NUM_G, stride_xm, stride_wn, stride_an, stride_ym,
    lx_ptr, stride_lxt,
    a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    count_ptr, sorted_ptr, tile_info_ptr,
    LK, k_per_split, shrink_programs, shrink_tiles, nf4_tiles,
    HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCALE: tl.constexpr,
    SWAP_AB: tl.constexpr, LOOKUP: tl.constexpr, V_DTYPE: tl.constexpr, TABLE_REGS: tl.constexpr,
    PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    ITERS: tl.constexpr, GROUP_M: tl.constexpr, EVEN: tl.constexpr,
    L_SPLIT_K: tl.constexpr, L_BLOCK_M: tl.constexpr, L_BLOCK_R: tl.constexpr, L_BLOCK_K: tl.constexpr,
    L_IEEE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Programs [0, shrink_programs): lora_shrink_kernel's (tile, split, slice) = (p % shrink_tiles,
    p // shrink_tiles % L_SPLIT_K, p // (shrink_tiles * L_SPLIT_K)); the rest: nf4_matmul_kernel's (tile, split)
    = (q % nf4_tiles, q // nf4_tiles), q = p - shrink_programs. Arguments: the matmul's, then (L*) the
    shrink's, named as in those kernels."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    if pid < shrink_programs:
        rest = pid // shrink_tiles
        shrink_program(
            pid % shrink_tiles, rest % L_SPLIT_K, rest // L_SPLIT_K,
            lx_ptr, stride_lxt, a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2, rank0_ptr, rank1_ptr,
            rank2_ptr, ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos, count_ptr, sorted_ptr, tile_info_ptr,
            LK, k_per_split, L_SPLIT_K, L_BLOCK_M, L_BLOCK_R, L_BLOCK_K, L_IEEE,
        )  # fmt: skip
    else:
        q = pid - shrink_programs
        nf4_program(q % nf4_tiles, q // nf4_tiles, x_ptr, w_ptr, absmax_ptr, lut_ptr, bias_ptr, y_ptr, part_ptr,
                    M, N, K, NUM_G, stride_xm, stride_wn, stride_an, stride_ym, HAS_BIAS, W_DTYPE, PRECISION,
                    SCALE, SWAP_AB, LOOKUP, V_DTYPE, TABLE_REGS, PREFETCH, BLOCK_M, BLOCK_N, SPLIT_K, ITERS,
                    GROUP_M, EVEN)


def shrink_constexprs(consts: dict) -> dict:
    """lora_shrink_kernel's constexprs under this kernel's names."""
    return {"L_" + k: v for k, v in consts.items()}


__all__ = ["nf4_shrink_kernel", "shrink_constexprs"]
