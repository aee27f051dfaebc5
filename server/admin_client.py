"""A small httpx client of the admin API (used by `hotlora adapters ...`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import httpx

from hotlora.adapters.names import name_error

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")


class AdminError(RuntimeError):
    pass


class AdminClient:
    def __init__(self, url: str, token: str | None, timeout: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach {self.http.base_url}: {exc}") from None
        if r.is_error:
            message = r.text
            with contextlib.suppress(ValueError, KeyError, TypeError):
                message = r.json()["error"]["message"]
            raise AdminError(f"HTTP {r.status_code}: {message}")
        return r.json()

    def upload(self, name: str, path: Path) -> dict[str, Any]:
        path = Path(path)
        with contextlib.ExitStack() as stack:
            if path.is_dir():
                missing = [n for n in PEFT_FILES if not (path / n).is_file()]
                if missing:
                    raise AdminError(f"{path} has no {', '.join(missing)} (a PEFT folder saved with safetensors)")
                files = [("files", (n, stack.enter_context(open(path / n, "rb")))) for n in PEFT_FILES]
            elif path.is_file() and path.name.lower().endswith(ARCHIVES):
                files = [("archive", (path.name, stack.enter_context(open(path, "rb"))))]
            else:
                raise AdminError(f"{path} is neither a PEFT folder nor a .tar.gz/.tgz/.tar/.zip archive")
            return self._call("POST", f"/admin/adapters/{_segment(name)}", files=files)

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/admin/adapters")["data"]

    def delete(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/admin/adapters/{_segment(name)}")

    def pin(self, name: str, pinned: bool) -> dict[str, Any]:
        return self._call("POST", f"/admin/adapters/{_segment(name)}/{'load' if pinned else 'unload'}")

    @staticmethod
    def format_table(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "no adapters"
        cols = ("name", "rank", "alpha", "residency", "pinned", "loads", "hits", "sha256", "target_modules")
        cells = [
            [
                str(r.get(c, ""))[:12]
                if c == "sha256"
                else ",".join(r.get(c, []))
                if c == "target_modules"
                else str(r.get(c, ""))
                for c in cols
            ]
            for r in rows
        ]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines = [cols, *cells]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _segment(name: str) -> str:
    """`name` for a URL path, checked first by the store's rule: a name with '#' or '?' was cut there (and
    uploaded as the name before it), and 'x/load' pinned x."""
    error = name_error(name)
    if error is not None:
        raise AdminError(error)
    return name
