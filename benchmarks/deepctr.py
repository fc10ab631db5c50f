"""DeepCTR-Torch's DIN training throughput before and after ``din_fast.integrations.deepctr_torch.patch``.

``python -m benchmarks.deepctr [--batch 1024] [--seq-lens 50,100] [--variants dice,sigmoid] [--threads 1]
[--device cpu|cuda] [--rounds 7] [--steps 3] [--out results/deepctr.json|.csv]``

One DeepCTR-Torch ``DIN`` per case (embedding size 8 per feature; the candidate and the history
are item and category, so the attention works on 16-wide embeddings), and a deep copy of it
patched with din_fast. Both train on the same batches with what ``BaseModel.fit`` does per step:
forward, summed binary cross-entropy plus ``get_regularization_loss()``, backward, an Adam step
(``compile("adam")``). Variants: ``dice`` (DeepCTR's defaults: Dice, attention MLP (64, 16), no
weight normalization) and ``sigmoid`` (sigmoid, (80, 40), the paper's unit). Histories have
valid lengths drawn uniformly from ``[1, T]``.

Timing: each round times ``--steps`` steps of one model, then of the other (their order
alternates between rounds, so load from elsewhere on a shared machine hits both alike); the
reported throughput is the median over rounds in samples per second. After timing, the two
models, trained alike, are compared on one batch in evaluation mode (``max_abs_diff`` of their
predictions). In float32 that difference is training drift, not an error: after a couple of
dozen Adam steps DeepCTR's own float32 model is about as far (1e-5) from its float64 twin.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .run import environment

VARIANTS = {"dice": dict(att_activation="Dice", att_hidden_size=(64, 16)),
            "sigmoid": dict(att_activation="sigmoid", att_hidden_size=(80, 40))}
EMBEDDING_DIM = 8
NUM_USERS, NUM_ITEMS, NUM_CATEGORIES = 10_000, 50_000, 500


def build_din(seq_len: int, variant: str, device: str):
    """DeepCTR-Torch's DIN laid out as its examples/run_din.py, at benchmark sizes."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN

    features = [SparseFeat("user", NUM_USERS, embedding_dim=EMBEDDING_DIM),
                SparseFeat("gender", 2, embedding_dim=EMBEDDING_DIM),
                SparseFeat("item_id", NUM_ITEMS, embedding_dim=EMBEDDING_DIM),
                SparseFeat("cate_id", NUM_CATEGORIES, embedding_dim=EMBEDDING_DIM),
                DenseFeat("pay_score", 1)]
    features += [
        VarLenSparseFeat(SparseFeat("hist_item_id", NUM_ITEMS, embedding_dim=EMBEDDING_DIM, embedding_name="item_id"),
                         maxlen=seq_len, length_name="seq_length"),
        VarLenSparseFeat(SparseFeat("hist_cate_id", NUM_CATEGORIES, embedding_dim=EMBEDDING_DIM,
                                    embedding_name="cate_id"), maxlen=seq_len, length_name="seq_length")]
    return DIN(features, ["item_id", "cate_id"], device=device, **VARIANTS[variant])


def make_batch(model, batch: int, seq_len: int, device: str, generator: torch.Generator):
    """``(X, y)`` in DeepCTR's input layout (columns in ``model.feature_index`` order, float32 as
    ``fit`` feeds them); histories padded with id 0 after their valid length."""
    def ids(high, *shape):
        return torch.randint(1, high, shape, generator=generator)

    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    padding = torch.arange(seq_len)[None, :] >= lengths[:, None]
    columns = {"user": ids(NUM_USERS, batch), "gender": torch.randint(0, 2, (batch,), generator=generator),
               "item_id": ids(NUM_ITEMS, batch), "cate_id": ids(NUM_CATEGORIES, batch),
               "pay_score": torch.rand(batch, generator=generator),
               "hist_item_id": ids(NUM_ITEMS, batch, seq_len).masked_fill(padding, 0),
               "hist_cate_id": ids(NUM_CATEGORIES, batch, seq_len).masked_fill(padding, 0),
               "seq_length": lengths}
    x = torch.cat([columns[name].float().reshape(batch, -1) for name in model.feature_index], dim=1)
    y = torch.randint(0, 2, (batch,), generator=generator).float()
    return x.to(device), y.to(device)


