"""din_fast.integrations.deepctr_torch.patch: a patched DeepCTR-Torch model computes what the original
computes (outputs, every gradient, BatchNorm running statistics), with the same parameters and
state_dict; unsupported configurations are refused by name."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

pytest.importorskip("deepctr_torch")

from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat  # noqa: E402
from deepctr_torch.layers.activation import Dice  # noqa: E402
from deepctr_torch.layers.core import LocalActivationUnit  # noqa: E402
from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer  # noqa: E402
from deepctr_torch.models import DIN  # noqa: E402

from din_fast.integrations.deepctr_torch import (FastAttentionSequencePoolingLayer, FastDice,  # noqa: E402
                                                 FastLocalActivationUnit, patch)
from din_fast.testing import assert_close  # noqa: E402

BACKENDS = ("torch", "reference")
SEQ_LEN = 6
# Valid lengths of the batch: an empty history, a full one, and partial ones.
LENGTHS = (0, SEQ_LEN, 3, 1, 5)
NUM_ITEMS, NUM_CATEGORIES = 9, 4


def _randomize(model: nn.Module) -> nn.Module:
    """Parameters and running statistics away from DeepCTR's initialisation (weights of std 1e-4,
    alpha 0, unit BatchNorm), so that no term of the math is trivially zero."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0, 0.5)
            elif isinstance(module, nn.PReLU):
                module.weight.uniform_(0.1, 0.4)
            elif isinstance(module, Dice):
                module.alpha.uniform_(0, 1)
                module.bn.weight.normal_(1, 0.5)
                module.bn.bias.normal_(0, 0.3)
                if module.bn.running_mean is not None:
                    module.bn.running_mean.normal_(0, 0.1)
                    module.bn.running_var.uniform_(0.5, 1.5)
    return model


def _din(activation="Dice", hidden=(64, 16), weight_normalization=False):
    """DeepCTR-Torch's DIN as in its examples/run_din.py: item and category features with their
    histories (one length feature) and a dense feature."""
    features = [SparseFeat("user", 4, embedding_dim=5), SparseFeat("gender", 2, embedding_dim=3),
                SparseFeat("item_id", NUM_ITEMS, embedding_dim=5),
                SparseFeat("cate_id", NUM_CATEGORIES, embedding_dim=4), DenseFeat("pay_score", 1)]
    features += [
        VarLenSparseFeat(SparseFeat("hist_item_id", NUM_ITEMS, embedding_dim=5, embedding_name="item_id"),
                         maxlen=SEQ_LEN, length_name="seq_length"),
        VarLenSparseFeat(SparseFeat("hist_cate_id", NUM_CATEGORIES, embedding_dim=4, embedding_name="cate_id"),
                         maxlen=SEQ_LEN, length_name="seq_length")]
    model = DIN(features, ["item_id", "cate_id"], dnn_hidden_units=(12, 7), att_activation=activation,
                att_hidden_size=hidden, att_weight_normalization=weight_normalization, l2_reg_embedding=1e-3)
    return _randomize(model)


def _batch(model: nn.Module, dtype: torch.dtype):
    """A batch ``(X, y)`` in DeepCTR's input layout (columns in ``model.feature_index`` order):
    histories padded with id 0 after their valid length, as DeepCTR pads them."""
    batch = len(LENGTHS)
    lengths = torch.tensor(LENGTHS)
    padding = torch.arange(SEQ_LEN)[None, :] >= lengths[:, None]
    columns = {"user": torch.randint(0, 4, (batch,)), "gender": torch.randint(0, 2, (batch,)),
               "item_id": torch.randint(1, NUM_ITEMS, (batch,)), "cate_id": torch.randint(1, NUM_CATEGORIES, (batch,)),
               "pay_score": torch.rand(batch),
               "hist_item_id": torch.randint(1, NUM_ITEMS, (batch, SEQ_LEN)).masked_fill(padding, 0),
               "hist_cate_id": torch.randint(1, NUM_CATEGORIES, (batch, SEQ_LEN)).masked_fill(padding, 0),
               "seq_length": lengths}
    x = torch.cat([columns[name].to(dtype).reshape(batch, -1) for name in model.feature_index], dim=1)
    return x, torch.randint(0, 2, (batch,)).to(dtype)


