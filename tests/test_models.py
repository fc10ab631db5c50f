"""DIN and BaseModel: shapes, padding, serving path equal to the batch path, backends agree,
training with Dice and MBA stays finite, and DIN beats BaseModel on planted interests."""

import copy

import numpy as np
import pytest
import torch

from din_fast.cli import evaluate
from din_fast.data import feature_counts, iterate_batches, make_batch, make_synthetic
from din_fast.models import DIN, BaseModel, build_model, load_checkpoint
from din_fast.testing import assert_close

SMALL = dict(num_users=200, num_items=150, num_categories=10)


@pytest.fixture
def one_thread():
    # Training steps are small: intra-op threads only add synchronisation (and stall on shared cores).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch(data, size=16, max_length=50):
    return make_batch(data, data.train, np.arange(size), max_length)


def _with_random_padding(batch, vocabulary, extra_columns, seed=0):
    """``batch`` with ``extra_columns`` more history columns and every padded position holding
    a random valid (non-zero) id: the padding row of an embedding is all zeros, so padding with
    id 0 cannot tell a model that reads ``lengths`` from one that pools every column."""
    generator = torch.Generator().manual_seed(seed)
    rows, width = batch.history_items.shape[0], batch.history_items.shape[1] + extra_columns
    padding = torch.arange(width)[None, :] >= batch.lengths[:, None]
    for name, table_rows in (("history_items", vocabulary.item_rows), ("history_categories", vocabulary.category_rows)):
        history = torch.cat([getattr(batch, name), torch.zeros(rows, extra_columns, dtype=torch.int64)], dim=1)
        noise = torch.randint(1, table_rows, (rows, width), generator=generator)
        setattr(batch, name, torch.where(padding, noise, history))
    return batch


@pytest.mark.parametrize("model_class", [DIN, BaseModel])
@pytest.mark.parametrize("dice", [False, True])
def test_forward_shapes_and_padding_invariance(model_class, dice):
    data = make_synthetic(**SMALL, seed=0)
    model = model_class(data.vocabulary, mlp_activation="dice" if dice else "prelu").eval()
    batch = _batch(data)
    assert len(set(batch.lengths.tolist())) > 1  # rows of different lengths: most rows hold padding
    logits = model(batch)
    assert logits.shape == (16,) and torch.isfinite(logits).all()
    # Each sample alone is a batch without padding.
    unpadded = torch.cat([model(make_batch(data, data.train, np.array([row]), 50)) for row in range(16)])
    torch.testing.assert_close(logits, unpadded, rtol=1e-5, atol=1e-6)
    # Whatever ids the padding (and extra padding columns) holds, it changes nothing.
    padded = _with_random_padding(_batch(data), data.vocabulary, extra_columns=5)
    torch.testing.assert_close(model(padded), unpadded, rtol=1e-5, atol=1e-6)
    loss, _ = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


def _loss_and_gradients(model, batch, dtype=torch.float32, training=True):
    """A copy of ``model`` in ``dtype`` and the given mode on ``batch``: ``(loss, logits,
    {parameter name: gradient}, {buffer name: value after the step})``; ``model`` itself stays
    as it was (a training step moves Dice's running statistics)."""
    model = copy.deepcopy(model).to(dtype).train(training)
    loss, logits = model.loss(batch)
    names, parameters = zip(*model.named_parameters())
    gradients = dict(zip(names, torch.autograd.grad(loss, parameters)))
    return loss, logits, gradients, dict(model.named_buffers())


def _assert_runs_close(run, expected, name):
    """A float32 ``_loss_and_gradients`` run against the float64 one: loss, logits, every
    parameter gradient and every buffer (Dice's running statistics), with the float32
    tolerances."""
    loss, logits, gradients, buffers = run
    assert_close(loss, expected[0], torch.float32, f"{name}: loss")
    assert_close(logits, expected[1], torch.float32, f"{name}: logits")
    assert gradients.keys() == expected[2].keys() and buffers.keys() == expected[3].keys()
    for key, gradient in gradients.items():
        assert_close(gradient, expected[2][key], torch.float32, f"{name}: gradient of {key}")
    for key, buffer in buffers.items():
        assert_close(buffer, expected[3][key], torch.float32, f"{name}: {key}")


