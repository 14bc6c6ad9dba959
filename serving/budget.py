"""The compute budget of one request: X-Compute-Budget header(s), the default and the operator ceiling.

The budget (MFLOPs per input, staged cost: early_exit/costs.py) is a hard cap: the deepest exit a
request may reach is the deepest whose staged cost fits it, and it selects the calibration row
(thresholds) of the largest tabulated budget not above it (early_exit.policy.entry_for_budget).

Header rules
- The name matches in any letter case (TorchServe keeps the client's case).
- Sent several times in different cases, every value must be valid and the smallest applies. Repeats in
  the same spelling are merged by TorchServe's frontend before the handler sees them (only one value
  arrives), so a client must not rely on sending one name twice.
- Absent: the manifest's default budget.
- An operator ceiling (handler option `max_budget_mflops`) clips a larger budget, default included;
  the answer reports `budget_clipped`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Sequence

from early_exit.manifest import Manifest
from early_exit.policy import BudgetEntry, BudgetError, deepest_exit_within, entry_for_budget
from serving.decoding import DecodedInput
from serving.rejections import RejectReason, RequestRejected

BUDGET_HEADER = "x-compute-budget"


class BudgetSource(str, Enum):
    HEADER = "header"
    DEFAULT = "default"


@dataclass(frozen=True)
class BudgetDecision:
    """What governs one request: its budget, where it came from, and what the budget allows."""

    budget_mflops: float  # applied (after the ceiling)
    requested_mflops: float  # from the header(s) or the default, before the ceiling
    source: BudgetSource
    clipped: bool  # the operator ceiling lowered it
    entry: BudgetEntry | None  # calibration row (None when answering from the full graph)
    max_exit: int  # 0-based deepest exit allowed


@dataclass(frozen=True)
class Prepared:
    """A decoded, validated request and the budget decision that governs it (kept here, not in handler.py:
    TorchServe's loader wants exactly one class in the handler module)."""

    request: DecodedInput
    budget: BudgetDecision


class BudgetResolver:
    """Budgets for one served model: `resolve(headers)` -> BudgetDecision or RequestRejected."""

    def __init__(self, manifest: Manifest, answer_costs: Sequence[float], ceiling: float | None,
                 use_calibration: bool) -> None:
        """answer_costs: cost of each answer the server can give (staged costs, or the full graph's alone)."""
        self.manifest = manifest
        self.costs = list(answer_costs)
        self.ceiling = ceiling
        self.use_calibration = use_calibration

    def error(self, reason: RejectReason, message: str) -> RequestRejected:
        lo, hi = self.costs[0], self.costs[-1]
        return RequestRejected(reason, message, valid_budget_mflops={"min": lo, "full_depth": hi},
                               hint=f"send X-Compute-Budget as a finite number >= {lo:g} (MFLOPs per input); "
                                    f"budgets of {hi:g} or more allow full depth")

    def _parse(self, text: str) -> float:
        text = text.strip()
        try:
            value = float(text)
        except ValueError:
            raise self.error(RejectReason.INVALID_BUDGET, f"X-Compute-Budget '{text[:64]}' is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise self.error(RejectReason.INVALID_BUDGET,
                             f"X-Compute-Budget must be finite and non-negative, got '{text[:64]}'")
        return value

    def resolve(self, headers: Mapping[str, str]) -> BudgetDecision:
        """Raises RequestRejected (INVALID_BUDGET, BUDGET_BELOW_MINIMUM) for a budget no exit can honour."""
        values = [self._parse(str(v)) for k, v in headers.items()
                  if isinstance(k, str) and k.lower() == BUDGET_HEADER and v is not None]
        if values:
            requested, source = min(values), BudgetSource.HEADER
        else:
            requested, source = self.manifest.default_budget_mflops, BudgetSource.DEFAULT
        clipped = self.ceiling is not None and requested > self.ceiling
        budget = min(requested, self.ceiling) if clipped and self.ceiling is not None else requested
        try:
            if not self.use_calibration:
                deepest_exit_within(budget, self.costs)  # the full graph is the only answer: it must fit
                return BudgetDecision(budget, requested, source, clipped, None, self.manifest.num_exits - 1)
            entry = entry_for_budget(budget, self.manifest.calibration, self.costs)
        except BudgetError as exc:
            raise self.error(RejectReason.BUDGET_BELOW_MINIMUM, str(exc)) from None
        return BudgetDecision(budget, requested, source, clipped, entry, entry.max_exit)
