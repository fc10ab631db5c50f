"""The public modules: PyTorch conventions, Dice against BatchNorm1d, backend rules, bad input."""

import pytest
import torch
from torch import nn

import din_fast
from din_fast import backend as B
from din_fast import functional as F
from din_fast.testing import random_attention_mlp


# ---------------------------------------------------------------------------------------------
# Conventions
# ---------------------------------------------------------------------------------------------


def test_dice_state_dict_repr_and_modes():
    dice = din_fast.Dice(5, eps=1e-5, momentum=0.2)
    assert set(dice.state_dict()) == {"alpha", "running_mean", "running_var"}
    assert [name for name, _ in dice.named_parameters()] == ["alpha"]
    assert "5, eps=1e-05, momentum=0.2, affine=False" in repr(dice)
    affine = din_fast.Dice(5, affine=True)
    assert set(affine.state_dict()) == {"alpha", "weight", "bias", "running_mean", "running_var"}
    x = torch.randn(8, 5)
    dice.train()
    dice(x)
    assert not torch.equal(dice.running_mean, torch.zeros(5))
    frozen = dice.running_mean.clone()
    dice.eval()
    dice(x)
    assert torch.equal(dice.running_mean, frozen)


def test_attention_pooling_state_dict_and_repr():
    pool = din_fast.AttentionPooling(18, hidden_units=(80, 40), activation="dice", normalization="softmax")
    keys = set(pool.state_dict())
    assert {"unit.layers.0.weight", "unit.layers.0.bias", "unit.layers.2.weight",
            "unit.activations.1.running_var"} <= keys
    assert pool.unit.layers[0].weight.shape == (80, 72)
    assert "normalization='softmax'" in repr(pool) and "activation='dice'" in repr(pool)
    clone = din_fast.AttentionPooling(18, hidden_units=(80, 40), activation="dice", normalization="softmax")
    clone.load_state_dict(pool.state_dict())
    query, keys_, lengths = torch.randn(3, 18), torch.randn(3, 4, 18), torch.tensor([4, 0, 2])
    pool.eval()
    clone.eval()
    torch.testing.assert_close(pool(query, keys_, lengths), clone(query, keys_, lengths), atol=0, rtol=0)


def test_attention_pooling_input_forms():
    pool = din_fast.AttentionPooling(6, hidden_units=(7,), backend="torch")
    query, keys = torch.randn(4, 6), torch.randn(4, 5, 6)
    lengths = torch.tensor([5, 1, 0, 3])
    mask = torch.arange(5)[None] < lengths[:, None]
    expected, weights = pool(query, keys, lengths, return_scores=True)
    assert expected.shape == (4, 6) and weights.shape == (4, 5)
    for out in (pool(query[:, None], keys, lengths), pool(query, keys, lengths[:, None]),
                pool(query, keys, mask=mask)):
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert torch.equal(weights[2], torch.zeros(5)) and torch.equal(expected[2], torch.zeros(6))


def test_local_activation_unit_scores_are_the_unmasked_weights():
    unit = din_fast.LocalActivationUnit(6, hidden_units=(5, 3), activation="prelu", backend="torch")
    query, keys = torch.randn(2, 6), torch.randn(2, 4, 6)
    scores = unit(query, keys)
    assert scores.shape == (2, 4)
    _, weights = F.attention_pooling(query, keys, backend="reference", **unit.mlp_arguments())
    torch.testing.assert_close(scores, weights)


