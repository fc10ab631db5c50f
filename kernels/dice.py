"""Dice (eq. 9) kernels and host launchers on ``x`` viewed as ``[M, C]`` (channels last, contiguous).

Math, per channel c, with an optional bool ``mask`` [M] choosing the positions that count in the
batch statistics (``n`` of them):

* ``mean``, ``var`` (biased) over the valid positions, accumulated in fp32 from per-tile moments
  merged with Chan's parallel formula (never ``E[x^2] - E[x]^2``). Each tile's moments are taken
  around one of its own valid values, so a channel whose inputs are all equal gets its mean
  exactly and variance exactly 0 (its rstd is ``1/sqrt(eps)``, which would amplify any rounding).
* ``xhat = (x - mean) * rstd``, ``rstd = 1/sqrt(var + eps)``, ``p = sigmoid(z)`` with
  ``z = xhat``, or ``z = weight * xhat + bias`` for the affine gate (``AFFINE``: optional
  per-channel ``weight``, ``bias``, a BatchNorm's affine transform before the sigmoid),
  ``y = x * (alpha + (1 - alpha) * p)``.
* Backward, with ``g_z = dy * x * (1 - alpha) * p * (1 - p)`` (the gradient at the sigmoid's
  input) and ``s = weight * g_z`` (the gradient with respect to xhat; ``s = g_z`` without the
  affine gate): ``dx = dy * (alpha + (1 - alpha) * p) + rstd * (s - valid * (S1 + xhat * S2) / n)``,
  where ``S1 = sum s`` and ``S2 = sum s * xhat`` run over ALL positions (every output depends on
  mean and var) and the correction reaches only the valid ones (only they enter mean and var);
  ``dalpha = sum dy * x * (1 - p)``, ``dbias = sum g_z`` and ``dweight = sum g_z * xhat`` over
  all positions, so that ``S1 = weight * dbias`` and ``S2 = weight * dweight``: the kernels sum
  ``g_z`` and ``g_z * xhat`` and scale by weight. Inference drops the correction.

Two paths: when ``M`` is small, one program per channel block holds every row on chip and does the
whole op in one launch (one read of ``x``); otherwise a statistics (or gradient-reduction) pass over
a grid of row chunks x channel blocks writes fp32 partials, a small combine kernel reduces them, and
an elementwise pass applies. Inputs are upcast to fp32 on loading, outputs stored in the input dtype;
offsets are int64 on the multi-pass path. Launchers take fp32 contiguous ``alpha``/``weight``/``bias``/
statistics and a ``uint8`` mask view, which the autograd layer (``din_fast.triton_ops.dice``) prepares.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from din_fast._numerics import DICE_KERNEL_MAX_POSITIONS
from din_fast.kernels._jit import is_aligned, jit_aligned_pointers

Tensor = torch.Tensor
# (BLOCK_M, BLOCK_C, num_warps) of the one-launch path: BLOCK_M is the most rows it holds.
ONE_PASS_CONFIGS = ((32, 64, 4), (512, 8, 8))
ONE_PASS_MAX_ROWS = ONE_PASS_CONFIGS[-1][0]
# Tiles of the multi-pass kernels; each program walks `tiles_per_chunk` consecutive row tiles.
MULTI_BLOCK_M, MULTI_BLOCK_C, MULTI_WARPS = 64, 32, 4
# The combine kernels reduce COMBINE_BLOCK_K chunks per step; the launchers keep the chunk count
# at most MAX_CHUNKS so that the serial combine stays short.
COMBINE_BLOCK_K, COMBINE_BLOCK_C, COMBINE_WARPS = 32, 32, 4
MAX_CHUNKS = 512


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_moments(x, valid, BLOCK_M: tl.constexpr):
    """Count (int32), mean and sum of squared deviations [BLOCK_C] of the valid rows of ``x``
    [BLOCK_M, BLOCK_C] (fp32; what invalid rows hold is ignored)."""
    local = tl.arange(0, BLOCK_M)
    count = tl.sum(valid.to(tl.int32), axis=0)
    first = tl.min(tl.where(valid, local, BLOCK_M), axis=0)
    # Centre on one valid value: exact for a constant channel, stable otherwise.
    shift = tl.sum(tl.where((local == first)[:, None], x, 0.0), axis=0)
    keep = valid[:, None]
    mean = shift + tl.sum(tl.where(keep, x - shift[None, :], 0.0), axis=0) / tl.maximum(count, 1).to(tl.float32)
    dev = tl.where(keep, x - mean[None, :], 0.0)
    return count, mean, tl.sum(dev * dev, axis=0)


@triton.jit
def _merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's merge of two (count, mean, m2) summaries."""
    count = count_a + count_b
    weight_b = count_b.to(tl.float32) / tl.maximum(count, 1).to(tl.float32)
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * delta * count_a.to(tl.float32) * weight_b
    return count, mean, m2


@triton.jit
def _finalize_statistics(count, mean, m2, cols, col_ok, write_count, mean_ptr, var_ptr, count_ptr, run_mean_ptr,
                         run_var_ptr, momentum):
    """Stores mean, biased var [C] and the count; applies BatchNorm's running update (unbiased
    variance ``var * n / max(n - 1, 1)``) unless the selection was empty. Returns var."""
    var = m2 / tl.maximum(count, 1).to(tl.float32)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(var_ptr + cols, var, mask=col_ok)
    tl.store(count_ptr, count, mask=write_count)
    # The count is broadcast before the `&`: Triton's interpreter mistypes scalar & vector.
    update = col_ok & ((count + tl.zeros_like(cols)) > 0)
    n = count.to(tl.float32)
    run_mean = tl.load(run_mean_ptr + cols, mask=update, other=0.0)
    run_var = tl.load(run_var_ptr + cols, mask=update, other=0.0)
    unbiased = var * n / tl.maximum(n - 1.0, 1.0)
    tl.store(run_mean_ptr + cols, (1.0 - momentum) * run_mean + momentum * mean, mask=update)
    tl.store(run_var_ptr + cols, (1.0 - momentum) * run_var + momentum * unbiased, mask=update)
    return var


