"""Data containers shared by every data set, batching and feature frequencies.

A data set stores each user's behaviour sequence once (chronological, flat arrays with
offsets) and each sample as ``(user, history_end, candidate item, candidate category, label)``:
the sample's behaviours are the first ``history_end`` entries of its user's sequence. Memory
therefore grows with the number of behaviours plus the number of samples, never with their
product. Id 0 is padding in every vocabulary; real ids start at 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

Tensor = torch.Tensor

PADDING_ID = 0


@dataclass(frozen=True)
class Vocabulary:
    """Embedding table sizes (rows, padding row 0 included).

    Attributes:
        item_rows: ``num_items + 1``.
        category_rows: ``num_categories + 1``.
        profile_names: names of the user profile features (may be empty).
        profile_rows: rows of each profile feature's table.
    """

    item_rows: int
    category_rows: int
    profile_names: Tuple[str, ...] = ()
    profile_rows: Tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"item_rows": self.item_rows, "category_rows": self.category_rows,
                "profile_names": list(self.profile_names), "profile_rows": list(self.profile_rows)}

    @classmethod
    def from_dict(cls, values: dict) -> "Vocabulary":
        return cls(int(values["item_rows"]), int(values["category_rows"]), tuple(values["profile_names"]),
                   tuple(int(n) for n in values["profile_rows"]))


@dataclass
class Samples:
    """One split's samples, all ``[N]`` numpy arrays.

    Attributes:
        users: int64 user index (row of ``InteractionData.user_profile`` and of the sequences).
        history_end: int64; the sample's behaviours are its user's first ``history_end`` ones.
        items, categories: int64 candidate ids (>= 1).
        labels: float32 click (1) or not (0).
    """

    users: np.ndarray
    history_end: np.ndarray
    items: np.ndarray
    categories: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def subset(self, index: np.ndarray) -> "Samples":
        return Samples(*(getattr(self, f.name)[index] for f in fields(self)))


@dataclass
class InteractionData:
    """A data set: behaviour sequences, user profiles and train/test samples.

    Attributes:
        name: short description.
        sequence_items, sequence_categories: ``[M]`` int64, every user's behaviours in time order,
            user after user.
        sequence_offsets: ``[U + 1]`` int64; user ``u``'s behaviours are
            ``sequence_*[sequence_offsets[u]:sequence_offsets[u + 1]]``.
        user_profile: ``[U, F]`` int64 profile feature ids (``F`` may be 0).
        item_categories: ``[item_rows]`` int64, the category of each item id (0 for padding).
        vocabulary: table sizes.
        train, test: the samples.
    """

    name: str
    sequence_items: np.ndarray
    sequence_categories: np.ndarray
    sequence_offsets: np.ndarray
    user_profile: np.ndarray
    item_categories: np.ndarray
    vocabulary: Vocabulary
    train: Samples
    test: Samples

    @property
    def num_users(self) -> int:
        return int(self.sequence_offsets.shape[0] - 1)

    def describe(self) -> str:
        lengths = np.diff(self.sequence_offsets)
        return (f"{self.name}: {self.num_users} users, {self.vocabulary.item_rows - 1} items, "
                f"{self.vocabulary.category_rows - 1} categories, {len(self.train)} train / {len(self.test)} test "
                f"samples (click rate {self.train.labels.mean():.3f} / {self.test.labels.mean():.3f}), "
                f"behaviours per user: mean {lengths.mean():.1f}, max {lengths.max()}")


@dataclass
class Batch:
    """A padded mini-batch (torch tensors).

    Attributes:
        profile: ``[B, F]`` int64 user profile ids.
        items, categories: ``[B]`` int64 candidate ids.
        history_items, history_categories: ``[B, T]`` int64 behaviours, oldest first, padded
            with 0 after the last valid one (``T`` is the batch's longest kept history, >= 1).
        lengths: ``[B]`` int64 valid behaviours per row.
        labels: ``[B]`` float32.
        users: ``[B]`` int64 user index (groups the impressions for GAUC).
    """

    profile: Tensor
    items: Tensor
    categories: Tensor
    history_items: Tensor
    history_categories: Tensor
    lengths: Tensor
    labels: Tensor
    users: Tensor

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))


def history_bounds(data: InteractionData, samples: Samples, index: np.ndarray,
                   max_length: int) -> Tuple[np.ndarray, np.ndarray]:
    """Flat ``[start, end)`` bounds of each selected sample's kept behaviours: the most recent
    ``max_length`` of them."""
    users = samples.users[index]
    ends = samples.history_end[index]
    lengths = np.minimum(ends, max_length)
    starts = data.sequence_offsets[users] + ends - lengths
    return starts, lengths


def make_batch(data: InteractionData, samples: Samples, index: np.ndarray, max_length: int) -> Batch:
    """Gathers and pads the samples ``samples[index]``; histories longer than ``max_length``
    keep their most recent ``max_length`` behaviours."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    index = np.asarray(index, dtype=np.int64)
    starts, lengths = history_bounds(data, samples, index, max_length)
    width = max(int(lengths.max()) if lengths.size else 0, 1)
    steps = np.arange(width, dtype=np.int64)
    valid = steps[None, :] < lengths[:, None]
    positions = np.where(valid, starts[:, None] + steps[None, :], 0)
    history_items = np.where(valid, data.sequence_items[positions], PADDING_ID)
    history_categories = np.where(valid, data.sequence_categories[positions], PADDING_ID)
    users = samples.users[index]
    return Batch(
        profile=torch.from_numpy(np.ascontiguousarray(data.user_profile[users], dtype=np.int64)),
        items=torch.from_numpy(samples.items[index].astype(np.int64)),
        categories=torch.from_numpy(samples.categories[index].astype(np.int64)),
        history_items=torch.from_numpy(history_items.astype(np.int64)),
        history_categories=torch.from_numpy(history_categories.astype(np.int64)),
        lengths=torch.from_numpy(lengths.astype(np.int64)),
        labels=torch.from_numpy(samples.labels[index].astype(np.float32)),
        users=torch.from_numpy(users.astype(np.int64)),
    )


def batch_indices(num_samples: int, batch_size: int, *, shuffle: bool = False,
                  rng: Optional[np.random.Generator] = None) -> Iterator[np.ndarray]:
    """Yields the sample indices of each batch (the last one may be smaller), in a random order
    drawn from ``rng`` when ``shuffle``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.arange(num_samples)
    if shuffle:
        (rng if rng is not None else np.random.default_rng()).shuffle(order)
    for first in range(0, num_samples, batch_size):
        yield order[first:first + batch_size]


def iterate_batches(data: InteractionData, samples: Samples, batch_size: int, max_length: int, *,
                    shuffle: bool = False, rng: Optional[np.random.Generator] = None,
                    device=None) -> Iterator[Batch]:
    """Yields the padded batches of ``samples`` (the last one may be smaller), in a random order
    drawn from ``rng`` when ``shuffle``."""
    for index in batch_indices(len(samples), batch_size, shuffle=shuffle, rng=rng):
        batch = make_batch(data, samples, index, max_length)
        yield batch if device is None else batch.to(device)


def num_batches(samples: Samples, batch_size: int) -> int:
    return (len(samples) + batch_size - 1) // batch_size


def feature_counts(data: InteractionData, max_length: int) -> Dict[str, np.ndarray]:
    """Feature frequencies ``n_j`` for MBA regularization: how often each id occurs in the
    training samples, as candidate or as one of the (kept) behaviours, counted per sample
    occurrence. Ids never seen count as 1 (eq. 7 divides by ``n_j``).

    Returns ``{"item": [item_rows], "category": [category_rows], <profile name>: [rows]}``,
    float64. Cost O(samples + behaviours): a difference array gives how many training samples
    keep each flat behaviour position.
    """
    train = data.train
    starts, lengths = history_bounds(data, train, np.arange(len(train)), max_length)
    coverage = np.zeros(data.sequence_items.shape[0] + 1, dtype=np.int64)
    np.add.at(coverage, starts, 1)
    np.add.at(coverage, starts + lengths, -1)
    coverage = np.cumsum(coverage[:-1])
    vocab = data.vocabulary
    items = (np.bincount(data.sequence_items, weights=coverage, minlength=vocab.item_rows)
             + np.bincount(train.items, minlength=vocab.item_rows))
    categories = (np.bincount(data.sequence_categories, weights=coverage, minlength=vocab.category_rows)
                  + np.bincount(train.categories, minlength=vocab.category_rows))
    counts = {"item": items, "category": categories}
    per_user = np.bincount(train.users, minlength=data.num_users)
    for column, (name, rows) in enumerate(zip(vocab.profile_names, vocab.profile_rows)):
        counts[name] = np.bincount(data.user_profile[:, column], weights=per_user, minlength=rows)
    return {name: np.maximum(values.astype(np.float64), 1.0) for name, values in counts.items()}

