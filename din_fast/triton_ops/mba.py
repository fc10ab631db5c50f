"""Triton backend of mini-batch aware (MBA) regularization (DIN eq. 4-7).

* ``mba_penalty``: same signature and semantics as ``din_fast.reference.mba_penalty``,
  registered with ``torch.library`` (``din_fast::mba_penalty`` and its backward
  ``din_fast::mba_penalty_backward``, each with a fake implementation) so ``torch.compile``
  traces it without graph breaks. Forward and backward touch only the batch's unique rows; the
  backward returns a ``[K, D]`` gradient that is zero outside those rows. It is differentiable
  once: the backward op has no autograd formula (no double backward, unlike the torch backend).
* ``mba_sgd_step_`` and ``mba_sgd_fused_``: the in-place eq. 7 updates behind
  ``din_fast.optim`` (which checks their arguments and holds the plain-PyTorch equivalents).

Arguments arrive checked (see ``din_fast.functional`` and ``din_fast.optim``).
"""

from __future__ import annotations

from typing import Optional

import torch

from din_fast._numerics import compute_dtype
from din_fast.kernels import mba as _k

Tensor = torch.Tensor


def _unique_rows(ids: Tensor, padding_idx: Optional[int] = None) -> Tensor:
    """Sorted distinct int64 row ids of ``ids`` (any shape), without ``padding_idx``."""
    rows = torch.unique(ids.reshape(-1)).to(torch.int64)
    if padding_idx is not None:
        rows = rows[rows != padding_idx]
    return rows


def _row_counts(counts: Tensor, rows: Tensor, table_dtype: torch.dtype) -> Tensor:
    # Gathering first keeps the cost in the batch's unique rows, not in K.
    return counts.index_select(0, rows).to(compute_dtype(table_dtype))


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _written(weight: Tensor) -> Tensor:
    """``weight`` after a kernel wrote it in place: its version counter is bumped as an in-place
    torch op would, so that autograd refuses a backward that saved the old values."""
    torch.autograd.graph.increment_version(weight)
    return weight


# ----------------------------------------------------------------------------------------------
# Penalty (eq. 4-6), differentiable
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("din_fast::mba_penalty", mutates_args=())
def _mba_penalty_op(weight: Tensor, ids: Tensor, counts: Tensor, lam: float) -> Tensor:
    rows = _unique_rows(ids)
    per_row = _k.mba_penalty_rows(_unit_stride(weight), rows, _row_counts(counts, rows, weight.dtype))
    return (0.5 * lam * per_row.sum()).to(weight.dtype)


@_mba_penalty_op.register_fake
def _(weight, ids, counts, lam):
    return weight.new_empty(())


@torch.library.custom_op("din_fast::mba_penalty_backward", mutates_args=())
def _mba_penalty_backward_op(grad_out: Tensor, weight: Tensor, ids: Tensor, counts: Tensor, lam: float) -> Tensor:
    rows = _unique_rows(ids)
    coef = (grad_out.to(compute_dtype(weight.dtype)) * lam).reshape(1)
    grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    return _k.mba_penalty_backward(_unit_stride(weight), rows, _row_counts(counts, rows, weight.dtype), coef,
                                   grad_weight)


@_mba_penalty_backward_op.register_fake
def _(grad_out, weight, ids, counts, lam):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def _setup_context(ctx, inputs, output):
    weight, ids, counts, lam = inputs
    # Only the ids are kept, not their unique rows: re-deduplicating in backward is a sort of
    # the batch's ids, and the forward's output stays a plain scalar.
    ctx.save_for_backward(weight, ids, counts)
    ctx.lam = lam


def _backward(ctx, grad_out):
    weight, ids, counts = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_weight = _mba_penalty_backward_op(grad_out, weight, ids, counts, ctx.lam)
    return grad_weight, None, None, None


_mba_penalty_op.register_autograd(_backward, setup_context=_setup_context)