def train_step(model, optimizer, x, y) -> None:
    """One step of ``BaseModel.fit`` (without its metrics and its host read of the loss)."""
    prediction = model(x).squeeze(-1)
    optimizer.zero_grad()
    loss = F.binary_cross_entropy(prediction, y, reduction="sum")
    (loss + model.get_regularization_loss() + model.aux_loss).backward()
    optimizer.step()


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(variant: str, seq_len: int, batch: int, device: str, rounds: int, steps: int, warmup: int,
             backend: str, seed: int = 0) -> Dict[str, object]:
    from din_fast.integrations.deepctr_torch import patch

    torch.manual_seed(seed)
    deepctr = build_din(seq_len, variant, device)
    fast = patch(copy.deepcopy(deepctr), backend=backend)
    generator = torch.Generator().manual_seed(seed)
    batches = [make_batch(deepctr, batch, seq_len, device, generator) for _ in range(max(steps, 1))]
    providers = {"deepctr": (deepctr, torch.optim.Adam(deepctr.parameters())),
                 "din_fast": (fast, torch.optim.Adam(fast.parameters()))}
    for model, _ in providers.values():
        model.train()
    times: Dict[str, List[float]] = {name: [] for name in providers}
    for round_index in range(warmup + rounds):
        order = list(providers) if round_index % 2 == 0 else list(reversed(providers))
        for name in order:
            model, optimizer = providers[name]
            _synchronize(device)
            start = time.perf_counter()
            for step in range(steps):
                train_step(model, optimizer, *batches[step % len(batches)])
            _synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    # Both models took the same steps on the same batches: their predictions must still agree.
    with torch.no_grad():
        deepctr.eval()
        fast.eval()
        max_abs_diff = (fast(batches[0][0]) - deepctr(batches[0][0])).abs().max().item()
    throughput = {name: steps * batch / statistics.median(values) for name, values in times.items()}
    return dict(variant=variant, att_activation=VARIANTS[variant]["att_activation"],
                att_hidden_size="x".join(map(str, VARIANTS[variant]["att_hidden_size"])), seq_len=seq_len,
                batch=batch, embedding_dim=EMBEDDING_DIM, threads=torch.get_num_threads(), backend=backend,
                rounds=rounds, steps=steps, deepctr_samples_per_s=throughput["deepctr"],
                din_fast_samples_per_s=throughput["din_fast"],
                speedup=throughput["din_fast"] / throughput["deepctr"], max_abs_diff=max_abs_diff)


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    header = ("variant", "att MLP", "T", "batch", "DeepCTR samples/s", "din_fast samples/s", "ratio", "max |diff|")
    lines = [header] + [(row["variant"], row["att_hidden_size"], str(row["seq_len"]), str(row["batch"]),
                         f"{row['deepctr_samples_per_s']:,.0f}", f"{row['din_fast_samples_per_s']:,.0f}",
                         f"{row['speedup']:.2f}x", f"{row['max_abs_diff']:.1e}") for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def write_rows(rows: Sequence[Dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(json.dumps(rows, indent=2) + "\n")


def _int_list(text: str) -> List[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seq-lens", type=_int_list, default=[50, 100], help="history lengths T, comma-separated")
    parser.add_argument("--variants", default="dice,sigmoid", help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", help="din_fast backend of the patched model")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per provider (median)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--out", type=Path, help="write the rows as JSON (or CSV for a .csv name)")
    args = parser.parse_args(argv)
    args.variants = [name for name in args.variants.split(",") if name]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment("cuda" if args.device.startswith("cuda") else "cpu")
    print(f"# {env['device_name']}, torch {env['torch']}, commit {env['commit']}", file=sys.stderr)
    rows = []
    for variant in args.variants:
        for seq_len in args.seq_lens:
            row = run_case(variant, seq_len, args.batch, args.device, args.rounds, args.steps, args.warmup,
                           args.backend)
            rows.append({**row, **env})
            print(f"# {variant} T={seq_len}: {row['speedup']:.2f}x", file=sys.stderr)
    print(format_table(rows))
    if args.out:
        write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
