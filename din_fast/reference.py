"""The paper's math, written literally in plain PyTorch: the ground truth of every test.

Nothing here is tuned for speed. Every function works in any floating dtype, float64 included,
on any device, and is differentiable by autograd. Inputs are assumed checked (see
``din_fast.functional`` for the checked public API).

Conventions shared with the other backends:

* MLP weights follow ``nn.Linear``: ``weights[i]`` is ``[out_i, in_i]``, ``biases[i]`` is
  ``[out_i]``. The first layer takes the ``4 * D`` features ``[q, k, q - k, q * k]``; the last
  layer maps to one score.
* ``act_params[i]`` holds the parameters of hidden layer i's activation: ``()`` for sigmoid and
  relu (an empty ``act_params`` will do for these), ``(prelu_weight,)`` (``[H_i]`` or ``[1]``) for prelu, ``(alpha, running_mean,
  running_var)`` (each ``[H_i]``) for dice, or ``(alpha, running_mean, running_var, weight, bias)``
  for the affine Dice of the peer libraries (see ``dice``).
* Valid positions are given by ``lengths`` ``[B]`` (positions ``t >= lengths[b]`` are padding) or
  a boolean ``mask`` ``[B, T]``; with neither, every position is valid. Padding contributes
  nothing to the pooled output, and its weight is 0.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._numerics import compute_dtype
from ._running_stats import update_running_stats
from ._validation import valid_mask

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Dice (eq. 9)
# ----------------------------------------------------------------------------------------------


def _all_reduce(value: Tensor, process_group) -> Tensor:
    """Sum over the ranks of ``process_group`` (differentiable), or ``value`` itself without one."""
    if process_group is None:
        return value
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(value, group=process_group)


def dice_statistics(x: Tensor, mask: Optional[Tensor], process_group=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` [..., C] over the positions where ``mask``
    [...] (bool) is true, or over all leading positions; with a ``torch.distributed``
    ``process_group``, over those positions of every rank in it (SyncBatchNorm's semantics).

    Returns ``(mean [C], var [C], count [])`` in ``x``'s dtype. An empty selection has mean and
    variance 0.
    """
    channels = x.shape[-1]
    flat = x.reshape(math.prod(x.shape[:-1]), channels)
    if mask is None:
        keep = torch.ones(flat.shape[0], dtype=torch.bool, device=x.device)
    else:
        keep = mask.reshape(-1)
    zeros = torch.zeros_like(flat)
    totals = _all_reduce(torch.cat([torch.where(keep[:, None], flat, zeros).sum(0), keep.sum().to(x.dtype)[None]]),
                         process_group)
    count = totals[-1]
    denom = count.clamp(min=1)
    mean = totals[:-1] / denom
    var = _all_reduce(torch.where(keep[:, None], (flat - mean) ** 2, zeros).sum(0), process_group) / denom
    return mean, var, count


def dice(x: Tensor, alpha: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
         mask: Optional[Tensor] = None, *, training: bool, momentum: float = 0.1, eps: float = 1e-8,
         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, process_group=None) -> Tensor:
    """Dice: ``f(s) = p(s) * s + (1 - p(s)) * alpha * s``, ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``.

    With ``weight`` and ``bias`` (the affine Dice of DeepCTR and other peer libraries, a
    ``BatchNorm1d`` with its affine transform before the sigmoid):
    ``p(s) = sigmoid(weight * (s - E[s]) / sqrt(Var[s] + eps) + bias)``.

    Args:
        x: ``[..., C]`` floating input, channels last.
        alpha: ``[C]``.
        running_mean, running_var: ``[C]`` buffers, updated in place when ``training``; may be
            ``None`` in training (no tracking), required in inference.
        mask: optional bool ``x.shape[:-1]``: only true positions count in the batch statistics.
            Every position still gets an output.
        training: batch statistics (and a running-statistics update) if true, running ones if not.
        weight, bias: optional ``[C]``, given together: the affine gate.
        process_group: a ``torch.distributed`` group whose ranks share the batch statistics.

    Returns:
        ``[..., C]`` in ``x``'s dtype; 16-bit inputs compute in float32 (their sums of squares
        overflow float16, and eps = 1e-8 rounds to 0 in it), with the parameters in float32 too.
    """
    compute = compute_dtype(x.dtype)
    s = x.to(compute)
    if training:
        mean, var, count = dice_statistics(s, mask, process_group)
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    else:
        mean, var = running_mean.to(compute), running_var.to(compute)
    x_hat = (s - mean) / torch.sqrt(var + eps)
    if weight is not None:
        x_hat = weight.to(compute) * x_hat + bias.to(compute)
    p = torch.sigmoid(x_hat)
    return (p * s + (1 - p) * alpha.to(compute) * s).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Local activation unit and attention pooling (eq. 3)
