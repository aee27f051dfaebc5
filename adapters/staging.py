"""Host copies of adapters as the device copy wants them: the raw safetensors file in one buffer.

A cold load reads adapter_model.safetensors straight into one buffer (pinned memory on CUDA), parses
only the header, and validates names, shapes and dtypes on the header's records (`Span`s): no torch call per
tensor, no per-tensor host copy, no host-side cast, no host-side finiteness scan (the slowest part on a CPU:
about a second for an 84 MB adapter on a loaded CPU). The device copy then moves the whole file in one
transfer and casts, transposes and checks finiteness on the device (adapters/poolwrite.py).

Where the file lays a module's layers out evenly (as safetensors does: every layer's tensors form one block
of the same size, the blocks in the sorted order of their names, so layer 10 comes before layer 2), a
`Stack` says so: the module's A (or B) of every layer is then one strided view of the buffer, and the copy
writes all layers with one call instead of one view per layer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import struct
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from hotlora.adapters.gilyield import yielding
from hotlora.adapters.peft_format import WEIGHTS_NAME, AdapterConfig, AdapterError, LoraAdapter, adapter_from_tensors

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Span(NamedTuple):
    """Where one tensor lies in a file's buffer. It answers the header checks as a tensor would (shape, dim(),
    is_floating_point(), nbytes), so a file is validated without a torch view per tensor: on a reading thread
    every torch call re-takes the GIL, and the engine thread waits behind it (bench/adapter_load.py --engine:
    the steps that grew during a load were the ones the parse overlapped)."""

    offset: int  # bytes into the buffer
    dtype: torch.dtype
    shape: tuple[int, ...]

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Stack:
    """One (module, side) of every layer as a single strided view: the tensor at file position k (in byte
    order) starts at `offset + k * step` (bytes into the buffer) and belongs to layer order[k]."""

    offset: int
    step: int
    dtype: torch.dtype
    shape: tuple[int, int]  # one layer's tensor
    order: tuple[int, ...]  # a permutation of range(len(order)): every layer from 0 has the module

    def view(self, typed: torch.Tensor) -> torch.Tensor:
        """[layers, *shape] in file order, over `typed`: the buffer reinterpreted as `dtype` from byte 0."""
        size = self.dtype.itemsize
        return typed.as_strided((len(self.order), *self.shape), (self.step // size, self.shape[1], 1),
                                self.offset // size)


@dataclass(slots=True)
class StagedAdapter:
    """weights: (layer, module) -> (A [r, in], B [out, r]) as stored (any float dtype); when `raw` is set they
    are the tensors' Spans in it (`spans`), and `views(raw)` makes the tensors (over `raw` or a device copy of
    it). check_finite: finiteness is still to be checked (on the device). stacks: module -> (A, B) as Stacks,
    for the modules whose layers the file lays out evenly."""

    config: AdapterConfig
    weights: dict[tuple[int, str], tuple[torch.Tensor | Span, torch.Tensor | Span]]
    nbytes: int
    sha256: str  # "" when not computed here (the registry hashes files when they are registered)
    raw: torch.Tensor | None = None  # uint8, the whole file
    data_start: int = 0  # where the tensor data begins in `raw`
    check_finite: bool = False
    stacks: dict[str, tuple[Stack, Stack]] = field(default_factory=dict)

    @property
    def spans(self) -> dict[tuple[int, str], tuple[Span, Span]] | None:
        """The weights' Spans in `raw`; None for an adapter that holds tensors (no `raw`)."""
        return self.weights if self.raw is not None else None

    def views(self, raw: torch.Tensor) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """The weights as views into `raw` (this adapter's buffer or a device copy of it)."""
        flat = _typed_views(raw, {(key, side): span for key, pair in self.spans.items()
                                  for side, span in enumerate(pair)})
        return {key: (flat[key, 0], flat[key, 1]) for key in self.spans}


def _view(raw: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape) * dtype.itemsize
    return raw[offset : offset + n].view(dtype).view(shape)


