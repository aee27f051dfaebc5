"""Where hotlora's Triton kernels run and how they are launched; shared by the kernel modules.

Programmatic dependent launch (PDL, Hopper and newer): a kernel launched with ``pdl_args(t)`` may be scheduled
while the kernel before it on the stream is still running (once all of that kernel's programs have started or
finished), so the launch latency and the ramp-up of one kernel hide behind the tail of the one before. Such a
kernel must start with ``pdl_enter(PDL)``: every program waits there until the kernel before it has completed
and its writes are visible, before it reads or writes anything, so a kernel's completion still implies its
predecessor's. The one exception is data that the kernel right before does not write (NF4 codes and scales, lookup
tables, adapter weights): a kernel may read that before its wait (nf4_regs_kernel's first fill, the LoRA expand's B
rows). Every kernel lets its dependents start only after its own wait, so what was written further back is complete
and visible by then. Under CUDA-graph capture the launch attribute becomes a programmatic edge of the graph.
HOTLORA_NO_PDL=1 turns it off (launches as before, the waits compile away).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors the torch references, unless HOTLORA_TRITON_CPU=1
    (with TRITON_INTERPRET=1: the kernels on Triton's interpreter)."""
    return t.is_cuda or os.environ.get("HOTLORA_TRITON_CPU") == "1"


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _on_hopper(t: torch.Tensor) -> bool:
    """t's CUDA device is Hopper or newer."""
    return _hopper_or_newer(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl(t: torch.Tensor) -> bool:
    """Programmatic dependent launch for a kernel on t's device: compiled CUDA on Hopper or newer, unless
    HOTLORA_NO_PDL=1."""
    if not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("HOTLORA_NO_PDL") == "1":
        return False
    return _on_hopper(t)


def tma(t: torch.Tensor) -> bool:
    """Tensor-memory-accelerator copies (tensor descriptors) for a kernel on t's device: Hopper or newer, or
    Triton's interpreter (which runs descriptor loads as plain loads)."""
    if not t.is_cuda:
        return os.environ.get("TRITON_INTERPRET") == "1"
    return _on_hopper(t)


def pdl_args(t: torch.Tensor) -> dict:
    """Launch keywords of a kernel that starts with pdl_enter(PDL): its PDL constexpr and Triton's launch flag."""
    return pdl_kwargs(pdl(t))


def pdl_kwargs(on: bool) -> dict:
    """The PDL constexpr and Triton's launch flag, for a launch whose caller already decided (pdl(t))."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """A PDL kernel's first statement (module docstring): wait for the kernel before it, then let the next one
    be scheduled (its programs wait in turn)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