def _fit_loss(model, x, y):
    """The loss of DeepCTR's ``BaseModel.fit``: summed BCE plus the model's regularization loss."""
    prediction = model(x).squeeze(-1)
    return prediction, nn.functional.binary_cross_entropy(prediction, y, reduction="sum") + \
        model.get_regularization_loss()


def _assert_same_state(actual: nn.Module, expected: nn.Module, dtype) -> None:
    expected_state = expected.state_dict()
    assert list(actual.state_dict()) == list(expected_state)
    for name, value in actual.state_dict().items():
        if value.is_floating_point():
            assert_close(value, expected_state[name], dtype, name)
        else:
            assert torch.equal(value, expected_state[name]), name


DIN_CONFIGS = [
    pytest.param(dict(), id="defaults-dice-64-16"),
    pytest.param(dict(weight_normalization=True), id="dice-softmax"),
    pytest.param(dict(activation="sigmoid", hidden=(80, 40)), id="sigmoid-80-40"),
    pytest.param(dict(activation="sigmoid", hidden=(80, 40), weight_normalization=True), id="sigmoid-softmax"),
    pytest.param(dict(activation="prelu", hidden=(7, 5), weight_normalization=True), id="prelu-softmax"),
    pytest.param(dict(activation="relu", hidden=(7, 5)), id="relu"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", DIN_CONFIGS)
def test_patched_din_trains_like_deepctr_float64(config, backend):
    original = _din(**config).double()
    fast = copy.deepcopy(original)
    # Optimizers built before patching: the patched model keeps the very same parameters. SGD, whose
    # step is proportional to the gradient, keeps rounding differences at rounding size.
    original_optimizer = torch.optim.SGD(original.parameters(), lr=0.05)
    fast_optimizer = torch.optim.SGD(fast.parameters(), lr=0.05)
    assert patch(fast, backend=backend) is fast
    assert isinstance(fast.attention, FastAttentionSequencePoolingLayer)
    for step in range(3):
        x, y = _batch(original, torch.float64)
        predictions = []
        for model, optimizer in ((original, original_optimizer), (fast, fast_optimizer)):
            model.train()
            optimizer.zero_grad()
            prediction, loss = _fit_loss(model, x, y)
            loss.backward()
            predictions.append(prediction)
        assert_close(predictions[1], predictions[0], torch.float64, f"step {step} prediction")
        expected_grads = dict(original.named_parameters())
        for name, parameter in fast.named_parameters():
            if expected_grads[name].grad is None:
                assert parameter.grad is None, name
            else:
                assert_close(parameter.grad, expected_grads[name].grad, torch.float64, f"step {step} grad {name}")
        original_optimizer.step()
        fast_optimizer.step()
    _assert_same_state(fast, original, torch.float64)
    x, _ = _batch(original, torch.float64)
    original.eval()
    fast.eval()
    with torch.no_grad():
        assert_close(fast(x), original(x), torch.float64, "eval prediction")


@pytest.mark.parametrize("config", [DIN_CONFIGS[0], DIN_CONFIGS[3]])
def test_patched_din_float32_matches_deepctr_float64(config):
    original = _din(**config).double()
    fast = patch(copy.deepcopy(original).float(), backend="torch")
    x, y = _batch(original, torch.float64)
    for mode in ("train", "eval"):
        predictions = []
        for model, dtype in ((original, torch.float64), (fast, torch.float32)):
            getattr(model, mode)()
            model.zero_grad()
            prediction, loss = _fit_loss(model, x.to(dtype), y.to(dtype))
            loss.backward()
            predictions.append(prediction)
        assert_close(predictions[1], predictions[0], torch.float32, f"{mode} prediction")
        expected_grads = dict(original.named_parameters())
        for name, parameter in fast.named_parameters():
            if parameter.grad is not None:
                assert_close(parameter.grad, expected_grads[name].grad, torch.float32, f"{mode} grad {name}")
    _assert_same_state(fast, original, torch.float32)


def test_patch_keeps_parameters_state_dict_and_checkpoints():
    model = _din()
    parameters, buffers = list(model.parameters()), list(model.buffers())
    keys = list(model.state_dict())
    patched = patch(model)
    assert patched is model
    assert len(list(model.parameters())) == len(parameters)
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert all(a is b for a, b in zip(model.buffers(), buffers))
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, (AttentionSequencePoolingLayer, LocalActivationUnit, Dice)) for m in model.modules())
    unit = model.attention.local_att
    assert isinstance(unit, FastLocalActivationUnit)
    assert all(isinstance(layer, FastDice) for layer in unit.dnn.activation_layers)
    assert patch(model) is model and list(model.state_dict()) == keys  # patching twice changes nothing

    # A DeepCTR checkpoint loads into the patched model and the patched model's into DeepCTR's.
    deepctr = _din()
    model.load_state_dict(deepctr.state_dict())
    x, _ = _batch(deepctr, torch.float32)
    deepctr.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), deepctr(x))
        _randomize(model)
        deepctr.load_state_dict(model.state_dict())
        torch.testing.assert_close(deepctr(x), model(x))


