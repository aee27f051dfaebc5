"""Tokenizer loading (local folders only; nothing is fetched from a hub)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_tokenizer(folder: Path | None) -> Any | None:
    """The HF tokenizer in `folder`, or None for checkpoints without one (random weights)."""
    if folder is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
