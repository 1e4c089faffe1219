"""Per-item means with their standard errors: one formula for the evals and the alignment stages."""

from __future__ import annotations

import math
from typing import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard error of per-item scores (0 for a single item, NaN for none)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def paired_change(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the per-item differences ``after - before`` over the same items (item
    difficulty cancels out: the s.e. of a paired change is smaller than that of two independent means)."""
    return mean_stderr([a - b for a, b in zip(after, before, strict=True)])
