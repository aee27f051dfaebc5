"""hotlora.server: the HTTP API, the engine and the model runner (see DESIGN.md's map).

Importing it drops the source checkout's root from ``sys.path`` where it stands there (Python puts the working
directory first for ``python -m``, and Ray puts the driver's in its workers'): from that root the checkout's
folders ``kernels/``, ``server/`` and ``adapters/`` would import as top-level packages of those names, and
``kernels`` is a PyPI package that transformers (5.25 and later) and bitsandbytes import. hotlora's own modules
import as ``hotlora.*`` through the install's mapping, never from that root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _drop_checkout_root() -> None:
    root = Path(__file__).resolve().parent.parent
    if not (root / "kernels" / "__init__.py").is_file():
        return
    sys.path[:] = [p for p in sys.path if not isinstance(p, str) or Path(p or os.getcwd()).resolve() != root]


_drop_checkout_root()
