"""AUC, GAUC, RelaImpr and log loss against hand-computed values and scikit-learn."""

import re

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss as sklearn_log_loss
from sklearn.metrics import roc_auc_score

from din_fast.metrics import auc, gauc, grouped_auc, log_loss, rela_impr


def test_auc_hand_computed():
    # Pairs (pos, neg): (0.9, 0.1) win, (0.9, 0.5) win, (0.4, 0.1) win, (0.4, 0.5) loss -> 3/4.
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.5]) == pytest.approx(0.75)
    # A tie between a positive and a negative counts half: (0.5, 0.5) tie, (0.5, 0.2) win -> 1.5/2.
    assert auc([1, 0, 0], [0.5, 0.5, 0.2]) == pytest.approx(0.75)
    assert auc([1, 1, 0, 0], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert auc([0, 1], [0.0, 1.0]) == 1.0
    assert auc([1, 0], [0.0, 1.0]) == 0.0


def test_gauc_hand_computed():
    labels = [1, 0, 0, 1, 0, 1, 1, 0, 0]
    scores = [0.8, 0.3, 0.9, 0.2, 0.1, 0.5, 0.6, 0.7, 0.7]
    users = [7, 7, 7, 3, 3, 5, 5, 9, 9]
    # user 7: pos 0.8 vs negs 0.3 (win), 0.9 (loss) -> 1/2, n=3; user 3: 0.2 > 0.1 -> 1, n=2;
    # user 5 (only positives) and user 9 (only negatives) are left out.
    expected = (3 * 0.5 + 2 * 1.0) / (3 + 2)
    assert gauc(labels, scores, users) == pytest.approx(expected)
    groups, sizes, aucs = grouped_auc(labels, scores, users)
    assert groups.tolist() == [3, 5, 7, 9]
    assert sizes.tolist() == [2, 2, 3, 2]
    assert aucs[0] == 1.0 and aucs[2] == 0.5 and np.isnan(aucs[1]) and np.isnan(aucs[3])


@pytest.mark.parametrize("n, levels", [(50, 3), (1000, 20), (5000, 1000)])
def test_auc_matches_sklearn_with_ties(n, levels):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    # Few distinct scores: many ties, within and across classes.
    scores = rng.integers(0, levels, n) / levels + 0.1 * labels * rng.random(n).round(1)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auc(torch.from_numpy(labels), torch.from_numpy(scores)) == pytest.approx(roc_auc_score(labels, scores),
                                                                                    abs=1e-12)


def test_gauc_matches_per_user_sklearn_with_ties():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    n = 3000
    users = rng.integers(0, 120, n) * 13 - 500  # unsorted, negative and sparse ids
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, 8, n).astype(np.float64)
    numerator = denominator = 0.0
    for user in np.unique(users):
        rows = users == user
        if labels[rows].min() != labels[rows].max():
            numerator += rows.sum() * roc_auc_score(labels[rows], scores[rows])
            denominator += rows.sum()
    assert gauc(labels, scores, users) == pytest.approx(numerator / denominator, abs=1e-12)


def test_rela_impr_and_log_loss():
    # The paper's Amazon numbers: DIN 0.8818 vs BaseModel 0.8624 -> RelaImpr 5.35%.
    assert rela_impr(0.8818, 0.8624) == pytest.approx(5.353, abs=1e-3)
    assert rela_impr(0.7, 0.7) == 0.0
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probabilities = rng.random(200)
    assert log_loss(labels, probabilities) == pytest.approx(sklearn_log_loss(labels, probabilities), rel=1e-9)
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))


def test_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="both classes"):
        gauc([1, 0], [0.2, 0.3], [1, 2])
    with pytest.raises(ValueError, match="0 or 1"):
        auc([2, 0], [0.2, 0.3])
    with pytest.raises(ValueError, match="one length"):
        auc([1, 0, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        auc([1, 0], [float("nan"), 0.3])
    with pytest.raises(ValueError, match="auc_base"):
        rela_impr(0.6, 0.5)


def test_log_loss_rejects_non_probabilities():
    for bad in (float("nan"), float("inf"), -0.1, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"probabilities must be in [0, 1], got {bad}")):
            log_loss([0, 1], [bad, 1.0])


def test_gauc_groups_must_be_whole_numbers():
    # Whole-valued float ids are the same users as their integers.
    labels, scores = [0, 1, 0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2, 0.6, 0.4]
    assert gauc(labels, scores, [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]) == gauc(labels, scores, [1, 1, 2, 2, 3, 3])
    for bad in (0.7, float("nan"), float("inf"), 2.0 ** 63):
        with pytest.raises(ValueError, match=re.escape(f"groups must be integers (e.g. user ids), got {bad}")):
            gauc([0, 1], [0.1, 0.2], [bad, bad])
    with pytest.raises(ValueError, match="groups must be integers"):
        grouped_auc([0, 1], [0.1, 0.2], torch.tensor([0.5, 0.5]))


def test_metrics_take_16_bit_tensors():
    labels, scores = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0.1, 0.4, 0.35, 0.8])
    for dtype in (torch.bfloat16, torch.float16):
        assert auc(labels, scores.to(dtype)) == auc(labels.numpy(), scores.to(dtype).double().numpy())
