"""Feature frequencies ``n_j`` for mini-batch aware regularization (DIN eq. 4-7).

``n_j`` is the number of occurrences of id j in the whole training set. Count them once, batch
by batch, before training::

    counter = FeatureCounter(num_items, padding_idx=0)
    for batch in train_loader:
        counter.update(batch["item"], batch["history_items"])   # columns sharing one table
    counts = counter.counts()                                  # int64 [K], unseen ids count as 1

Each update costs O(number of ids), not O(K).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

Tensor = torch.Tensor
IdColumn = Union[Tensor, np.ndarray]


class FeatureCounter:
    """Streaming occurrence counts of the ids of one embedding table.

    Args:
        num_rows: the table's size K; every id must lie in ``[0, K)``.
        padding_idx: an id that marks padding and is never counted.
        device: where the counts live (default CPU); ids from elsewhere are moved there.
    """

    def __init__(self, num_rows: int, padding_idx: Optional[int] = None, device: Union[str, torch.device] = "cpu"):
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows <= 0:
            raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
                raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
            if not 0 <= padding_idx < num_rows:
                raise ValueError(f"padding_idx must lie in [0, {num_rows}), got {padding_idx}")
        self.num_rows = num_rows
        self.padding_idx = padding_idx
        self._occurrences = torch.zeros(num_rows, dtype=torch.int64, device=device)

    def _checked(self, name: str, ids: IdColumn) -> Tensor:
        if isinstance(ids, np.ndarray):
            # torch.from_numpy takes no negative strides (a reversed view).
            ids = torch.from_numpy(np.ascontiguousarray(ids))
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array of ints, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
        flat = ids.reshape(-1).to(device=self._occurrences.device, dtype=torch.int64)
        if flat.numel():
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.num_rows:
                raise ValueError(f"{name} must lie in [0, {self.num_rows}), got values in [{lo}, {hi}]")
        if self.padding_idx is not None:
            flat = flat[flat != self.padding_idx]
        return flat

    def update(self, *ids: IdColumn) -> "FeatureCounter":
        """Counts every id of each column (tensors or numpy arrays of any shape and integer
        dtype, all ids of this one table). Every column is checked before anything is counted,
        so a bad column leaves the counts unchanged. Returns ``self``."""
        flats = [self._checked(f"ids[{i}]" if len(ids) > 1 else "ids", col) for i, col in enumerate(ids)]
        for flat in flats:
            self._occurrences.index_add_(0, flat, torch.ones_like(flat))
        return self

    def occurrences(self) -> Tensor:
        """int64 ``[K]``: the raw number of times each id was seen (0 for unseen ids)."""
        return self._occurrences.clone()

    def counts(self) -> Tensor:
        """int64 ``[K]``: ``n_j`` for MBA regularization, ids never seen (and padding) counting as 1
        so that ``1 / n_j`` stays finite."""
        return self._occurrences.clamp(min=1)


def count_features(batches_of_ids: Iterable[Union[IdColumn, Sequence[IdColumn]]], num_rows: int,
                   padding_idx: Optional[int] = None) -> Tensor:
    """``n_j`` over an iterable of batches; each batch is one id column or a tuple/list of
    columns sharing the table. Returns ``FeatureCounter(...).counts()`` (int64 ``[K]``, CPU)."""
    counter = FeatureCounter(num_rows, padding_idx)
    for batch in batches_of_ids:
        if isinstance(batch, (tuple, list)):
            counter.update(*batch)
        else:
            counter.update(batch)
    return counter.counts()
