"""Data-parallel training (din_fast.distributed) on 2 CPU processes with gloo: union of ids, Dice
statistics synchronized over the ranks (outputs, every gradient, running statistics), DDP
training of a DIN equal to one process on the same global batches, and ``din-fast train``
under torchrun.

The 2-rank runs happen once, in one ``torch.multiprocessing.spawn`` (``two_ranks`` fixture),
which saves each rank's results; each test then computes the one-process expectation here and
compares. Everything runs in float64 against the float64 tolerances of ``din_fast.testing``.
"""

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from din_fast import distributed
from din_fast.cli import main
from din_fast.data import feature_counts, iterate_batches, make_batch, make_synthetic
from din_fast.models import DIN, load_checkpoint
from din_fast.modules import AttentionPooling, Dice
from din_fast.optim import MBASGD
from din_fast.testing import TOLERANCES, assert_close

WORLD = 2
F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]

# The DIN run: 2 epochs of global batches 24, 24, 11 (the last split 6 / 5).
TRAIN_SAMPLES, GLOBAL_BATCH, MAX_LENGTH, EPOCHS = 59, 24, 9, 2


# ----------------------------------------------------------------------------------------------
# Cases run by every rank (and, with rank 0 of 1, by this process for the expectation)
# ----------------------------------------------------------------------------------------------


