"""Keep Triton's CPU interpreter (TRITON_INTERPRET=1) working with NumPy >= 2.4.

The interpreter holds scalars as 1-element arrays and converts them with ``int(array)``, which NumPy 2.4
rejects, so ``range(0, rank, BLOCK)`` over a loaded scalar fails (triton-lang/triton#9171, fixed upstream
after Triton 3.6). Installed only under the interpreter; it wraps the interpreter's own patch hook.
"""

from __future__ import annotations

import os


def install() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_hotlora_compat", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._hotlora_compat = True
    interpreter._patch_lang_tensor = patched
