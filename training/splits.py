"""Grouped splits: photos of one spot or part never sit on both sides of a split."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


class SplitError(ValueError):
    """The groups cannot be split as asked (too few groups, or no defects on one side)."""


def grouped_kfold(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(train_index, test_index)`` with whole groups on one side, classes balanced."""
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise SplitError(f"{n_groups} groups cannot make {n_splits} grouped folds")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    yield from splitter.split(np.zeros(len(labels)), labels, groups)


def grouped_holdout(
    labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split off about ``fraction`` of the groups as validation, with both classes in it.

    Tries the stratified grouped folds in turn and keeps the first whose validation side holds
    both classes; validation without defects cannot calibrate or set thresholds.
    """
    if not 0 < fraction < 1:
        raise SplitError("validation fraction must be between 0 and 1")
    n_splits = max(2, round(1 / fraction))
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise SplitError("need at least 2 groups to hold out validation data")
    n_splits = min(n_splits, n_groups)
    for train, val in grouped_kfold(labels, groups, n_splits, seed):
        if len(np.unique(labels[val])) == 2 and len(np.unique(labels[train])) == 2:
            return train, val
    raise SplitError(
        "no grouped validation split has both classes; add data or use fewer, larger groups"
    )


def assert_disjoint(groups: np.ndarray, *indices: np.ndarray) -> None:
    """Fail loudly if any group appears in more than one of the index sets."""
    seen: dict[str, int] = {}
    for side, index in enumerate(indices):
        for group in np.unique(groups[index]):
            if group in seen and seen[group] != side:
                raise SplitError(f"group {group!r} is on both sides of a split")
            seen[str(group)] = side
