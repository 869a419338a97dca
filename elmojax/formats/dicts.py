"""Nested dicts (configs, options.json, a dump's manifest) as flat {"a.b.c": value} dicts, to
compare them field by field."""

from __future__ import annotations

from typing import Mapping


def flatten(d: Mapping, prefix: str = "") -> dict:
    """{"lstm": {"dim": 16}} -> {"lstm.dim": 16}; an empty dict stays a value."""
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
