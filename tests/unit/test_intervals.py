"""bench.intervals against the published examples (Newcombe 1998, both papers)."""
from __future__ import annotations

import pytest

from bench.intervals import accuracy_interval, difference_interval, newcombe_difference, successes, wilson


def test_wilson_matches_newcombes_single_proportion_examples() -> None:
    assert wilson(81, 263).to_list() == pytest.approx([0.2553, 0.3662], abs=1e-4)
    assert wilson(15, 148).to_list() == pytest.approx([0.0624, 0.1605], abs=1e-4)
    assert wilson(0, 20).to_list() == pytest.approx([0.0, 0.1611], abs=1e-4)
    assert wilson(1, 29).to_list() == pytest.approx([0.0061, 0.1718], abs=1e-4)


def test_newcombe_hybrid_score_matches_the_papers_method_10() -> None:
    assert newcombe_difference(56, 70, 48, 80).to_list() == pytest.approx([0.0524, 0.3339], abs=1e-4)
    assert newcombe_difference(9, 10, 3, 10).to_list() == pytest.approx([0.1705, 0.8090], abs=1e-4)
    assert newcombe_difference(6, 7, 2, 7).to_list() == pytest.approx([0.0582, 0.8062], abs=1e-4)


def test_accuracies_from_eval_json_recover_their_counts() -> None:
    assert successes(81 / 263, 263) == 81
    assert accuracy_interval(81 / 263, 263) == wilson(81, 263)
    assert difference_interval(0.8, 70, 0.6, 80) == newcombe_difference(56, 70, 48, 80)
    with pytest.raises(ValueError):
        successes(0.5, 263)  # 131.5 of 263 images is no count
    with pytest.raises(ValueError):
        wilson(3, 0)
