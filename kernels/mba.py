"""Triton kernels for mini-batch aware (MBA) regularization (DIN eq. 4-7).

Every kernel works on the *unique* rows of a batch (``rows``: sorted, distinct int64 row ids),
so its cost grows with the number of distinct ids in the batch, never with the table size K.
Offsets into the table are computed in int64 (tables of 10M x 64 and more). Loads are upcast to
fp32 (fp64 for float64 tables) before any arithmetic.

Kernels:

* ``_mba_penalty_forward_kernel``: per unique row, ``||w_j||^2 / n_j``.
* ``_mba_penalty_backward_kernel``: writes ``coef * w_j / n_j`` into the rows of a gradient.
* ``_mba_sgd_dense_kernel``: eq. 7 on the unique rows with the gradient read from a dense
  ``[K, D]`` gradient at those rows.
* ``_mba_segment_sum_kernel`` then ``_mba_sgd_segment_kernel``: eq. 7 where the gradient of each
  unique row is the sum of the looked-up rows' gradients that share its id (a sorted segment), so
  no ``[K, D]`` gradient exists (the fused embedding-backward form). The first sums pieces of at
  most ``_PIECE_ENTRIES`` entries, one program each, so that a hot id's segment is summed in
  parallel; the second sums each row's pieces and updates the row.

The host launchers below take already-checked arguments: ``rows`` sorted distinct and in range,
``row_counts`` the frequencies ``n_j`` of ``rows`` (``[U]``, >= 1) in the compute dtype. They do
no autograd.
"""

from __future__ import annotations

import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from din_fast._numerics import compute_dtype
from din_fast.kernels._jit import jit_unspecialized

# Elements of a [rows, D] tile held by one program of the row-parallel kernels (half for
# float64, whose values take two registers each; a full tile spills on sm_90).
_TILE_ELEMENTS = 1024
# Rows summed at once by the segment kernels' programs: a piece of n entries takes n /
# _SEGMENT_BLOCK dependent steps, not n.
_SEGMENT_BLOCK = 16
# Entries of a segment summed by one program of the first segment kernel. Zipf ids have hot
# ones: the hottest of 4096 x 101 ids drawn over 1M rows with exponent 1.1 (the benchmark's)
# has 37,113 entries, summed by one program 16 at a time before pieces existed, which made the
# fused step 4x slower than the torch backend's on an H200.
_PIECE_ENTRIES = 256
# Unique rows handled one after another by one program of the update kernel.
_SEGMENT_ROWS_PER_PROGRAM = 4
_NUM_WARPS = 4


