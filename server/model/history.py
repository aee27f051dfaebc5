"""Each sequence's token ids as one growing int64 tensor, for the processors that read a row's history.

The penalties count a row's prompt and generated tokens every step. Copying them out of the sequence's
Python list each step costs O(history) in Python objects (64 rows x 4,096 tokens: ~18 ms of host time a step,
more than a decode step on the GPU); here a sequence's ids are kept in a tensor that only the new tokens are
appended to, and a step reads views of it.
"""

from __future__ import annotations

import weakref

import torch

from hotlora.server.engine.sequence import Sequence


class TokenHistory:
    """Sequence -> int64 [len(seq)] CPU tensor of its token ids (a view of a buffer grown by doubling); the
    entry goes with its sequence (weak keys)."""

    def __init__(self) -> None:
        self._bufs: weakref.WeakKeyDictionary[Sequence, tuple[torch.Tensor, int]] = weakref.WeakKeyDictionary()

    def ids(self, seq: Sequence) -> torch.Tensor:
        ids = seq.token_ids
        buf, n = self._bufs.get(seq, (None, 0))
        if buf is None or n > len(ids) or buf.numel() < len(ids):
            grown = torch.empty(max(64, 2 * len(ids)), dtype=torch.int64)
            if buf is not None and n <= len(ids):
                grown[:n] = buf[:n]
            else:
                n = 0
            buf = grown
        if n < len(ids):
            buf[n : len(ids)] = torch.tensor(ids[n:], dtype=torch.int64)
        self._bufs[seq] = (buf, len(ids))
        return buf[: len(ids)]
