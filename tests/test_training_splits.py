"""The grouped splitters never put one group on both sides of a split."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from training.splits import SplitError, assert_disjoint, grouped_holdout, grouped_kfold


def _synthetic(seed: int, n_groups: int = 15, per_group: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"g{i}" for i in range(n_groups)], per_group)
    # Defects appear late in each group's time series, like the wear data.
    labels = np.concatenate(
        [(np.arange(per_group) > rng.integers(5, per_group)).astype(int) for _ in range(n_groups)]
    )
    return labels, groups


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("folds", [2, 3, 5])
def test_kfold_groups_never_on_both_sides(seed: int, folds: int) -> None:
    labels, groups = _synthetic(seed)
    seen_test: list[str] = []
    for train, test in grouped_kfold(labels, groups, folds, seed):
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(labels)
        seen_test.extend(np.unique(groups[test]))
    assert sorted(seen_test) == sorted(np.unique(groups))  # every group tested exactly once


@pytest.mark.parametrize("seed", range(5))
def test_holdout_is_grouped_and_has_both_classes(seed: int) -> None:
    labels, groups = _synthetic(seed)
    train, val = grouped_holdout(labels, groups, 0.2, seed)
    assert not set(groups[train]) & set(groups[val])
    assert set(labels[val]) == {0, 1}
    assert 0.05 < len(val) / len(labels) < 0.4


def test_holdout_refuses_when_no_split_has_defects() -> None:
    groups = np.array(["a"] * 10 + ["b"] * 10 + ["c"] * 10)
    labels = np.array([0] * 20 + [1] * 10)  # defects only in group c
    with pytest.raises(SplitError, match="both classes"):
        grouped_holdout(labels, groups, 0.34, 0)


def test_too_few_groups_for_folds() -> None:
    with pytest.raises(SplitError, match="groups"):
        list(grouped_kfold(np.array([0, 1, 0, 1]), np.array(["a", "a", "b", "b"]), 3, 0))


def test_assert_disjoint_detects_leak() -> None:
    groups = np.array(["a", "a", "b", "b"])
    with pytest.raises(SplitError, match="both sides"):
        assert_disjoint(groups, np.array([0, 2]), np.array([1, 3]))
    assert_disjoint(groups, np.array([0, 1]), np.array([2, 3]))
