"""Writing TOML inline: the ``VALUE`` of a ``--set KEY=VALUE`` and small one-key-per-line documents.

For tools that produce pipelines or overrides (``benchmarks/suite.py`` records the ``--set`` strings
that rebuild each of its runs; the config fuzz test writes mutated pipelines). Every table is
written inline, which TOML allows for any document; ``tomllib.loads(dumps(doc)) == doc`` for every
``doc`` of TOML's types (tested).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["dumps", "key", "value"]


def key(k: str) -> str:
    """``k`` as a TOML key: bare where TOML allows it, else a quoted string."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def value(v: Any) -> str:
    """``v`` (bool, int, float, str, list/tuple, dict) as an inline TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are TOML basic-string escapes (\uXXXX included)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def dumps(doc: dict) -> str:
    """``doc`` as a TOML document, one top-level key per line (tables inline)."""
    return "".join(f"{key(k)} = {value(v)}\n" for k, v in doc.items())
