"""One-line validation errors shared by configs and layers: name the field, the value, what is allowed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


class RunError(Exception):
    """A run (or study, or analysis) cannot start or go on; the message is one line for the user."""


def fail(field: str, value: Any, allowed: str) -> None:
    """Raise ValueError('field=value: allowed')."""
    raise ValueError(f"{field}={value!r}: {allowed}")


def one_line(err: BaseException) -> str:
    """An exception's message on one line (yaml's, orbax's and the OS's span several), its type when it has none."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def is_int(value: Any) -> bool:
    """True for Python and numpy ints, False for bools."""
    # bool is an int subclass, but True as a width or a count is almost surely a mistake.
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def int_at_least(field: str, value: Any, low: int) -> None:
    """Check value is an int >= low (bools are refused)."""
    if not is_int(value) or value < low:
        fail(field, value, "must be a positive int" if low == 1 else f"must be an int >= {low}")


def positive_int(field: str, value: Any) -> None:
    """Check value is an int >= 1 (bools are refused)."""
    int_at_least(field, value, 1)


def positive_ints(field: str, values: Any) -> None:
    """Check values is a non-empty sequence of ints >= 1."""
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
        fail(field, values, "must be a non-empty tuple of positive ints")
    if not all(is_int(v) and v >= 1 for v in values):
        fail(field, tuple(values), "each entry must be a positive int")


def optional_positive_int(field: str, value: Any) -> None:
    """Check value is None or an int >= 1."""
    if value is not None:
        positive_int(field, value)


def positive_number(field: str, value: Any) -> None:
    """Check value is a real number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        fail(field, value, "must be a number > 0")


def non_negative_number(field: str, value: Any) -> None:
    """Check value is a real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        fail(field, value, "must be a number >= 0")


def choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
    """Check value is one of allowed."""
    allowed = list(allowed)
    if value not in allowed:
        fail(field, value, "allowed: " + ", ".join(repr(a) for a in allowed))
