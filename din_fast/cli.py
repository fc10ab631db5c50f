"""The ``din-fast`` command line.

* ``din-fast train``: trains DIN (or BaseModel) on the synthetic data set, Amazon Electronics or
  MovieLens 20M; prints per-epoch test AUC, GAUC, log loss and throughput and a final table; writes a
  run folder with ``metrics.json``, ``checkpoint.pt`` and PNG plots. Under ``torchrun`` it trains
  data-parallel (``din_fast.distributed``; docs/distributed.md): each global batch of
  ``--batch-size`` samples is split across the processes, Dice statistics and MBA ids are
  synchronized, and rank 0 alone prints, evaluates and writes the run folder.
* ``din-fast serve-bench``: latency of scoring C candidates for one user with the whole model.
* ``din-fast bench ...``: the kernel benchmark suite (``din_fast.benchmarks.run``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .backend import BACKENDS
from .data._files import DataFileError
from .data.batching import InteractionData, Samples, feature_counts, iterate_batches
from .metrics import auc, gauc, log_loss

DEFAULT_MAX_LENGTH = 100


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def _load_data(args) -> InteractionData:
    from . import data

    if args.amazon:
        return data.load_amazon(args.amazon, seed=args.seed)
    if args.movielens:
        return data.load_movielens(args.movielens, seed=args.seed, max_ratings=args.max_ratings)
    return data.make_synthetic(num_users=args.synthetic_users, seed=args.seed)


def _build_model(args, data: InteractionData, counts):
    from .models import DIN, BaseModel

    common = dict(embedding_dim=args.embedding_dim, mlp_activation="dice" if args.dice else "prelu",
                  mba_lambda=args.mba, feature_counts=counts, backend=args.backend)
    if args.model == "base":
        return BaseModel(data.vocabulary, **common)
    return DIN(data.vocabulary, attention_activation=args.attention_activation,
               attention_normalization=args.attention_normalization, **common)


def _parameter_groups(args, model) -> list:
    """With ``--l2``: the embedding tables in a group of their own with dense L2 (weight decay on
    every row at every step, what frameworks do without eq. 7); else all parameters in one."""
    if args.l2 == 0:
        return [{"params": list(model.parameters())}]
    tables = {id(table.weight) for table in model.embedding_tables().values()}
    return [{"params": [p for p in model.parameters() if id(p) in tables], "weight_decay": args.l2},
            {"params": [p for p in model.parameters() if id(p) not in tables]}]


def _build_optimizer(args, model):
    """Adam, or SGD; with ``--mba`` and SGD, MBASGD applies eq. 7 to the embedding tables (the
    model then leaves the penalty out of the loss)."""
    if args.optimizer == "adam":
        return torch.optim.Adam(_parameter_groups(args, model), lr=args.lr), True
    if args.mba > 0:
        from .optim import MBASGD

        tables = model.embedding_tables()
        embeddings = [(tables[name], regularizer.counts) for name, regularizer in model.regularizers.items()]
        return MBASGD(model.parameters(), lr=args.lr, embeddings=embeddings, lam=args.mba), False
    return torch.optim.SGD(_parameter_groups(args, model), lr=args.lr), True


def _safe(metric, *values) -> float:
    try:
        return metric(*values)
    except ValueError:
        return float("nan")


def evaluate(model, data: InteractionData, samples: Samples, batch_size: int, max_length: int,
             device) -> Dict[str, float]:
    """Test AUC, GAUC and log loss of ``model`` on ``samples`` (NaN where a metric is undefined)."""
    model.eval()
    probabilities, labels, users = [], [], []
    with torch.no_grad():
        for batch in iterate_batches(data, samples, batch_size, max_length, device=device):
            probabilities.append(torch.sigmoid(model(batch)).float().cpu())
            labels.append(batch.labels.cpu())
            users.append(batch.users.cpu())
    if not probabilities:
        return {"auc": float("nan"), "gauc": float("nan"), "logloss": float("nan")}
    p, y, u = (torch.cat(values).numpy() for values in (probabilities, labels, users))
    return {"auc": _safe(auc, y, p), "gauc": _safe(gauc, y, p, u), "logloss": _safe(log_loss, y, p)}


def _attention_panels(model, data: InteractionData, max_length: int, device, num_users: int = 3,
                      shown_behaviours: int = 30, shown_candidates: int = 8) -> List[dict]:
    """Attention weights of a few test users' most recent behaviours against test candidates
    that share that history (clicked ones first)."""
    test = data.test
    panels = []
    for user in np.unique(test.users):
        rows = np.flatnonzero(test.users == user)
        end = int(test.history_end[rows].max())
        rows = rows[test.history_end[rows] == end]
        if end < 5 or len(rows) < 2:
            continue
        rows = rows[np.argsort(-test.labels[rows], kind="stable")][:shown_candidates]
        # The model's whole history (its last max_length behaviours), so that softmax weights are
        # the ones it uses; only the most recent are shown.
        start = data.sequence_offsets[user] + max(0, end - max_length)
        stop = data.sequence_offsets[user] + end
        history = np.stack([data.sequence_items[start:stop], data.sequence_categories[start:stop]], axis=1)
        candidates = np.stack([test.items[rows], test.categories[rows]], axis=1)
        with torch.no_grad():
            _, weights = model.score_candidates(torch.from_numpy(data.user_profile[user]).to(device),
                                                torch.from_numpy(history).to(device),
                                                torch.from_numpy(candidates).to(device), return_attention=True)
        shown = min(len(history), shown_behaviours)
        panels.append({
            "weights": weights.float().cpu().numpy()[:, -shown:],
            "behaviour_labels": [f"c{c}" for c in history[-shown:, 1]],
            "candidate_labels": [f"item {i} (c{c}) {'clicked' if y else 'not clicked'}"
                                 for i, c, y in zip(candidates[:, 0], candidates[:, 1], test.labels[rows])],
            "title": f"user {user}: {end} behaviours (last {shown} shown)",
        })
        if len(panels) == num_users:
            break
    return panels


def _run_folder(out: Optional[str]) -> Path:
    if out:
        folder = Path(out)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path("runs") / stamp
        suffix = 1
        while folder.exists():
            folder = Path("runs") / f"{stamp}-{suffix}"
            suffix += 1
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _format_table(history: List[dict]) -> str:
    header = f"{'epoch':>5} {'train loss':>10} {'test AUC':>9} {'test GAUC':>9} {'log loss':>9} " \
             f"{'samples/s':>10} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for row in history:
        lines.append(f"{row['epoch']:>5} {row['train_loss']:>10.4f} {row['test_auc']:>9.4f} {row['test_gauc']:>9.4f} "
                     f"{row['test_logloss']:>9.4f} {row['samples_per_s']:>10.0f} {row['train_seconds']:>8.1f}")
    return "\n".join(lines)


def _quiet(*args, **kwargs) -> None:
    pass


def train(args) -> int:
    """``din-fast train``; under torchrun, one data-parallel rank of the run."""
    if not distributed.launched_by_torchrun():
        return _train(args, torch.device(args.device or _default_device()), parallel=False)
    device = distributed.rank_device(args.device)
    joined = not distributed.is_distributed()
    if joined:
        distributed.init_from_environment(device)
    try:
        return _train(args, device, parallel=True)
    finally:
        if joined:
            distributed.destroy()


def _train(args, device: torch.device, parallel: bool) -> int:
    started = time.perf_counter()
    rank, world = distributed.rank(), distributed.world_size()
    main_process = rank == 0
    log = print if main_process else _quiet
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    # Every rank draws the same parameters and the same batch order from the seed.
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        # Before the data: not after minutes of loading.
        print(f"din-fast: error: --out {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    data = _load_data(args)
    log(data.describe(), flush=True)
    for split in ("train", "test"):
        if len(getattr(data, split)) == 0:
            print(f"din-fast: error: the {split} split of {data.name} is empty: too little data (--max-ratings, or "
                  f"too few interactions per user)", file=sys.stderr)
            return 2
    counts = feature_counts(data, args.max_length) if args.mba > 0 else None
    model = _build_model(args, data, counts).to(device)
    optimizer, penalty_in_loss = _build_optimizer(args, model)
    compute_loss = model.loss
    if parallel:
        compute_loss = distributed.data_parallel(model, device=device, sync_dice=not args.no_sync_dice)
    folder = _run_folder(args.out) if main_process else None
    where = f"{world} processes on {device.type}" if parallel else str(device)
    log(f"{model.model_name.upper()} ({sum(p.numel() for p in model.parameters()):,} parameters) on {where}, "
        f"backend {args.backend}; run folder {folder}", flush=True)

    history: List[dict] = []
    steps = distributed.num_global_batches(len(data.train), args.batch_size, world)
    for epoch in range(1, args.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        epoch_start = time.perf_counter()
        with tqdm(total=steps, desc=f"epoch {epoch}/{args.epochs}", unit="batch", leave=False,
                  disable=not main_process) as progress:
            batches = distributed.local_batches(data, data.train, args.batch_size, args.max_length, rng=rng,
                                                rank=rank, world=world, device=device)
            for step, (batch, global_size) in enumerate(batches, start=1):
                optimizer.zero_grad()
                loss, _ = compute_loss(batch, include_mba=penalty_in_loss,
                                       log_loss_scale=distributed.shard_weight(len(batch), global_size, world))
                loss.backward()
                optimizer.step()
                # The ranks' losses average to the global batch's.
                loss_sum += loss.detach() * (global_size / world)
                seen += global_size
                progress.update()
                if step % 50 == 0 or step == steps:
                    # Reading the loss synchronizes a GPU (and the ranks): only every 50 steps.
                    progress.set_postfix(loss=f"{distributed.all_reduce_sum(loss_sum).item() / seen:.4f}")
        train_loss = distributed.all_reduce_sum(loss_sum).item() / seen
        train_seconds = time.perf_counter() - epoch_start
        if not math.isfinite(train_loss):
            if main_process:
                print(f"epoch {epoch}: the training loss is {train_loss}; stopping", file=sys.stderr)
            return 1
        if not main_process:
            continue
        scores = evaluate(model, data, data.test, args.eval_batch_size, args.max_length, device)
        row = {"epoch": epoch, "train_loss": train_loss, "test_auc": scores["auc"], "test_gauc": scores["gauc"],
               "test_logloss": scores["logloss"], "samples_per_s": seen / train_seconds,
               "train_seconds": train_seconds}
        history.append(row)
        tqdm.write(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f}  test AUC {scores['auc']:.4f}  "
                   f"GAUC {scores['gauc']:.4f}  log loss {scores['logloss']:.4f}  "
                   f"{row['samples_per_s']:.0f} samples/s")

    if not main_process:
        return 0
    torch.save({"config": model.config, "state_dict": model.state_dict()}, folder / "checkpoint.pt")
    plots = []
    if not args.no_plots:
        from .plots import plot_attention, plot_learning_curves

        title = f"{model.model_name.upper()} on {data.name}"
        plots.append(plot_learning_curves(history, folder / "learning_curves.png", title).name)
        if hasattr(model, "attention"):
            panels = _attention_panels(model.eval(), data, args.max_length, device)
            if panels:
                plots.append(plot_attention(panels, folder / "attention.png",
                                            f"{title}: attention weights (behaviours x candidates)").name)
    total_seconds = time.perf_counter() - started
    metrics = {"config": {key: value for key, value in vars(args).items() if key != "handler"},
               "data": data.describe(), "model": model.config, "device": str(device),
               "processes": world, "dice_statistics_synchronized": bool(parallel and not args.no_sync_dice),
               "optimizer": type(optimizer).__name__, "l2": args.l2, "mba_penalty_in_loss": bool(args.mba > 0 and penalty_in_loss),
               "epochs": history, "final": history[-1] if history else None, "total_seconds": total_seconds,
               "plots": plots}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    print()
    print(_format_table(history))
    print(f"\ntotal {total_seconds:.1f} s; run folder {folder}")
    return 0


# ----------------------------------------------------------------------------------------------
# serve-bench, bench
# ----------------------------------------------------------------------------------------------


def serve_bench(args) -> int:
    from .models import load_checkpoint
    from .serving import measure_latency, random_requests, serving_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or _default_device())
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, backend=args.backend)
    else:
        model = serving_model(args.model, dice=args.dice, backend=args.backend or "auto")
    model = model.to(device).eval()
    requests = random_requests(model.vocabulary, args.history, args.candidates, count=8, device=device, seed=args.seed)
    result = measure_latency(model, requests, iterations=args.iterations, warmup=args.warmup)
    print(f"{model.model_name.upper()} scoring {args.candidates} candidates against a history of {args.history} on "
          f"{device} ({torch.get_num_threads()} threads, backend {model.backend}): "
          f"p50 {result['p50_ms']:.2f} ms  p90 {result['p90_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
          f"(mean {result['mean_ms']:.2f} ms over {result['iterations']} requests)")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "candidates": args.candidates, "history": args.history,
                                               "threads": torch.get_num_threads(), "device": str(device)}, indent=2))
    return 0


def bench(argv: Sequence[str]) -> int:
    from .benchmarks.run import main as bench_main

    return bench_main(list(argv))


# ----------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="din-fast", description="Deep Interest Network: train, serve, benchmark.")
    commands = parser.add_subparsers(dest="command", required=True)

    t = commands.add_parser("train", help="train DIN or BaseModel and evaluate AUC / GAUC / log loss")
    source = t.add_mutually_exclusive_group()
    source.add_argument("--data", choices=["synthetic"], default="synthetic",
                        help="the synthetic data set with planted interests (default)")
    source.add_argument("--amazon", metavar="DIR",
                        help="folder with reviews_Electronics_5.json and meta_Electronics.json")
    source.add_argument("--movielens", metavar="DIR", help="folder with ratings.csv and movies.csv (MovieLens 20M)")
    t.add_argument("--model", choices=["din", "base"], default="din")
    t.add_argument("--dice", action="store_true", help="Dice instead of PReLU in the top MLP")
    t.add_argument("--mba", type=_non_negative_float, default=0.0, metavar="LAMBDA",
                   help="mini-batch aware regularization strength (0: off)")
    t.add_argument("--l2", type=_non_negative_float, default=0.0, metavar="LAMBDA",
                   help="dense L2 on every embedding row at every step (weight decay), to compare with --mba")
    t.add_argument("--epochs", type=_positive_int, default=3)
    t.add_argument("--batch-size", type=_positive_int, default=256)
    t.add_argument("--eval-batch-size", type=_positive_int, default=4096)
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="with --mba, sgd applies eq. 7 exactly (MBASGD); adam adds the MBA penalty to the loss")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default 5e-3 for adam, 1.0 for sgd)")
    t.add_argument("--max-length", type=_positive_int, default=DEFAULT_MAX_LENGTH,
                   help="behaviours kept per sample (the most recent)")
    t.add_argument("--embedding-dim", type=_positive_int, default=18)
    t.add_argument("--attention-activation", choices=["sigmoid", "relu", "prelu", "dice"], default="sigmoid")
    t.add_argument("--attention-normalization", choices=["none", "softmax"], default="none")
    t.add_argument("--backend", choices=list(BACKENDS), default="auto")
    t.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available); under torchrun cpu or cuda (each "
                        "process takes cuda:LOCAL_RANK)")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default on CPU: 1; a training step's ops are small, so extra "
                        "threads gain little and stall badly when the cores are shared)")
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--synthetic-users", type=_positive_int, default=10000, help="users of the synthetic data set")
    t.add_argument("--max-ratings", type=_positive_int, default=None,
                   help="MovieLens: read only the first N ratings")
    t.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    t.add_argument("--no-sync-dice", action="store_true",
                   help="under torchrun: each process normalizes Dice by its own shard of the batch (as BatchNorm "
                        "without SyncBatchNorm) instead of the whole global batch")
    t.add_argument("--no-plots", action="store_true")
    t.set_defaults(handler=train)

    s = commands.add_parser("serve-bench", help="latency of scoring C candidates for one user")
    s.add_argument("--candidates", type=_positive_int, default=200)
    s.add_argument("--history", type=_positive_int, default=100)
    s.add_argument("--threads", type=_positive_int, default=2)
    s.add_argument("--model", choices=["din", "base"], default="din")
    s.add_argument("--dice", action="store_true")
    s.add_argument("--backend", choices=list(BACKENDS), default=None,
                   help="default: auto, or the one a --checkpoint was trained with (which this replaces)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    s.add_argument("--checkpoint", default=None, help="a checkpoint.pt from din-fast train (default: an untrained "
                                                      "model with Amazon's table sizes)")
    s.add_argument("--iterations", type=_positive_int, default=300)
    s.add_argument("--warmup", type=_positive_int, default=30)
    s.add_argument("--seed", type=_non_negative_int, default=0)
    s.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    s.set_defaults(handler=serve_bench)

    commands.add_parser("bench", help="kernel benchmarks (arguments go to din_fast.benchmarks.run)", add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "mba", 0) > 0 and getattr(args, "l2", 0) > 0:
        parser.error("--mba and --l2 are two ways to regularize the embeddings: choose one")
    world = distributed.environment_world_size()
    if args.command == "train" and args.batch_size % world:
        parser.error(f"--batch-size ({args.batch_size}) must be divisible by the number of processes ({world}): "
                     f"each takes an equal share of every global batch")
    if args.command == "serve-bench" and args.checkpoint and (args.model != "din" or args.dice):
        parser.error("--model and --dice describe an untrained model: a --checkpoint brings its own")
    if getattr(args, "lr", "absent") is None:
        args.lr = 5e-3 if args.optimizer == "adam" else 1.0
    try:
        return args.handler(args)
    except (FileNotFoundError, DataFileError) as error:
        print(f"din-fast: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
