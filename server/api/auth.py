"""Bearer-token authentication of the admin routes (constant-time comparison)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import Request

from hotlora.server.api.errors import APIError

TOKEN_ENV = "HOTLORA_ADMIN_TOKEN"
DISABLED_MESSAGE = (
    "the admin API is disabled: start the server with HOTLORA_ADMIN_TOKEN=<token> in its environment or "
    "--admin-token-file FILE (a file holding the token), then send 'Authorization: Bearer <token>'"
)


def load_admin_token(token_file: Path | str | None = None, env: dict[str, str] | None = None) -> str | None:
    """The token from token_file if given, else from $HOTLORA_ADMIN_TOKEN; None when neither is set."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the admin token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"the admin token file {token_file} is empty")
        return token
    token = (os.environ if env is None else env).get(TOKEN_ENV, "").strip()
    return token or None


def check_bearer(expected: str | None, authorization: str | None) -> None:
    if expected is None:
        raise APIError(403, DISABLED_MESSAGE, code="admin_disabled")
    scheme, _, given = (authorization or "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(
            401,
            "missing bearer token: send 'Authorization: Bearer <admin token>'",
            code="invalid_token",
            headers=challenge,
        )
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise APIError(401, "invalid admin token", code="invalid_token", headers=challenge)


async def require_admin(request: Request) -> None:
    """FastAPI dependency: the app's admin token must match the request's bearer token."""
    check_bearer(request.app.state.hotlora.admin_token, request.headers.get("authorization"))