@pytest.mark.parametrize("model_class", [DIN, BaseModel])
def test_training_padding_invariance_with_dice(model_class, one_thread):
    """Training mode, where Dice normalizes with batch statistics: in the top MLP over the batch's
    rows and, in DIN, in the attention unit over the valid positions only. Random ids at every
    padded position and 5 more padding columns change nothing: the loss, the logits, every
    parameter gradient and the running statistics after the step equal those of the same batch
    in a float64 copy of the model. Statistics that counted padding positions would differ."""
    data = make_synthetic(**SMALL, seed=0)
    options = dict(attention_activation="dice", dice_stats="valid") if model_class is DIN else {}
    model = model_class(data.vocabulary, mlp_activation="dice", **options)
    batch = _batch(data)
    assert len(set(batch.lengths.tolist())) > 1
    expected = _loss_and_gradients(model, batch, torch.float64)
    padded = _with_random_padding(_batch(data), data.vocabulary, extra_columns=5)
    for name, run_batch in (("padded with 0", batch), ("random padding", padded)):
        _assert_runs_close(_loss_and_gradients(model, run_batch), expected, name)


@pytest.mark.parametrize("model_class", [DIN, BaseModel])
def test_score_candidates_equals_batch_forward(model_class, one_thread):
    data = make_synthetic(**SMALL, seed=1)
    model = model_class(data.vocabulary, mlp_activation="dice")
    # Train a few steps so Dice's running statistics and the weights are not at their initial values.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in iterate_batches(data, data.train, 64, 50):
        optimizer.zero_grad()
        loss, _ = model.loss(batch)
        loss.backward()
        optimizer.step()
    model.eval()
    # The served user's impressions share the batch with those of a user whose history is longer,
    # so that theirs are padded (with random ids).
    history_lengths = np.diff(data.sequence_offsets)
    user = int(data.test.users[np.argmin(history_lengths[data.test.users])])
    longer_user = int(data.test.users[np.argmax(history_lengths[data.test.users])])
    rows = np.flatnonzero(data.test.users == user)
    batch = make_batch(data, data.test, np.concatenate([rows, np.flatnonzero(data.test.users == longer_user)]), 1000)
    length = int(batch.lengths[0])
    assert length < batch.history_items.shape[1]
    _with_random_padding(batch, data.vocabulary, extra_columns=0)
    expected = torch.sigmoid(model(batch))[:len(rows)]
    history = torch.stack([batch.history_items[0, :length], batch.history_categories[0, :length]], dim=1)
    candidates = torch.stack([batch.items[:len(rows)], batch.categories[:len(rows)]], dim=1)
    with torch.no_grad():
        probabilities, weights = model.score_candidates(batch.profile[0], history, candidates, return_attention=True)
    torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-6)
    if model_class is DIN:
        assert weights.shape == (len(rows), length)
        batch_weights = model.attention_weights(batch)[:len(rows)]
        torch.testing.assert_close(weights, batch_weights[:, :length], rtol=1e-5, atol=1e-6)
        assert not batch_weights[:, length:].any()
    with pytest.raises(RuntimeError, match="eval"):
        model.train().score_candidates(batch.profile[0], history, candidates)


def test_backends_agree_and_checkpoint_round_trip(tmp_path, one_thread):
    data = make_synthetic(**SMALL, seed=2)
    torch_model = DIN(data.vocabulary, attention_activation="dice", mlp_activation="dice", backend="torch")
    running_before = {name: value.clone() for name, value in torch_model.named_buffers() if "running_" in name}
    embedding_before = torch_model.item_embedding.weight.detach().clone()
    # Training moves Dice's running statistics and the weights off their initial values, so that
    # the round trip must carry them.
    _train(torch_model, data, epochs=1, batch_size=64, lr=1e-2)
    torch_model.eval()
    buffers = dict(torch_model.named_buffers())
    assert running_before and all(not torch.equal(buffers[name], value) for name, value in running_before.items())
    assert not torch.equal(torch_model.item_embedding.weight, embedding_before)
    reference_model = build_model({**torch_model.config, "backend": "reference"}).eval()
    reference_model.load_state_dict(torch_model.state_dict())
    batch = _batch(data)
    torch.testing.assert_close(torch_model(batch), reference_model(batch), rtol=1e-4, atol=1e-5)
    # Both backends in float32, in inference and in training mode (Dice's batch statistics),
    # against the reference backend in float64: loss, logits, every parameter gradient and the
    # running statistics after the step.
    for training in (False, True):
        expected = _loss_and_gradients(reference_model, batch, torch.float64, training)
        for name, model in (("torch", torch_model), ("reference", reference_model)):
            _assert_runs_close(_loss_and_gradients(model, batch, training=training), expected,
                               f"{name} backend, training={training}")

    path = tmp_path / "checkpoint.pt"
    torch.save({"config": torch_model.config, "state_dict": torch_model.state_dict()}, path)
    restored = load_checkpoint(path)
    assert isinstance(restored, DIN) and not restored.training
    torch.testing.assert_close(restored(batch), torch_model(batch))