def _compare_module(original: nn.Module, fast: nn.Module, inputs, modes=("train", "eval")):
    """Float64: outputs, gradients of every input and parameter, and the state after each mode."""
    for mode in modes:
        results = []
        for model in (original, fast):
            getattr(model, mode)()
            model.zero_grad()
            leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
            out = model(*leaves)
            out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)))
            results.append((out, [t.grad for t in leaves], {n: p.grad for n, p in model.named_parameters()}))
        (out, input_grads, grads), (fast_out, fast_input_grads, fast_grads) = results
        assert_close(fast_out, out, torch.float64, f"{mode} output")
        for i, (actual, expected) in enumerate(zip(fast_input_grads, input_grads)):
            if expected is not None:
                assert_close(actual, expected, torch.float64, f"{mode} grad of input {i}")
        assert list(fast_grads) == list(grads)
        for name, expected in grads.items():
            assert_close(fast_grads[name], expected, torch.float64, f"{mode} grad {name}")
        _assert_same_state(fast, original, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [2, 3])
def test_standalone_dice(dim, backend):
    original = _randomize(Dice(7, dim=dim)).double()
    fast = patch(copy.deepcopy(original), backend=backend)
    assert isinstance(fast, FastDice) and list(fast.state_dict()) == list(original.state_dict())
    x = torch.randn((5, 7) if dim == 2 else (3, 4, 7), dtype=torch.float64) * 2 + 0.5
    for _ in range(2):
        _compare_module(original, fast, [x])
    assert int(fast.bn.num_batches_tracked) == 2


