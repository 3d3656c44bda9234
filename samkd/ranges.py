"""Value ranges, declared once by the code that owns a value and gathered by :func:`samkd.config.rules` for
the config checks: ``build_detector`` and ``model.num_classes`` refuse the same values with the same words."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Range:
    """``ok(value)`` says whether a value is allowed; ``must`` says what it must be (``"must be >= 1"``)."""

    ok: Callable[[float], bool]
    must: str

    def allows(self, value) -> bool:
        return math.isfinite(value) and self.ok(value)

    def check(self, what: str, value) -> None:
        """``ValueError("<what>: <must>, got <value>")`` unless ``value`` is allowed."""
        if not self.allows(value):
            raise ValueError(f"{what}: {self.must}, got {value!r}")


def at_least(n) -> Range:
    return Range(lambda v: v >= n, f"must be >= {n}")


def between(lo, hi, lo_open: bool = False) -> Range:
    return Range(lambda v: (lo < v if lo_open else lo <= v) and v <= hi, f"must be in {'[('[lo_open]}{lo}, {hi}]")


POSITIVE = Range(lambda v: v > 0, "must be > 0")
