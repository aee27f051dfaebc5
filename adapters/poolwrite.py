"""The copy stage of a cold load: a staged adapter written into its rows of the slot pools.

On CUDA the file's bytes are first moved to the device in one transfer; every write below then reads a view of
that device buffer and is queued on the cache's side stream (adapters/cache.py says who issues them, when).
Each torch call here re-takes the GIL, which a loaded server's other threads hold most of the time, so the
number of calls per load matters more than their size:

- a module whose layers the file lays out evenly (staging.Stack: what safetensors writes) is copied with one
  strided view per side: A as [layers, r, in] straight into the pool rows, B as [layers, out, r] transposed.
  When the file's layer order is not 0, 1, 2, ... (safetensors sorts names, so "layers.10" comes before
  "layers.2") the rows are written through index_copy_ with the order as a device index.
- any other module (layers_to_transform, mixed dtypes, an upload held as separate tensors) is stacked per
  module, or written layer by layer when some layers lack it (a zero delta there).

For the Llama-3-8B shape, r=16 on all seven projections, one copy made 954 torch calls (448 per-layer views
of the device buffer, 448 dtype reads for the finiteness check, 14 stacks ...) and now makes 55
(tests/test_adapter_poolwrite.py counts them).
"""

from __future__ import annotations

import torch

from hotlora.adapters.compose import StagedMix, fold
from hotlora.adapters.peft_format import TARGET_MODULES, finite_as
from hotlora.adapters.staging import Stack, StagedAdapter

Pools = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [layers, rows, in], B [layers, rows, out])


def file_order(num_layers: int) -> tuple[int, ...]:
    """The layer order of a file saved by safetensors (tensor names sorted as strings)."""
    return tuple(sorted(range(num_layers), key=lambda layer: f"{layer}."))


