"""Mini-batch aware (MBA) regularization as an optimizer step (DIN eq. 7).

For an embedding table ``W`` ``[K, D]`` with feature frequencies ``n_j`` (see
``din_fast.frequency``), one step on mini-batch ``B_m`` is

    w_j <- w_j - lr * (grad_j + lam * alpha_mj / n_j * w_j),

``alpha_mj = 1`` iff id j occurs in the batch (once, however often). Only the batch's rows are
read or written: the cost grows with the batch's distinct ids, never with K, and every other
row stays bit-identical.

* ``mba_sgd_step_(weight, grad, ids, counts, lam=, lr=)``: from a dense ``[K, D]`` gradient
  (nonzero only on the batch's rows; read only there) or a sparse COO gradient
  (``nn.Embedding(sparse=True)``).
* ``mba_sgd_fused_(weight, ids, grad_rows, counts, lam=, lr=)``: from the gradient of the
  lookup's output ``weight[ids]``: duplicate ids' rows are summed and each distinct row updated
  once, with no ``[K, D]`` gradient (what a fused embedding backward does).
* ``MBASGD``: a ``torch.optim.Optimizer`` applying eq. 7 to given embedding tables and plain
  SGD to every other parameter; in a data-parallel run it updates the rows of the union of the
  ranks' batches (see ``din_fast.distributed``).

Backends: ``"triton"`` runs the fused kernels (``din_fast.triton_ops.mba``); ``"torch"`` and
``"reference"`` run the plain-PyTorch code below (gather the rows, update, scatter them back);
``"auto"`` follows ``din_fast.backend.resolve_backend``. Float64 tables compute in float64,
every other floating dtype in float32. Every argument is checked before anything is written:
bad input raises ``TypeError``/``ValueError`` naming the argument and leaves the table as it was.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _validation as V
from ._numerics import compute_dtype
from .backend import BACKENDS, resolve_backend
from .functional import check_counts

Tensor = torch.Tensor
EmbeddingTable = Union[nn.Embedding, nn.EmbeddingBag, Tensor]


# ----------------------------------------------------------------------------------------------
# Argument checks (all run before any write)
# ----------------------------------------------------------------------------------------------


def _check_weight(weight) -> None:
    V.check_tensor("weight", weight, ndim=(2,), floating=True)
    if weight.layout != torch.strided:
        raise TypeError(f"weight must be a dense (strided) tensor, got layout {weight.layout}")
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        raise ValueError(f"weight must have unit stride along D to be updated in place, got strides "
                         f"{tuple(weight.stride())}")


def _check_scalars(lam, lr) -> Tuple[float, float]:
    lam = V.check_positive_float("lam", lam, allow_zero=True)
    # lr = 0 is a step that changes nothing, as torch.optim.SGD takes it (warm-up schedules start there).
    lr = V.check_positive_float("lr", lr, allow_zero=True)
    return lam, lr


def _check_padding_idx(padding_idx, num_rows: int) -> Optional[int]:
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not 0 <= padding_idx < num_rows:
        raise ValueError(f"padding_idx must lie in [0, {num_rows}), got {padding_idx}")
    return padding_idx


def _check_ids(name: str, ids, weight: Tensor) -> Tensor:
    V.check_tensor(name, ids)
    if ids.device != weight.device:
        raise ValueError(f"{name} must be on {weight.device} like weight, got {ids.device}")
    return V.check_index_tensor(name, ids, weight.shape[0])


def _check_batch_counts(counts: Tensor, weight: Tensor, ids: Tensor, padding_idx: Optional[int]) -> None:
    """Shape, dtype and device of ``counts``; its values only on the batch's rows (padding
    excluded), so a step never reads all K counts."""
    rows = ids.reshape(-1)
    if padding_idx is not None:
        rows = rows[rows != padding_idx]
    check_counts(counts, weight.shape[0], weight, rows=rows)


def _check_same_kind(name: str, value: Tensor, weight: Tensor) -> None:
    if value.dtype != weight.dtype:
        raise TypeError(f"{name} must have weight's dtype {weight.dtype}, got {value.dtype}")
    if value.device != weight.device:
        raise ValueError(f"{name} must be on {weight.device} like weight, got {value.device}")


def _check_grad(grad, weight: Tensor, ids: Optional[Tensor]) -> None:
    V.check_tensor("grad", grad)
    if tuple(grad.shape) != tuple(weight.shape):
        raise ValueError(f"grad must have weight's shape {tuple(weight.shape)}, got {tuple(grad.shape)}")
    _check_same_kind("grad", grad, weight)
    if grad.layout == torch.strided:
        if ids is None:
            raise ValueError("ids must be given with a dense grad (they name the batch's rows)")
        return
    if grad.layout != torch.sparse_coo or grad.sparse_dim() != 1 or grad.dense_dim() != 1:
        raise TypeError(f"grad must be dense or a sparse COO tensor with one sparse and one dense dim "
                        f"(nn.Embedding(sparse=True)), got layout {grad.layout}")
    grad_ids = grad._indices()[0]
    _check_ids("grad's indices", grad_ids, weight)
    if ids is not None and grad_ids.numel() and not bool(torch.isin(grad_ids, ids.reshape(-1)).all()):
        raise ValueError("grad has nonzero rows whose ids are not in ids: the sparse gradient and ids must come "
                         "from the same batch")


def _check_grad_rows(grad_rows, ids: Tensor, weight: Tensor) -> None:
    V.check_tensor("grad_rows", grad_rows, floating=True)
    expected = (*ids.shape, weight.shape[1])
    if tuple(grad_rows.shape) not in (expected, (ids.numel(), weight.shape[1])):
        raise ValueError(f"grad_rows must have shape [*ids.shape, D] = {list(expected)}, got {list(grad_rows.shape)}")
    _check_same_kind("grad_rows", grad_rows, weight)
    if grad_rows.layout != torch.strided:
        raise TypeError(f"grad_rows must be a dense tensor, got layout {grad_rows.layout}")


def _triton_mba(backend: str, device: torch.device):
    """The triton module when ``backend`` resolves to triton on ``device``, else None (torch path)."""
    V.check_choice("backend", backend, BACKENDS)
    if resolve_backend(backend, device, "mba_penalty") == "triton":
        from .triton_ops import mba
        return mba
    return None


# ----------------------------------------------------------------------------------------------
# Plain-PyTorch path
# ----------------------------------------------------------------------------------------------


def _unique_rows(ids: Tensor, padding_idx: Optional[int]) -> Tensor:
    rows = torch.unique(ids.reshape(-1)).to(torch.int64)
    return rows if padding_idx is None else rows[rows != padding_idx]


def _torch_update_rows_(weight: Tensor, rows: Tensor, grad_at_rows: Tensor, counts: Tensor, lam: float,
                        lr: float) -> Tensor:
    compute = compute_dtype(weight.dtype)
    w = weight.index_select(0, rows).to(compute)
    scale = lam / counts.index_select(0, rows).to(compute)
    weight.index_copy_(0, rows, (w - lr * (grad_at_rows.to(compute) + scale[:, None] * w)).to(weight.dtype))
    return weight


def _torch_segment_sum(rows: Tensor, grad_ids: Tensor, grad_values: Tensor, dtype: torch.dtype) -> Tensor:
    """``[U, D]``: for each of the sorted ``rows``, the sum of ``grad_values`` rows whose id
    matches; ids outside ``rows`` are dropped."""
    grad_ids = grad_ids.reshape(-1).to(torch.int64)
    grad_values = grad_values.reshape(grad_ids.shape[0], grad_values.shape[-1])
    acc = torch.zeros(rows.shape[0], grad_values.shape[1], dtype=dtype, device=grad_values.device)
    if rows.numel() == 0 or grad_ids.numel() == 0:
        return acc
    pos = torch.searchsorted(rows, grad_ids).clamp(max=rows.shape[0] - 1)
    hit = rows[pos] == grad_ids
    return acc.index_add_(0, pos[hit], grad_values[hit].to(dtype))


def _torch_sgd_step_(weight, grad, ids, counts, lam, lr, padding_idx=None) -> Tensor:
    if grad.is_sparse:
        grad_ids = grad._indices()[0]
        rows = _unique_rows(grad_ids if ids is None else ids, padding_idx)
        grad_at_rows = _torch_segment_sum(rows, grad_ids, grad._values(), compute_dtype(weight.dtype))
    else:
        rows = _unique_rows(ids, padding_idx)
        grad_at_rows = grad.index_select(0, rows)
    return _torch_update_rows_(weight, rows, grad_at_rows, counts, lam, lr)


def _torch_sgd_fused_(weight, ids, grad_rows, counts, lam, lr, padding_idx=None) -> Tensor:
    flat_ids = ids.reshape(-1).to(torch.int64)
    rows, position = torch.unique(flat_ids, return_inverse=True)
    compute = compute_dtype(weight.dtype)
    grad_at_rows = torch.zeros(rows.shape[0], weight.shape[1], dtype=compute, device=weight.device)
    grad_at_rows.index_add_(0, position, grad_rows.reshape(flat_ids.shape[0], weight.shape[1]).to(compute))
    if padding_idx is not None:
        kept = rows != padding_idx
        rows, grad_at_rows = rows[kept], grad_at_rows[kept]
    return _torch_update_rows_(weight, rows, grad_at_rows, counts, lam, lr)


# ----------------------------------------------------------------------------------------------
# Public functional API
# ----------------------------------------------------------------------------------------------


def _check_step(weight, grad, ids, counts, lam, lr, padding_idx):
    _check_weight(weight)
    if ids is not None:
        _check_ids("ids", ids, weight)
    _check_grad(grad, weight, ids)
    lam, lr = _check_scalars(lam, lr)
    padding_idx = _check_padding_idx(padding_idx, weight.shape[0])
    _check_batch_counts(counts, weight, grad._indices()[0] if ids is None else ids, padding_idx)
    return lam, lr, padding_idx


def _check_fused(weight, ids, grad_rows, counts, lam, lr, padding_idx):
    _check_weight(weight)
    _check_ids("ids", ids, weight)
    _check_grad_rows(grad_rows, ids, weight)
    lam, lr = _check_scalars(lam, lr)
    padding_idx = _check_padding_idx(padding_idx, weight.shape[0])
    _check_batch_counts(counts, weight, ids, padding_idx)
    return lam, lr, padding_idx


@torch.no_grad()
def mba_sgd_step_(weight: Tensor, grad: Tensor, ids: Optional[Tensor], counts: Tensor, *, lam: float, lr: float,
                  padding_idx: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Eq. 7 in place on exactly the distinct rows of ``ids`` (``padding_idx`` excluded).

    Args:
        weight: ``[K, D]`` floating table, unit stride along D; updated in place.
        grad: the batch-mean loss gradient of ``weight``: dense ``[K, D]`` (weight's dtype; read
            only on the batch's rows, so it must be zero elsewhere, as a lookup's gradient is) or
            sparse COO (``nn.Embedding(sparse=True)``; duplicate entries are summed; every row
            it holds must be in ``ids``).
        ids: int32/int64, any shape, in ``[0, K)``: the rows the batch looked up. May be
            ``None`` with a sparse ``grad``: its own indices are then the batch's rows.
        counts: ``[K]`` frequencies ``n_j >= 1`` (any real dtype), on weight's device.
        lam: ``>= 0``; lr: ``>= 0``.
        padding_idx: a row never read nor written.

    Returns:
        ``weight``.
    """
    lam, lr, padding_idx = _check_step(weight, grad, ids, counts, lam, lr, padding_idx)
    triton_mba = _triton_mba(backend, weight.device)
    if triton_mba is not None:
        return triton_mba.mba_sgd_step_(weight, grad, ids, counts, lam, lr, padding_idx)
    return _torch_sgd_step_(weight, grad, ids, counts, lam, lr, padding_idx)