@triton.jit
def _load_affine(ptr, cols, col_ok, IDENTITY: tl.constexpr, AFFINE: tl.constexpr):
    """The affine gate's weight or bias [BLOCK_C] (fp32) from ``ptr``; without the affine gate,
    its identity value (weight 1, bias 0), which the helpers below never apply."""
    if AFFINE:
        return tl.load(ptr + cols, mask=col_ok, other=0.0)
    return tl.zeros_like(cols).to(tl.float32) + IDENTITY


@triton.jit
def _dice_gate(x, mean, var, weight, bias, eps, AFFINE: tl.constexpr):
    """``(xhat, p, q, rstd)`` for ``x`` [BLOCK_M, BLOCK_C] and per-channel mean, var, weight,
    bias [BLOCK_C]: ``p = sigmoid(z)`` (``z = weight * xhat + bias`` if ``AFFINE``, else xhat) and
    ``q = 1 - p``, both accurate when the gate saturates (tiny variances make rstd as large as
    ``1/sqrt(eps)``)."""
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = (x - mean[None, :]) * rstd[None, :]
    z = xhat
    if AFFINE:
        z = xhat * weight[None, :] + bias[None, :]
    tail = tl.exp(-tl.abs(z))
    big = 1.0 / (1.0 + tail)
    small = tail * big
    positive = z >= 0
    return xhat, tl.where(positive, big, small), tl.where(positive, small, big), rstd


@triton.jit
def _dice_grad_terms(x, g, p, q, alpha):
    """Direct part of dx, the gradient at the sigmoid's input (``g_z``), and dalpha's term, per
    element."""
    a = alpha[None, :]
    direct = g * (a + (1.0 - a) * p)
    grad_gate = g * x * (1.0 - a) * (p * q)
    grad_alpha = g * x * q
    return direct, grad_gate, grad_alpha


@triton.jit
def _gate_to_xhat(grad_gate, weight, AFFINE: tl.constexpr):
    """Gradients (or their sums) at the sigmoid's input -> with respect to xhat: times weight."""
    if AFFINE:
        return grad_gate * weight
    return grad_gate


