"""DIN and BaseModel: shapes, padding, serving path equal to the batch path, backends agree,
training with Dice and MBA stays finite, and DIN beats BaseModel on planted interests."""

import numpy as np
import pytest
import torch

from din_fast.cli import evaluate
from din_fast.data import feature_counts, iterate_batches, make_batch, make_synthetic
from din_fast.models import DIN, BaseModel, build_model, load_checkpoint

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


@pytest.mark.parametrize("model_class", [DIN, BaseModel])
@pytest.mark.parametrize("dice", [False, True])
def test_forward_shapes_and_padding_invariance(model_class, dice):
    data = make_synthetic(**SMALL, seed=0)
    model = model_class(data.vocabulary, mlp_activation="dice" if dice else "prelu").eval()
    batch = _batch(data)
    logits = model(batch)
    assert logits.shape == (16,) and torch.isfinite(logits).all()
    # Extra padding columns change nothing.
    padded = _batch(data)
    extra = torch.zeros(16, 5, dtype=torch.int64)
    padded.history_items = torch.cat([padded.history_items, extra], dim=1)
    padded.history_categories = torch.cat([padded.history_categories, extra], dim=1)
    torch.testing.assert_close(model(padded), logits, rtol=1e-5, atol=1e-6)
    loss, _ = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


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
    user = int(data.test.users[0])
    rows = np.flatnonzero(data.test.users == user)
    batch = make_batch(data, data.test, rows, 1000)
    expected = torch.sigmoid(model(batch))
    length = int(batch.lengths[0])
    history = torch.stack([batch.history_items[0, :length], batch.history_categories[0, :length]], dim=1)
    candidates = torch.stack([batch.items, batch.categories], dim=1)
    with torch.no_grad():
        probabilities, weights = model.score_candidates(batch.profile[0], history, candidates, return_attention=True)
    torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-6)
    if model_class is DIN:
        assert weights.shape == (len(rows), length)
        torch.testing.assert_close(weights, model.attention_weights(batch)[:, :length], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="eval"):
        model.train().score_candidates(batch.profile[0], history, candidates)


def test_backends_agree_and_checkpoint_round_trip(tmp_path):
    data = make_synthetic(**SMALL, seed=2)
    torch_model = DIN(data.vocabulary, attention_activation="dice", backend="torch").eval()
    reference_model = build_model({**torch_model.config, "backend": "reference"}).eval()
    reference_model.load_state_dict(torch_model.state_dict())
    batch = _batch(data)
    torch.testing.assert_close(torch_model(batch), reference_model(batch), rtol=1e-4, atol=1e-5)

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
