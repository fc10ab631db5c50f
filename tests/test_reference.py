"""The reference against small cases worked out by hand, and gradcheck of every reference op."""

import math

import pytest
import torch

from din_fast import reference as R
from din_fast.testing import random_attention_mlp


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def test_dice_hand_case_training_and_running_stats():
    # Two positions, one channel: mean 2, biased variance 1, so x_hat = -1 and +1.
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    alpha = torch.tensor([0.5], dtype=torch.float64)
    running_mean = torch.zeros(1, dtype=torch.float64)
    running_var = torch.ones(1, dtype=torch.float64)
    y = R.dice(x, alpha, running_mean, running_var, training=True, momentum=0.1, eps=0.0)
    p_low, p_high = _sigmoid(-1.0), _sigmoid(1.0)
    expected = [1.0 * (0.5 + 0.5 * p_low), 3.0 * (0.5 + 0.5 * p_high)]
    assert y[:, 0].tolist() == pytest.approx(expected, abs=1e-12)
    # running_mean = 0.9 * 0 + 0.1 * 2; running_var = 0.9 * 1 + 0.1 * (1 * 2 / 1), the unbiased variance.
    assert running_mean.item() == pytest.approx(0.2, abs=1e-12)
    assert running_var.item() == pytest.approx(1.1, abs=1e-12)


