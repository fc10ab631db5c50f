"""PNG figures of a training run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_learning_curves(history: List[Dict[str, float]], path: Path, title: str = "") -> Path:
    """Training loss, test log loss, test AUC and GAUC per epoch (``history``: one dict per epoch
    with ``epoch``, ``train_loss``, ``test_logloss``, ``test_auc``, ``test_gauc``)."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
    loss_axis.plot(epochs, [row["test_logloss"] for row in history], marker="o", label="test log loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("log loss")
    loss_axis.legend()
    auc_axis.plot(epochs, [row["test_auc"] for row in history], marker="o", label="test AUC")
    auc_axis.plot(epochs, [row["test_gauc"] for row in history], marker="o", label="test GAUC")
    auc_axis.set_xlabel("epoch")
    auc_axis.set_ylabel("AUC")
    auc_axis.legend()
    for axis in (loss_axis, auc_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_attention(panels: Sequence[dict], path: Path, title: str = "") -> Path:
    """Attention weights of users' behaviours against candidates, as heatmaps (one panel per
    user; the paper's Figure 5 shows one candidate's weights over a user's behaviours).

    Each panel is a dict with ``weights`` ``[C, T]`` (array), ``behaviour_labels`` (T strings),
    ``candidate_labels`` (C strings) and ``title``.
    """
    figure, axes = plt.subplots(len(panels), 1, figsize=(11, 1.2 + 0.45 * sum(len(p["candidate_labels"])
                                                                                for p in panels) + 0.9 * len(panels)),
                                squeeze=False)
    for axis, panel in zip(axes[:, 0], panels):
        weights = np.asarray(panel["weights"], dtype=np.float64)
        # Unnormalized weights may be negative (the sign is the model's choice): a diverging map
        # centred at 0 shows their magnitude either way.
        limit = max(float(np.abs(weights).max()), 1e-12)
        image = axis.imshow(weights, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        axis.set_yticks(range(len(panel["candidate_labels"])), panel["candidate_labels"], fontsize=7)
        axis.set_xticks(range(len(panel["behaviour_labels"])), panel["behaviour_labels"], fontsize=6, rotation=90)
        axis.set_ylabel("candidate", fontsize=8)
        axis.set_title(panel["title"], fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.025, pad=0.01)
    axes[-1, 0].set_xlabel("behaviours, oldest to most recent (category of each)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
