"""The base of every request model: unknown fields refused, never silently ignored; NaN and infinities refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