def test_dice_hand_case_mask_and_inference():
    # The masked-out 100 must not move the statistics: mean 2, variance 1 as above.
    x = torch.tensor([[[1.0], [100.0]], [[3.0], [5.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, False]])
    alpha = torch.tensor([0.25], dtype=torch.float64)
    y = R.dice(x, alpha, None, None, mask, training=True, eps=0.0)
    p = _sigmoid((100.0 - 2.0) / 1.0)
    assert y[0, 1, 0].item() == pytest.approx(100.0 * (0.25 + 0.75 * p), abs=1e-9)
    assert y[1, 0, 0].item() == pytest.approx(3.0 * (0.25 + 0.75 * _sigmoid(1.0)), abs=1e-12)
    # Inference: running statistics mean 1, variance 4.
    y_eval = R.dice(torch.tensor([[5.0]], dtype=torch.float64), alpha, torch.tensor([1.0], dtype=torch.float64),
                    torch.tensor([4.0], dtype=torch.float64), training=False, eps=0.0)
    assert y_eval.item() == pytest.approx(5.0 * (0.25 + 0.75 * _sigmoid(2.0)), abs=1e-12)


def _hand_unit():
    # D = 1, one hidden unit with a sigmoid, then the score layer (weight 1, bias 0).
    weights = [torch.tensor([[0.5, -1.0, 0.25, 1.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)]
    biases = [torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    query = torch.tensor([[2.0]], dtype=torch.float64)
    keys = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    # h = 0.5 q - k + 0.25 (q - k) + q k: 2.25 for k = 1 and 3.75 for k = 3; the score is
    # 1 * sigmoid(h) + 0.
    scores = [_sigmoid(2.25), _sigmoid(3.75)]
    return query, keys, weights, biases, scores


def test_attention_hand_case_raw_weights():
    query, keys, weights, biases, (s1, s2) = _hand_unit()
    pooled, attn = R.attention_pooling(query, keys, weights, biases, activation="sigmoid")
    assert attn[0].tolist() == pytest.approx([s1, s2], abs=1e-12)
    assert pooled.item() == pytest.approx(s1 * 1.0 + s2 * 3.0, abs=1e-12)
    pooled_short, attn_short = R.attention_pooling(query, keys, weights, biases, lengths=torch.tensor([1]))
    assert pooled_short.item() == pytest.approx(s1, abs=1e-12)
    assert attn_short[0].tolist() == pytest.approx([s1, 0.0], abs=1e-12)


def test_attention_hand_case_softmax_with_scale():
    query, keys, weights, biases, (s1, s2) = _hand_unit()
    scale = 0.5
    e1, e2 = math.exp(scale * s1), math.exp(scale * s2)
    pooled, attn = R.attention_pooling(query, keys, weights, biases, normalization="softmax", softmax_scale=scale)
    assert attn[0].tolist() == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)], abs=1e-12)
    assert pooled.item() == pytest.approx((e1 * 1.0 + e2 * 3.0) / (e1 + e2), abs=1e-12)


def test_softmax_all_padding_row_is_zero_not_nan():
    query, keys, weights, biases, _ = _hand_unit()
    query = query.clone().requires_grad_()
    pooled, attn = R.attention_pooling(query, keys, weights, biases, lengths=torch.tensor([0]),
                                       normalization="softmax")
    assert attn.tolist() == [[0.0, 0.0]] and pooled.tolist() == [[0.0]]
    (grad,) = torch.autograd.grad(pooled.sum() + attn.sum(), query)
    assert torch.isfinite(grad).all()


def test_mba_hand_case():
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    counts = torch.tensor([2, 5, 4])
    ids = torch.tensor([0, 0, 2])
    # Rows 0 and 2, each once: 0.5 * 0.5 * (5 / 2 + 1 / 4).
    assert R.mba_penalty(weight, ids, counts, lam=0.5).item() == pytest.approx(0.6875, abs=1e-12)
    stepped = R.mba_sgd_step(weight, torch.zeros_like(weight), ids, counts, lam=0.5, lr=0.1)
    assert stepped[0].tolist() == pytest.approx([0.975, 1.95], abs=1e-12)
    assert torch.equal(stepped[1], weight[1])
    assert stepped[2].tolist() == pytest.approx([0.0, 0.9875], abs=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_gradcheck_reference_dice(training, masked):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 3) > 0.3 if masked else None
    stats = (torch.randn(5, dtype=torch.float64), 1 + torch.rand(5, dtype=torch.float64))

    def fn(x, alpha):
        return R.dice(x, alpha, *(s.clone() for s in stats), mask, training=training, eps=1e-3)

    assert torch.autograd.gradcheck(fn, (x, alpha))

    def affine(x, alpha, weight, bias):
        return R.dice(x, alpha, *(s.clone() for s in stats), mask, training=training, eps=1e-3, weight=weight,
                      bias=bias)

    gate = (torch.randn(5, dtype=torch.float64, requires_grad=True),
            torch.randn(5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(affine, (x, alpha, *gate))


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_gradcheck_reference_attention(activation, normalization):
    dim, hidden = 3, (4, 2)
    weights, biases, act_params = random_attention_mlp(dim, hidden, activation, torch.float64)
    params = weights + biases + [p for layer in act_params for p in layer[:1]]
    for p in params:
        p.requires_grad_()
    query = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(3, 4, dim, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 0])
    n = len(weights)

    def fn(query, keys, *flat):
        ws, bs, first = flat[:n], flat[n:2 * n], flat[2 * n:]
        acts = [(f,) + tuple(layer[1:]) for f, layer in zip(first, act_params)] if first else act_params
        return R.attention_pooling(query, keys, ws, bs, lengths=lengths, activation=activation, act_params=acts,
                                   normalization=normalization, softmax_scale=0.7, training=True, eps=1e-3)

    assert torch.autograd.gradcheck(fn, (query, keys, *params))


def test_gradcheck_reference_mba_penalty():
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 4], [4, 5]])
    counts = torch.tensor([1, 2, 3, 4, 5, 6])
    assert torch.autograd.gradcheck(lambda w: R.mba_penalty(w, ids, counts, 0.3), (weight,))
    (grad,) = torch.autograd.grad(R.mba_penalty(weight, ids, counts, 0.3), weight)
    expected = torch.zeros_like(weight)
    for j in (1, 4, 5):
        expected[j] = 0.3 * weight[j].detach() / counts[j]
    torch.testing.assert_close(grad, expected, atol=1e-14, rtol=0)
