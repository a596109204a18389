"""Argument checks shared by the public API."""

from __future__ import annotations

import operator


def as_int(value, what: str) -> int:
    """``value`` as a Python int: ints and integer scalars of numpy or torch pass; bools, floats (even 8.0) and
    everything else raise ValueError naming ``what``."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{what} must be an integer, got {value!r}")