def _train(model, data, epochs, lr=5e-3, batch_size=256, optimizer=None, penalty_in_loss=True, seed=0):
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        model.train()
        for batch in iterate_batches(data, data.train, batch_size, 50, shuffle=True, rng=rng):
            optimizer.zero_grad()
            loss, _ = model.loss(batch, include_mba=penalty_in_loss)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def test_din_beats_base_model_on_planted_interests(one_thread):
    # Measured on this reduced synthetic set (3 epochs, seeds fixed below): DIN test GAUC 0.732,
    # BaseModel 0.666, gap 0.067 (with data/torch seeds 0, 8, 9, 10 instead of 7 the gap was 0.041,
    # 0.048, 0.065, 0.062). The asserted margin, 0.025, stays safely below all of them.
    data = make_synthetic(num_users=3000, num_items=500, num_categories=20, seed=7)
    results = {}
    for model_class in (DIN, BaseModel):
        torch.manual_seed(7)
        model = model_class(data.vocabulary)
        _train(model, data, epochs=3)
        results[model_class.model_name] = evaluate(model, data, data.test, 4096, 50, "cpu")
    assert results["din"]["gauc"] > results["base"]["gauc"] + 0.025, results
    assert results["din"]["auc"] > results["base"]["auc"], results


@pytest.mark.parametrize("variant", ["dice", "mba-adam", "mba-sgd", "dice-attention-softmax"])
def test_training_options_stay_finite(variant, one_thread):
    data = make_synthetic(num_users=400, num_items=300, num_categories=15, seed=3)
    counts = feature_counts(data, 50)
    options = {"dice": dict(mlp_activation="dice"),
               "mba-adam": dict(mba_lambda=0.05, feature_counts=counts),
               "mba-sgd": dict(mba_lambda=0.05, feature_counts=counts, mlp_activation="dice"),
               "dice-attention-softmax": dict(attention_activation="dice", attention_normalization="softmax")}[variant]
    model = DIN(data.vocabulary, **options)
    optimizer, penalty_in_loss = None, True
    if variant == "mba-sgd":
        from din_fast.optim import MBASGD

        tables = model.embedding_tables()
        optimizer = MBASGD(model.parameters(), lr=0.5,
                           embeddings=[(tables[name], r.counts) for name, r in model.regularizers.items()],
                           lam=0.05)
        penalty_in_loss = False
    if model.regularizers:
        batch = _batch(data, 64)
        assert model.mba_penalty(batch) > 0
    before = model.item_embedding.weight.detach().clone()
    losses = _train(model, data, epochs=1, batch_size=128, optimizer=optimizer, penalty_in_loss=penalty_in_loss)
    assert all(np.isfinite(losses))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before, model.item_embedding.weight)
    assert model.item_embedding.weight[0].abs().max() == 0  # padding row never moves
    scores = evaluate(model, data, data.test, 1024, 50, "cpu")
    assert np.isfinite(scores["logloss"]) and 0.0 <= scores["gauc"] <= 1.0


def test_mba_needs_counts():
    data = make_synthetic(**SMALL, seed=0)
    with pytest.raises(ValueError, match="feature_counts"):
        DIN(data.vocabulary, mba_lambda=0.1)
    with pytest.raises(ValueError, match="mlp_activation"):
        BaseModel(data.vocabulary, mlp_activation="relu")
