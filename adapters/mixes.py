"""The registry's table of mixes: canonical spelling -> the MixVersion over the current component versions.

A mix is cached like an adapter: its device slot (one slot of the summed rank, see compose.py) stays
resident and LRU-evictable after its requests finish, and the next request for the same mix over the
same component versions reuses it. A hot swap or delete of any component retires every mix over the
old version: it leaves the table (the next request builds a new MixVersion on the new version, with a
new id, so it never shares prefix-cache KV with the old one), and its slot is freed now if idle, else
when its last running sequence releases it; running sequences finish on the old weights.
Only the engine thread uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hotlora.adapters.cache import LoraSlotCache
from hotlora.adapters.compose import StagedMix, staged_mix
from hotlora.adapters.mixspec import MixSpec
from hotlora.adapters.peft_format import AdapterError

if TYPE_CHECKING:
    from hotlora.adapters.registry import AdapterVersion
    from hotlora.adapters.staging import StagedAdapter

MAX_CACHED_MIXES = 256  # table entries (not device slots): the oldest are dropped beyond it


@dataclass(eq=False)
class MixVersion:
    """One mix over fixed component versions: what a sequence holds on to, as it holds an AdapterVersion.

    `name` is the canonical spelling; `version` comes from the registry's version counter (the
    prefix-cache namespace). `staging` keeps each component's host copy once read, until the mix is
    copied to the device, so that the host budget trimming one component's copy while another is
    still being read cannot make the mix wait for ever."""

    name: str
    spec: MixSpec
    components: list[AdapterVersion]
    version: int
    error: str | None = None  # a component failed to load or the copy failed: requests for the mix fail
    host: None = None  # never kept (StagedMix points at the components' copies); cleared on failures
    staging: list[StagedAdapter | None] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return sum(v.config.rank for v in self.components)


class MixTable:
    def __init__(self, cache: LoraSlotCache, max_rank: int, capacity: int = MAX_CACHED_MIXES) -> None:
        self.cache, self.max_rank, self.capacity = cache, max_rank, capacity
        self.mixes: OrderedDict[str, MixVersion] = OrderedDict()

    def get(self, spec: MixSpec, components: list[AdapterVersion], new_id: Callable[[], int]) -> MixVersion:
        """The cached mix of `spec` over exactly these component versions, or a new one.

        Raises AdapterError when the summed rank is above the server's maximum LoRA rank."""
        key = spec.canonical
        mix = self.mixes.get(key)
        if mix is not None and all(a is b for a, b in zip(mix.components, components, strict=True)):
            self.mixes.move_to_end(key)
            return mix
        rank = sum(v.config.rank for v in components)
        if rank > self.max_rank:
            ranks = " + ".join(f"{v.name} r={v.config.rank}" for v in components)
            raise AdapterError(f"adapter mix {key!r} has summed rank {rank} ({ranks}), above the server's "
                               f"maximum LoRA rank {self.max_rank} (raise it with --max-lora-rank)")
        if mix is not None:  # a component changed without passing through retire() (cannot happen today)
            self._retire(key)
        mix = MixVersion(key, spec, list(components), new_id(), staging=[None] * len(components))
        self.mixes[key] = mix
        while len(self.mixes) > self.capacity:
            self._retire(next(iter(self.mixes)))
        return mix

    def is_current(self, mix: MixVersion) -> bool:
        return self.mixes.get(mix.name) is mix

    def retire_component(self, version: AdapterVersion) -> None:
        """`version` was replaced or deleted: every mix over it leaves the table."""
        for key in [k for k, m in self.mixes.items() if any(c is version for c in m.components)]:
            self._retire(key)

    def _retire(self, key: str) -> None:
        mix = self.mixes.pop(key)
        mix.staging = [None] * len(mix.components)
        self.cache.evict(mix)  # freed now if idle; else the registry frees it on the last release
        self.cache.evictions.pop(mix, None)

    def staged(self, mix: MixVersion, host: Callable[[AdapterVersion], StagedAdapter | None]) -> StagedMix | None:
        """What to copy to the device for `mix`, once every component's host copy is in; None while one
        is still being read (all reads run at once). Raises AdapterError if a component failed to load."""
        if mix.error is not None:
            raise AdapterError(mix.error)
        for i, v in enumerate(mix.components):
            if mix.staging[i] is None:
                try:
                    mix.staging[i] = host(v)
                except AdapterError as exc:
                    mix.error = f"adapter mix {mix.name!r}: {exc}"
                    raise AdapterError(mix.error) from None
        if any(h is None for h in mix.staging):
            return None
        staged = staged_mix(list(mix.staging), [c.weight for c in mix.spec.components])
        mix.staging = [None] * len(mix.components)  # the copy holds them now
        return staged

    def names(self) -> list[str]:
        return list(self.mixes)
