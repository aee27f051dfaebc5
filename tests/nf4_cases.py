"""NF4 weights for the kernel tests (CPU interpreter and GPU): bitsandbytes storage, its packed group, and the
fp32 reference every result is held to."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import torch

from hotlora.kernels.nf4 import pack_nf4, pack_nf4_group

# Llama-3-8B projections as the engine runs them (K, member output widths): q/k/v and gate/up fused
LLAMA = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
         "down": (14336, (4096,))}

# relative Frobenius error of y against the fp32 reference, by x dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def quantize(widths: tuple[int, ...], k: int, dtype: torch.dtype, device: str = "cpu"):
    """bnb NF4 storage of random weights, one per member width: [(packed, state), ...]."""
    members = []
    for n in widths:
        w = torch.randn(n, k, dtype=dtype, device=device) * 0.05
        members.append(bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
    return members


def packed_group(members):
    return pack_nf4_group([pack_nf4(p, s) for p, s in members])


def reference(x: torch.Tensor, members, bias: torch.Tensor | None) -> torch.Tensor:
    """x.float() @ dequantize_4bit(W).float().T (+ bias): bitsandbytes' own dequantization."""
    w = torch.cat([bnbF.dequantize_4bit(p, s) for p, s in members]).to(x.dtype).float()
    y = x.float() @ w.T
    return y if bias is None else y + bias.float()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.float() - ref).norm() / ref.norm()).item()
