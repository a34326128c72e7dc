"""Our time against the machine's own floor, and the regression check built on it.

The floor of a step is the time the machine needs at its measured rates (``txl_fast.bench.machine``)
for the work the step cannot avoid (``txl_fast.bench.analytic``): FLOPs / matmul rate for an
evaluation segment or a prompt, bytes / read bandwidth for a decode step. ``fraction`` is floor /
our time: 1.0 would be the machine's limit. Both sides are best-of-several times, measured the
same way and alternated, so a loaded machine slows them alike.
"""
from __future__ import annotations

from typing import Sequence


def fraction(floor_seconds: float, seconds: float) -> float:
    """Our fraction of the floor: floor time / our time."""
    if not floor_seconds > 0 or not seconds > 0:
        raise ValueError(f"times must be positive, got floor {floor_seconds} s and {seconds} s")
    return floor_seconds / seconds


def check_fraction(what: str, floor_seconds: float, times: Sequence[float], minimum: float) -> float:
    """Our best time of ``times`` as a fraction of ``floor_seconds``; an AssertionError naming the
    numbers when it is below ``minimum``."""
    achieved = fraction(floor_seconds, min(times))
    assert achieved >= minimum, (
        f"{what}: best of {len(times)} runs {min(times) * 1e3:.2f} ms against a floor of {floor_seconds * 1e3:.2f} ms "
        f"is {achieved:.0%} of the floor, below the {minimum:.0%} required")
    return achieved
