"""The base model's linear layers: NF4 (bitsandbytes) or dense, behind one constructor.

NF4 is exactly what peft's QLoRA reference runs, `bnb.nn.Linear4bit(quant_type="nf4",
compress_statistics=True)` with blocksize 64: the same `quantize_4bit` call at build time and the same
`bnb.matmul_4bit` call per forward, so outputs are bit-identical to it. That includes bitsandbytes'
CPU fast path: on a CPU with AVX512-BF16, Linear4bit repacks the weight on its first inference call
and then computes in bfloat16 (absmax de-nested to bf16) whatever the input dtype; we do the same, on
a copy, so `packed_weight`/`quant_state` always keep bitsandbytes' standard layout (what the fused
GPU dequant-GEMM reads).
"""

from __future__ import annotations

import copy
import logging
import sys

import torch
from torch import nn

# bitsandbytes tries the Hugging Face kernels hub for a CPU GEMM (never reachable here) and warns when
# it is missing; when the repo root is on sys.path it even imports our kernels/ folder by mistake.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402

if "kernels" in sys.modules and not hasattr(sys.modules["kernels"], "get_kernel"):
    del sys.modules["kernels"]  # our own folder, imported under the wrong name by bitsandbytes

QUANT_CHOICES = ("nf4", "none")
NF4_BLOCKSIZE = 64
_CPU_REPACK = bnbF.has_avx512bf16()  # the condition bnb.nn.Linear4bit checks (support_avx512bf16_for_cpu)


class DenseLinear(nn.Module):
    """y = x @ W.T + b, in the weight's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


class NF4Linear(nn.Module):
    """NF4 weight (blocksize 64, double-quantized absmax), computed through bnb.matmul_4bit.

    packed_weight: uint8 [(out*in+1)//2, 1], two 4-bit codes per byte (bitsandbytes' layout).
    quant_state: bnb QuantState (absmax uint8 per 64 weights + nested state2 per 256 absmax, offset).
    Built on the weight's device; it is not meant to move afterwards.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype
        packed, state = bnbF.quantize_4bit(
            weight.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4",
            quant_storage=torch.uint8,
        )
        self.register_buffer("packed_weight", packed)
        self.quant_state = state
        self.register_buffer("bias", None if bias is None else bias.to(weight.dtype))
        self.cpu_repack = _CPU_REPACK
        self._cpu_packed: tuple[torch.Tensor, bnbF.QuantState] | None = None

    def _weight_for(self, x: torch.Tensor) -> tuple[torch.Tensor, bnbF.QuantState]:
        if x.device.type == "cpu" and self.cpu_repack and not x.requires_grad:
            if self._cpu_packed is None:
                # mutates the state it is given (de-nests absmax): work on a copy
                self._cpu_packed = bnbF._convert_weight_packed_for_cpu(
                    self.packed_weight, copy.deepcopy(self.quant_state)
                )
            return self._cpu_packed
        return self.packed_weight, self.quant_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, state = self._weight_for(x)
        out = bnb.matmul_4bit(x.to(self.compute_dtype), weight, bias=self.bias, quant_state=state)
        return out.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The NF4 weight as a dense [out, in] tensor in the compute dtype (for references and tests)."""
        return bnbF.dequantize_4bit(self.packed_weight, self.quant_state).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, compute={self.compute_dtype}"


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: str) -> nn.Module:
    """A base-model linear from an [out, in] weight (and optional [out] bias); quant in QUANT_CHOICES."""
    if weight.dim() != 2:
        raise ValueError(f"linear weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features {weight.shape[0]}")
    if quant == "nf4":
        return NF4Linear(weight, bias)
    if quant == "none":
        return DenseLinear(weight, bias)
    raise ValueError(f"unknown quant {quant!r}; choose one of {QUANT_CHOICES}")