def _typed_views(raw: torch.Tensor, spans: dict) -> dict:
    """key -> view of (offset, dtype, shape) in `raw`: one as_strided per tensor on `raw` reinterpreted once
    per dtype (each torch call re-takes the GIL, which a loaded server's other threads hold)."""
    typed: dict[torch.dtype, torch.Tensor] = {}
    out = {}
    for key, (offset, dtype, shape) in yielding(spans.items()):
        if offset % dtype.itemsize:  # unaligned (refused by parse_staged; kept general here)
            out[key] = _view(raw, offset, dtype, shape)
            continue
        if dtype not in typed:
            typed[dtype] = raw[: raw.numel() - raw.numel() % dtype.itemsize].view(dtype)
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        out[key] = typed[dtype].as_strided(shape, stride, offset // dtype.itemsize)
    return out


def from_adapter(adapter: LoraAdapter) -> StagedAdapter:
    """An adapter that is in memory already (an upload, validated by the store)."""
    return StagedAdapter(adapter.config, adapter.weights, adapter.nbytes, adapter.sha256)


def read_header(raw: torch.Tensor, size: int) -> tuple[dict, int]:
    if size < 8:
        raise AdapterError(f"{WEIGHTS_NAME} is not a valid safetensors file: too short")
    (n,) = struct.unpack("<Q", raw[:8].numpy().tobytes())
    if n > size - 8:
        raise AdapterError(f"{WEIGHTS_NAME} is not a valid safetensors file: header past the end")
    try:
        header = json.loads(raw[8 : 8 + n].numpy().tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{WEIGHTS_NAME} is not a valid safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _spans(header: dict, start: int, size: int) -> dict[str, Span]:
    """name -> Span of each tensor the header lists, its dtype, size and bounds checked."""
    spans = {}
    for key, info in yielding(header.items()):
        try:
            dtype = _DTYPES.get(info["dtype"])
            shape = tuple(map(int, info["shape"]))
            begin, end = map(int, info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{WEIGHTS_NAME} is not a valid safetensors file: bad entry {key!r}") from None
        if dtype is None:
            raise AdapterError(f"tensor {key!r} has dtype {info['dtype']}; LoRA weights must be floating point")
        if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - start:
            raise AdapterError(f"{WEIGHTS_NAME} is not a valid safetensors file: bad offsets for {key!r}")
        if (start + begin) % dtype.itemsize:
            raise AdapterError(f"tensor {key!r} is not aligned in {WEIGHTS_NAME}")
        spans[key] = Span(start + begin, dtype, shape)
    return spans


def read_raw(folder: Path, pin: bool, lock: AbstractContextManager | None = None) -> torch.Tensor:
    """adapter_model.safetensors in one uint8 buffer (pinned if `pin`): the disk read, nothing else.
    `lock` is held while the buffer is allocated (a pinned allocation must not overlap a graph capture)."""
    path = Path(folder) / WEIGHTS_NAME
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AdapterError(f"{WEIGHTS_NAME} is missing in the adapter folder") from None
    with lock or contextlib.nullcontext():
        raw = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    with open(path, "rb") as f:
        if f.readinto(memoryview(raw.numpy())) != size:
            raise AdapterError(f"{WEIGHTS_NAME} changed while it was read")
    return raw


def parse_staged(raw: torch.Tensor, folder: Path, name: str) -> StagedAdapter:
    """Validate a file read by read_raw against its adapter_config.json, on its header's Spans (no tensor is
    made here); finiteness is left to the device."""
    size = raw.numel()
    header, start = read_header(raw, size)
    adapter = adapter_from_tensors(Path(folder), name, _spans(header, start, size), check_finite=False)
    pairs = adapter.weights
    return StagedAdapter(adapter.config, pairs, adapter.nbytes, "", raw, start, True, find_stacks(pairs))


def find_stacks(pairs: dict[tuple[int, str], tuple[Span, Span]]) -> dict[str, tuple[Stack, Stack]]:
    """module -> (A, B) Stacks for each module whose A and B tensors are each evenly spaced in the file,
    one per layer from 0 up (spans as StagedAdapter.spans)."""
    by_module: dict[str, list[tuple[int, tuple, tuple]]] = {}
    for (layer, module), (a, b) in pairs.items():
        by_module.setdefault(module, []).append((layer, a, b))
    out = {}
    for module, entries in by_module.items():
        a = _stack([(layer, span) for layer, span, _ in entries])
        b = _stack([(layer, span) for layer, _, span in entries])
        if a is not None and b is not None:
            out[module] = (a, b)
    return out


def _stack(spans: list[tuple[int, Span]]) -> Stack | None:
    """The Stack of these (layer, (offset, dtype, shape)) spans, or None if they are not one."""
    spans = sorted(spans, key=lambda s: s[1][0])
    order = tuple(layer for layer, _ in spans)
    offsets = [offset for _, (offset, _, _) in spans]
    _, dtype, shape = spans[0][1]
    nbytes = math.prod(shape) * dtype.itemsize
    step = offsets[1] - offsets[0] if len(offsets) > 1 else nbytes
    regular = (
        sorted(order) == list(range(len(order))) and len(shape) == 2
        and all(d == dtype and s == shape for _, (_, d, s) in spans)
        and step >= nbytes and step % dtype.itemsize == 0 and offsets[0] % dtype.itemsize == 0
        and all(b - a == step for a, b in itertools.pairwise(offsets))
    )  # fmt: skip
    return Stack(offsets[0], step, dtype, tuple(shape), order) if regular else None


def pinned_blocks(sizes: list[int], budget: int) -> list[int]:
    """The pinned blocks that loads of files of these sizes will ask torch's host allocator for, smallest
    first, within `budget` bytes: the allocator rounds every request up to a power of two and serves it only
    from a free block of that same size."""
    blocks, total = [], 0
    for size in sorted(1 << max(size - 1, 0).bit_length() for size in sizes if size > 0):
        if total + size > budget:
            break
        blocks.append(size)
        total += size
    return blocks


def warm_pinned(sizes: list[int], budget: int, lock: AbstractContextManager | None = None) -> int:
    """Allocate, then free into torch's pinned-host cache, the blocks of ``pinned_blocks``; the bytes pinned.

    A pinned allocation (cudaHostAlloc) takes the driver's lock while it pins its pages, and the engine
    thread's launches wait behind it: the first cold load of an 84 MB adapter during decode stretched one
    step from 5.9 to 54 ms on an H200 (bench/adapter_load.py --engine), the later ones, served from the
    cache, did not. Done at startup, the loads that follow find their blocks cached."""
    blocks = pinned_blocks(sizes, budget)
    with lock or contextlib.nullcontext():
        held = [torch.empty(b, dtype=torch.uint8, pin_memory=True) for b in blocks]
    del held
    return sum(blocks)