def mba_penalty(weight: Tensor, ids: Tensor, counts: Tensor, lam: float) -> Tensor:
    """``lam / 2 * sum_{j in unique(ids)} ||w_j||^2 / n_j`` (see ``din_fast.reference.mba_penalty``).

    Args:
        weight: ``[K, D]`` floating table; ids: int32/int64, any shape, in ``[0, K)``;
        counts: ``[K]`` frequencies ``n_j >= 1`` (any real dtype); lam: ``>= 0``.

    Returns:
        A scalar in weight's dtype.
    """
    return _mba_penalty_op(weight, ids, counts, float(lam))


# ----------------------------------------------------------------------------------------------
# Fused updates (eq. 7)
# ----------------------------------------------------------------------------------------------


def _segment_update_(weight: Tensor, rows: Tensor, grad_ids: Tensor, grad_values: Tensor, counts: Tensor,
                     lam: float, lr: float) -> Tensor:
    """Eq. 7 on ``rows`` with row j's gradient the sum of ``grad_values`` [M, D] where
    ``grad_ids`` [M] equals j; entries whose id is not in ``rows`` are ignored."""
    sorted_ids, order = torch.sort(grad_ids.reshape(-1).to(torch.int64))
    seg_start = torch.searchsorted(sorted_ids, rows)
    seg_end = torch.searchsorted(sorted_ids, rows, right=True)
    # An explicit row count: with D = 0, reshape(-1, 0) cannot infer it.
    grad_values = grad_values.reshape(grad_ids.numel(), weight.shape[1])
    return _k.mba_sgd_segment_(weight, _unit_stride(grad_values), order, seg_start,
                               seg_end, rows, _row_counts(counts, rows, weight.dtype), lam, lr)


def mba_sgd_step_(weight: Tensor, grad: Tensor, ids: Optional[Tensor], counts: Tensor, lam: float, lr: float,
                  padding_idx: Optional[int] = None) -> Tensor:
    """Eq. 7 in place on the unique rows of ``ids`` (without ``padding_idx``).

    ``grad`` is dense ``[K, D]`` (read only at those rows) or a sparse COO ``[K, D]`` gradient,
    coalesced or not (duplicates are summed); with a sparse gradient ``ids=None`` means the
    gradient's own row indices. Returns ``weight``.
    """
    if grad.is_sparse:
        grad_ids = grad._indices()[0]
        if ids is None:
            return mba_sgd_fused_(weight, grad_ids, grad._values(), counts, lam, lr, padding_idx)
        _segment_update_(weight, _unique_rows(ids, padding_idx), grad_ids, grad._values(), counts, lam, lr)
        return _written(weight)
    rows = _unique_rows(ids, padding_idx)
    _k.mba_sgd_dense_(weight, _unit_stride(grad), rows, _row_counts(counts, rows, weight.dtype), lam, lr)
    return _written(weight)


def mba_sgd_fused_(weight: Tensor, ids: Tensor, grad_rows: Tensor, counts: Tensor, lam: float, lr: float,
                   padding_idx: Optional[int] = None) -> Tensor:
    """Eq. 7 in place from the lookup's output gradient: ``grad_rows`` ``[*ids.shape, D]`` holds
    the gradient of ``weight[ids]``. Duplicate ids' rows are summed (one sort of the ids, then a
    segment sum inside the kernel) and each unique row (but ``padding_idx``) is updated once;
    no ``[K, D]`` gradient is built. Returns ``weight``."""
    sorted_ids, order = torch.sort(ids.reshape(-1).to(torch.int64))
    rows, lengths = torch.unique_consecutive(sorted_ids, return_counts=True)
    seg_end = lengths.cumsum(0)
    seg_start = seg_end - lengths
    if padding_idx is not None:
        keep = rows != padding_idx
        rows, seg_start, seg_end = rows[keep], seg_start[keep], seg_end[keep]
    _k.mba_sgd_segment_(weight, _unit_stride(grad_rows.reshape(ids.numel(), weight.shape[1])), order, seg_start,
                        seg_end, rows, _row_counts(counts, rows, weight.dtype), lam, lr)
    return _written(weight)