@torch.no_grad()
def mba_sgd_fused_(weight: Tensor, ids: Tensor, grad_rows: Tensor, counts: Tensor, *, lam: float, lr: float,
                   padding_idx: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Eq. 7 in place from the gradient of the lookup ``weight[ids]``, with no ``[K, D]`` gradient.

    Args:
        weight: ``[K, D]`` floating table, unit stride along D; updated in place.
        ids: int32/int64, any shape, in ``[0, K)``.
        grad_rows: ``[*ids.shape, D]`` (or ``[ids.numel(), D]``) in weight's dtype: the gradient
            of the batch-mean loss with respect to ``weight[ids]``. Rows of equal ids are summed.
        counts: ``[K]`` frequencies ``n_j >= 1``; lam: ``>= 0``; lr: ``>= 0``.
        padding_idx: a row never read nor written (its gradient rows are dropped).

    Returns:
        ``weight``.
    """
    lam, lr, padding_idx = _check_fused(weight, ids, grad_rows, counts, lam, lr, padding_idx)
    triton_mba = _triton_mba(backend, weight.device)
    if triton_mba is not None:
        return triton_mba.mba_sgd_fused_(weight, ids, grad_rows, counts, lam, lr, padding_idx)
    return _torch_sgd_fused_(weight, ids, grad_rows, counts, lam, lr, padding_idx)


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------


@dataclass
class _Table:
    index: int
    counts: Tensor
    padding_idx: Optional[int]
    recorded_ids: List[Tensor] = field(default_factory=list)


def _record_hook(optimizer_ref):
    def hook(module, args, kwargs):
        optimizer = optimizer_ref()
        if optimizer is None or not torch.is_grad_enabled() or not module.weight.requires_grad:
            return
        optimizer.record_ids(module.weight, args[0] if args else kwargs["input"])
    return hook


def _parse_embedding(i: int, entry, padding_idx: Optional[int]):
    """``(weight, module or None, counts, padding_idx)`` of one checked ``embeddings`` entry."""
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise ValueError(f"embeddings[{i}] must be a (table, counts) pair")
    table, counts = entry
    module = table if isinstance(table, (nn.Embedding, nn.EmbeddingBag)) else None
    weight = module.weight if module is not None else table
    if not isinstance(weight, Tensor):
        raise TypeError(f"embeddings[{i}] table must be an nn.Embedding, nn.EmbeddingBag or a weight tensor, "
                        f"got {type(table).__name__}")
    _check_weight(weight)
    check_counts(counts, weight.shape[0], weight)
    pad = padding_idx if padding_idx is not None else getattr(module, "padding_idx", None)
    return weight, module, counts, _check_padding_idx(pad, weight.shape[0])


# What a parameter group may hold: its tensors (and their names) and the options step reads.
_GROUP_OPTIONS = {"params", "param_names", "lr", "lam"}


def _param_groups(params) -> List[dict]:
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors or dicts, got a tensor")
    params = list(params)
    if not params or not isinstance(params[0], dict):
        return [{"params": params}] if params else []
    groups = []
    for group in params:
        group = dict(group)
        group["params"] = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        groups.append(group)
    return groups


def _tensor(param) -> Tensor:
    """A parameter given plainly or as ``named_parameters()``'s ``(name, tensor)``."""
    return param[1] if isinstance(param, tuple) else param


def _check_group_values(group: dict, where: str) -> None:
    try:
        _check_scalars(group.get("lam", 0.0), group.get("lr", 0.0))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None


def _check_gradient_within_rows(index: int, grad: Tensor, rows: Tensor) -> None:
    """A dense gradient must be 0 off the rows the batch's recorded lookups used: step updates
    only those rows, so any other gradient would be dropped without a word."""
    if not V.values_checkable() or grad.shape[0] == 0:
        return
    outside = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
    outside[rows] = False
    stray = outside & (grad != 0).any(dim=1)
    if bool(stray.any()):
        raise ValueError(
            f"embeddings[{index}] has a nonzero gradient on row {int(stray.nonzero()[0])}, which no recorded "
            f"lookup of this batch used: the table is also used another way (a tied weight, or a module not "
            f"given in embeddings: give every module that looks it up)")


class MBASGD(torch.optim.Optimizer):
    """SGD with mini-batch aware regularization (eq. 7) on embedding tables.

    Each step updates every registered table on exactly the rows the batch used:
    ``w_j <- w_j - lr * (grad_j + lam / n_j * w_j)``; rows not in the batch are not written.
    Every other parameter gets plain SGD, ``p <- p - lr * grad``.

    Which rows did the batch use? The optimizer takes them from

    * a sparse gradient (``nn.Embedding(sparse=True)``): its row indices. Nothing to do.
    * otherwise, the ids recorded since the last step or ``zero_grad``: an ``nn.Embedding`` or
      ``nn.EmbeddingBag`` passed in ``embeddings`` records its input by itself (a forward
      pre-hook, active while autograd is enabled); a bare weight used through
      ``F.embedding`` needs ``optimizer.record_ids(weight, ids)`` once per lookup. A table
      looked up by several modules is given once per module, with the same counts. A dense
      gradient that is nonzero off the recorded rows (the table also used another way, as a
      tied weight or through a module not given) makes ``step`` raise (a value check, one
      pass over the gradient, skipped with ``DIN_FAST_VALUE_CHECKS=0``), as does one with no
      recorded ids; a table with no recorded ids whose gradient is all zero is taken as unused
      by the batch (as after ``zero_grad(set_to_none=False)``) and left alone, eq. 7's penalty
      included.

    Data parallel (``DistributedDataParallel``, which averages the gradients): the global
    mini-batch is the union of the ranks' batches, so each step unites the rows of every rank
    (``din_fast.distributed.union_ids``, one exchange for all tables) and every rank applies the
    same update to the same rows, as one process would on the global batch. Every rank must then
    call ``step`` together.

    Args:
        params: parameters (plain or ``named_parameters()``) or parameter groups, as for
            ``torch.optim.SGD``; group options ``lr`` and ``lam`` override the defaults (any
            other option, or a bad value, raises, also in ``add_param_group`` and, before any
            write, in ``step``). Tables missing from ``params`` are added as groups of their
            own.
        lr: learning rate ``>= 0``.
        embeddings: ``(table, counts)`` pairs: table an ``nn.Embedding``, ``nn.EmbeddingBag`` or
            its ``[K, D]`` weight; counts ``[K]`` frequencies ``n_j >= 1`` on the table's device
            (``din_fast.frequency.FeatureCounter``). Counts are not part of ``state_dict``.
        lam: regularization strength ``lambda >= 0``.
        padding_idx: a row of every table that is never updated; ``None`` uses each module's
            own ``padding_idx``.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"`` (see module doc).
        process_group: the data-parallel ranks whose rows are united; None: torch.distributed's
            default group when it is initialized with more than one rank, else no exchange.
    """

    def __init__(self, params, lr: float, embeddings: Sequence[Tuple[EmbeddingTable, Tensor]] = (),
                 lam: float = 0.0, padding_idx: Optional[int] = None, backend: str = "auto",
                 process_group=None):
        lam, lr = _check_scalars(lam, lr)
        V.check_choice("backend", backend, BACKENDS)
        tables = [_parse_embedding(i, entry, padding_idx) for i, entry in enumerate(embeddings)]
        for i, (weight, _, counts, pad) in enumerate(tables):
            for other, _, other_counts, other_pad in tables[:i]:
                # One table looked up by several modules: each records its ids.
                if weight is other and (pad != other_pad or not (counts is other_counts or (
                        counts.shape == other_counts.shape and bool(torch.equal(counts, other_counts))))):
                    raise ValueError(f"embeddings[{i}] repeats a table given before with other counts or "
                                     f"padding_idx")
        groups = _param_groups(params)
        named = any(isinstance(p, tuple) for group in groups for p in group["params"])
        listed = {id(_tensor(p)) for group in groups for p in group["params"]}
        # A table missing from params gets a group of its own (default lr and lam), named like
        # the others where they are.
        for i, (weight, *_) in enumerate(tables):
            if id(weight) not in listed:
                listed.add(id(weight))
                groups.append({"params": [(f"embeddings[{i}]", weight) if named else weight]})
        super().__init__(groups, dict(lr=lr, lam=lam))
        self.backend = backend
        self.process_group = process_group
        self._tables = {}
        self._hook_handles = []
        optimizer_ref = weakref.ref(self)
        for i, (weight, module, counts, pad) in enumerate(tables):
            self._tables.setdefault(weight, _Table(i, counts, pad))
            if module is not None and not module.sparse:
                self._hook_handles.append(
                    module.register_forward_pre_hook(_record_hook(optimizer_ref), with_kwargs=True))

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer``'s; its options (``lr``, ``lam``) are checked."""
        where = f"param group {len(getattr(self, 'param_groups', ()))}"
        unknown = sorted(set(param_group) - _GROUP_OPTIONS)
        if unknown:
            raise ValueError(f"{where} has options MBASGD does not take: {unknown} (it takes lr and lam)")
        _check_group_values(param_group, where)
        super().add_param_group(param_group)

    def _table(self, table: EmbeddingTable) -> Tuple[Tensor, _Table]:
        weight = table.weight if isinstance(table, (nn.Embedding, nn.EmbeddingBag)) else table
        info = self._tables.get(weight) if isinstance(weight, Tensor) else None
        if info is None:
            raise ValueError("table must be one of the tables given in embeddings")
        return weight, info

    def record_ids(self, table: EmbeddingTable, ids: Tensor) -> None:
        """Notes that the current batch looked up rows ``ids`` (int32/int64, any shape) of
        ``table``; call once per lookup, between ``zero_grad`` and ``step``."""
        weight, info = self._table(table)
        _check_ids("ids", ids, weight)
        info.recorded_ids.append(ids.detach().reshape(-1).to(torch.int64))

    def remove_hooks(self) -> None:
        """Stops the modules given in ``embeddings`` from recording their ids."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._clear_recorded_ids()

    def _clear_recorded_ids(self) -> None:
        for info in self._tables.values():
            info.recorded_ids.clear()

    def _batch_ids(self, weight: Tensor, info: _Table) -> Optional[Tensor]:
        """The rows this process's batch used: its recorded ids, else a sparse gradient's indices."""
        if info.recorded_ids:
            return torch.cat(info.recorded_ids)
        if weight.grad.is_sparse:
            return None
        if not bool(weight.grad.any()):
            return torch.empty(0, dtype=torch.int64, device=weight.device)
        raise RuntimeError(
            f"embeddings[{info.index}] has a dense gradient but no recorded ids: pass the nn.Embedding "
            f"module (it records its input), use nn.Embedding(sparse=True), or call record_ids(table, ids)")

    def _process_group(self):
        if self.process_group is not None:
            return self.process_group
        from .distributed import default_group

        return default_group()

    def _plan_table(self, weight: Tensor, info: _Table, group: dict, ids: Optional[Tensor]):
        """Checks one table's step and returns the update to run."""
        grad = weight.grad
        counts, pad = info.counts, info.padding_idx
        lam, lr, pad = _check_step(weight, grad, ids, counts, group["lam"], group["lr"], pad)
        triton_mba = _triton_mba(self.backend, weight.device)
        if triton_mba is not None:
            return lambda: triton_mba.mba_sgd_step_(weight, grad, ids, counts, lam, lr, pad)
        return lambda: _torch_sgd_step_(weight, grad, ids, counts, lam, lr, pad)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            # Every group and table is checked before any parameter is written (a scheduler may
            # have set a group's lr since the last step).
            for i, group in enumerate(self.param_groups):
                _check_group_values(group, f"param group {i}")
            tables = [(p, info, group) for group in self.param_groups for p in group["params"]
                      for info in [self._tables.get(p)] if info is not None and p.grad is not None]
            ids = [self._batch_ids(p, info) for p, info, _ in tables]
            process_group = self._process_group()
            if process_group is not None and tables:
                from .distributed import union_table_ids

                local = [p.grad._indices()[0] if table_ids is None else table_ids
                         for (p, _, _), table_ids in zip(tables, ids)]
                ids = union_table_ids(local, [p.shape[0] for p, _, _ in tables], process_group)
            for (p, info, _), table_ids in zip(tables, ids):
                if not p.grad.is_sparse:
                    _check_gradient_within_rows(info.index, p.grad, table_ids)
            updates = [self._plan_table(p, info, group, table_ids)
                       for (p, info, group), table_ids in zip(tables, ids)]
            for group in self.param_groups:
                for p in group["params"]:
                    if p not in self._tables and p.grad is not None:
                        updates.append(lambda p=p, lr=group["lr"]: p.add_(p.grad, alpha=-lr))
            for update in updates:
                update()
        finally:
            self._clear_recorded_ids()
        return loss