# ----------------------------------------------------------------------------------------------


def apply_activation(h: Tensor, activation: str, params: Sequence[Tensor], *, dice_mask: Optional[Tensor],
                     training: bool, momentum: float, eps: float, process_group=None) -> Tensor:
    """One hidden layer's activation on ``h`` [..., H]."""
    if activation == "sigmoid":
        return torch.sigmoid(h)
    if activation == "relu":
        return torch.relu(h)
    if activation == "prelu":
        (weight,) = params
        return torch.where(h >= 0, h, weight * h)
    if activation == "dice":
        alpha, running_mean, running_var, *affine = params
        weight, bias = affine or (None, None)
        return dice(h, alpha, running_mean, running_var, dice_mask, training=training, momentum=momentum, eps=eps,
                    weight=weight, bias=bias, process_group=process_group)
    raise ValueError(f"activation must be one of sigmoid, relu, prelu, dice, got {activation!r}")


def attention_features(query: Tensor, keys: Tensor) -> Tensor:
    """``[q, k, q - k, q * k]``: query ``[B, D]``, keys ``[B, T, D]`` -> ``[B, T, 4D]``."""
    q = query[:, None, :].expand_as(keys)
    return torch.cat([q, keys, q - keys, q * keys], dim=-1)


def local_activation_scores(query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                            activation: str, act_params: Sequence[Sequence[Tensor]], dice_mask: Optional[Tensor],
                            training: bool, momentum: float = 0.1, eps: float = 1e-8, process_group=None) -> Tensor:
    """The activation unit's raw scores ``a(e_t, v_A)``: query ``[B, D]``, keys ``[B, T, D]`` -> ``[B, T]``.

    ``dice_mask`` [B, T] (bool) restricts Dice's batch statistics to its true positions.
    """
    h = attention_features(query, keys)
    for i, (w, b) in enumerate(zip(weights[:-1], biases[:-1])):
        h = apply_activation(F.linear(h, w, b), activation, act_params[i] if act_params else (), dice_mask=dice_mask,
                             training=training, momentum=momentum, eps=eps, process_group=process_group)
    return F.linear(h, weights[-1], biases[-1]).squeeze(-1)


def pool_scores(scores: Tensor, keys: Tensor, valid: Tensor, *, normalization: str,
                softmax_scale: float) -> Tuple[Tensor, Tensor]:
    """Turns scores ``[B, T]`` into weights and the weighted sum of ``keys`` ``[B, T, D]``.

    Returns ``(pooled [B, D], weights [B, T])``; padding has weight 0 and contributes nothing,
    and a row with no valid position pools to zeros.
    """
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if normalization == "none":
        weights = torch.where(valid, scores, zero)
    elif normalization == "softmax":
        logits = torch.where(valid, scores * softmax_scale, torch.full_like(scores, float("-inf")))
        # With T = 0 there is nothing to take the max of (amax rejects the empty dimension); the
        # shift is 0 there, as in a row of padding only.
        row_max = logits.amax(dim=1, keepdim=True) if logits.shape[1] else logits.new_zeros(logits.shape[0], 1)
        row_max = torch.where(torch.isneginf(row_max), zero, row_max).detach()
        exps = torch.where(valid, torch.exp(logits - row_max), zero)
        total = exps.sum(dim=1, keepdim=True)
        weights = exps / torch.where(total > 0, total, torch.ones_like(total))
    else:
        raise ValueError(f"normalization must be one of none, softmax, got {normalization!r}")
    pooled = torch.einsum("bt,btd->bd", weights, torch.where(valid[..., None], keys, zero))
    return pooled, weights