@triton.jit
def _add_triples(a0, b0, c0, a1, b1, c1):
    """Combine function of a three-operand ``tl.reduce``: element-wise sums."""
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _load_valid(mask_ptr, rows, row_ok, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    return row_ok


# ----------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_width(C, VEC: tl.constexpr):
    """``C``, known to the compiler as a multiple of ``VEC`` (the launcher picks VEC dividing C):
    with 16-byte-aligned pointers, rows of ``[M, C]`` and ``[num_chunks, C]`` tensors then start
    on VEC-element boundaries and the column masks are constant over VEC columns, so the loads
    and stores move VEC elements at once (128-bit for fp32, 64-bit for 16-bit inputs)."""
    return (C // VEC) * VEC


@triton.jit
def _one_pass_tile(x_ptr, M, C, pid_c, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """All M rows of channel block ``pid_c`` for the one-launch kernels: rows [BLOCK_M], cols
    [BLOCK_C], their masks, the tile mask, the int32 offsets and x upcast to fp32."""
    rows = tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    tile_ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    return rows, cols, row_ok, col_ok, tile_ok, offs, x


@jit_aligned_pointers
def _dice_forward_one_pass_kernel(x_ptr, mask_ptr, alpha_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, var_ptr,
                                  count_ptr, run_mean_ptr, run_var_ptr, M, C, momentum, eps, HAS_MASK: tl.constexpr,
                                  AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                                  VEC: tl.constexpr):
    """Training forward for M <= BLOCK_M: statistics, running update and output in one launch.
    Grid: (cdiv(C, BLOCK_C),). Needs M * C < 2**31."""
    C = _row_width(C, VEC)
    pid_c = tl.program_id(0)
    rows, cols, row_ok, col_ok, tile_ok, offs, x = _one_pass_tile(x_ptr, M, C, pid_c, BLOCK_M, BLOCK_C)
    valid = _load_valid(mask_ptr, rows, row_ok, HAS_MASK)
    count, mean, m2 = _tile_moments(x, valid, BLOCK_M)
    var = _finalize_statistics(count, mean, m2, cols, col_ok, pid_c == 0, mean_ptr, var_ptr, count_ptr, run_mean_ptr,
                               run_var_ptr, momentum)
    alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)
    weight = _load_affine(weight_ptr, cols, col_ok, 1.0, AFFINE)
    bias = _load_affine(bias_ptr, cols, col_ok, 0.0, AFFINE)
    _, p, _, _ = _dice_gate(x, mean, var, weight, bias, eps, AFFINE)
    y = x * (alpha[None, :] + (1.0 - alpha[None, :]) * p)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=tile_ok)


@jit_aligned_pointers
def _dice_forward_stats_kernel(x_ptr, mask_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr, M, C, tiles_per_chunk,
                               HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                               VEC: tl.constexpr):
    """Per-chunk moments: partials [num_chunks, C] (fp32 mean, m2) and [num_chunks] int32 counts.
    Grid: (num_chunks, cdiv(C, BLOCK_C)); chunk k covers tiles [k * tiles_per_chunk, ...)."""
    C = _row_width(C, VEC)
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    count = tl.full([], 0, tl.int32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(0, tiles_per_chunk):
        rows = (pid_m * tiles_per_chunk + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        tile_ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        valid = _load_valid(mask_ptr, rows, row_ok, HAS_MASK)
        tile_count, tile_mean, tile_m2 = _tile_moments(x, valid, BLOCK_M)
        count, mean, m2 = _merge_moments(count, mean, m2, tile_count, tile_mean, tile_m2)
    part = pid_m.to(tl.int64) * C + cols
    tl.store(part_mean_ptr + part, mean, mask=col_ok)
    tl.store(part_m2_ptr + part, m2, mask=col_ok)
    tl.store(part_count_ptr + pid_m, count, mask=pid_c == 0)


@jit_aligned_pointers
def _dice_forward_combine_kernel(part_mean_ptr, part_m2_ptr, part_count_ptr, mean_ptr, var_ptr, count_ptr,
                                 run_mean_ptr, run_var_ptr, C, num_chunks, momentum, BLOCK_K: tl.constexpr,
                                 BLOCK_C: tl.constexpr,
                                 VEC: tl.constexpr):
    """Reduces the chunk moments to mean, var [C] and the count, and updates the running
    statistics. Grid: (cdiv(C, BLOCK_C),)."""
    C = _row_width(C, VEC)
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    local = tl.arange(0, BLOCK_K)
    count = tl.full([], 0, tl.int32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, num_chunks, BLOCK_K):
        chunks = start + local
        chunk_ok = chunks < num_chunks
        block_ok = chunk_ok[:, None] & col_ok[None, :]
        part = chunks.to(tl.int64)[:, None] * C + cols[None, :]
        chunk_count = tl.load(part_count_ptr + chunks, mask=chunk_ok, other=0)
        chunk_mean = tl.load(part_mean_ptr + part, mask=block_ok, other=0.0)
        chunk_m2 = tl.load(part_m2_ptr + part, mask=block_ok, other=0.0)
        # The parallel form of the merge over BLOCK_K chunks, centred on one non-empty chunk.
        block_count = tl.sum(chunk_count, axis=0)
        first = tl.min(tl.where(chunk_count > 0, local, BLOCK_K), axis=0)
        shift = tl.sum(tl.where((local == first)[:, None], chunk_mean, 0.0), axis=0)
        weight = chunk_count.to(tl.float32)[:, None]
        block_mean = shift + tl.sum(weight * (chunk_mean - shift[None, :]), axis=0) / \
            tl.maximum(block_count, 1).to(tl.float32)
        dev = chunk_mean - block_mean[None, :]
        block_m2 = tl.sum(chunk_m2, axis=0) + tl.sum(weight * dev * dev, axis=0)
        count, mean, m2 = _merge_moments(count, mean, m2, block_count, block_mean, block_m2)
    _finalize_statistics(count, mean, m2, cols, col_ok, pid_c == 0, mean_ptr, var_ptr, count_ptr, run_mean_ptr,
                         run_var_ptr, momentum)


@jit_aligned_pointers
def _dice_forward_apply_kernel(x_ptr, alpha_ptr, weight_ptr, bias_ptr, mean_ptr, var_ptr, y_ptr, M, C, tiles_per_chunk,
                               eps, AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                               VEC: tl.constexpr):
    """Elementwise ``y`` from per-channel fp32 mean and var (batch or running).
    Grid: (num_chunks, cdiv(C, BLOCK_C))."""
    C = _row_width(C, VEC)
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    var = tl.load(var_ptr + cols, mask=col_ok, other=0.0)
    weight = _load_affine(weight_ptr, cols, col_ok, 1.0, AFFINE)
    bias = _load_affine(bias_ptr, cols, col_ok, 0.0, AFFINE)
    for tile in range(0, tiles_per_chunk):
        rows = (pid_m * tiles_per_chunk + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        tile_ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        _, p, _, _ = _dice_gate(x, mean, var, weight, bias, eps, AFFINE)
        y = x * (alpha[None, :] + (1.0 - alpha[None, :]) * p)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------


@jit_aligned_pointers
def _dice_backward_one_pass_kernel(x_ptr, g_ptr, mask_ptr, alpha_ptr, weight_ptr, bias_ptr, mean_ptr, var_ptr,
                                   count_ptr, dx_ptr, dalpha_ptr, dweight_ptr, dbias_ptr, M, C, eps,
                                   HAS_MASK: tl.constexpr, TRAINING: tl.constexpr, AFFINE: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                                   VEC: tl.constexpr):
    """dx, dalpha and with ``AFFINE`` dweight, dbias (fp32 [C]) for M <= BLOCK_M in one launch.
    Grid: (cdiv(C, BLOCK_C),). Needs M * C < 2**31."""
    C = _row_width(C, VEC)
    pid_c = tl.program_id(0)
    rows, cols, row_ok, col_ok, tile_ok, offs, x = _one_pass_tile(x_ptr, M, C, pid_c, BLOCK_M, BLOCK_C)
    g = tl.load(g_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    var = tl.load(var_ptr + cols, mask=col_ok, other=0.0)
    weight = _load_affine(weight_ptr, cols, col_ok, 1.0, AFFINE)
    bias = _load_affine(bias_ptr, cols, col_ok, 0.0, AFFINE)
    xhat, p, q, rstd = _dice_gate(x, mean, var, weight, bias, eps, AFFINE)
    direct, grad_gate, grad_alpha = _dice_grad_terms(x, g, p, q, alpha)
    grad_xhat = _gate_to_xhat(grad_gate, weight[None, :], AFFINE)
    if TRAINING:
        # Loaded ahead of the channel sums, so that its latency hides behind them.
        inv_count = 1.0 / tl.maximum(tl.load(count_ptr), 1).to(tl.float32)
    sum_gate = tl.sum(grad_gate, axis=0)
    sum_gate_xhat = tl.sum(grad_gate * xhat, axis=0)
    if TRAINING:
        coef_mean = _gate_to_xhat(sum_gate, weight, AFFINE) * inv_count
        coef_var = _gate_to_xhat(sum_gate_xhat, weight, AFFINE) * inv_count
        valid = _load_valid(mask_ptr, rows, row_ok, HAS_MASK)
        correction = tl.where(valid[:, None], coef_mean[None, :] + xhat * coef_var[None, :], 0.0)
        dx = direct + rstd[None, :] * (grad_xhat - correction)
    else:
        dx = direct + rstd[None, :] * grad_xhat
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dalpha_ptr + cols, tl.sum(grad_alpha, axis=0), mask=col_ok)
    if AFFINE:
        tl.store(dweight_ptr + cols, sum_gate_xhat, mask=col_ok)
        tl.store(dbias_ptr + cols, sum_gate, mask=col_ok)


@jit_aligned_pointers
def _dice_backward_reduce_kernel(x_ptr, g_ptr, alpha_ptr, weight_ptr, bias_ptr, mean_ptr, var_ptr, part_gate_ptr,
                                 part_gate_xhat_ptr, part_dalpha_ptr, M, C, tiles_per_chunk, eps, AFFINE: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                                 VEC: tl.constexpr):
    """Training: per-chunk sums over all rows of ``g_z``, ``g_z * xhat`` (the partials of dbias
    and dweight) and dalpha's terms, fp32 partials [num_chunks, C].
    Grid: (num_chunks, cdiv(C, BLOCK_C))."""
    C = _row_width(C, VEC)
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    var = tl.load(var_ptr + cols, mask=col_ok, other=0.0)
    weight = _load_affine(weight_ptr, cols, col_ok, 1.0, AFFINE)
    bias = _load_affine(bias_ptr, cols, col_ok, 0.0, AFFINE)
    sum_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gate_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dalpha = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(0, tiles_per_chunk):
        rows = (pid_m * tiles_per_chunk + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        tile_ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        xhat, p, q, _ = _dice_gate(x, mean, var, weight, bias, eps, AFFINE)
        _, grad_gate, grad_alpha = _dice_grad_terms(x, g, p, q, alpha)
        sum_gate += tl.sum(grad_gate, axis=0)
        sum_gate_xhat += tl.sum(grad_gate * xhat, axis=0)
        sum_dalpha += tl.sum(grad_alpha, axis=0)
    part = pid_m.to(tl.int64) * C + cols
    tl.store(part_gate_ptr + part, sum_gate, mask=col_ok)
    tl.store(part_gate_xhat_ptr + part, sum_gate_xhat, mask=col_ok)
    tl.store(part_dalpha_ptr + part, sum_dalpha, mask=col_ok)


@jit_aligned_pointers
def _dice_backward_combine_kernel(part_gate_ptr, part_gate_xhat_ptr, part_dalpha_ptr, count_ptr, weight_ptr,
                                  coef_mean_ptr, coef_var_ptr, dalpha_ptr, dweight_ptr, dbias_ptr, C, num_chunks,
                                  TRAINING: tl.constexpr, AFFINE: tl.constexpr, BLOCK_K: tl.constexpr,
                                  BLOCK_C: tl.constexpr,
                                  VEC: tl.constexpr):
    """Sums the chunk partials: dalpha [C]; with ``AFFINE`` dbias and dweight [C]; in training
    the correction coefficients ``S1 / n`` and ``S2 / n`` [C]. Grid: (cdiv(C, BLOCK_C),)."""
    C = _row_width(C, VEC)
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    local = tl.arange(0, BLOCK_K)
    sum_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gate_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dalpha = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, num_chunks, BLOCK_K):
        chunks = start + local
        block_ok = (chunks < num_chunks)[:, None] & col_ok[None, :]
        part = chunks.to(tl.int64)[:, None] * C + cols[None, :]
        sum_dalpha += tl.sum(tl.load(part_dalpha_ptr + part, mask=block_ok, other=0.0), axis=0)
        if TRAINING or AFFINE:
            sum_gate += tl.sum(tl.load(part_gate_ptr + part, mask=block_ok, other=0.0), axis=0)
            sum_gate_xhat += tl.sum(tl.load(part_gate_xhat_ptr + part, mask=block_ok, other=0.0), axis=0)
    tl.store(dalpha_ptr + cols, sum_dalpha, mask=col_ok)
    if AFFINE:
        tl.store(dweight_ptr + cols, sum_gate_xhat, mask=col_ok)
        tl.store(dbias_ptr + cols, sum_gate, mask=col_ok)
    if TRAINING:
        weight = _load_affine(weight_ptr, cols, col_ok, 1.0, AFFINE)
        inv_count = 1.0 / tl.maximum(tl.load(count_ptr), 1).to(tl.float32)
        tl.store(coef_mean_ptr + cols, _gate_to_xhat(sum_gate, weight, AFFINE) * inv_count, mask=col_ok)
        tl.store(coef_var_ptr + cols, _gate_to_xhat(sum_gate_xhat, weight, AFFINE) * inv_count, mask=col_ok)


@jit_aligned_pointers
def _dice_backward_apply_kernel(x_ptr, g_ptr, mask_ptr, alpha_ptr, weight_ptr, bias_ptr, mean_ptr, var_ptr,
                                coef_mean_ptr, coef_var_ptr, dx_ptr, part_dalpha_ptr, part_gate_ptr,
                                part_gate_xhat_ptr, M, C, tiles_per_chunk, eps, HAS_MASK: tl.constexpr,
                                TRAINING: tl.constexpr, AFFINE: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_C: tl.constexpr,
                                VEC: tl.constexpr):
    """Elementwise dx. Training applies the correction ``rstd * (S1 + xhat * S2) / n`` on the
    valid rows; inference has none and instead writes dalpha partials [num_chunks, C] (and with
    ``AFFINE`` those of dbias and dweight). Grid: (num_chunks, cdiv(C, BLOCK_C))."""
    C = _row_width(C, VEC)
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    var = tl.load(var_ptr + cols, mask=col_ok, other=0.0)
    weight = _load_affine(weight_ptr, cols, col_ok, 1.0, AFFINE)
    bias = _load_affine(bias_ptr, cols, col_ok, 0.0, AFFINE)
    if TRAINING:
        coef_mean = tl.load(coef_mean_ptr + cols, mask=col_ok, other=0.0)
        coef_var = tl.load(coef_var_ptr + cols, mask=col_ok, other=0.0)
    sum_dalpha = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gate_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(0, tiles_per_chunk):
        rows = (pid_m * tiles_per_chunk + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        tile_ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        xhat, p, q, rstd = _dice_gate(x, mean, var, weight, bias, eps, AFFINE)
        direct, grad_gate, grad_alpha = _dice_grad_terms(x, g, p, q, alpha)
        grad_xhat = _gate_to_xhat(grad_gate, weight[None, :], AFFINE)
        if TRAINING:
            valid = _load_valid(mask_ptr, rows, row_ok, HAS_MASK)
            correction = tl.where(valid[:, None], coef_mean[None, :] + xhat * coef_var[None, :], 0.0)
            dx = direct + rstd[None, :] * (grad_xhat - correction)
        else:
            dx = direct + rstd[None, :] * grad_xhat
            if not AFFINE:
                sum_dalpha += tl.sum(grad_alpha, axis=0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        if not TRAINING:
            if AFFINE:
                # One reduction for the three sums, after dx's store frees its registers (holding
                # dx across three separate reductions costs fp32 about 200 registers a thread).
                tile_dalpha, tile_gate, tile_gate_xhat = tl.reduce((grad_alpha, grad_gate, grad_gate * xhat), 0,
                                                                   _add_triples)
                sum_dalpha += tile_dalpha
                sum_gate += tile_gate
                sum_gate_xhat += tile_gate_xhat
    if not TRAINING:
        part = pid_m.to(tl.int64) * C + cols
        tl.store(part_dalpha_ptr + part, sum_dalpha, mask=col_ok)
        if AFFINE:
            tl.store(part_gate_ptr + part, sum_gate, mask=col_ok)
            tl.store(part_gate_xhat_ptr + part, sum_gate_xhat, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _one_pass_config(rows: int, channels: int, one_pass_max_rows: Optional[int]):
    """The smallest one-launch config holding ``rows`` rows, or None for the multi-pass path."""
    if one_pass_max_rows is None:
        one_pass_max_rows = ONE_PASS_MAX_ROWS
    if rows > one_pass_max_rows or rows * channels >= 2**31:
        return None
    for block_m, block_c, warps in ONE_PASS_CONFIGS:
        if rows <= block_m:
            return block_m, block_c, warps
    return None


def _chunking(rows: int, tiles_per_chunk: Optional[int]) -> Tuple[int, int]:
    """``(tiles_per_chunk, num_chunks)`` for the multi-pass grid: at most MAX_CHUNKS chunks."""
    tiles = max(triton.cdiv(rows, MULTI_BLOCK_M), 1)
    if tiles_per_chunk is None:
        tiles_per_chunk = triton.cdiv(tiles, MAX_CHUNKS)  # read at call time: tests lower it
    if tiles_per_chunk < 1:
        raise ValueError(f"tiles_per_chunk must be >= 1, got {tiles_per_chunk}")
    return tiles_per_chunk, triton.cdiv(tiles, tiles_per_chunk)


# Elements per load and store where the channel count allows (``_row_width``), on the multi-pass
# path. The one-launch path (at most ONE_PASS_MAX_ROWS rows) keeps VEC = 1: at 4, ptxas spills a
# value in three of its affine backward configurations on sm_80, and launches that small gain
# nothing from wider loads.
VECTOR_WIDTH = 4
ONE_PASS_VEC = 1


def _vector_width(channels: int) -> int:
    """The kernels' ``VEC``: ``VECTOR_WIDTH`` where it divides the channel count, else 1."""
    return VECTOR_WIDTH if channels % VECTOR_WIDTH == 0 else 1


def _check_aligned(*tensors: Tensor) -> None:
    # The kernels specialize their pointers on 16-byte alignment; the gate compiled that variant.
    assert all(is_aligned(t) for t in tensors), "the kernels take 16-byte-aligned tensors"


def _check_2d(x: Tensor) -> Tuple[int, int]:
    assert x.dim() == 2 and x.is_contiguous(), "launchers take x as a contiguous [M, C] tensor"
    rows, channels = x.shape
    # Row indices are int32 (element offsets are int64), with room for the last chunk's overhang.
    assert rows < DICE_KERNEL_MAX_POSITIONS, f"at most {DICE_KERNEL_MAX_POSITIONS} positions"
    return rows, channels


def _check_channel_vectors(channels: int, *vectors: Optional[Tensor]) -> None:
    for vector in vectors:
        if vector is not None:
            assert vector.dtype == torch.float32 and vector.is_contiguous() and vector.shape == (channels,), \
                "per-channel vectors are contiguous fp32 [C]"


def _output(out: Optional[Tensor], like: Tensor) -> Tensor:
    if out is None:
        return torch.empty_like(like)
    assert out.shape == like.shape and out.dtype == like.dtype and out.is_contiguous()
    return out


def _affine_args(channels: int, weight: Optional[Tensor], bias: Optional[Tensor], placeholder: Tensor
                 ) -> Tuple[bool, Tensor, Tensor]:
    """``(affine, weight, bias)`` kernel arguments: the affine gate's vectors, or ``placeholder``
    (any fp32 tensor, never read) for both without it."""
    assert (weight is None) == (bias is None), "weight and bias come together"
    if weight is None:
        return False, placeholder, placeholder
    _check_channel_vectors(channels, weight, bias)
    return True, weight, bias


def dice_forward_training(x: Tensor, alpha: Tensor, mask: Optional[Tensor], running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], momentum: float, eps: float, *,
                          weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, out: Optional[Tensor] = None,
                          one_pass_max_rows: Optional[int] = None, tiles_per_chunk: Optional[int] = None
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward with batch statistics.

    Args:
        x: ``[M, C]`` contiguous fp32/bf16/fp16.
        alpha: ``[C]`` fp32 contiguous.
        mask: ``[M]`` uint8 (nonzero = counts in the statistics) or None (all count).
        running_mean, running_var: ``[C]`` fp32 contiguous, updated in place (skipped when the
            selection is empty), or both None.
        weight, bias: ``[C]`` fp32 contiguous, the affine gate, or both None.
        out: optional ``[M, C]`` output buffer in x's dtype.
        one_pass_max_rows, tiles_per_chunk: path and chunking overrides, ``ONE_PASS_MAX_ROWS``
            and enough tiles per chunk for at most ``MAX_CHUNKS`` chunks by default (tests lower
            them to run the multi-pass path on tiny shapes).

    Returns:
        ``(y [M, C] x.dtype, mean [C] fp32, var [C] fp32 biased, count [1] int32)``.
    """
    rows, channels = _check_2d(x)
    _check_channel_vectors(channels, alpha, running_mean, running_var)
    affine, weight, bias = _affine_args(channels, weight, bias, alpha)
    assert mask is None or (mask.dtype == torch.uint8 and mask.shape == (rows,) and mask.is_contiguous())
    y = _output(out, x)
    mean = torch.empty(channels, dtype=torch.float32, device=x.device)
    var = torch.empty(channels, dtype=torch.float32, device=x.device)
    count = torch.empty(1, dtype=torch.int32, device=x.device)
    if running_mean is None:
        # Untracked: the kernels still write an update, into scratch that is dropped.
        running_mean = torch.zeros(channels, dtype=torch.float32, device=x.device)
        running_var = torch.zeros(channels, dtype=torch.float32, device=x.device)
    has_mask = mask is not None
    mask_arg = mask if has_mask else x
    _check_aligned(x, alpha, weight, bias, y, mean, var, count, running_mean, running_var, mask_arg)
    vec = _vector_width(channels)
    config = _one_pass_config(rows, channels, one_pass_max_rows)
    if config is not None:
        block_m, block_c, warps = config
        _dice_forward_one_pass_kernel[(triton.cdiv(channels, block_c),)](
            x, mask_arg, alpha, weight, bias, y, mean, var, count, running_mean, running_var, rows, channels, momentum,
            eps, HAS_MASK=has_mask, AFFINE=affine, BLOCK_M=block_m, BLOCK_C=block_c, VEC=ONE_PASS_VEC, num_warps=warps)
        return y, mean, var, count
    tiles_per_chunk, num_chunks = _chunking(rows, tiles_per_chunk)
    channel_blocks = triton.cdiv(channels, MULTI_BLOCK_C)
    part_mean = torch.empty(num_chunks, channels, dtype=torch.float32, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    part_count = torch.empty(num_chunks, dtype=torch.int32, device=x.device)
    _dice_forward_stats_kernel[(num_chunks, channel_blocks)](
        x, mask_arg, part_mean, part_m2, part_count, rows, channels, tiles_per_chunk, HAS_MASK=has_mask,
        BLOCK_M=MULTI_BLOCK_M, BLOCK_C=MULTI_BLOCK_C, VEC=vec, num_warps=MULTI_WARPS)
    _dice_forward_combine_kernel[(triton.cdiv(channels, COMBINE_BLOCK_C),)](
        part_mean, part_m2, part_count, mean, var, count, running_mean, running_var, channels, num_chunks, momentum,
        BLOCK_K=COMBINE_BLOCK_K, BLOCK_C=COMBINE_BLOCK_C, VEC=vec, num_warps=COMBINE_WARPS)
    _dice_forward_apply_kernel[(num_chunks, channel_blocks)](
        x, alpha, weight, bias, mean, var, y, rows, channels, tiles_per_chunk, eps, AFFINE=affine,
        BLOCK_M=MULTI_BLOCK_M, BLOCK_C=MULTI_BLOCK_C, VEC=vec, num_warps=MULTI_WARPS)
    return y, mean, var, count


def dice_forward_inference(x: Tensor, alpha: Tensor, mean: Tensor, var: Tensor, eps: float, *,
                           weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                           out: Optional[Tensor] = None, tiles_per_chunk: Optional[int] = None) -> Tensor:
    """Inference forward, one elementwise pass: x ``[M, C]`` (fp32/bf16/fp16, contiguous),
    alpha, mean (running), var (running) and the optional affine weight, bias ``[C]`` fp32.
    Returns y ``[M, C]`` in x's dtype."""
    rows, channels = _check_2d(x)
    _check_channel_vectors(channels, alpha, mean, var)
    affine, weight, bias = _affine_args(channels, weight, bias, alpha)
    y = _output(out, x)
    _check_aligned(x, alpha, weight, bias, mean, var, y)
    vec = _vector_width(channels)
    tiles_per_chunk, num_chunks = _chunking(rows, tiles_per_chunk)
    _dice_forward_apply_kernel[(num_chunks, triton.cdiv(channels, MULTI_BLOCK_C))](
        x, alpha, weight, bias, mean, var, y, rows, channels, tiles_per_chunk, eps, AFFINE=affine,
        BLOCK_M=MULTI_BLOCK_M, BLOCK_C=MULTI_BLOCK_C, VEC=vec, num_warps=MULTI_WARPS)
    return y


def dice_backward(x: Tensor, grad: Tensor, alpha: Tensor, mask: Optional[Tensor], mean: Tensor, var: Tensor,
                  count: Optional[Tensor], training: bool, eps: float, *, weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, out: Optional[Tensor] = None, one_pass_max_rows: Optional[int] = None,
                  tiles_per_chunk: Optional[int] = None
                  ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Backward of Dice.

    Args:
        x, grad: ``[M, C]`` contiguous, x's dtype.
        alpha, mean, var: ``[C]`` fp32: the statistics the forward used (batch ones with
            ``training``, running ones without).
        mask: ``[M]`` uint8 or None; count: ``[1]`` int32 valid positions (training only).
        weight, bias: ``[C]`` fp32, the affine gate, or both None.
        out: optional ``[M, C]`` buffer for dx.

    Returns:
        ``(dx [M, C] x.dtype, dalpha [C] fp32, dweight [C] fp32, dbias [C] fp32)``; dweight and
        dbias are None without the affine gate.
    """
    rows, channels = _check_2d(x)
    assert grad.shape == x.shape and grad.dtype == x.dtype and grad.is_contiguous()
    _check_channel_vectors(channels, alpha, mean, var)
    assert not training or (count is not None and count.dtype == torch.int32)
    affine, weight, bias = _affine_args(channels, weight, bias, alpha)
    dx = _output(out, x)
    dalpha = torch.empty(channels, dtype=torch.float32, device=x.device)
    dweight = torch.empty_like(dalpha) if affine else None
    dbias = torch.empty_like(dalpha) if affine else None
    # Kernel arguments for the affine gradients, never written without the affine gate.
    dweight_arg = dweight if affine else dalpha
    dbias_arg = dbias if affine else dalpha
    has_mask = training and mask is not None
    mask_arg = mask if has_mask else x
    count_arg = count if training else mean
    _check_aligned(x, grad, mask_arg, alpha, weight, bias, mean, var, count_arg, dx, dalpha, dweight_arg, dbias_arg)
    vec = _vector_width(channels)
    config = _one_pass_config(rows, channels, one_pass_max_rows)
    if config is not None:
        block_m, block_c, warps = config
        _dice_backward_one_pass_kernel[(triton.cdiv(channels, block_c),)](
            x, grad, mask_arg, alpha, weight, bias, mean, var, count_arg, dx, dalpha, dweight_arg, dbias_arg, rows,
            channels, eps, HAS_MASK=has_mask, TRAINING=training, AFFINE=affine, BLOCK_M=block_m, BLOCK_C=block_c,
            VEC=ONE_PASS_VEC, num_warps=warps)
        return dx, dalpha, dweight, dbias
    tiles_per_chunk, num_chunks = _chunking(rows, tiles_per_chunk)
    channel_blocks = triton.cdiv(channels, MULTI_BLOCK_C)
    part_dalpha = torch.empty(num_chunks, channels, dtype=torch.float32, device=x.device)
    if training or affine:
        part_gate = torch.empty_like(part_dalpha)
        part_gate_xhat = torch.empty_like(part_dalpha)
    else:
        part_gate = part_gate_xhat = part_dalpha
    if training:
        coef_mean = torch.empty(channels, dtype=torch.float32, device=x.device)
        coef_var = torch.empty_like(coef_mean)
        _dice_backward_reduce_kernel[(num_chunks, channel_blocks)](
            x, grad, alpha, weight, bias, mean, var, part_gate, part_gate_xhat, part_dalpha, rows, channels,
            tiles_per_chunk, eps, AFFINE=affine, BLOCK_M=MULTI_BLOCK_M, BLOCK_C=MULTI_BLOCK_C, VEC=vec,
            num_warps=MULTI_WARPS)
        _dice_backward_combine_kernel[(triton.cdiv(channels, COMBINE_BLOCK_C),)](
            part_gate, part_gate_xhat, part_dalpha, count, weight, coef_mean, coef_var, dalpha, dweight_arg,
            dbias_arg, channels, num_chunks, TRAINING=True, AFFINE=affine, BLOCK_K=COMBINE_BLOCK_K,
            BLOCK_C=COMBINE_BLOCK_C, VEC=vec, num_warps=COMBINE_WARPS)
        _dice_backward_apply_kernel[(num_chunks, channel_blocks)](
            x, grad, mask_arg, alpha, weight, bias, mean, var, coef_mean, coef_var, dx, part_dalpha, part_gate,
            part_gate_xhat, rows, channels, tiles_per_chunk, eps, HAS_MASK=has_mask, TRAINING=True, AFFINE=affine,
            BLOCK_M=MULTI_BLOCK_M, BLOCK_C=MULTI_BLOCK_C, VEC=vec, num_warps=MULTI_WARPS)
        return dx, dalpha, dweight, dbias
    _dice_backward_apply_kernel[(num_chunks, channel_blocks)](
        x, grad, x, alpha, weight, bias, mean, var, mean, var, dx, part_dalpha, part_gate, part_gate_xhat, rows,
        channels, tiles_per_chunk, eps, HAS_MASK=False, TRAINING=False, AFFINE=affine, BLOCK_M=MULTI_BLOCK_M,
        BLOCK_C=MULTI_BLOCK_C, VEC=vec, num_warps=MULTI_WARPS)
    _dice_backward_combine_kernel[(triton.cdiv(channels, COMBINE_BLOCK_C),)](
        part_gate, part_gate_xhat, part_dalpha, mean, weight, mean, mean, dalpha, dweight_arg, dbias_arg, channels,
        num_chunks, TRAINING=False, AFFINE=affine, BLOCK_K=COMBINE_BLOCK_K, BLOCK_C=COMBINE_BLOCK_C,
        VEC=vec, num_warps=COMBINE_WARPS)
    return dx, dalpha, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every configuration the launchers above can choose.
# ----------------------------------------------------------------------------------------------

_DTYPES = ("fp32", "bf16", "fp16")


def _aot_specs():
    specs = []
    for dt in _DTYPES:
        x = f"*{dt}"
        for affine in (False, True):
            gate = "_affine" if affine else ""
            for has_mask in (False, True):
                tag = f"{dt}_{'mask' if has_mask else 'nomask'}"
                for block_m, block_c, warps in ONE_PASS_CONFIGS:
                    specs.append(dict(
                        name=f"dice_forward_one_pass_{tag}{gate}_{block_m}x{block_c}",
                        fn=_dice_forward_one_pass_kernel,
                        signature=dict(x_ptr=x, mask_ptr="*u8" if has_mask else x, alpha_ptr="*fp32",
                                       weight_ptr="*fp32", bias_ptr="*fp32", y_ptr=x, mean_ptr="*fp32",
                                       var_ptr="*fp32", count_ptr="*i32", run_mean_ptr="*fp32", run_var_ptr="*fp32",
                                       M="i32", C="i32", momentum="fp32", eps="fp32", HAS_MASK="constexpr",
                                       AFFINE="constexpr", BLOCK_M="constexpr", BLOCK_C="constexpr"),
                        constexprs=dict(HAS_MASK=has_mask, AFFINE=affine, BLOCK_M=block_m, BLOCK_C=block_c),
                        num_warps=warps))
                if not affine:  # the statistics pass does not see the gate
                    specs.append(dict(
                        name=f"dice_forward_stats_{tag}", fn=_dice_forward_stats_kernel,
                        signature=dict(x_ptr=x, mask_ptr="*u8" if has_mask else x, part_mean_ptr="*fp32",
                                       part_m2_ptr="*fp32", part_count_ptr="*i32", M="i32", C="i32",
                                       tiles_per_chunk="i32", HAS_MASK="constexpr", BLOCK_M="constexpr",
                                       BLOCK_C="constexpr"),
                        constexprs=dict(HAS_MASK=has_mask, BLOCK_M=MULTI_BLOCK_M, BLOCK_C=MULTI_BLOCK_C),
                        num_warps=MULTI_WARPS))
            specs.append(dict(
                name=f"dice_forward_apply_{dt}{gate}", fn=_dice_forward_apply_kernel,
                signature=dict(x_ptr=x, alpha_ptr="*fp32", weight_ptr="*fp32", bias_ptr="*fp32", mean_ptr="*fp32",
                               var_ptr="*fp32", y_ptr=x, M="i32", C="i32", tiles_per_chunk="i32", eps="fp32",
                               AFFINE="constexpr", BLOCK_M="constexpr", BLOCK_C="constexpr"),
                constexprs=dict(AFFINE=affine, BLOCK_M=MULTI_BLOCK_M, BLOCK_C=MULTI_BLOCK_C), num_warps=MULTI_WARPS))
            specs.append(dict(
                name=f"dice_backward_reduce_{dt}{gate}", fn=_dice_backward_reduce_kernel,
                signature=dict(x_ptr=x, g_ptr=x, alpha_ptr="*fp32", weight_ptr="*fp32", bias_ptr="*fp32",
                               mean_ptr="*fp32", var_ptr="*fp32", part_gate_ptr="*fp32", part_gate_xhat_ptr="*fp32",
                               part_dalpha_ptr="*fp32", M="i32", C="i32", tiles_per_chunk="i32", eps="fp32",
                               AFFINE="constexpr", BLOCK_M="constexpr", BLOCK_C="constexpr"),
                constexprs=dict(AFFINE=affine, BLOCK_M=MULTI_BLOCK_M, BLOCK_C=MULTI_BLOCK_C), num_warps=MULTI_WARPS))
            # (HAS_MASK, TRAINING): inference ignores the mask.
            for has_mask, training in ((False, True), (True, True), (False, False)):
                mode = ("train_mask" if has_mask else "train_nomask") if training else "infer"
                mask_sig = "*u8" if has_mask else x
                for block_m, block_c, warps in ONE_PASS_CONFIGS:
                    specs.append(dict(
                        name=f"dice_backward_one_pass_{dt}_{mode}{gate}_{block_m}x{block_c}",
                        fn=_dice_backward_one_pass_kernel,
                        signature=dict(x_ptr=x, g_ptr=x, mask_ptr=mask_sig, alpha_ptr="*fp32", weight_ptr="*fp32",
                                       bias_ptr="*fp32", mean_ptr="*fp32", var_ptr="*fp32",
                                       count_ptr="*i32" if training else "*fp32", dx_ptr=x, dalpha_ptr="*fp32",
                                       dweight_ptr="*fp32", dbias_ptr="*fp32", M="i32", C="i32", eps="fp32",
                                       HAS_MASK="constexpr", TRAINING="constexpr", AFFINE="constexpr",
                                       BLOCK_M="constexpr", BLOCK_C="constexpr"),
                        constexprs=dict(HAS_MASK=has_mask, TRAINING=training, AFFINE=affine, BLOCK_M=block_m,
                                        BLOCK_C=block_c),
                        num_warps=warps))
                specs.append(dict(
                    name=f"dice_backward_apply_{dt}_{mode}{gate}", fn=_dice_backward_apply_kernel,
                    signature=dict(x_ptr=x, g_ptr=x, mask_ptr=mask_sig, alpha_ptr="*fp32", weight_ptr="*fp32",
                                   bias_ptr="*fp32", mean_ptr="*fp32", var_ptr="*fp32", coef_mean_ptr="*fp32",
                                   coef_var_ptr="*fp32", dx_ptr=x, part_dalpha_ptr="*fp32", part_gate_ptr="*fp32",
                                   part_gate_xhat_ptr="*fp32", M="i32", C="i32", tiles_per_chunk="i32", eps="fp32",
                                   HAS_MASK="constexpr", TRAINING="constexpr", AFFINE="constexpr",
                                   BLOCK_M="constexpr", BLOCK_C="constexpr"),
                    constexprs=dict(HAS_MASK=has_mask, TRAINING=training, AFFINE=affine, BLOCK_M=MULTI_BLOCK_M,
                                    BLOCK_C=MULTI_BLOCK_C),
                    num_warps=MULTI_WARPS))
    specs.append(dict(
        name="dice_forward_combine", fn=_dice_forward_combine_kernel,
        signature=dict(part_mean_ptr="*fp32", part_m2_ptr="*fp32", part_count_ptr="*i32", mean_ptr="*fp32",
                       var_ptr="*fp32", count_ptr="*i32", run_mean_ptr="*fp32", run_var_ptr="*fp32", C="i32",
                       num_chunks="i32", momentum="fp32", BLOCK_K="constexpr", BLOCK_C="constexpr"),
        constexprs=dict(BLOCK_K=COMBINE_BLOCK_K, BLOCK_C=COMBINE_BLOCK_C), num_warps=COMBINE_WARPS))
    for affine in (False, True):
        for training in (True, False):
            specs.append(dict(
                name=f"dice_backward_combine_{'train' if training else 'infer'}{'_affine' if affine else ''}",
                fn=_dice_backward_combine_kernel,
                signature=dict(part_gate_ptr="*fp32", part_gate_xhat_ptr="*fp32", part_dalpha_ptr="*fp32",
                               count_ptr="*i32" if training else "*fp32", weight_ptr="*fp32", coef_mean_ptr="*fp32",
                               coef_var_ptr="*fp32", dalpha_ptr="*fp32", dweight_ptr="*fp32", dbias_ptr="*fp32",
                               C="i32", num_chunks="i32", TRAINING="constexpr", AFFINE="constexpr",
                               BLOCK_K="constexpr", BLOCK_C="constexpr"),
                constexprs=dict(TRAINING=training, AFFINE=affine, BLOCK_K=COMBINE_BLOCK_K, BLOCK_C=COMBINE_BLOCK_C),
                num_warps=COMBINE_WARPS))
    return specs


def _with_vector_widths(specs):
    """Each spec at every ``VEC`` the launchers pick: the one-launch kernels at ``ONE_PASS_VEC``,
    the others at 1 and ``VECTOR_WIDTH`` (name ``..._vec4``)."""
    out = []
    for spec in specs:
        one_pass = spec["fn"] in (_dice_forward_one_pass_kernel, _dice_backward_one_pass_kernel)
        for vec in (ONE_PASS_VEC,) if one_pass else (1, VECTOR_WIDTH):
            out.append(dict(spec, name=spec["name"] + (f"_vec{vec}" if vec > 1 else ""),
                            signature=dict(spec["signature"], VEC="constexpr"),
                            constexprs=dict(spec["constexprs"], VEC=vec)))
    return out


AOT_SPECS = _with_vector_widths(_aot_specs())