@pytest.mark.parametrize("setting", ["momentum_none", "untracked", "sync_batch_norm_single_process"])
def test_standalone_dice_batch_norm_settings(setting):
    original = Dice(6, dim=3)
    if setting == "momentum_none":
        original.bn.momentum = None  # cumulative average over num_batches_tracked
    elif setting == "untracked":
        original.bn = nn.BatchNorm1d(6, eps=1e-8, track_running_stats=False)  # batch statistics in eval too
    else:
        original.bn = nn.SyncBatchNorm(6, eps=1e-8)  # without torch.distributed: a BatchNorm
    original = _randomize(original).double()
    fast = patch(copy.deepcopy(original), backend="torch")
    for _ in range(3):
        _compare_module(original, fast, [torch.randn(4, 5, 6, dtype=torch.float64)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["dice", "prelu", "sigmoid"])
def test_standalone_local_activation_unit(activation, backend):
    original = _randomize(LocalActivationUnit(hidden_units=(7, 5), embedding_dim=6, activation=activation)).double()
    fast = patch(copy.deepcopy(original), backend=backend)
    assert isinstance(fast, FastLocalActivationUnit)
    query, keys = torch.randn(3, 1, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    _compare_module(original, fast, [query, keys])


@pytest.mark.parametrize("weight_normalization", [False, True])
@pytest.mark.parametrize("return_score", [False, True])
@pytest.mark.parametrize("inputs", ["float_lengths", "mask"])
def test_attention_pooling_layer_options(inputs, return_score, weight_normalization):
    layer = AttentionSequencePoolingLayer(att_hidden_units=(7, 5), att_activation="dice",
                                          weight_normalization=weight_normalization, return_score=return_score,
                                          supports_masking=inputs == "mask", embedding_dim=6)
    original = _randomize(layer).double()
    fast = patch(copy.deepcopy(original), backend="torch")
    query, keys = torch.randn(4, 1, 6, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    if inputs == "mask":
        # Not a prefix, and one row without a valid position.
        mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 1]], dtype=torch.bool)
        extra = (None, mask)
    else:
        # keys_length as DeepCTR also takes it: float, [B, 1], beyond T.
        extra = (torch.tensor([[2.5], [0.0], [5.0], [7.0]], dtype=torch.float64),)
    for mode in ("train", "eval"):
        results = []
        for model in (original, fast):
            getattr(model, mode)()
            model.zero_grad()
            q, k = (t.detach().clone().requires_grad_() for t in (query, keys))
            out = model(q, k, *extra)
            out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2)))
            results.append((out, q.grad, k.grad, {n: p.grad for n, p in model.named_parameters()}))
        (out, grad_q, grad_k, grads), (fast_out, fast_grad_q, fast_grad_k, fast_grads) = results
        assert fast_out.shape == out.shape == ((4, 1, 5) if return_score else (4, 1, 6))
        assert_close(fast_out, out, torch.float64, f"{mode} output")
        assert_close(fast_grad_q, grad_q, torch.float64, f"{mode} grad query")
        assert_close(fast_grad_k, grad_k, torch.float64, f"{mode} grad keys")
        for name, expected in grads.items():
            assert_close(fast_grads[name], expected, torch.float64, f"{mode} grad {name}")
        _assert_same_state(fast, original, torch.float64)
    if weight_normalization and return_score:
        assert torch.allclose(fast_out[1], torch.full((1, 5), 0.2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Refused configurations and bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(use_bn=True), r"local_att\.dnn: use_bn=True"),
    (dict(activation="linear"), r"local_att\.dnn\.activation_layers\.0: activation Identity is not supported"),
    (dict(dice_dim=2), r"local_att\.dnn\.activation_layers\.0: Dice\(dim=2\)"),
])
def test_unsupported_configurations_are_refused_and_leave_the_model_unchanged(kwargs, message):
    model = nn.Sequential()
    model.add_module("pool", AttentionSequencePoolingLayer(att_hidden_units=(4, 3), att_activation="dice",
                                                           embedding_dim=5))
    model.pool.local_att = LocalActivationUnit(hidden_units=(4, 3), embedding_dim=5,
                                               **{"activation": "dice", **kwargs})
    modules = list(model.modules())
    with pytest.raises(ValueError, match=message):
        patch(model)
    assert list(model.modules()) == modules  # rolled back: the Dice replaced before the error are restored


