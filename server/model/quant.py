"""The base model's linear layers: NF4 (bitsandbytes) or dense, behind one constructor.

On CUDA (in_features a multiple of 64) the weights are re-laid-out once into hotlora.kernels.nf4's
layout, whose values are bit-identical, and every forward is the fused Triton dequant-GEMM; projections
that share their input (q/k/v, gate/up) are fused into one weight by ``fuse_nf4``. The CPU path stays
bitsandbytes':

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
import os
import sys

import torch
from torch import nn

# bitsandbytes tries the Hugging Face kernels hub for a CPU GEMM (never reachable here) and warns when
# it is missing; when the repo root is on sys.path it even imports our kernels/ folder by mistake.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402

from hotlora.kernels.nf4 import Finish, NF4Weight, nf4_dequantize, nf4_matmul, pack_nf4, pack_nf4_group  # noqa: E402

if "kernels" in sys.modules and not hasattr(sys.modules["kernels"], "get_kernel"):
    del sys.modules["kernels"]  # our own folder, imported under the wrong name by bitsandbytes

QUANT_CHOICES = ("nf4", "none")
NF4_BLOCKSIZE = 64
_CPU_REPACK = bnbF.has_avx512bf16()  # the condition bnb.nn.Linear4bit checks (support_avx512bf16_for_cpu)
# HOTLORA_NF4_TRITON=0 keeps bnb.matmul_4bit on CUDA too (the reference path, for comparisons)
_FUSED_ON_CUDA = os.environ.get("HOTLORA_NF4_TRITON", "1") != "0"


class DenseLinear(nn.Module):
    """y = x @ W.T + b, in the weight's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, finish: Finish | None = None) -> torch.Tensor:
        """finish: unused (no split-K sums here; see nf4_matmul)."""
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


class NF4Linear(nn.Module):
    """NF4 weight (blocksize 64, double-quantized absmax), computed through bnb.matmul_4bit.

    packed_weight: uint8 [(out*in+1)//2, 1], two 4-bit codes per byte (bitsandbytes' layout); on CUDA
        None once re-laid-out into `fused` (kernels.nf4.NF4Weight), the storage the Triton kernel reads.
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
        self.quant_state = state
        self.register_buffer("bias", None if bias is None else bias.to(weight.dtype))
        self.cpu_repack = _CPU_REPACK
        self._cpu_packed: tuple[torch.Tensor, bnbF.QuantState] | None = None
        self.fused: NF4Weight | None = None
        if weight.is_cuda and self.in_features % 64 == 0 and _FUSED_ON_CUDA:
            self.fused = pack_nf4(packed, state)
            packed = None  # the re-laid-out copy replaces bitsandbytes' storage
        self.register_buffer("packed_weight", packed)

    def _weight_for(self, x: torch.Tensor) -> tuple[torch.Tensor, bnbF.QuantState]:
        if x.device.type == "cpu" and self.cpu_repack and not x.requires_grad:
            if self._cpu_packed is None:
                # mutates the state it is given (de-nests absmax): work on a copy
                self._cpu_packed = bnbF._convert_weight_packed_for_cpu(
                    self.packed_weight, copy.deepcopy(self.quant_state)
                )
            return self._cpu_packed
        return self.packed_weight, self.quant_state

    def forward(self, x: torch.Tensor, finish: Finish | None = None) -> torch.Tensor:
        """finish: see nf4_matmul (the fused kernel's path only)."""
        if self.fused is not None:
            return nf4_matmul(x.to(self.compute_dtype), self.fused, self.bias, finish=finish).to(x.dtype)
        weight, state = self._weight_for(x)
        out = bnb.matmul_4bit(x.to(self.compute_dtype), weight, bias=self.bias, quant_state=state)
        return out.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The NF4 weight as a dense [out, in] tensor in the compute dtype (for references and tests)."""
        if self.fused is not None:
            return nf4_dequantize(self.fused).to(self.compute_dtype)
        return bnbF.dequantize_4bit(self.packed_weight, self.quant_state).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, compute={self.compute_dtype}"


class NF4Group(nn.Module):
    """Projections of one input (q/k/v, gate/up) as one NF4 weight: one fused dequant-GEMM, outputs split.

    The members' `fused` weights become row views of the group's, so no weight is stored twice.
    """

    def __init__(self, members: list[NF4Linear]) -> None:
        super().__init__()
        self.weight = pack_nf4_group([m.fused for m in members])
        self.compute_dtype = members[0].compute_dtype
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(m.out_features, dtype=self.compute_dtype, device=self.weight.codes.device)
             if b is None else b for m, b in zip(members, biases, strict=True)])
        start = 0
        for m in members:
            m.fused = self.weight.rows(start, start + m.out_features)
            start += m.out_features

    def forward(self, x: torch.Tensor, finish: Finish | None = None) -> list[torch.Tensor]:
        """Each member's output [T, out_i], as column views of one [T, sum(out)] result; finish: see nf4_matmul."""
        y = nf4_matmul(x.to(self.compute_dtype), self.weight, self.bias, finish=finish).to(x.dtype)
        return list(y.split(self.weight.splits, dim=1))


def fuse_nf4(modules: list[nn.Module]) -> NF4Group | None:
    """One NF4Group when every module is an NF4Linear on the fused-kernel path, else None."""
    if len(modules) > 1 and all(isinstance(m, NF4Linear) and m.fused is not None for m in modules):
        return NF4Group(modules)
    return None


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