class PoolWriter:
    """Writes adapters into `pools` (on `device`) for a model of `num_layers` layers."""

    def __init__(self, pools: Pools, num_layers: int, device: torch.device) -> None:
        self.pools, self.num_layers, self.device = pools, num_layers, device
        self.dtype = next(iter(pools.values()))[0].dtype
        self._index: dict[tuple[int, ...], torch.Tensor] = {}
        self.order_index(file_order(num_layers))  # on the device from the start: no load pays for its transfer

    def write(self, start: int, adapter: StagedAdapter | StagedMix, to_device: bool) -> torch.Tensor | None:
        """Copy an adapter, or each component of a mix at its row offset per module, into the pool rows from
        `start`; the finiteness flag if it is still to check. `to_device`: move each file to the device first."""
        if not isinstance(adapter, StagedMix):
            return self.write_from(start, adapter, self._raw(adapter, to_device))
        offsets = dict.fromkeys(TARGET_MODULES, 0)
        flags = []
        for part, weight in adapter.parts:
            flag = self.write_from(start, part, self._raw(part, to_device), offsets, weight)
            if flag is not None:
                flags.append(flag)
            for m in part.config.target_modules:
                offsets[m] += part.config.rank
        return torch.stack(flags).all() if flags else None

    def _raw(self, adapter: StagedAdapter, to_device: bool) -> torch.Tensor | None:
        """The file's bytes where the copies read from: a device copy of them on CUDA."""
        if not to_device or adapter.raw is None:
            return adapter.raw
        return adapter.raw.to(self.device, non_blocking=True)

    def write_from(self, start: int, adapter: StagedAdapter, raw: torch.Tensor | None,
                   offsets: dict[str, int] | None = None, weight: float | None = None) -> torch.Tensor | None:
        """Copy (casting, B transposed) from `raw` (the file's bytes, or None: the adapter's own tensors) into
        the pool rows from `start` (+ offsets[module] for a mix component, whose A is folded with `weight` and
        its scale); the finiteness flag if still to check."""
        typed = _Typed(raw) if raw is not None else None
        weights = None  # the per-layer views, made only if a module is not a Stack
        for m in adapter.config.target_modules:
            first = start + (offsets[m] if offsets is not None else 0)
            rows = slice(first, first + adapter.config.rank)
            stacks = adapter.stacks.get(m) if typed is not None else None
            if stacks is not None and len(stacks[0].order) == self.num_layers:
                self._write_stacked(m, rows, stacks, typed, weight, adapter.config.scale)
                continue
            if weights is None:
                weights = adapter.weights if raw is None else adapter.views(raw)
            self._write_layers(m, rows, weights, weight, adapter.config.scale)
        if not adapter.check_finite:
            return None
        return _all_finite(adapter, raw, typed, self.dtype)

    def _write_stacked(self, m: str, rows: slice, stacks: tuple[Stack, Stack], typed: _Typed,
                       weight: float | None, scale: float) -> None:
        pool_a, pool_b = self.pools[m]
        sa, sb = stacks
        a, a_dtype = sa.view(typed(sa.dtype)), sa.dtype
        if weight is not None:
            a, a_dtype = fold(a, weight, scale), torch.float32
        self._put(pool_a[:, rows], a, a_dtype, sa.order)
        self._put(pool_b[:, rows], sb.view(typed(sb.dtype)).transpose(1, 2), sb.dtype, sb.order)

    def _put(self, dst: torch.Tensor, src: torch.Tensor, dtype: torch.dtype, order: tuple[int, ...]) -> None:
        """dst[order[k]] = src[k] for every layer k, casting from src's `dtype` (passed: reading a tensor's
        dtype is one more call)."""
        index = self.order_index(order)
        if index is None:
            dst.copy_(src, non_blocking=True)
            return
        if dtype != self.dtype:  # index_copy_ does not cast
            src = src.to(self.dtype)
        dst.index_copy_(0, index, src)

    def order_index(self, order: tuple[int, ...]) -> torch.Tensor | None:
        """`order` as an index tensor on the device (kept: files of one model share it); None for 0, 1, 2..."""
        if all(layer == k for k, layer in enumerate(order)):
            return None
        index = self._index.get(order)
        if index is None:
            # from pageable memory, non_blocking: staged by the driver at once, no wait for the stream's work
            index = self._index[order] = torch.tensor(order, dtype=torch.int64).to(self.device, non_blocking=True)
        return index

    def _write_layers(self, m: str, rows: slice, weights: dict, weight: float | None, scale: float) -> None:
        pairs = [weights.get((layer, m)) for layer in range(self.num_layers)]
        if weight is not None:
            pairs = [None if ab is None else (fold(ab[0], weight, scale), ab[1]) for ab in pairs]
        pool_a, pool_b = self.pools[m]
        if all(ab is not None for ab in pairs):
            pool_a[:, rows].copy_(torch.stack([a for a, _ in pairs]), non_blocking=True)
            pool_b[:, rows].copy_(torch.stack([b for _, b in pairs]).transpose(1, 2), non_blocking=True)
            return
        for layer, ab in enumerate(pairs):
            if ab is None:  # not targeted in this layer (layers_to_transform): a zero delta
                pool_a[layer, rows].zero_()
                pool_b[layer, rows].zero_()
            else:
                pool_a[layer, rows].copy_(ab[0], non_blocking=True)
                pool_b[layer, rows].copy_(ab[1].T, non_blocking=True)


class _Typed:
    """A byte buffer reinterpreted as each dtype asked for, from byte 0 (one view per dtype, made once)."""

    def __init__(self, raw: torch.Tensor) -> None:
        self.raw, self.n = raw, raw.numel()
        self._views: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        view = self._views.get(dtype)
        if view is None:
            view = self._views[dtype] = self.raw[: self.n - self.n % dtype.itemsize].view(dtype)
        return view


def _all_finite(adapter: StagedAdapter, raw: torch.Tensor, typed: _Typed, pool_dtype: torch.dtype) -> torch.Tensor:
    """One kernel over the file's data when it is all one dtype (as peft saves it), else one per tensor. Finite
    in the pools' dtype: a float64 1e300 is finite in the file and inf in a float32 pool."""
    dtypes = {span[1] for pair in adapter.spans.values() for span in pair}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        size = dtype.itemsize
        if adapter.data_start % size == 0 and (typed.n - adapter.data_start) % size == 0:
            return finite_as(typed(dtype)[adapter.data_start // size :], pool_dtype)
    weights = adapter.views(raw)
    return torch.stack([finite_as(t, pool_dtype) for ab in weights.values() for t in ab]).all()