@jit_unspecialized
def _mba_penalty_forward_kernel(weight_ptr, rows_ptr, row_counts_ptr, out_ptr, num_rows, dim, stride_weight,
                                BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    offs_u = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = offs_u < num_rows
    rows = tl.load(rows_ptr + offs_u, mask=row_mask, other=0).to(tl.int64)
    n = tl.load(row_counts_ptr + offs_u, mask=row_mask, other=1).to(ACC_DTYPE)
    row_base = weight_ptr + rows[:, None] * stride_weight
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=ACC_DTYPE)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < dim)
        w = tl.load(row_base + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        acc += w * w
    tl.store(out_ptr + offs_u, tl.sum(acc, axis=1) / n, mask=row_mask)


@triton.jit
def _batch_row_tile(rows_ptr, row_counts_ptr, num_rows, dim, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC_DTYPE: tl.constexpr):
    """This program's tile (grid axis 0: unique rows, axis 1: columns): the row ids (int64
    [BLOCK_ROWS]), their counts n_j ([BLOCK_ROWS], 1 where masked), the columns ([BLOCK_D]) and
    the tile mask ([BLOCK_ROWS, BLOCK_D])."""
    offs_u = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = offs_u < num_rows
    rows = tl.load(rows_ptr + offs_u, mask=row_mask, other=0).to(tl.int64)
    n = tl.load(row_counts_ptr + offs_u, mask=row_mask, other=1).to(ACC_DTYPE)
    return rows, n, cols, row_mask[:, None] & (cols[None, :] < dim)


@jit_unspecialized
def _mba_penalty_backward_kernel(weight_ptr, rows_ptr, row_counts_ptr, coef_ptr, grad_weight_ptr, num_rows, dim,
                                 stride_weight, stride_grad, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                                 ACC_DTYPE: tl.constexpr):
    rows, n, cols, mask = _batch_row_tile(rows_ptr, row_counts_ptr, num_rows, dim, BLOCK_ROWS, BLOCK_D, ACC_DTYPE)
    coef = tl.load(coef_ptr).to(ACC_DTYPE)
    w = tl.load(weight_ptr + rows[:, None] * stride_weight + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    grad = (coef / n)[:, None] * w
    tl.store(grad_weight_ptr + rows[:, None] * stride_grad + cols[None, :],
             grad.to(grad_weight_ptr.dtype.element_ty), mask=mask)


@jit_unspecialized
def _mba_sgd_dense_kernel(weight_ptr, grad_ptr, rows_ptr, row_counts_ptr, num_rows, dim, stride_weight, stride_grad,
                          lam_hi, lam_lo, lr_hi, lr_lo, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                          ACC_DTYPE: tl.constexpr):
    rows, n, cols, mask = _batch_row_tile(rows_ptr, row_counts_ptr, num_rows, dim, BLOCK_ROWS, BLOCK_D, ACC_DTYPE)
    lam = tl.cast(lam_hi, ACC_DTYPE) + tl.cast(lam_lo, ACC_DTYPE)
    lr = tl.cast(lr_hi, ACC_DTYPE) + tl.cast(lr_lo, ACC_DTYPE)
    w_ptrs = weight_ptr + rows[:, None] * stride_weight + cols[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    w = w - lr * (g + (lam / n)[:, None] * w)
    tl.store(w_ptrs, w.to(weight_ptr.dtype.element_ty), mask=mask)


@jit_unspecialized
def _mba_segment_sum_kernel(grad_rows_ptr, order_ptr, piece_lo_ptr, piece_hi_ptr, partial_ptr, dim, stride_grad_rows,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    lo = tl.load(piece_lo_ptr + pid_p)
    hi = tl.load(piece_hi_ptr + pid_p)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC_DTYPE)
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hi
        src = tl.load(order_ptr + ks, mask=k_mask, other=0).to(tl.int64)
        g = tl.load(grad_rows_ptr + src[:, None] * stride_grad_rows + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += g.to(ACC_DTYPE)
    tl.store(partial_ptr + pid_p.to(tl.int64) * dim + cols, tl.sum(acc, axis=0), mask=col_mask)


@jit_unspecialized
def _mba_sgd_segment_kernel(weight_ptr, partial_ptr, piece_start_ptr, piece_end_ptr, rows_ptr, row_counts_ptr,
                            num_rows, dim, stride_weight, lam_hi, lam_lo, lr_hi, lr_lo,
                            ROWS_PER_PROGRAM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                            ACC_DTYPE: tl.constexpr):
    pid_u = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    lam = tl.cast(lam_hi, ACC_DTYPE) + tl.cast(lam_lo, ACC_DTYPE)
    lr = tl.cast(lr_hi, ACC_DTYPE) + tl.cast(lr_lo, ACC_DTYPE)
    for r in tl.static_range(ROWS_PER_PROGRAM):
        u = pid_u * ROWS_PER_PROGRAM + r
        valid = u < num_rows
        row = tl.load(rows_ptr + u, mask=valid, other=0).to(tl.int64)
        n = tl.load(row_counts_ptr + u, mask=valid, other=1).to(ACC_DTYPE)
        # An out-of-range u gets no pieces: [0, 0).
        start = tl.load(piece_start_ptr + u, mask=valid, other=0)
        end = tl.load(piece_end_ptr + u, mask=valid, other=0)
        acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC_DTYPE)
        for k0 in range(start, end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            acc += tl.load(partial_ptr + ks[:, None] * dim + cols[None, :],
                           mask=(ks < end)[:, None] & col_mask[None, :], other=0.0)
        # valid broadcast explicitly: the interpreter rejects a scalar mask operand.
        mask = col_mask & (tl.zeros([BLOCK_D], dtype=tl.int32) + u < num_rows)
        w_ptrs = weight_ptr + row * stride_weight + cols
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        w = w - lr * (tl.sum(acc, axis=0) + (lam / n) * w)
        tl.store(w_ptrs, w.to(weight_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(dim: int) -> int:
    return min(128, max(16, triton.next_power_of_2(dim)))


def _block_rows(block_d: int, dtype: torch.dtype) -> int:
    return (_TILE_ELEMENTS // 2 if dtype == torch.float64 else _TILE_ELEMENTS) // block_d


def _to_f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _split_f64(value: float) -> Tuple[float, float]:
    """``value`` as fp32 ``hi + lo``: Python floats reach a kernel as fp32 scalars, and the
    kernels rebuild ``hi + lo`` in their compute dtype, which keeps ~48 bits for float64 tables."""
    hi = _to_f32(value)
    return hi, _to_f32(value - hi)


def _check_rows(weight: torch.Tensor, rows: torch.Tensor, row_counts: torch.Tensor) -> None:
    # D = 1: the column stride is never used.
    assert weight.dim() == 2 and (weight.stride(1) == 1 or weight.shape[1] == 1), \
        "weight must be [K, D] with unit stride in D"
    assert weight.dtype in _TRITON_DTYPE, f"unsupported table dtype {weight.dtype}"
    assert rows.dtype == torch.int64 and rows.dim() == 1 and rows.is_contiguous()
    assert row_counts.shape == rows.shape and row_counts.dtype == compute_dtype(weight.dtype)


def mba_penalty_rows(weight: torch.Tensor, rows: torch.Tensor, row_counts: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``||w_j||^2 / n_j`` for each unique row.

    Args:
        weight: ``[K, D]`` table (float32, bfloat16, float16 or float64), unit stride in D.
        rows: ``[U]`` int64 distinct row ids.
        row_counts: ``[U]`` ``n_j`` of ``rows``, in ``compute_dtype(weight.dtype)``.
        out: optional ``[U]`` buffer in the compute dtype.

    Returns:
        ``[U]`` in ``compute_dtype(weight.dtype)``.
    """
    _check_rows(weight, rows, row_counts)
    num_rows, dim = rows.shape[0], weight.shape[1]
    if out is None:
        out = torch.empty(num_rows, dtype=row_counts.dtype, device=weight.device)
    assert out.shape == rows.shape and out.dtype == row_counts.dtype and out.is_contiguous()
    if num_rows == 0:
        return out
    block_d = _block_d(dim)
    block_rows = _block_rows(block_d, weight.dtype)
    _mba_penalty_forward_kernel[(triton.cdiv(num_rows, block_rows),)](
        weight, rows, row_counts, out, num_rows, dim, weight.stride(0), BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        ACC_DTYPE=_acc_dtype(weight.dtype), num_warps=_NUM_WARPS)
    return out


def mba_penalty_backward(weight: torch.Tensor, rows: torch.Tensor, row_counts: torch.Tensor, coef: torch.Tensor,
                         grad_weight: torch.Tensor) -> torch.Tensor:
    """Writes ``coef * w_j / n_j`` into rows ``rows`` of ``grad_weight`` (``[K, D]``, weight's
    dtype, unit stride in D); every other row of ``grad_weight`` is left as it is.

    ``coef`` is a one-element tensor (``lam * grad_out``) on the table's device, so no value
    crosses to the host. Returns ``grad_weight``.
    """
    _check_rows(weight, rows, row_counts)
    assert grad_weight.shape == weight.shape and grad_weight.dtype == weight.dtype and grad_weight.stride(1) == 1
    assert coef.numel() == 1 and coef.device == weight.device
    num_rows, dim = rows.shape[0], weight.shape[1]
    if num_rows == 0:
        return grad_weight
    block_d = _block_d(dim)
    block_rows = _block_rows(block_d, weight.dtype)
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(dim, block_d))
    _mba_penalty_backward_kernel[grid](
        weight, rows, row_counts, coef, grad_weight, num_rows, dim, weight.stride(0), grad_weight.stride(0),
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, ACC_DTYPE=_acc_dtype(weight.dtype), num_warps=_NUM_WARPS)
    return grad_weight


def mba_sgd_dense_(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, row_counts: torch.Tensor,
                   lam: float, lr: float) -> torch.Tensor:
    """Eq. 7 in place on rows ``rows`` of ``weight``: ``w_j <- w_j - lr * (grad_j + lam / n_j * w_j)``,
    with ``grad`` a dense ``[K, D]`` gradient (weight's dtype, unit stride in D) read only at
    ``rows``. No other row is read or written. Returns ``weight``."""
    _check_rows(weight, rows, row_counts)
    assert grad.shape == weight.shape and grad.dtype == weight.dtype and grad.stride(1) == 1
    num_rows, dim = rows.shape[0], weight.shape[1]
    if num_rows == 0:
        return weight
    block_d = _block_d(dim)
    block_rows = _block_rows(block_d, weight.dtype)
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(dim, block_d))
    _mba_sgd_dense_kernel[grid](
        weight, grad, rows, row_counts, num_rows, dim, weight.stride(0), grad.stride(0), *_split_f64(lam),
        *_split_f64(lr), BLOCK_ROWS=block_rows, BLOCK_D=block_d, ACC_DTYPE=_acc_dtype(weight.dtype),
        num_warps=_NUM_WARPS)
    return weight


def mba_sgd_segment_(weight: torch.Tensor, grad_rows: torch.Tensor, order: torch.Tensor, seg_start: torch.Tensor,
                     seg_end: torch.Tensor, rows: torch.Tensor, row_counts: torch.Tensor, lam: float,
                     lr: float) -> torch.Tensor:
    """Eq. 7 in place on rows ``rows`` of ``weight``, the gradient of row ``rows[u]`` being
    ``sum_{k in [seg_start[u], seg_end[u])} grad_rows[order[k]]``.

    Args:
        grad_rows: ``[M, D]`` looked-up rows' gradients (weight's dtype, unit stride in D).
        order: ``[M']`` int64 positions into ``grad_rows``, grouped so each unique row's entries
            are contiguous (a stable argsort of the looked-up ids).
        seg_start, seg_end: ``[U]`` int64 bounds into ``order``; an empty segment means no
            gradient (the row is only regularized).

    Two launches: ``_mba_segment_sum_kernel`` sums the segments in pieces (``_segment_pieces``)
    into a ``[P, D]`` buffer in the compute dtype, ``_mba_sgd_segment_kernel`` sums each row's
    pieces and updates it. Returns ``weight``; no row outside ``rows`` is read or written.
    """
    _check_rows(weight, rows, row_counts)
    assert grad_rows.dim() == 2 and grad_rows.shape[1] == weight.shape[1] and grad_rows.stride(1) == 1
    assert grad_rows.dtype == weight.dtype
    assert order.dtype == seg_start.dtype == seg_end.dtype == torch.int64
    assert seg_start.shape == seg_end.shape == rows.shape
    num_rows, dim = rows.shape[0], weight.shape[1]
    if num_rows == 0:
        return weight
    block_d = _block_d(dim)
    piece_lo, piece_hi, piece_start, piece_end = _segment_pieces(seg_start, seg_end, order.shape[0])
    partial = torch.empty(piece_lo.shape[0], dim, dtype=compute_dtype(weight.dtype), device=weight.device)
    _mba_segment_sum_kernel[(piece_lo.shape[0], triton.cdiv(dim, block_d))](
        grad_rows, order, piece_lo, piece_hi, partial, dim, grad_rows.stride(0), BLOCK_K=_SEGMENT_BLOCK,
        BLOCK_D=block_d, ACC_DTYPE=_acc_dtype(weight.dtype), num_warps=_NUM_WARPS)
    grid = (triton.cdiv(num_rows, _SEGMENT_ROWS_PER_PROGRAM), triton.cdiv(dim, block_d))
    _mba_sgd_segment_kernel[grid](
        weight, partial, piece_start, piece_end, rows, row_counts, num_rows, dim, weight.stride(0),
        *_split_f64(lam), *_split_f64(lr), ROWS_PER_PROGRAM=_SEGMENT_ROWS_PER_PROGRAM, BLOCK_K=_SEGMENT_BLOCK,
        BLOCK_D=block_d, ACC_DTYPE=_acc_dtype(weight.dtype), num_warps=_NUM_WARPS)
    return weight


def _segment_pieces(seg_start: torch.Tensor, seg_end: torch.Tensor, num_entries: int
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cuts each segment ``[seg_start[u], seg_end[u])`` (``[U]`` int64, within ``num_entries``)
    into pieces of at most ``_PIECE_ENTRIES`` entries, on the device with no host sync.

    Returns ``(piece_lo, piece_hi)`` ``[P]``, each piece's bounds, and ``(piece_start,
    piece_end)`` ``[U]``, row u's pieces. ``P = U + num_entries // _PIECE_ENTRIES`` bounds the
    count (a row of n entries has at most ``n // _PIECE_ENTRIES + 1`` pieces); the pieces past
    the last are empty.
    """
    pieces = (seg_end - seg_start + _PIECE_ENTRIES - 1) // _PIECE_ENTRIES
    piece_end = pieces.cumsum(0)
    piece_start = piece_end - pieces
    index = torch.arange(seg_start.shape[0] + num_entries // _PIECE_ENTRIES, device=seg_start.device)
    row = torch.searchsorted(piece_end, index, right=True).clamp_(max=seg_start.shape[0] - 1)
    piece_lo = seg_start[row] + (index - piece_start[row]) * _PIECE_ENTRIES
    piece_hi = torch.where(index < piece_end[-1], torch.minimum(piece_lo + _PIECE_ENTRIES, seg_end[row]), piece_lo)
    return piece_lo, piece_hi, piece_start, piece_end


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every configuration the launchers above can choose.
# ----------------------------------------------------------------------------------------------


def _aot_specs():
    specs = []
    for dtype, tname in _TRITON_DTYPE.items():
        acc_dtype = _acc_dtype(dtype)
        cname = "fp64" if dtype == torch.float64 else "fp32"
        for block_d in (16, 32, 64, 128):
            block_rows = _block_rows(block_d, dtype)
            tag = f"{tname}_d{block_d}"
            specs.append(dict(
                name=f"mba_penalty_forward_{tag}", fn=_mba_penalty_forward_kernel,
                signature={"weight_ptr": f"*{tname}", "rows_ptr": "*i64", "row_counts_ptr": f"*{cname}",
                           "out_ptr": f"*{cname}", "num_rows": "i32", "dim": "i32", "stride_weight": "i64",
                           "BLOCK_ROWS": "constexpr", "BLOCK_D": "constexpr", "ACC_DTYPE": "constexpr"},
                constexprs={"BLOCK_ROWS": block_rows, "BLOCK_D": block_d, "ACC_DTYPE": acc_dtype},
                num_warps=_NUM_WARPS))
            specs.append(dict(
                name=f"mba_penalty_backward_{tag}", fn=_mba_penalty_backward_kernel,
                signature={"weight_ptr": f"*{tname}", "rows_ptr": "*i64", "row_counts_ptr": f"*{cname}",
                           "coef_ptr": f"*{cname}", "grad_weight_ptr": f"*{tname}", "num_rows": "i32",
                           "dim": "i32", "stride_weight": "i64", "stride_grad": "i64", "BLOCK_ROWS": "constexpr",
                           "BLOCK_D": "constexpr", "ACC_DTYPE": "constexpr"},
                constexprs={"BLOCK_ROWS": block_rows, "BLOCK_D": block_d, "ACC_DTYPE": acc_dtype},
                num_warps=_NUM_WARPS))
            specs.append(dict(
                name=f"mba_sgd_dense_{tag}", fn=_mba_sgd_dense_kernel,
                signature={"weight_ptr": f"*{tname}", "grad_ptr": f"*{tname}", "rows_ptr": "*i64",
                           "row_counts_ptr": f"*{cname}", "num_rows": "i32", "dim": "i32", "stride_weight": "i64",
                           "stride_grad": "i64", "lam_hi": "fp32", "lam_lo": "fp32", "lr_hi": "fp32",
                           "lr_lo": "fp32", "BLOCK_ROWS": "constexpr", "BLOCK_D": "constexpr",
                           "ACC_DTYPE": "constexpr"},
                constexprs={"BLOCK_ROWS": block_rows, "BLOCK_D": block_d, "ACC_DTYPE": acc_dtype},
                num_warps=_NUM_WARPS))
            specs.append(dict(
                name=f"mba_segment_sum_{tag}", fn=_mba_segment_sum_kernel,
                signature={"grad_rows_ptr": f"*{tname}", "order_ptr": "*i64", "piece_lo_ptr": "*i64",
                           "piece_hi_ptr": "*i64", "partial_ptr": f"*{cname}", "dim": "i32",
                           "stride_grad_rows": "i64", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
                           "ACC_DTYPE": "constexpr"},
                constexprs={"BLOCK_K": _SEGMENT_BLOCK, "BLOCK_D": block_d, "ACC_DTYPE": acc_dtype},
                num_warps=_NUM_WARPS))
            specs.append(dict(
                name=f"mba_sgd_segment_{tag}", fn=_mba_sgd_segment_kernel,
                signature={"weight_ptr": f"*{tname}", "partial_ptr": f"*{cname}", "piece_start_ptr": "*i64",
                           "piece_end_ptr": "*i64", "rows_ptr": "*i64", "row_counts_ptr": f"*{cname}",
                           "num_rows": "i32", "dim": "i32", "stride_weight": "i64", "lam_hi": "fp32",
                           "lam_lo": "fp32", "lr_hi": "fp32", "lr_lo": "fp32", "ROWS_PER_PROGRAM": "constexpr",
                           "BLOCK_K": "constexpr", "BLOCK_D": "constexpr", "ACC_DTYPE": "constexpr"},
                constexprs={"ROWS_PER_PROGRAM": _SEGMENT_ROWS_PER_PROGRAM, "BLOCK_K": _SEGMENT_BLOCK,
                            "BLOCK_D": block_d, "ACC_DTYPE": acc_dtype},
                num_warps=_NUM_WARPS))
    return specs


AOT_SPECS = _aot_specs()
