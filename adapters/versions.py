"""The registry's records: one version of an adapter name, its statistics, and what `info` reports.

A version is what a sequence holds on to: a hot swap makes a new one, and the old one lives on (with its
device slot) until its last sequence finishes.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from hotlora.adapters.peft_format import WEIGHTS_NAME, AdapterConfig
from hotlora.adapters.staging import StagedAdapter


class UnknownAdapterError(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"adapter {self.name!r} does not exist"


@dataclass(eq=False)
class AdapterVersion:
    """One upload of one name: what a sequence holds on to."""

    name: str
    path: Path
    version: int
    config: AdapterConfig
    sha256: str | None  # known once the weights are read
    file_bytes: int
    host: StagedAdapter | None = None
    loading: Future | None = None  # the read (or the staging of an upload); its result is the host copy
    error: str | None = None


@dataclass(slots=True)
class AdapterInfo:
    name: str
    rank: int
    alpha: float
    target_modules: list[str]
    nbytes: int
    sha256: str | None  # None until the adapter is first loaded
    residency: str  # "disk" | "host" | "device"
    on_host: bool  # a host copy is kept (also while on the device, until the host budget drops it)
    pinned: bool
    last_used: float | None
    loads: int
    hits: int
    evictions: int


@dataclass(slots=True)
class NameStats:
    loads: int = 0
    hits: int = 0
    last_used: float | None = None
    pinned: bool = False
    evictions: int = 0  # of the name's earlier versions (the cache counts the current one's)


def hash_weights(v: AdapterVersion) -> None:
    digest = hashlib.sha256()
    with open(v.path / WEIGHTS_NAME, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    v.sha256 = v.sha256 or digest.hexdigest()