def test_score_candidates_equals_pooling_each_candidate():
    pool = din_fast.AttentionPooling(8, hidden_units=(6,), normalization="softmax", backend="torch").eval()
    history, candidates = torch.randn(5, 8), torch.randn(3, 8)
    pooled, weights = pool.score_candidates(history, candidates, return_scores=True)
    per_candidate, per_weights = pool(candidates, history[None].expand(3, -1, -1), return_scores=True)
    torch.testing.assert_close(pooled, per_candidate)
    torch.testing.assert_close(weights, per_weights)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_attention_dice_layers_set_to_eval_keep_their_statistics(backend):
    # As with BatchNorm, a Dice layer frozen by its own eval() stops updating its statistics
    # and uses them, whatever mode the pooling module is in.
    pool = din_fast.AttentionPooling(4, (6, 4), activation="dice", backend=backend).train()
    query, keys = torch.randn(2, 4), torch.randn(2, 3, 4)
    for dice in pool.unit.activations:
        dice.eval()
    statistics = [t.clone() for dice in pool.unit.activations for t in (dice.running_mean, dice.running_var)]
    frozen = pool(query, keys)
    assert all(torch.equal(t, before) for t, before in
               zip([t for dice in pool.unit.activations for t in (dice.running_mean, dice.running_var)], statistics))
    torch.testing.assert_close(frozen, pool.eval()(query, keys), atol=0, rtol=0)
    pool.train()
    pool.unit.activations[1].eval()
    with pytest.raises(ValueError, match=r"activations\[1\] differs from activations\[0\] in \['training'\]"):
        pool(query, keys)
    pool.unit.activations[1].train()
    pool.unit.activations[1].momentum = 0.5
    with pytest.raises(ValueError, match=r"in \['momentum'\]"):
        pool(query, keys)


@pytest.mark.parametrize("activation,act_params", [
    ("prelu", [(None,)]), ("dice", [(torch.rand(3), None, None)]),
    ("dice", [(torch.rand(3), torch.zeros(3), torch.ones(3), None, None)])])
def test_none_in_act_params_is_named(activation, act_params):
    weights, biases = [torch.randn(3, 16), torch.randn(1, 3)], [torch.randn(3), torch.randn(1)]
    with pytest.raises(TypeError, match=r"act_params\[0\]\[[0-9]\] must be a tensor, got None"):
        F.attention_pooling(torch.randn(2, 4), torch.randn(2, 5, 4), weights, biases, activation=activation,
                            act_params=act_params, backend="torch")


def test_mba_regularizer_gradient_touches_only_batch_rows():
    counts = torch.tensor([1, 2, 3, 4, 5])
    reg = din_fast.MBARegularizer(counts, lam=0.1)
    assert torch.equal(reg.state_dict()["counts"], counts)
    table = nn.Embedding(5, 3)
    ids = torch.tensor([[3, 3, 1]])
    reg.penalty(table.weight, ids).backward()
    touched = table.weight.grad.abs().sum(1) != 0
    assert touched.tolist() == [False, True, False, True, False]
    torch.testing.assert_close(table.weight.grad[3], 0.1 * table.weight[3].detach() / 4)


# ---------------------------------------------------------------------------------------------
# Dice against torch.nn.BatchNorm1d's conventions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("shape", [(32, 7), (6, 9, 7)])
@pytest.mark.parametrize("affine", [False, True])
def test_dice_follows_batchnorm_conventions(backend, shape, affine):
    """Dice's gate is sigmoid of BatchNorm1d (with or without its affine transform) with the same
    eps and momentum; the running statistics follow BatchNorm's update (unbiased running variance)
    step by step, and evaluation uses them the same way."""
    torch.set_default_dtype(torch.float64)
    try:
        dice = din_fast.Dice(7, eps=1e-5, momentum=0.3, affine=affine, backend=backend)
        norm = nn.BatchNorm1d(7, eps=1e-5, momentum=0.3, affine=affine)
        with torch.no_grad():
            dice.alpha.copy_(torch.rand(7))
            if affine:
                norm.weight.copy_(torch.randn(7))
                norm.bias.copy_(torch.randn(7))
                dice.weight.copy_(norm.weight)
                dice.bias.copy_(norm.bias)

        def expected(x):
            normalized = norm(x.transpose(1, 2)).transpose(1, 2) if x.dim() == 3 else norm(x)
            gate = torch.sigmoid(normalized)
            return gate * x + (1 - gate) * dice.alpha * x

        for mode in ("train", "train", "train", "eval"):
            dice.train(mode == "train")
            norm.train(mode == "train")
            x = 3 * torch.randn(shape) + 1
            torch.testing.assert_close(dice(x), expected(x))
            torch.testing.assert_close(dice.running_mean, norm.running_mean)
            torch.testing.assert_close(dice.running_var, norm.running_var)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_dice_all_false_mask_leaves_running_stats_and_stays_finite(backend):
    dice = din_fast.Dice(4, backend=backend)
    x = torch.randn(3, 5, 4, requires_grad=True)
    y = dice(x, torch.zeros(3, 5, dtype=torch.bool))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.equal(dice.running_mean, torch.zeros(4)) and torch.equal(dice.running_var, torch.ones(4))