def test_hooked_layers_and_subclasses_are_refused_and_leave_the_model_unchanged():
    # The fast path never calls the reused Linear layers, so a pruning hook would never run.
    model = nn.Sequential(LocalActivationUnit(hidden_units=(4, 3), embedding_dim=5, activation="sigmoid"))
    prune.l1_unstructured(model[0].dnn.linears[0], "weight", amount=0.5)
    modules = list(model.modules())
    with pytest.raises(ValueError, match=r"^0\.dnn\.linears\.0: has forward or backward hooks"):
        patch(model)
    assert list(model.modules()) == modules

    class Doubled(LocalActivationUnit):
        def forward(self, query, user_behavior):
            return 2 * super().forward(query, user_behavior)

    with pytest.raises(ValueError, match="Doubled overrides the forward of DeepCTR-Torch's LocalActivationUnit"):
        patch(Doubled(hidden_units=(4, 3), embedding_dim=5, activation="sigmoid"))

    class Renamed(LocalActivationUnit):
        pass

    assert isinstance(patch(Renamed(hidden_units=(4, 3), embedding_dim=5, activation="sigmoid")),
                      FastLocalActivationUnit)


def test_a_layer_registered_under_two_names_is_replaced_under_both():
    dice = Dice(4, dim=2)
    model = nn.Module()
    model.first, model.second = dice, dice
    patch(model)
    assert isinstance(model.first, FastDice) and model.second is model.first


def test_mixed_dice_settings_are_refused():
    unit = LocalActivationUnit(hidden_units=(4, 3), embedding_dim=5, activation="dice")
    unit.dnn.activation_layers[1].bn.eps = 1e-5
    with pytest.raises(ValueError, match=r"<?LocalActivationUnit.*bn\.eps"):
        patch(unit)


def test_dice_gate_other_than_batch_norm_is_refused():
    dice = Dice(4, dim=2)
    dice.bn = nn.LayerNorm(4)
    with pytest.raises(ValueError, match=r"Dice\.bn: LayerNorm is not supported"):
        patch(dice)


def test_dropout_in_training_is_refused():
    original = _randomize(LocalActivationUnit(hidden_units=(4, 3), embedding_dim=5, activation="sigmoid",
                                              dropout_rate=0.5)).double()
    fast = patch(copy.deepcopy(original))
    query, keys = torch.randn(2, 1, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    original.eval()
    fast.eval()
    assert_close(fast(query, keys), original(query, keys), torch.float64, "eval scores")  # dropout is off
    fast.train()
    with pytest.raises(ValueError, match=r"dropout_rate=0\.5 in training"):
        fast(query, keys)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        patch(nn.Linear(2, 2), backend="cuda")
    fast = patch(AttentionSequencePoolingLayer(att_hidden_units=(4,), embedding_dim=5, supports_masking=True))
    with pytest.raises(ValueError, match="supports_masking"):
        fast(torch.randn(2, 1, 5), torch.randn(2, 3, 5), None)
    with pytest.raises(ValueError, match=r"query must have shape \[B, 1, E\]"):
        fast(torch.randn(2, 5), torch.randn(2, 3, 5), None, torch.ones(2, 3, dtype=torch.bool))
    dice = patch(Dice(4, dim=2))
    with pytest.raises(ValueError, match=r"Dice\(dim=2\) takes 2-D input"):
        dice(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        dice(torch.randn(1, 4))


def test_missing_deepctr_gives_install_hint(monkeypatch):
    for name in [name for name in sys.modules if name == "deepctr_torch" or name.startswith("deepctr_torch.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install deepctr-torch"):
        patch(nn.Linear(2, 2))


def test_din_fast_does_not_import_deepctr():
    code = ("import sys, din_fast, din_fast.integrations.deepctr_torch; "
            "assert 'deepctr_torch' not in sys.modules, 'imported deepctr_torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_benchmark_runs_and_writes_rows(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import deepctr as bench

    out = tmp_path / "deepctr.csv"
    assert bench.main(["--batch", "16", "--seq-lens", "5", "--rounds", "1", "--steps", "1", "--warmup", "0",
                       "--threads", str(torch.get_num_threads()), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("variant,") and len(lines) == 3
    row = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert float(row["deepctr_samples_per_s"]) > 0 and float(row["din_fast_samples_per_s"]) > 0
    assert float(row["max_abs_diff"]) < 1e-5
