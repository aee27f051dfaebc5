"""Adapter mixes by name: the text of a `model` field such as "sql*0.7+chat*0.3".

A mix is a sum of registered adapter names, each with an optional weight (default 1.0). Its meaning is
PEFT's `add_weighted_adapter(names, weights, combination_type="cat")`:

    delta_W[module] = sum over components i targeting module: w_i * scale_i * B_i @ A_i

Adapter names are [A-Za-z0-9._-]{1,64} (adapters/store.py), so '*' and '+' never occur in a name and a
mix is recognised by containing either. Weights are decimal numbers, signed or not ("chat*-0.5",
"x*1e-1"). Pure Python (no torch): the API side parses mixes to answer malformed ones with a 400.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_COMPONENTS = 8
_NAME = r"[A-Za-z0-9._-]{1,64}"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_COMPONENT = re.compile(rf"\s*(?P<name>{_NAME})\s*(?:\*\s*(?P<weight>{_NUMBER})\s*)?")


class MixError(ValueError):
    """A malformed mix (the API answers 400); the message says what is wrong and what a mix looks like."""


@dataclass(frozen=True, slots=True)
class MixComponent:
    name: str
    weight: float


@dataclass(frozen=True, slots=True)
class MixSpec:
    components: tuple[MixComponent, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    @property
    def canonical(self) -> str:
        """One spelling per mix (spaces dropped, every weight written out): the key mixes are cached by."""
        return "+".join(f"{c.name}*{c.weight!r}" for c in self.components)


def is_mix(text: str) -> bool:
    return "*" in text or "+" in text


def _malformed(text: str, why: str) -> MixError:
    return MixError(
        f"malformed adapter mix {text!r}: {why}; a mix is adapter names joined by '+', each with an "
        "optional weight after '*', e.g. \"sql*0.7+chat*0.3\""
    )


def parse_mix(text: str) -> MixSpec:
    """Parse a mix; MixError if it is malformed, names an adapter twice, or has more than MAX_COMPONENTS."""
    components: list[MixComponent] = []
    pos = 0
    while True:
        match = _COMPONENT.match(text, pos)
        if match is None:
            raise _malformed(text, f"expected an adapter name at character {pos + 1}")
        weight = float(match["weight"]) if match["weight"] is not None else 1.0
        if not math.isfinite(weight):
            raise _malformed(text, f"the weight of {match['name']!r} is not a finite number")
        components.append(MixComponent(match["name"], weight))
        pos = match.end()
        if pos == len(text):
            break
        if text[pos] != "+":
            raise _malformed(text, f"unexpected {text[pos]!r} at character {pos + 1}")
        pos += 1
    if len(components) > MAX_COMPONENTS:
        raise MixError(f"adapter mix {text!r} has {len(components)} components; at most {MAX_COMPONENTS} are allowed")
    names = [c.name for c in components]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _malformed(text, f"{', '.join(map(repr, twice))} appears more than once (sum the weights instead)")
    return MixSpec(tuple(components))
