"""The one cost model: what an answer at exit k really costs, in MFLOPs per input.

A multi-exit network is K stages with one head after each (docs/method.md). Two costs of exit k
(0-based here, 1-based in every user-facing number):

- anytime cost: stages 0..k plus head k. Exit k evaluated on its own, as in the papers' per-exit
  tables (RDI-Nets, NEO-KD). Reported beside the per-exit accuracies, never used for a budget.
- staged cost: stages 0..k plus heads 0..k. What early exit really runs: every head on the way was
  evaluated and rejected before the input went deeper. The budget header, the calibration table,
  the policy's offline cost, the response, the metrics and the benchmarks all speak in this one.

Per-stage and per-head costs are measured with torch's `FlopCounterMode` at export/training time
(`MultiExitNetwork.cost_profile`); this module is numpy- and torch-free so serving can import it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Sequence


class CostError(ValueError):
    """A cost profile that cannot describe a network (wrong lengths, negative or non-finite costs)."""


@dataclass(frozen=True)
class CostProfile:
    """Per-stage and per-head MFLOPs (one input, FlopCounterMode's count / 1e6), cheapest exit first."""

    stage_mflops: tuple[float, ...]
    head_mflops: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.stage_mflops) != len(self.head_mflops) or not self.stage_mflops:
            raise CostError(f"a cost profile needs one head cost per stage cost, got {len(self.stage_mflops)} "
                            f"stages and {len(self.head_mflops)} heads")
        for value in (*self.stage_mflops, *self.head_mflops):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise CostError(f"costs must be finite, non-negative numbers of MFLOPs, got {value!r}")

    @property
    def num_exits(self) -> int:
        return len(self.stage_mflops)

    @property
    def staged(self) -> list[float]:
        """Cost of an answer at exit k under staged early exit: stages 0..k plus heads 0..k (MFLOPs)."""
        return list(accumulate(s + h for s, h in zip(self.stage_mflops, self.head_mflops)))

    @property
    def anytime(self) -> list[float]:
        """Cost of exit k evaluated alone: stages 0..k plus head k (MFLOPs), the papers' per-exit figure."""
        return [s + h for s, h in zip(accumulate(self.stage_mflops), self.head_mflops)]

    @property
    def full(self) -> float:
        """The whole network to its last exit without the early heads (the full graph): anytime cost of exit K."""
        return self.anytime[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON form; the derived lists ride along for readers, `from_dict` re-derives and checks them."""
        return {"stage_mflops": list(self.stage_mflops), "head_mflops": list(self.head_mflops),
                "staged_mflops": self.staged, "anytime_mflops": self.anytime}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostProfile":
        """Inverse of `to_dict`; raises CostError when the stored derived lists disagree with the parts."""
        try:
            profile = cls(tuple(float(v) for v in d["stage_mflops"]), tuple(float(v) for v in d["head_mflops"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CostError):
                raise
            raise CostError(f"cost profile is malformed: {exc}") from None
        for key, derived in (("staged_mflops", profile.staged), ("anytime_mflops", profile.anytime)):
            stored = d.get(key)
            if stored is not None and not _close(stored, derived):
                raise CostError(f"{key} {stored} does not match the per-stage and per-head costs ({derived})")
        return profile


def _close(a: Sequence[float], b: Sequence[float], rel: float = 1e-9) -> bool:
    return len(a) == len(b) and all(math.isclose(float(x), y, rel_tol=rel, abs_tol=1e-12) for x, y in zip(a, b))