def attention_pooling(query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                      lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None, activation: str = "sigmoid",
                      act_params: Sequence[Sequence[Tensor]] = (), normalization: str = "none",
                      softmax_scale: float = 1.0, dice_stats: str = "valid", training: bool = False,
                      momentum: float = 0.1, eps: float = 1e-8, process_group=None) -> Tuple[Tensor, Tensor]:
    """DIN's user interest ``v_U(A) = sum_t w_t e_t`` with ``w_t`` from the local activation unit.

    Args:
        query: ``[B, D]`` candidate embedding ``v_A``.
        keys: ``[B, T, D]`` behaviour embeddings ``e_t``.
        lengths: ``[B]`` int valid lengths, or ``mask``: ``[B, T]`` bool; neither means all valid.
        normalization: ``"none"`` (raw scores as weights, the paper) or ``"softmax"`` over the
            valid positions of ``softmax_scale * scores``.
        dice_stats: ``"valid"`` (Dice statistics over valid positions) or ``"all"`` (over all
            ``B * T`` positions, as the peer libraries do).
        process_group: a ``torch.distributed`` group whose ranks share Dice's batch statistics.

    Returns:
        ``(pooled [B, D], weights [B, T])``.
    """
    batch, seq_len, _ = keys.shape
    valid = valid_mask(batch, seq_len, lengths, mask, keys.device)
    scores = local_activation_scores(query, keys, weights, biases, activation=activation, act_params=act_params,
                                     dice_mask=valid if dice_stats == "valid" else None, training=training,
                                     momentum=momentum, eps=eps, process_group=process_group)
    return pool_scores(scores, keys, valid, normalization=normalization, softmax_scale=softmax_scale)


def score_candidates(history: Tensor, candidates: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                     activation: str = "sigmoid", act_params: Sequence[Sequence[Tensor]] = (),
                     normalization: str = "none", softmax_scale: float = 1.0, eps: float = 1e-8
                     ) -> Tuple[Tensor, Tensor]:
    """Serving: one user's ``history`` ``[T, D]`` against ``candidates`` ``[C, D]``, inference
    semantics (Dice uses its running statistics).

    Returns ``(pooled [C, D], weights [C, T])``: row c is ``attention_pooling`` of candidate c.
    """
    keys = history[None].expand(candidates.shape[0], -1, -1)
    return attention_pooling(candidates, keys, weights, biases, activation=activation, act_params=act_params,
                             normalization=normalization, softmax_scale=softmax_scale, training=False, eps=eps)


# ----------------------------------------------------------------------------------------------
# Mini-batch aware regularization (eq. 4-7)
# ----------------------------------------------------------------------------------------------


def batch_indicator(ids: Tensor, num_rows: int) -> Tensor:
    """``alpha_mj``: bool ``[K]``, true for each row id that occurs in ``ids`` (once, however often)."""
    present = torch.zeros(num_rows, dtype=torch.bool, device=ids.device)
    present[ids.reshape(-1)] = True
    return present


def mba_penalty(weight: Tensor, ids: Tensor, counts: Tensor, lam: float) -> Tensor:
    """``lam / 2 * sum_{j in unique(ids)} ||w_j||^2 / n_j`` for ``weight`` ``[K, D]``, ``ids`` (any
    shape, ints in ``[0, K)``) and ``counts`` ``n_j`` ``[K]`` (>= 1).

    The factor 1/2 makes the gradient exactly eq. 7's regularization term ``lam * w_j / n_j``.
    """
    present = batch_indicator(ids, weight.shape[0])
    # In at least float32: float16 squares overflow, and n_j = 257 is 256 in bfloat16.
    compute = compute_dtype(weight.dtype)
    w = weight.to(compute)
    # Rows outside the batch divide by 1, not by their count, which only the batch's rows must
    # have >= 1: a 0 there would make the masked-out term's gradient 0 / 0.
    per_row = (w * w).sum(dim=1) / torch.where(present, counts.to(compute), 1.0)
    return (0.5 * lam * torch.where(present, per_row, torch.zeros_like(per_row)).sum()).to(weight.dtype)


def mba_sgd_step(weight: Tensor, grad: Tensor, ids: Tensor, counts: Tensor, *, lam: float, lr: float) -> Tensor:
    """Eq. 7: ``w_j <- w_j - lr * (grad_j + lam * alpha_mj / n_j * w_j)``; returns the new table.

    ``grad`` ``[K, D]`` is the gradient of the batch's mean loss (the ``1/|B_m| sum`` of eq. 7).
    Rows whose id is not in ``ids`` and whose gradient is 0 come back unchanged.
    """
    present = batch_indicator(ids, weight.shape[0])
    # Rows outside the batch get scale 0 whatever their count (only the batch's must be >= 1).
    scale = torch.where(present, lam / counts.to(weight.dtype), 0.0)
    return weight - lr * (grad + scale[:, None] * weight)
