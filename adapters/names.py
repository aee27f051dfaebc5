"""The adapter name rule, shared by the store, the HTTP API and the admin client (which must not import the store's
torch-backed parsing just to check a name)."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def name_error(name: object) -> str | None:
    """Why `name` cannot name an adapter, or None if it can: 1-64 characters from A-Z a-z 0-9 . _ -, not '.' or
    '..' (so that it is one safe path segment, on disk and in a URL)."""
    if isinstance(name, str) and NAME_RE.fullmatch(name) and name not in (".", ".."):
        return None
    return f"invalid adapter name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - (not '.' or '..')"