# ---------------------------------------------------------------------------------------------
# Backend rules
# ---------------------------------------------------------------------------------------------


def test_auto_picks_torch_on_cpu_and_env_var_overrides(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    assert B.resolve_backend("auto", cpu, "dice") == "torch"
    monkeypatch.setenv(B.ENV_VAR, "reference")
    assert B.resolve_backend("auto", cpu, "dice") == "reference"
    assert B.resolve_backend("torch", cpu, "dice") == "torch"
    monkeypatch.setenv(B.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=B.ENV_VAR):
        B.resolve_backend("auto", cpu, "dice")


def test_explicit_triton_request_never_falls_back(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        B.resolve_backend("triton", cpu, "dice")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(B._TRITON_MODULES, "unported_op", "no_such_module")
    with pytest.raises(NotImplementedError, match="unported_op"):
        B.resolve_backend("triton", cpu, "unported_op")
    monkeypatch.setattr(B, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        B.resolve_backend("triton", cpu, "dice")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        din_fast.Dice(3, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        F.dice(torch.randn(2, 3), torch.zeros(3), training=True, backend="fast")


# ---------------------------------------------------------------------------------------------
# Bad input: a TypeError or ValueError naming the argument
# ---------------------------------------------------------------------------------------------


def _pool():
    return din_fast.AttentionPooling(4, hidden_units=(3,), backend="torch")


@pytest.mark.parametrize("make_args,error,pattern", [
    (lambda: (torch.randn(2, 4), torch.randn(2, 4)), ValueError, "keys must be 3-D"),
    (lambda: (torch.randn(2, 2, 4), torch.randn(2, 3, 4)), ValueError, r"query must have shape \[B, D\]"),
    (lambda: (torch.randn(3, 4), torch.randn(2, 3, 4)), ValueError, "batch size B"),
    (lambda: (torch.randn(2, 5), torch.randn(2, 3, 5)), ValueError, r"weights\[0\] must have shape"),
    (lambda: (torch.randn(2, 4), torch.randn(2, 3, 3)), ValueError, "embedding size D"),
    (lambda: (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, 4)), TypeError, "share one dtype"),
    (lambda: (torch.randint(0, 3, (2, 4)), torch.randn(2, 3, 4)), TypeError, "query must have a floating"),
    (lambda: ("query", torch.randn(2, 3, 4)), TypeError, "query must be a torch.Tensor"),
])
def test_attention_bad_tensors(make_args, error, pattern):
    with pytest.raises(error, match=pattern):
        _pool()(*make_args())


@pytest.mark.parametrize("lengths,error,pattern", [
    (torch.tensor([1, -1]), ValueError, r"lengths must lie in \[0, 3\]"),
    (torch.tensor([1, 4]), ValueError, r"lengths must lie in \[0, 3\]"),
    (torch.tensor([1.0, 2.0]), TypeError, "lengths must be an integer tensor"),
    (torch.tensor([1, 2, 3]), ValueError, r"lengths must have shape \[2\]"),
    (torch.tensor([[1, 2]]), ValueError, r"lengths must have shape \[B\] or \[B, 1\]"),
])
def test_attention_bad_lengths(lengths, error, pattern):
    with pytest.raises(error, match=pattern):
        _pool()(torch.randn(2, 4), torch.randn(2, 3, 4), lengths)


@pytest.mark.usefixtures("on_kernel_device")
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_value_checks_can_be_switched_off(monkeypatch, backend):
    # Without the checks (no host sync) lengths outside [0, T] act as clamped to it, as under
    # torch.compile.
    if backend == "triton":
        pytest.importorskip("triton")
    query, keys = torch.randn(2, 4), torch.randn(2, 3, 4)
    pool = din_fast.AttentionPooling(4, hidden_units=(3,), backend=backend)
    monkeypatch.setenv("DIN_FAST_VALUE_CHECKS", "0")
    unchecked = pool(query, keys, torch.tensor([-2, 7]))
    monkeypatch.delenv("DIN_FAST_VALUE_CHECKS")
    clamped = pool(query, keys, torch.tensor([0, 3]))
    for got, want in zip(unchecked, clamped):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
        pool(query, keys, torch.tensor([-2, 7]))


def test_attention_bad_mask_and_options():
    query, keys = torch.randn(2, 4), torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        _pool()(query, keys, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 3\]"):
        _pool()(query, keys, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="either lengths or mask"):
        _pool()(query, keys, torch.tensor([1, 2]), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="activation must be one of"):
        din_fast.AttentionPooling(4, activation="tanh")
    with pytest.raises(ValueError, match="normalization must be one of"):
        din_fast.AttentionPooling(4, normalization="sum")
    with pytest.raises(ValueError, match="dice_stats must be one of"):
        din_fast.AttentionPooling(4, dice_stats="none")
    with pytest.raises(ValueError, match="hidden_units"):
        din_fast.AttentionPooling(4, hidden_units=(8, 0))
    # An infinite score scale would turn every softmax weight into NaN.
    with pytest.raises(ValueError, match="softmax_scale must be finite, got inf"):
        din_fast.AttentionPooling(4, normalization="softmax", softmax_scale=float("inf"))
    weights, biases, _ = random_attention_mlp(4, (3,), "sigmoid")
    with pytest.raises(ValueError, match="softmax_scale must be finite, got inf"):
        F.attention_pooling(query, keys, weights, biases, normalization="softmax", softmax_scale=float("inf"))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("culprit", ["weights", "act_params"])
def test_mlp_parameters_in_another_dtype_are_named(backend, culprit):
    # The parameters must share the inputs' dtype on every backend, as nn.Linear's do.
    query, keys = torch.randn(2, 4), torch.randn(2, 3, 4)
    weights, biases = [torch.randn(3, 16), torch.randn(1, 3)], [torch.randn(3), torch.randn(1)]
    act_params = [(torch.full((3,), 0.25),)]
    if culprit == "weights":
        weights[0] = weights[0].double()
        pattern = r"weights\[0\] and biases\[0\] must have keys' dtype torch.float32, got torch.float64"
    else:
        act_params = [(act_params[0][0].double(),)]
        pattern = r"act_params\[0\]\[0\] must have the inputs' dtype torch.float32, got torch.float64"
    for call in (lambda: F.attention_pooling(query, keys, weights, biases, activation="prelu", act_params=act_params,
                                             backend=backend),
                 lambda: F.score_candidates(keys[0], query, weights, biases, activation="prelu",
                                            act_params=act_params, backend=backend)):
        with pytest.raises(TypeError, match=pattern):
            call()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dice_running_statistics_may_stay_float32_with_16_bit_inputs(backend):
    # As BatchNorm's buffers may: only the parameters must share the inputs' dtype.
    query, keys = torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(2, 3, 4, dtype=torch.bfloat16)
    weights = [torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(1, 3, dtype=torch.bfloat16)]
    biases = [torch.randn(3, dtype=torch.bfloat16), torch.randn(1, dtype=torch.bfloat16)]
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    act_params = [(torch.rand(3, dtype=torch.bfloat16), running_mean, running_var)]
    pooled, _ = F.attention_pooling(query, keys, weights, biases, activation="dice", act_params=act_params,
                                    training=True, backend=backend)
    assert pooled.dtype == torch.bfloat16 and running_mean.dtype == torch.float32
    assert not torch.equal(running_mean, torch.zeros(3))


def test_tensors_on_different_devices_are_named():
    # The meta device stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match="query on meta, keys on cpu"):
        F.attention_pooling(torch.randn(2, 4, device="meta"), torch.randn(2, 3, 4), [torch.randn(3, 16)] * 2,
                            [torch.randn(3)] * 2)
    with pytest.raises(ValueError, match="lengths must be on cpu"):
        _pool()(torch.randn(2, 4), torch.randn(2, 3, 4), torch.tensor([1, 2], device="meta"))
    with pytest.raises(ValueError, match="weight on cpu, ids on meta"):
        din_fast.MBARegularizer(torch.ones(5), 0.1).penalty(torch.randn(5, 2), torch.tensor([1], device="meta"))


def test_dice_bad_input():
    dice = din_fast.Dice(3)
    with pytest.raises(ValueError, match="3 channels"):
        dice(torch.randn(4, 5))
    with pytest.raises(ValueError, match="x must be 2-D or 3-D"):
        dice(torch.randn(4))
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        dice(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must have shape \[4\]"):
        dice(torch.randn(4, 3), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="momentum must be in"):
        din_fast.Dice(3, momentum=1.5)
    with pytest.raises(ValueError, match="num_features"):
        din_fast.Dice(0)
    x, alpha = torch.randn(4, 3), torch.zeros(3)
    with pytest.raises(ValueError, match="weight and bias .* together"):
        F.dice(x, alpha, training=True, weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"bias must have shape \[3\]"):
        F.dice(x, alpha, training=True, weight=torch.ones(3), bias=torch.zeros(4))
    pooling_args = [torch.randn(2, 4), torch.randn(2, 3, 4), [torch.randn(5, 16), torch.randn(1, 5)],
                    [torch.randn(5), torch.randn(1)]]
    dice_layer = (torch.zeros(5), torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match=r"act_params\[0\] must hold 3 or 5 tensors"):
        F.attention_pooling(*pooling_args, activation="dice", act_params=[dice_layer[:2]])


def test_mba_bad_input():
    counts = torch.tensor([1, 2, 3])
    reg = din_fast.MBARegularizer(counts, 0.1)
    weight = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\)"):
        reg.penalty(weight, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\)"):
        reg.penalty(weight, torch.tensor([-1]))
    with pytest.raises(TypeError, match="ids must be an int32 or int64"):
        reg.penalty(weight, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="counts must be >= 1"):
        din_fast.MBARegularizer(torch.tensor([1, 0, 2]), 0.1)
    with pytest.raises(ValueError, match=r"counts must have shape \[4\]"):
        F.mba_penalty(torch.randn(4, 2), torch.tensor([0]), counts, 0.1)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        din_fast.MBARegularizer(counts, -1.0)


# ---------------------------------------------------------------------------------------------
# NaN reaches the output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_nan_input_reaches_output(backend, normalization):
    pool = din_fast.AttentionPooling(4, hidden_units=(3,), normalization=normalization, backend=backend)
    query, keys = torch.randn(2, 4), torch.randn(2, 3, 4)
    keys[0, 1, 2] = float("nan")
    query[1, 0] = float("nan")
    out = pool(query, keys, torch.tensor([3, 3]))
    assert torch.isnan(out[0]).any() and torch.isnan(out[1]).any()
    dice = din_fast.Dice(4, backend=backend)
    x = torch.randn(5, 4)
    x[2, 1] = float("nan")
    assert torch.isnan(dice(x)[:, 1]).all()
    assert not torch.isnan(dice(x)[:, 0]).any()
