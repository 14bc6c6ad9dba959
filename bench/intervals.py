"""95% confidence intervals for accuracies (proportions) and for differences of two accuracies. Pure functions.

- `wilson`: the Wilson score interval of one proportion (Wilson 1927; Newcombe, "Two-sided confidence intervals
  for the single proportion", Statistics in Medicine 17, 1998, method 3: 81/263 -> 0.2553 to 0.3662).
- `newcombe_difference`: the hybrid score interval of p1 - p2 for two independent proportions (Newcombe,
  "Interval estimation for the difference between independent proportions", Statistics in Medicine 17, 1998,
  method 10: 56/70 - 48/80 -> 0.0524 to 0.3339), built from the two Wilson intervals.

bench-train compares neokd and adv on the SAME attacked images; treating the two accuracies as independent
ignores their positive correlation, which widens the interval: the difference's interval is conservative.

An accuracy from eval.json is a float count / n; `successes` recovers the count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Interval:
    """A confidence interval [low, high] (proportions or differences of proportions, unitless)."""

    low: float
    high: float

    def to_list(self) -> list[float]:
        return [self.low, self.high]

    def __str__(self) -> str:
        return f"[{self.low:.3f}, {self.high:.3f}]"


def successes(accuracy: float, n: int) -> int:
    """The count behind `accuracy` = count / `n` (eval.json stores the float); ValueError if it is not one."""
    if n <= 0:
        raise ValueError(f"an accuracy over {n} images")
    count = round(accuracy * n)
    if abs(count - accuracy * n) > 1e-6 * n or not 0 <= count <= n:
        raise ValueError(f"accuracy {accuracy!r} is not a count out of {n}")
    return count


def wilson(count: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of the proportion `count` / `n` (two-sided, coverage set by `z`; default 95%)."""
    if n <= 0 or not 0 <= count <= n:
        raise ValueError(f"{count} successes out of {n}")
    p = count / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def accuracy_interval(accuracy: float, n: int, z: float = Z95) -> Interval:
    """Wilson interval of an accuracy measured on `n` images."""
    return wilson(successes(accuracy, n), n, z)


def newcombe_difference(count1: int, n1: int, count2: int, n2: int, z: float = Z95) -> Interval:
    """Newcombe's hybrid score interval of p1 - p2 (p_i = count_i / n_i, independent samples)."""
    p1, p2 = count1 / n1, count2 / n2
    a, b = wilson(count1, n1, z), wilson(count2, n2, z)
    d = p1 - p2
    return Interval(d - math.sqrt((p1 - a.low) ** 2 + (b.high - p2) ** 2),
                    d + math.sqrt((a.high - p1) ** 2 + (p2 - b.low) ** 2))


def difference_interval(accuracy1: float, n1: int, accuracy2: float, n2: int, z: float = Z95) -> Interval:
    """Newcombe interval of accuracy1 - accuracy2, measured on n1 and n2 images."""
    return newcombe_difference(successes(accuracy1, n1), n1, successes(accuracy2, n2), n2, z)
