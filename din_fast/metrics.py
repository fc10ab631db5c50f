"""The paper's metrics: AUC, user-weighted GAUC (eq. 10), RelaImpr (eq. 11) and log loss.

All are vectorized (sort-based, no Python loop over users) and accept numpy arrays, torch
tensors or sequences. Ties in the scores count half, i.e. tied scores get their average rank, so
``auc`` equals ``sklearn.metrics.roc_auc_score``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def _as_array(name: str, values, dtype: Optional[type]) -> np.ndarray:
    """``values`` as a 1-D array of ``dtype`` (``None``: the dtype they come with)."""
    if hasattr(values, "detach"):
        values = values.detach()
        # numpy has no bfloat16; float64 holds every floating dtype exactly.
        values = (values.double() if values.is_floating_point() else values).cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array if dtype is None else array.astype(dtype, copy=False)


def _labels(labels) -> np.ndarray:
    array = _as_array("labels", labels, np.float64)
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return array


def _groups(groups) -> np.ndarray:
    array = _as_array("groups", groups, None)
    if array.dtype.kind == "f":
        # A cast would truncate (ids 0.5 and 0.7 would become one user) or overflow past int64.
        whole = (np.abs(array) < 2.0 ** 63) & (array == np.round(array))
        if not whole.all():
            raise ValueError(f"groups must be integers (e.g. user ids), got {array[~whole][0]}")
    return array.astype(np.int64, copy=False)


def _check_lengths(**arrays: np.ndarray) -> None:
    sizes = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inputs must have one length, got {sizes}")


def grouped_auc(labels, scores, groups) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC of each group, ties as average ranks.

    Args:
        labels: ``[N]`` 0/1; scores: ``[N]`` floats; groups: ``[N]`` ints (e.g. user ids; floats must be
            whole numbers).

    Returns:
        ``(group ids [G], impressions per group [G], AUC per group [G])``; the AUC is NaN for a
        group that lacks one of the classes.
    """
    labels = _labels(labels)
    scores = _as_array("scores", scores, np.float64)
    groups = _groups(groups)
    _check_lengths(labels=labels, scores=scores, groups=groups)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.lexsort((scores, groups))
    labels, scores, groups = labels[order], scores[order], groups[order]
    n = labels.shape[0]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = groups[1:] != groups[:-1]
    group_index = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    # Runs of equal (group, score) share the average of their 1-based ranks inside the group.
    new_run = new_group.copy()
    new_run[1:] |= scores[1:] != scores[:-1]
    run_index = np.cumsum(new_run) - 1
    rank = np.arange(1, n + 1, dtype=np.float64) - group_start[group_index]
    run_rank = np.bincount(run_index, weights=rank) / np.bincount(run_index)
    ranks = run_rank[run_index]
    positives = np.bincount(group_index, weights=labels)
    sizes = np.bincount(group_index).astype(np.float64)
    negatives = sizes - positives
    positive_rank_sum = np.bincount(group_index, weights=ranks * labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        aucs = (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    aucs[(positives == 0) | (negatives == 0)] = np.nan
    return groups[group_start], sizes.astype(np.int64), aucs


def auc(labels, scores) -> float:
    """Area under the ROC curve; equals ``sklearn.metrics.roc_auc_score``.

    Raises:
        ValueError: if ``labels`` hold only one class.
    """
    labels = _labels(labels)
    _, _, aucs = grouped_auc(labels, scores, np.zeros(labels.shape[0], dtype=np.int64))
    if aucs.size == 0 or np.isnan(aucs[0]):
        raise ValueError("AUC needs both classes in labels")
    return float(aucs[0])


def gauc(labels, scores, users) -> float:
    """User-weighted AUC (the paper's eq. 10): ``sum_u n_u AUC_u / sum_u n_u`` over the users
    whose impressions hold both classes, ``n_u`` their number of impressions.

    Raises:
        ValueError: if no user has both classes.
    """
    _, sizes, aucs = grouped_auc(labels, scores, users)
    kept = ~np.isnan(aucs)
    if not kept.any():
        raise ValueError("GAUC needs at least one user whose impressions hold both classes")
    return float((sizes[kept] * aucs[kept]).sum() / sizes[kept].sum())


def rela_impr(auc_model: float, auc_base: float) -> float:
    """RelaImpr (eq. 11) in percent: ``((auc_model - 0.5) / (auc_base - 0.5) - 1) * 100``."""
    if auc_base == 0.5:
        raise ValueError("auc_base must differ from 0.5 (RelaImpr divides by auc_base - 0.5)")
    return ((auc_model - 0.5) / (auc_base - 0.5) - 1.0) * 100.0


def log_loss(labels, probabilities, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of click ``probabilities`` (clipped to ``[eps, 1 - eps]``)."""
    labels = _labels(labels)
    probabilities = _as_array("probabilities", probabilities, np.float64)
    _check_lengths(labels=labels, probabilities=probabilities)
    # Clipping would keep NaN, and turn infinities or values outside [0, 1] into a plausible loss.
    valid = (probabilities >= 0.0) & (probabilities <= 1.0)
    if not valid.all():
        raise ValueError(f"probabilities must be in [0, 1], got {probabilities[~valid][0]}")
    probabilities = np.clip(probabilities, eps, 1.0 - eps)
    if labels.size == 0:
        raise ValueError("log_loss needs at least one sample")
    return float(-(labels * np.log(probabilities) + (1 - labels) * np.log1p(-probabilities)).mean())