def _dice_case(seed: int, shape, masked: bool, rank: int = 0, world: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    channels = shape[-1]
    x = torch.randn(shape, generator=g, dtype=F64)
    upstream = torch.randn(shape, generator=g, dtype=F64)
    mask = None
    if masked:
        mask = torch.rand(shape[:-1], generator=g) < 0.7
        mask[:, 0] = True
    dice = Dice(channels, affine=True, backend="torch", dtype=F64)
    with torch.no_grad():
        dice.alpha.copy_(torch.rand(channels, generator=g, dtype=F64))
        dice.weight.copy_(1 + 0.5 * torch.randn(channels, generator=g, dtype=F64))
        dice.bias.copy_(0.3 * torch.randn(channels, generator=g, dtype=F64))
        dice.running_mean.copy_(0.1 * torch.randn(channels, generator=g, dtype=F64))
        dice.running_var.copy_(0.5 + torch.rand(channels, generator=g, dtype=F64))
    initial_running_var = dice.running_var.clone()
    rows = distributed.shard_indices(shape[0], rank, world)
    if world > 1:
        assert distributed.sync_dice_statistics(dice) is dice
    x = x[rows].requires_grad_()
    y = dice(x, None if mask is None else mask[rows])
    (y * upstream[rows]).sum().backward()
    return {"y": y.detach(), "x.grad": x.grad, "alpha.grad": dice.alpha.grad, "weight.grad": dice.weight.grad,
            "bias.grad": dice.bias.grad, "running_mean": dice.running_mean, "running_var": dice.running_var,
            "initial running_var": initial_running_var}


def _attention_case(seed: int, rank: int = 0, world: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, length, dim = 9, 5, 4
    query = torch.randn(batch, dim, generator=g, dtype=F64)
    keys = torch.randn(batch, length, dim, generator=g, dtype=F64)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    lengths[1], lengths[-1] = 0, length
    upstream = torch.randn(batch, dim, generator=g, dtype=F64)
    torch.manual_seed(seed)
    pooling = AttentionPooling(dim, (6, 3), activation="dice", dice_stats="valid", backend="torch", dtype=F64)
    with torch.no_grad():
        for dice in pooling.unit.activations:
            dice.alpha.uniform_(0.2, 0.8)
    rows = distributed.shard_indices(batch, rank, world)
    if world > 1:
        assert distributed.sync_dice_statistics(pooling) is pooling
    query, keys = query[rows].requires_grad_(), keys[rows].requires_grad_()
    pooled = pooling(query, keys, lengths=lengths[rows])
    (pooled * upstream[rows]).sum().backward()
    result = {"pooled": pooled.detach(), "query.grad": query.grad, "keys.grad": keys.grad}
    result.update((f"{name}.grad", p.grad) for name, p in pooling.named_parameters())
    result.update(pooling.named_buffers())
    return result


def _tiny_data(seed: int):
    data = make_synthetic(num_users=12, num_items=40, num_categories=6, history_length=(2, 12), train_candidates=5,
                          test_candidates=1, seed=seed)
    data.train = data.train.subset(np.arange(TRAIN_SAMPLES))
    return data, feature_counts(data, MAX_LENGTH)


def _train_din(optimizer_name: str, seed: int, rank: int = 0, world: int = 1) -> dict:
    """A DIN with Dice in the attention unit (valid-position statistics) and in the top MLP, and
    MBA (in the loss with Adam, as eq. 7 with MBASGD), trained for a few global batches."""
    data, counts = _tiny_data(seed)
    torch.manual_seed(seed)
    model = DIN(data.vocabulary, embedding_dim=3, mlp_hidden=(7, 5), mlp_activation="dice", attention_hidden=(6, 4),
                attention_activation="dice", dice_stats="valid", mba_lambda=0.5, feature_counts=counts,
                backend="torch").to(F64)
    if optimizer_name == "adam":
        optimizer, include_mba = torch.optim.Adam(model.parameters(), lr=0.02), True
    else:
        tables = model.embedding_tables()
        optimizer = MBASGD(model.parameters(), lr=0.5, lam=0.5,
                           embeddings=[(tables[name], r.counts) for name, r in model.regularizers.items()])
        include_mba = False
    rng = np.random.default_rng(seed)
    parallel = distributed.data_parallel(model) if world > 1 else None
    model.train()
    for _ in range(EPOCHS):
        if parallel is None:
            # One process: the plain path of din_fast.models.
            for batch in iterate_batches(data, data.train, GLOBAL_BATCH, MAX_LENGTH, shuffle=True, rng=rng):
                optimizer.zero_grad()
                loss, _ = model.loss(batch, include_mba=include_mba)
                loss.backward()
                optimizer.step()
            continue
        for batch, global_size in distributed.local_batches(data, data.train, GLOBAL_BATCH, MAX_LENGTH, rng=rng,
                                                            rank=rank, world=world):
            optimizer.zero_grad()
            loss, _ = parallel(batch, include_mba=include_mba,
                               log_loss_scale=distributed.shard_weight(len(batch), global_size, world))
            loss.backward()
            optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _union_cases(rank: int) -> dict:
    per_rank = {
        "mixed": [torch.tensor([[3, 1], [3, 7]]), torch.tensor([2, 7, 9, 9, 11, 0], dtype=torch.int32)],
        "one empty": [torch.zeros(0, dtype=torch.int64), torch.tensor([5, 5])],
        "all empty": [torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)],
    }
    results = {name: distributed.union_ids(ids[rank]) for name, ids in per_rank.items()}
    # Two tables of 10 and 5 rows in one exchange: equal ids of different tables stay apart.
    tables = [[torch.tensor([9, 0, 4]), torch.tensor([4, 4])], [torch.tensor([1]), torch.tensor([0, 3])]]
    results["tables"] = distributed.union_table_ids(tables[rank], [10, 5])
    return results


def _broadcast_case(rank: int) -> list:
    module = torch.nn.BatchNorm1d(3)
    module.running_mean.fill_(rank + 1.0)
    module.num_batches_tracked.fill_(rank + 5)
    distributed.broadcast_buffers(module)
    return [module.running_mean, module.num_batches_tracked]


def _copy_case(rank: int) -> list:
    """A module synchronized over the world, deep-copied and pickled: the copy still shares the
    statistics (both run a training forward over both ranks' rows)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), Dice(4, backend="torch")).to(F64)
    distributed.sync_dice_statistics(module)
    duplicate = pickle.loads(pickle.dumps(copy.deepcopy(module)))
    x = torch.randn(5 + rank, 3, dtype=F64, generator=torch.Generator().manual_seed(rank))
    return [module(x).detach(), duplicate(x).detach(), torch.tensor(duplicate[1].process_group is distributed.WORLD)]


def _rank_main(rank: int, store: str, out: str, seed: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        assert distributed.rank() == rank and distributed.world_size() == WORLD
        results = {
            "union": _union_cases(rank),
            "dice 3d masked": _dice_case(seed, (13, 3, 5), True, rank, WORLD),
            "dice 2d": _dice_case(seed + 1, (11, 4), False, rank, WORLD),
            "attention": _attention_case(seed, rank, WORLD),
            "din adam": _train_din("adam", seed, rank, WORLD),
            "din mbasgd": _train_din("mbasgd", seed, rank, WORLD),
            "buffers": _broadcast_case(rank),
            "copy": _copy_case(rank),
        }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    seed = int(torch.randint(0, 2**31 - 1, ()))
    mp.spawn(_rank_main, args=(str(folder / "store"), str(folder), seed), nprocs=WORLD, join=True)
    return seed, [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_union_ids(two_ranks):
    _, ranks = two_ranks
    expected = {"mixed": [0, 1, 2, 3, 7, 9, 11], "one empty": [5], "all empty": []}
    for name, ids in expected.items():
        for r in range(WORLD):
            union = ranks[r]["union"][name]
            assert union.dtype == torch.int64 and union.tolist() == ids, (name, r)
            assert [t.tolist() for t in ranks[r]["union"]["tables"]] == [[0, 1, 4, 9], [0, 3, 4]]
    with pytest.raises(ValueError, match="not initialized"):
        distributed.union_ids(torch.tensor([1, 2]))


def test_a_synchronized_module_survives_deepcopy_and_pickle(two_ranks):
    # The default group is kept as din_fast.distributed.WORLD, which pickles; the group itself
    # does not.
    _, ranks = two_ranks
    for rank in ranks:
        original, duplicate, is_world = rank["copy"]
        assert bool(is_world)
        torch.testing.assert_close(duplicate, original, atol=0, rtol=0)


def test_broadcast_buffers_takes_the_first_ranks(two_ranks):
    _, ranks = two_ranks
    for r in range(WORLD):
        running_mean, tracked = ranks[r]["buffers"]
        assert running_mean.tolist() == [1.0, 1.0, 1.0] and int(tracked) == 5


def _assert_sharded_equals_whole(name: str, ranks, whole: dict, batch_keys, summed_keys, shared_keys):
    for key in batch_keys:
        assert_close(torch.cat([r[key] for r in ranks]), whole[key], F64, f"{name}: {key}")
    for key in summed_keys:
        assert_close(sum(r[key] for r in ranks), whole[key], F64, f"{name}: {key} summed over the ranks")
    for key in shared_keys:
        for i, r in enumerate(ranks):
            assert_close(r[key], whole[key], F64, f"{name}: {key} of rank {i}")


@pytest.mark.parametrize("case", ["dice 3d masked", "dice 2d"])
def test_sync_dice_statistics_equals_one_process_on_the_concatenation(two_ranks, case):
    seed, ranks = two_ranks
    whole = _dice_case(seed, (13, 3, 5), True) if case == "dice 3d masked" else _dice_case(seed + 1, (11, 4), False)
    _assert_sharded_equals_whole(case, [r[case] for r in ranks], whole, ["y", "x.grad"],
                                 ["alpha.grad", "weight.grad", "bias.grad"], ["running_mean", "running_var"])
    # The running statistics moved (so their equality above means something).
    assert not torch.allclose(whole["running_var"], whole["initial running_var"])


def test_sync_dice_statistics_in_attention_pooling(two_ranks):
    seed, ranks = two_ranks
    whole = _attention_case(seed)
    parameters = [key for key in whole if key.startswith("unit.") and key.endswith(".grad")]
    buffers = [key for key in whole if key.endswith(("running_mean", "running_var"))]
    assert len(buffers) == 4 and any("activations" in key for key in parameters)
    _assert_sharded_equals_whole("attention", [r["attention"] for r in ranks], whole,
                                 ["pooled", "query.grad", "keys.grad"], parameters, buffers)


@pytest.mark.parametrize("optimizer_name", ["adam", "mbasgd"])
def test_ddp_training_equals_one_process(two_ranks, optimizer_name):
    seed, ranks = two_ranks
    expected = _train_din(optimizer_name, seed)
    data, _ = _tiny_data(seed)
    torch.manual_seed(seed)
    initial = DIN(data.vocabulary, embedding_dim=3, mlp_hidden=(7, 5), mlp_activation="dice",
                  attention_hidden=(6, 4), attention_activation="dice").state_dict()
    results = [r[f"din {optimizer_name}"] for r in ranks]
    assert set(results[0]) == set(expected)
    for name, value in expected.items():
        for r, result in enumerate(results):
            assert_close(result[name], value, F64, f"{optimizer_name}: {name} of rank {r}")
        if name in initial:
            # Everything trained moved away from its initial value (the Dice statistics too).
            assert not torch.allclose(value.float(), initial[name]), name
    # Only the rows the batches used moved (eq. 7); the padding row never does.
    assert expected["item_embedding.weight"][0].abs().max() == 0


def test_shard_indices_and_local_batches():
    for n in (0, 1, 5, 24):
        for world in (1, 2, 3):
            parts = [distributed.shard_indices(n, r, world) for r in range(world)]
            assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]] and parts[-1].stop == n
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1 and parts[0].start == 0
    with pytest.raises(ValueError, match="rank"):
        distributed.shard_indices(4, 2, 2)
    assert distributed.num_global_batches(49, 24, 2) == 2 and distributed.num_global_batches(50, 24, 2) == 3
    data, _ = _tiny_data(0)
    rng = [np.random.default_rng(3) for _ in range(WORLD)]
    shards = [list(distributed.local_batches(data, data.train, GLOBAL_BATCH, MAX_LENGTH, rng=rng[r], rank=r,
                                             world=WORLD)) for r in range(WORLD)]
    order = np.arange(TRAIN_SAMPLES)
    np.random.default_rng(3).shuffle(order)
    for i, parts in enumerate(zip(*shards)):
        whole = make_batch(data, data.train, order[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH], MAX_LENGTH)
        assert all(size == len(whole) for _, size in parts)
        for field in ("items", "labels", "lengths", "history_items", "history_categories"):
            # Each shard is padded to the global batch's width.
            assert torch.equal(torch.cat([getattr(batch, field) for batch, _ in parts]), getattr(whole, field))
    assert len(shards[0]) == 3
    with pytest.raises(ValueError, match="shuffling needs rng"):
        distributed.local_batches(data, data.train, GLOBAL_BATCH, MAX_LENGTH, rng=None, rank=0, world=WORLD)


def test_batch_size_must_divide_among_processes(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(SystemExit):
        main(["train", "--batch-size", "63", "--device", "cpu"])
    assert "divisible by the number of processes (2)" in capsys.readouterr().err


@pytest.fixture
def _restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_train_under_torchrun(tmp_path, _restore_threads):
    arguments = ["train", "--synthetic-users", "40", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
                 "--attention-activation", "dice", "--dice", "--mba", "0.01", "--optimizer", "sgd", "--lr", "0.1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "din_fast.cli", *arguments], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    # Rank 0 alone printed and wrote one run folder.
    assert launched.stdout.count("test GAUC") == 1
    (folder,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["attention.png", "checkpoint.pt", "learning_curves.png",
                                                        "metrics.json"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["dice_statistics_synchronized"]
    assert metrics["optimizer"] == "MBASGD" and len(metrics["epochs"]) == 1

    # One process on the same global batches ends with the same model (float32 rounding apart).
    alone = tmp_path / "alone"
    assert main([*arguments, "--out", str(alone), "--no-plots"]) == 0
    expected = load_checkpoint(alone / "checkpoint.pt").state_dict()
    trained = load_checkpoint(folder / "checkpoint.pt").state_dict()
    for name, value in expected.items():
        assert_close(trained[name], value, torch.float32, name)
    single = json.loads((alone / "metrics.json").read_text())["final"]["train_loss"]
    assert abs(metrics["final"]["train_loss"] - single) <= TOLERANCES[torch.float32]["rtol"] * single
