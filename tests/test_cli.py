"""The ``din-fast`` command line: a tiny training run and its run folder, serve-bench, the
bench forwarding and readable data errors."""

import json
import sys
import types

import pytest
import torch

from din_fast.cli import main
from din_fast.models import DIN, BaseModel, load_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--synthetic-users", "60", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _restore_threads():
    # train sets torch's thread count for the whole process.
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_train_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test GAUC" in printed and "samples/s" in printed and str(out) in printed
    assert sorted(p.name for p in out.iterdir()) == ["attention.png", "checkpoint.pt", "learning_curves.png",
                                                     "metrics.json"]
    for name in ("attention.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and metrics["config"]["model"] == "din"
    final = metrics["final"]
    for key in ("test_auc", "test_gauc", "test_logloss", "samples_per_s", "train_loss"):
        assert isinstance(final[key], float)
    assert 0.0 <= final["test_auc"] <= 1.0 and final["samples_per_s"] > 0
    model = load_checkpoint(out / "checkpoint.pt")
    assert isinstance(model, DIN) and model.config == metrics["model"]


def test_train_base_with_dice_and_mba_sgd(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--model", "base", "--dice", "--mba", "0.01", "--optimizer", "sgd", "--lr", "0.1",
                 "--out", str(out), "--no-plots"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer"] == "MBASGD" and not metrics["mba_penalty_in_loss"]
    model = load_checkpoint(out / "checkpoint.pt")
    assert isinstance(model, BaseModel) and model.config["mlp_activation"] == "dice"
    assert model.config["mba_lambda"] == 0.01 and set(model.regularizers) == {"item", "category", "segment"}


def test_serve_bench(tmp_path, capsys):
    result = tmp_path / "latency.json"
    arguments = ["serve-bench", "--candidates", "20", "--history", "10", "--iterations", "5", "--warmup", "1",
                 "--threads", "1"]
    assert main([*arguments, "--json", str(result)]) == 0
    assert "p50" in capsys.readouterr().out
    latency = json.loads(result.read_text())
    assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
    assert latency["candidates"] == 20 and latency["history"] == 10

    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--no-plots"]) == 0
    assert main([*arguments, "--checkpoint", str(run / "checkpoint.pt")]) == 0


def test_bench_forwards_arguments(monkeypatch):
    received = []
    fake = types.ModuleType("din_fast.benchmarks.run")
    fake.main = lambda argv: received.append(argv) or 7
    monkeypatch.setitem(sys.modules, "din_fast.benchmarks.run", fake)
    assert main(["bench", "--quick", "--op", "dice"]) == 7
    assert received == [["--quick", "--op", "dice"]]


def test_missing_data_is_a_readable_error(tmp_path, capsys):
    assert main(["train", "--amazon", str(tmp_path), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "reviews_Electronics_5.json" in error and "meta_Electronics.json" in error


def test_train_with_dense_l2_and_its_exclusion_of_mba(tmp_path, capsys):
    out = tmp_path / "l2"
    assert main(["train", *TINY, "--l2", "0.01", "--optimizer", "sgd", "--lr", "0.1", "--out", str(out),
                 "--no-plots"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["l2"] == 0.01 and metrics["optimizer"] == "SGD"
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--l2", "0.01", "--mba", "0.01"])
    assert "choose one" in capsys.readouterr().err


def test_bad_arguments_and_empty_splits_are_readable_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--lr", "-1"])
    assert "--lr: must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve-bench", "--checkpoint", str(tmp_path / "any.pt"), "--model", "base"])
    assert "a --checkpoint brings its own" in capsys.readouterr().err
    taken = tmp_path / "a_file"
    taken.write_text("")
    assert main(["train", *TINY, "--out", str(taken)]) == 2
    assert "din-fast: error:" in capsys.readouterr().err
    # Three ratings of one user: the test split (a share of the users) is empty.
    movielens = tmp_path / "ml"
    movielens.mkdir()
    (movielens / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,1\n1,20,5.0,2\n1,30,1.0,3\n")
    (movielens / "movies.csv").write_text("movieId,title,genres\n10,A (2000),Drama\n20,B (2001),Comedy\n"
                                          "30,C (2002),Drama\n")
    assert main(["train", "--movielens", str(movielens), "--epochs", "1", "--device", "cpu",
                 "--out", str(tmp_path / "ml_run")]) == 2
    assert "the test split of" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, error", [
    (["train", "--seed", "-1"], "--seed: must be >= 0, got -1"),
    (["serve-bench", "--seed", "-1"], "--seed: must be >= 0, got -1"),
    (["train", "--mba", "inf"], "--mba: must be a finite number >= 0, got inf"),
    (["train", "--mba", "nan"], "--mba: must be a finite number >= 0, got nan"),
    (["train", "--l2", "inf"], "--l2: must be a finite number >= 0, got inf"),
    (["train", "--l2", "-0.1"], "--l2: must be a finite number >= 0, got -0.1"),
], ids=["train-seed", "serve-bench-seed", "mba-inf", "mba-nan", "l2-inf", "l2-negative"])
def test_out_of_range_numbers_are_argument_errors(arguments, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    assert exit_.value.code == 2 and error in capsys.readouterr().err


def test_serve_bench_replaces_a_checkpoints_backend(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--no-plots", "--backend", "reference"]) == 0
    capsys.readouterr()
    assert main(["serve-bench", "--candidates", "5", "--history", "4", "--iterations", "2", "--warmup", "1",
                 "--threads", "1", "--checkpoint", str(run / "checkpoint.pt"), "--backend", "torch"]) == 0
    assert "backend torch" in capsys.readouterr().out
