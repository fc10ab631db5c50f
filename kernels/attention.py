"""Fused DIN local activation unit (target attention): forward and recomputing backward.

The math. The first layer ``W1 = [Wq | Wk | Wd | Wp]`` ([H1, 4D], ``nn.Linear``
layout) acting on ``[q, k, q - k, q * k]`` folds into

    z1 = u_b + k M_b,   u_b = q (Wq + Wd)^T + b1   [H1],   M_b = (Wk - Wd)^T + diag(q) Wp^T   [D, H1]

so a behaviour costs ``D * H1`` multiply-adds and the ``[B, T, 4D]`` features never exist. The
launchers compute ``u`` for the whole batch as one small GEMM and hand the kernels the folded,
sample-independent matrices ``(Wk - Wd)^T`` and ``Wp^T``; each program builds its sample's
``M_b`` once and then walks the behaviour sequence tile by tile: first layer by ``tl.dot``, the
activation, the other hidden layers by ``tl.dot``, the score layer, the mask, then the weighted
sum of the keys (raw scores, or an online softmax across tiles). No ``[B, T, H]`` tensor is
written; tiles past a sample's last valid position are never computed.

The backward recomputes the MLP tile by tile from the inputs and the per-sample softmax
statistics saved by the forward (row max and denominator, ``[B]`` fp32). Per-sample results
(``G_b = sum_t dz1`` and the query's share through ``Wp``) go to small ``[B, *]`` buffers;
weight gradients are accumulated in one fp32 partial buffer per program (each program owns its
slice and adds into it tile by tile, so the result is deterministic without atomics) and summed
by the launcher. The backward's fold is rebuilt per tile, D in chunks, from the cached folded
weights: holding it would leave no registers for the backward's live ``[BLOCK_T, H]`` tiles.

Everything is computed in fp32 after loading. ``tl.dot`` runs as 3xTF32 for fp32 inputs (about
fp32 accuracy, so results meet the fp32 tolerances; plain IEEE fp32 dots compile to far more
registers) and as TF32 for 16-bit inputs (exact for their mantissas, fp32 accumulation).

Activation codes: 0 sigmoid, 1 relu, 2 prelu (per-channel weight), 3 dice, 4 dice with the affine gate. The
kernels see Dice's gate as ``sigmoid((z - mean) * scale + bias)`` per channel, ``scale = weight * rstd`` (code 3:
``scale = rstd``, no bias), with the running statistics (inference) or the batch statistics (training). Centring
before scaling keeps the gate exact where rstd is large (zero batch variance gives rstd ``1/sqrt(eps)``).

Training-mode Dice: the batch statistics of hidden layer l's pre-activation need the
layers below it with their own batch statistics, so the forward runs a statistics pass per Dice
layer (the forward kernel with ``STAT_LAYER = l``: it recomputes up to layer l and writes the
sample's fp32 count, mean and centred sum of squares, tile moments merged with Chan's formula),
reduced in a fixed order on the device, then the ordinary forward. The backward's cross-sample
terms are, per channel of layer l with ``n`` kept positions, gate gradient ``s = dL/d(gate
input)``, ``S0 = sum s`` and ``S1 = sum s (z - mean)`` over all positions::

    dL/dz_i = direct_i + scale * (s_i - keep_i * (S0 + rstd^2 S1 (z_i - mean)) / n)

and S0, S1 of layer l depend on these terms of every layer above it. The backward therefore runs
one summing pass per Dice layer, top down (``PHASE = 0``, ``STOP_LAYER = l``: it recomputes the
MLP and back-propagates down to layer l only, with the terms of the layers above), then its
ordinary passes with every term, the keys' gradient in a third one (``PHASE = 3``: the terms leave
phase 1 no registers for it). Affine gate: ``dweight = rstd S1``, ``dbias = S0`` (running statistics: phase 2).
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from din_fast._attention_shapes import GATED_SHAPES, kernel_unsupported, padded_size
from din_fast.kernels._jit import jit_unspecialized
from din_fast.kernels.dice import _merge_moments

ACTIVATION_CODES = {"sigmoid": 0, "relu": 1, "prelu": 2, "dice": 3}
# The kernels' code of Dice with the affine gate (its bias costs registers the plain gate keeps).
DICE_AFFINE_CODE = 4
NORMALIZATION_CODES = {"none": 0, "softmax": 1}
# Register limit of the 16-bit forwards and summing passes (left unset, ptxas lowers their target
# for occupancy, to 64-168 registers, and spills values held across the tile loop; set on every
# launch, it makes the fp32 passes at the 255-register limit spill more). 4 or 8 warps allow 255.
MAX_REGISTERS = 255
# Finite stand-in for -inf as the running max of an online softmax, so that a tile with no valid
# position rescales by exp(0) = 1 instead of exp(-inf + inf) = NaN.
_NEG_BIG = tl.constexpr(-1.0e30)


# ``tl.dot`` needs every dimension to be a power of two and at least 16; the launchers pad each
# size as the shape envelope does.
_padded = padded_size


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """fp32 x fp32 -> fp32 product; IEEE (fp32 inputs) asks for fp32-accurate 3xTF32."""
    if IEEE:
        out = tl.dot(a, b, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, input_precision="tf32")
    return out


@triton.jit
def _load_vector(ptr, N: tl.constexpr, NP: tl.constexpr):
    offs = tl.arange(0, NP)
    return tl.load(ptr + offs, mask=offs < N, other=0.0)


@triton.jit
def _load_matrix(ptr, ROWS: tl.constexpr, COLS: tl.constexpr, ROWS_P: tl.constexpr, COLS_P: tl.constexpr,
                 TRANSPOSE: tl.constexpr):
    """A row-major fp32 ``[ROWS, COLS]`` matrix as a zero-padded ``[ROWS_P, COLS_P]`` tile, or
    its transpose as ``[COLS_P, ROWS_P]``."""
    if TRANSPOSE:
        offs_r = tl.arange(0, ROWS_P)[None, :]
        offs_c = tl.arange(0, COLS_P)[:, None]
    else:
        offs_r = tl.arange(0, ROWS_P)[:, None]
        offs_c = tl.arange(0, COLS_P)[None, :]
    return tl.load(ptr + offs_r * COLS + offs_c, mask=(offs_r < ROWS) & (offs_c < COLS), other=0.0)


@triton.jit
def _accumulate_vector(ptr, value, N: tl.constexpr, NP: tl.constexpr):
    offs = tl.arange(0, NP)
    keep = offs < N
    tl.store(ptr + offs, tl.load(ptr + offs, mask=keep, other=0.0) + value, mask=keep)


@triton.jit
def _accumulate_matrix(ptr, value, ROWS: tl.constexpr, COLS: tl.constexpr, ROWS_P: tl.constexpr,
                       COLS_P: tl.constexpr):
    offs_r = tl.arange(0, ROWS_P)[:, None]
    offs_c = tl.arange(0, COLS_P)[None, :]
    keep = (offs_r < ROWS) & (offs_c < COLS)
    offs = offs_r * COLS + offs_c
    tl.store(ptr + offs, tl.load(ptr + offs, mask=keep, other=0.0) + value, mask=keep)


@triton.jit
def _act_params(ptr, layer: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, HMAX: tl.constexpr):
    """Layer ``layer``'s activation parameters from the packed fp32 ``[NUM_HIDDEN, 4, HMAX]``
    buffer: (prelu weight or dice alpha, dice mean, dice gate scale, dice gate bias)."""
    base = ptr + layer * 4 * HMAX
    return (_load_vector(base, H, HP), _load_vector(base + HMAX, H, HP), _load_vector(base + 2 * HMAX, H, HP),
            _load_vector(base + 3 * HMAX, H, HP))


@triton.jit
def _act_params_at(ptr, layer: tl.constexpr, offs, H: tl.constexpr, HMAX: tl.constexpr):
    """Like ``_act_params`` for the channels ``offs`` only."""
    base = ptr + layer * 4 * HMAX + offs
    keep = offs < H
    return (tl.load(base, mask=keep, other=0.0), tl.load(base + HMAX, mask=keep, other=0.0),
            tl.load(base + 2 * HMAX, mask=keep, other=0.0), tl.load(base + 3 * HMAX, mask=keep, other=0.0))


@triton.jit
def _gate_input(z, mean, scale, bias, ACT: tl.constexpr):
    """Dice's gate input ``(z - mean) * scale`` (plus the affine gate's bias for ACT 4)."""
    out = (z - mean[None, :]) * scale[None, :]
    if ACT == 4:
        out += bias[None, :]
    return out


@triton.jit
def _activation(z, p0, p1, p2, p3, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.sigmoid(z)
    elif ACT == 1:
        out = tl.maximum(z, 0.0)
    elif ACT == 2:
        out = tl.where(z >= 0, z, p0[None, :] * z)
    else:
        gate = tl.sigmoid(_gate_input(z, p1, p2, p3, ACT))
        out = z * (gate + (1.0 - gate) * p0[None, :])
    return out


@triton.jit
def _activation_backward(z, grad_out, p0, p1, p2, p3, ACT: tl.constexpr):
    """Returns ``(dL/dz, per-element dL/dparam, per-element dL/d(dice gate input), dL/dz but
    the gate's share)``; the second is summed over rows by the caller (prelu weight or dice
    alpha; zeros for sigmoid and relu), the last two (dice only) serve ``_dice_gate_terms``."""
    if ACT == 0:
        s = tl.sigmoid(z)
        grad_z = grad_out * s * (1.0 - s)
        grad_p = tl.zeros_like(z)
        grad_gate = grad_p
        direct = grad_z
    elif ACT == 1:
        grad_z = tl.where(z > 0, grad_out, 0.0)
        grad_p = tl.zeros_like(z)
        grad_gate = grad_p
        direct = grad_z
    elif ACT == 2:
        negative = z < 0
        grad_z = tl.where(negative, p0[None, :] * grad_out, grad_out)
        grad_p = tl.where(negative, grad_out * z, 0.0)
        grad_gate = tl.zeros_like(z)
        direct = grad_z
    else:
        gate = tl.sigmoid(_gate_input(z, p1, p2, p3, ACT))
        alpha = p0[None, :]
        local = gate + (1.0 - gate) * alpha + z * (1.0 - alpha) * gate * (1.0 - gate) * p2[None, :]
        grad_z = grad_out * local
        grad_p = grad_out * z * (1.0 - gate)
        # Unused (and dropped by the compiler) but where the gate's batch terms need them.
        grad_gate = grad_out * z * (1.0 - alpha) * gate * (1.0 - gate)
        direct = grad_out * (gate + (1.0 - gate) * alpha)
    return grad_z, grad_p, grad_gate, direct


@triton.jit
def _dice_gate_terms(grad_z, direct, grad_gate, z, mean, scale, keep, gate_ptr, corr_ptr, layer: tl.constexpr, offs,
                     H: tl.constexpr, HMAX: tl.constexpr, SUMS: tl.constexpr, CORRECT: tl.constexpr):
    """Dice layer ``layer``'s cross-sample terms on the channels ``offs`` of a tile, s = ``grad_gate``: SUMS adds
    S0 = sum s, S1 = sum s (z - mean) and, with CORRECT, Sc = sum of the kept (z - mean) to ``gate_ptr`` (fp32
    ``[NUM_HIDDEN, 3, HMAX]``); CORRECT returns ``direct + scale * (s - keep * (A + B (z - mean)))``, (A, B) from
    ``corr_ptr`` (fp32 ``[NUM_HIDDEN, 2, HMAX]``): inside the bracket, s cancels exactly where one position counts."""
    if SUMS or CORRECT:
        keep_c = offs < H
        centred = z - mean[None, :]
    if SUMS:
        sums = gate_ptr + layer * 3 * HMAX + offs
        tl.store(sums, tl.load(sums, mask=keep_c, other=0.0) + tl.sum(grad_gate, axis=0), mask=keep_c)
        tl.store(sums + HMAX, tl.load(sums + HMAX, mask=keep_c, other=0.0) + tl.sum(grad_gate * centred, axis=0),
                 mask=keep_c)
        if CORRECT:
            tl.store(sums + 2 * HMAX, tl.load(sums + 2 * HMAX, mask=keep_c, other=0.0)
                     + tl.sum(tl.where(keep[:, None], centred, 0.0), axis=0), mask=keep_c)
    if CORRECT:
        base = corr_ptr + layer * 2 * HMAX + offs
        term_a = tl.load(base, mask=keep_c, other=0.0)
        term_b = tl.load(base + HMAX, mask=keep_c, other=0.0)
        batch_terms = tl.where(keep[:, None], term_a[None, :] + term_b[None, :] * centred, 0.0)
        grad_z = direct + scale[None, :] * (grad_gate - batch_terms)
    return grad_z


@triton.jit
def _load_fold_rows(ptr, offs_c, c_ok, H1: tl.constexpr, H1P: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Rows ``offs_c`` of a row-major fp32 ``[D, H1]`` matrix as ``[BD, H1P]``, or transposed
    as ``[H1P, BD]``."""
    offs_h = tl.arange(0, H1P)
    if TRANSPOSE:
        ptrs = ptr + offs_c[None, :] * H1 + offs_h[:, None]
        keep = c_ok[None, :] & (offs_h < H1)[:, None]
    else:
        ptrs = ptr + offs_c[:, None] * H1 + offs_h[None, :]
        keep = c_ok[:, None] & (offs_h < H1)[None, :]
    return tl.load(ptrs, mask=keep, other=0.0)


@triton.jit
def _load_fold_block(ptr, offs_c, c_ok, offs_h, H1: tl.constexpr):
    """Rows ``offs_c``, columns ``offs_h`` of a row-major fp32 ``[D, H1]`` matrix, transposed:
    ``[len(offs_h), len(offs_c)]``."""
    return tl.load(ptr + offs_c[None, :] * H1 + offs_h[:, None], mask=c_ok[None, :] & (offs_h < H1)[:, None],
                   other=0.0)


@triton.jit
def _load_w2_columns(w2_ptr, offs_hc, H1: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr,
                     TRANSPOSE: tl.constexpr):
    """Columns ``offs_hc`` of the second layer's fp32 ``[H2, H1]`` weight: ``[H2P, HC]``, or its
    transpose ``[HC, H2P]``."""
    offs_h2 = tl.arange(0, H2P)
    if TRANSPOSE:
        ptrs = w2_ptr + offs_h2[None, :] * H1 + offs_hc[:, None]
        keep = (offs_h2 < H2)[None, :] & (offs_hc < H1)[:, None]
    else:
        ptrs = w2_ptr + offs_h2[:, None] * H1 + offs_hc[None, :]
        keep = (offs_h2 < H2)[:, None] & (offs_hc < H1)[None, :]
    return tl.load(ptrs, mask=keep, other=0.0)


@triton.jit
def _first_layer_backward(z1, grad_h, a0, a1, a2, a3, keep, part_act, grad_u_row, gate_ptr, corr_ptr, ACT: tl.constexpr,
                          PHASE: tl.constexpr, H1: tl.constexpr, H1P: tl.constexpr, HMAX: tl.constexpr,
                          SUMS: tl.constexpr, CORRECT: tl.constexpr):
    """``dz1`` of a whole ``[BLOCK_T, H1P]`` tile, with Dice's cross-sample terms (see
    ``_dice_gate_terms``); PHASE 1 also adds its activation-parameter and ``G_b`` sums."""
    grad_z1, grad_param, grad_gate, direct = _activation_backward(z1, grad_h, a0, a1, a2, a3, ACT)
    grad_z1 = _dice_gate_terms(grad_z1, direct, grad_gate, z1, a1, a2, keep, gate_ptr, corr_ptr, 0,
                               tl.arange(0, H1P), H1, HMAX, SUMS, CORRECT)
    if PHASE == 1:
        _accumulate_vector(part_act, tl.sum(grad_param, axis=0), H1, H1P)
        _accumulate_vector(grad_u_row, tl.sum(grad_z1, axis=0), H1, H1P)
    return grad_z1


@triton.jit
def _moments_update(count, mean, m2, z, keep):
    """Merges the moments (count, mean, centred sum of squares) of the kept rows of the tile
    ``z`` [BLOCK_T, HP] into the running ``(count, mean, m2)`` with Chan's formula. A tile's own
    moments are taken around its mean (a single kept row: exactly itself, variance exactly 0)."""
    tile_count = tl.sum(keep.to(tl.int32), axis=0)
    kept = keep[:, None]
    tile_mean = tl.sum(tl.where(kept, z, 0.0), axis=0) / tl.maximum(tile_count, 1).to(tl.float32)
    dev = tl.where(kept, z - tile_mean[None, :], 0.0)
    return _merge_moments(count, mean, m2, tile_count, tile_mean, tl.sum(dev * dev, axis=0))


@triton.jit
def _mlp_vectors(act_ptr, b2_ptr, b3_ptr, wo_ptr, bo_ptr, H1: tl.constexpr, H1P: tl.constexpr, H2: tl.constexpr,
                 H2P: tl.constexpr, H3: tl.constexpr, H3P: tl.constexpr, HMAX: tl.constexpr,
                 NUM_HIDDEN: tl.constexpr):
    """The per-channel vectors of the MLP: activation parameters and bias of each hidden layer
    (zeros for absent layers), then the score layer's weight and bias."""
    a0, a1, a2, a3 = _act_params(act_ptr, 0, H1, H1P, HMAX)
    b2 = tl.zeros([H2P], dtype=tl.float32)
    c0, c1, c2, c3 = b2, b2, b2, b2
    b3 = tl.zeros([H3P], dtype=tl.float32)
    e0, e1, e2, e3 = b3, b3, b3, b3
    if NUM_HIDDEN >= 2:
        b2 = _load_vector(b2_ptr, H2, H2P)
        c0, c1, c2, c3 = _act_params(act_ptr, 1, H2, H2P, HMAX)
    if NUM_HIDDEN >= 3:
        b3 = _load_vector(b3_ptr, H3, H3P)
        e0, e1, e2, e3 = _act_params(act_ptr, 2, H3, H3P, HMAX)
    if NUM_HIDDEN == 1:
        wo = _load_vector(wo_ptr, H1, H1P)
    elif NUM_HIDDEN == 2:
        wo = _load_vector(wo_ptr, H2, H2P)
    else:
        wo = _load_vector(wo_ptr, H3, H3P)
    return a0, a1, a2, a3, b2, c0, c1, c2, c3, b3, e0, e1, e2, e3, wo, tl.load(bo_ptr)


@triton.jit
def _folded_first_layer(q, wkd_ptr, wp_ptr, D: tl.constexpr, DP: tl.constexpr, H1: tl.constexpr,
                        H1P: tl.constexpr):
    """``M_b = (Wk - Wd)^T + diag(q) Wp^T`` as a ``[DP, H1P]`` tile."""
    return (_load_matrix(wkd_ptr, D, H1, DP, H1P, False)
            + q[:, None] * _load_matrix(wp_ptr, D, H1, DP, H1P, False))


@triton.jit
def _valid_rows(mask_ptr, sample, offs_t, span, T, HAS_MASK: tl.constexpr):
    in_span = offs_t < span
    if HAS_MASK:
        flag = tl.load(mask_ptr + sample * T + offs_t, mask=in_span, other=0)
        valid = in_span & (flag != 0)
    else:
        valid = in_span
    return in_span, valid


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@jit_unspecialized
def _din_attention_fwd_kernel(
        query_ptr, keys_ptr, u_ptr, wkd_ptr, wp_ptr,
        w2_ptr, b2_ptr, w3_ptr, b3_ptr, wo_ptr, bo_ptr, act_ptr,
        span_ptr, mask_ptr,
        pooled_ptr, weights_ptr, logits_ptr, row_max_ptr, row_sum_ptr,
        stat_count_ptr, stat_mean_ptr, stat_m2_ptr,
        T, stride_qb, stride_kb, stride_kt, softmax_scale,
        D: tl.constexpr, DP: tl.constexpr,
        H1: tl.constexpr, H1P: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr,
        H3: tl.constexpr, H3P: tl.constexpr, HMAX: tl.constexpr, NUM_HIDDEN: tl.constexpr,
        ACT: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
        IEEE: tl.constexpr, BD: tl.constexpr, STAT_LAYER: tl.constexpr):
    """One program per sample; BD == DP holds the sample's fold across tiles, a smaller BD
    works through D in chunks.

    query ``[B, D]``, keys ``[B, T, D]`` (last stride 1; a batch stride of 0 serves one history
    to many candidates), u ``[B, H1]`` fp32, ``(Wk - Wd)^T`` and ``Wp^T`` ``[D, H1]`` fp32, the
    other layers fp32 ``nn.Linear`` layout, span ``[B]`` int32 (one past the last valid
    position), mask ``[B, T]`` uint8 when HAS_MASK. Writes pooled ``[B, D]`` and weights
    ``[B, T]`` (keys' dtype); for softmax also fp32 logits ``[B, T]`` (scratch) and the row max
    and denominator ``[B]``.

    STAT_LAYER = l > 0 (Dice statistics pass) stops at hidden layer l's pre-activation and
    writes instead the moments of its valid positions: count ``[B]`` int32, mean and centred
    sum of squares ``[B, H_l]`` fp32. The same code computes the layers below as the forward
    does, so both passes see the same pre-activations.
    """
    sample = tl.program_id(0).to(tl.int64)
    span = tl.load(span_ptr + sample)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    q = tl.load(query_ptr + sample * stride_qb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    u = _load_vector(u_ptr + sample * H1, H1, H1P)
    if BD == DP:
        fold = _folded_first_layer(q, wkd_ptr, wp_ptr, D, DP, H1, H1P)
        a0, a1, a2, a3, b2, c0, c1, c2, c3, b3, e0, e1, e2, e3, wo, bo = _mlp_vectors(
            act_ptr, b2_ptr, b3_ptr, wo_ptr, bo_ptr, H1, H1P, H2, H2P, H3, H3P, HMAX, NUM_HIDDEN)

    if STAT_LAYER == 1:
        stat_mean = tl.zeros([H1P], dtype=tl.float32)
    elif STAT_LAYER == 2:
        stat_mean = tl.zeros([H2P], dtype=tl.float32)
    elif STAT_LAYER == 3:
        stat_mean = tl.zeros([H3P], dtype=tl.float32)
    if STAT_LAYER > 0:
        stat_count = tl.full([], 0, tl.int32)
        stat_m2 = tl.zeros_like(stat_mean)
    row_max = tl.full([], _NEG_BIG, tl.float32)
    row_sum = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([DP], dtype=tl.float32)
    keys_row = keys_ptr + sample * stride_kb
    num_tiles = tl.cdiv(span, BLOCK_T)
    for tile in range(0, num_tiles):
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        in_span, valid = _valid_rows(mask_ptr, sample, offs_t, span, T, HAS_MASK)
        if BD < DP:
            # Re-read each tile (cache hits): the chunked 3xTF32 products leave no registers
            # to hold them across tiles.
            a0, a1, a2, a3, b2, c0, c1, c2, c3, b3, e0, e1, e2, e3, wo, bo = _mlp_vectors(
                act_ptr, b2_ptr, b3_ptr, wo_ptr, bo_ptr, H1, H1P, H2, H2P, H3, H3P, HMAX, NUM_HIDDEN)
        if BD == DP:
            k = tl.load(keys_row + offs_t[:, None] * stride_kt + offs_d[None, :],
                        mask=in_span[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            z1 = u[None, :] + _mm(k, fold, IEEE)
        else:
            # D in chunks, the fold rebuilt from cached weights: holding a [D, H1] fold and
            # feeding a D-deep dot costs more registers than 3xTF32 leaves.
            z1 = tl.zeros([BLOCK_T, H1P], dtype=tl.float32) + u[None, :]
            for chunk in range(0, DP // BD):
                offs_c = chunk * BD + tl.arange(0, BD)
                c_ok = offs_c < D
                k_c = tl.load(keys_row + offs_t[:, None] * stride_kt + offs_c[None, :],
                              mask=in_span[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                q_c = tl.load(query_ptr + sample * stride_qb + offs_c, mask=c_ok, other=0.0).to(tl.float32)
                fold_c = (_load_fold_rows(wkd_ptr, offs_c, c_ok, H1, H1P, False)
                          + q_c[:, None] * _load_fold_rows(wp_ptr, offs_c, c_ok, H1, H1P, False))
                z1 += _mm(k_c, fold_c, IEEE)
        if STAT_LAYER == 1:
            stat_count, stat_mean, stat_m2 = _moments_update(stat_count, stat_mean, stat_m2, z1, valid)
        if STAT_LAYER != 1:
            h = _activation(z1, a0, a1, a2, a3, ACT)
        if NUM_HIDDEN >= 2 and STAT_LAYER != 1:
            z2 = _mm(h, _load_matrix(w2_ptr, H2, H1, H2P, H1P, True), IEEE) + b2[None, :]
            if STAT_LAYER == 2:
                stat_count, stat_mean, stat_m2 = _moments_update(stat_count, stat_mean, stat_m2, z2, valid)
            else:
                h = _activation(z2, c0, c1, c2, c3, ACT)
        if NUM_HIDDEN >= 3 and (STAT_LAYER == 0 or STAT_LAYER == 3):
            z3 = _mm(h, _load_matrix(w3_ptr, H3, H2, H3P, H2P, True), IEEE) + b3[None, :]
            if STAT_LAYER == 3:
                stat_count, stat_mean, stat_m2 = _moments_update(stat_count, stat_mean, stat_m2, z3, valid)
            else:
                h = _activation(z3, e0, e1, e2, e3, ACT)
        if STAT_LAYER == 0:
            score = tl.sum(h * wo[None, :], axis=1) + bo
            if BD < DP:
                # Read only now (cache hits): held across the chunked products it would spill.
                k = tl.load(keys_row + offs_t[:, None] * stride_kt + offs_d[None, :],
                            mask=in_span[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            if NORM == 0:
                w = tl.where(valid, score, 0.0)
                acc += tl.sum(w[:, None] * k, axis=0)
                tl.store(weights_ptr + sample * T + offs_t, w.to(weights_ptr.dtype.element_ty), mask=offs_t < T)
            else:
                logit = tl.where(valid, score * softmax_scale, float("-inf"))
                new_max = tl.maximum(row_max, tl.max(logit, axis=0))
                rescale = tl.exp(row_max - new_max)
                p = tl.exp(logit - new_max)
                row_sum = row_sum * rescale + tl.sum(p, axis=0)
                acc = acc * rescale + tl.sum(p[:, None] * k, axis=0)
                row_max = new_max
                tl.store(logits_ptr + sample * T + offs_t, logit, mask=in_span)
    if STAT_LAYER > 0:
        if STAT_LAYER == 1:
            offs_s = tl.arange(0, H1P)
            width = H1
        elif STAT_LAYER == 2:
            offs_s = tl.arange(0, H2P)
            width = H2
        else:
            offs_s = tl.arange(0, H3P)
            width = H3
        tl.store(stat_count_ptr + sample, stat_count)
        tl.store(stat_mean_ptr + sample * width + offs_s, stat_mean, mask=offs_s < width)
        tl.store(stat_m2_ptr + sample * width + offs_s, stat_m2, mask=offs_s < width)
    else:
        for start in range(num_tiles * BLOCK_T, T, BLOCK_T):
            offs_t = start + tl.arange(0, BLOCK_T)
            tl.store(weights_ptr + sample * T + offs_t, tl.zeros([BLOCK_T], dtype=weights_ptr.dtype.element_ty),
                     mask=offs_t < T)
        if NORM == 1:
            denom = tl.where(row_sum > 0, row_sum, 1.0)
            acc = acc / denom
            tl.store(row_max_ptr + sample, row_max)
            tl.store(row_sum_ptr + sample, row_sum)
            # The logits were written by other threads of this program.
            tl.debug_barrier()
            for tile in range(0, num_tiles):
                offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
                in_span = offs_t < span
                logit = tl.load(logits_ptr + sample * T + offs_t, mask=in_span, other=float("-inf"))
                w = tl.exp(logit - row_max) / denom
                tl.store(weights_ptr + sample * T + offs_t, w.to(weights_ptr.dtype.element_ty), mask=offs_t < T)
        tl.store(pooled_ptr + sample * D + offs_d, acc.to(pooled_ptr.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@jit_unspecialized
def _din_attention_bwd_kernel(
        query_ptr, keys_ptr, u_ptr, wkd_ptr, wp_ptr,
        w2_ptr, b2_ptr, w3_ptr, b3_ptr, wo_ptr, bo_ptr, act_ptr,
        span_ptr, mask_ptr,
        grad_pooled_ptr, grad_weights_ptr, row_max_ptr, row_sum_ptr, delta_ptr,
        grad_keys_ptr, grad_u_ptr, grad_query_part_ptr,
        part_p_ptr, part_pq_ptr, part_w2_ptr, part_b2_ptr, part_w3_ptr, part_b3_ptr,
        part_wo_ptr, part_bo_ptr, part_act_ptr, scratch_ptr, corr_ptr, part_gate_ptr,
        B, T, stride_qb, stride_kb, stride_kt, stride_gkb, stride_gkt, softmax_scale, keep_all,
        D: tl.constexpr, DP: tl.constexpr,
        H1: tl.constexpr, H1P: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr,
        H3: tl.constexpr, H3P: tl.constexpr, HMAX: tl.constexpr, NUM_HIDDEN: tl.constexpr,
        ACT: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
        IEEE: tl.constexpr, BD: tl.constexpr, PHASE: tl.constexpr, HC: tl.constexpr,
        DICE_MODE: tl.constexpr, STOP_LAYER: tl.constexpr, BD_FIRST: tl.constexpr):
    """Persistent programs; program ``pid`` handles samples ``pid, pid + P, ...``.

    Inputs as in the forward, plus grad_pooled ``[B, D]`` fp32, grad_weights ``[B, T]`` fp32,
    the forward's row max / denominator and ``delta_b = sum_t w_t dL/dw_t`` ``[B]`` fp32
    (softmax only). Writes grad_keys ``[B, T, D]`` (keys' dtype, zero on padding) and adds into
    these zero-initialised fp32 buffers: grad_u ``[B, H1]`` (``G_b = sum_t dz1``), grad_query_part
    ``[B, D]`` (the query's gradient through ``Wp``), and this program's slice of the partials
    ``sum dz1^T k`` and ``sum dz1^T (k * q)`` ``[P, H1, D]``, layer 2/3 weights and biases,
    score-layer weight ``[P, Hn]`` and bias ``[P]``, activation parameters ``[P, NUM_HIDDEN, HMAX]``.

    With HC < H1P, ``z1`` and ``dz1`` pass through scratch ``[P, 2, BLOCK_T, H1P]`` fp32 (this
    program's slice, cache-resident) so that every H1-deep product (layer 2 both ways, layer 2's
    weight gradient, the first layer's backward) runs in chunks of HC.
    The work is split in two launches that each recompute the MLP (one pass would need more
    registers than there are): PHASE 1 (keys, and all but the first layer's parameters) and
    PHASE 2 (query, and the first layer's weight sums). DICE_MODE 2 moves the keys out of
    PHASE 1 into a third launch, PHASE 3 (the cross-sample terms leave PHASE 1 no registers
    for them).

    Dice (``corr`` ``[NUM_HIDDEN, 2, HMAX]`` fp32 per layer: A, B; ``part_gate``
    ``[P, NUM_HIDDEN, 3, HMAX]`` fp32: S0, S1, Sc; see ``_dice_gate_terms``): DICE_MODE 1 (affine
    gate, running statistics) has PHASE 2 (the one with registers to spare) add every layer's S0
    and S1. DICE_MODE 2 (batch statistics) adds the cross-sample terms of every layer to dz at
    the kept positions (the valid ones, or all ``t < span`` when ``keep_all`` is nonzero); its
    PHASE 0 back-propagates only down to layer STOP_LAYER, adds that layer's S0 and S1 and
    writes nothing else.

    BD_FIRST is the D chunk of the first layer's recompute (BD elsewhere). With batch statistics
    every pass takes the same one (for fp32 the forward's), so that the passes see the same z1:
    where a channel's batch variance is tiny, rstd magnifies any difference.
    """
    # 64-bit sample indices: sample * stride_kb may exceed 2**31.
    pid = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0)
    offs_h1 = tl.arange(0, H1P)

    part_p = part_p_ptr + pid * H1 * D
    part_pq = part_pq_ptr + pid * H1 * D
    part_act = part_act_ptr + pid * NUM_HIDDEN * HMAX
    part_gate = part_gate_ptr + pid * NUM_HIDDEN * 3 * HMAX
    for sample in range(pid, B, num_programs):
        span = tl.load(span_ptr + sample)
        if NORM == 1:
            row_max = tl.load(row_max_ptr + sample)
            row_sum = tl.load(row_sum_ptr + sample)
            denom = tl.where(row_sum > 0, row_sum, 1.0)
            delta = tl.load(delta_ptr + sample)
        keys_row = keys_ptr + sample * stride_kb
        grad_keys_row = grad_keys_ptr + sample * stride_gkb
        num_tiles = tl.cdiv(span, BLOCK_T)
        for tile in range(0, num_tiles):
            # Buffers accumulated last tile are read back (by other threads of this program).
            tl.debug_barrier()
            offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
            in_span, valid = _valid_rows(mask_ptr, sample, offs_t, span, T, HAS_MASK)
            if DICE_MODE == 2:
                # The vector is widened before the `+`: Triton's interpreter mistypes scalar + vector.
                keep = in_span & ((valid.to(tl.int32) + (keep_all + tl.zeros_like(offs_t))) > 0)
            else:
                keep = valid
            # Per-channel vectors are re-read each tile (cache hits) to keep registers free.
            a0, a1, a2, a3 = _act_params(act_ptr, 0, H1, H1P, HMAX)
            if NUM_HIDDEN >= 2:
                b2 = _load_vector(b2_ptr, H2, H2P)
                c0, c1, c2, c3 = _act_params(act_ptr, 1, H2, H2P, HMAX)
            if NUM_HIDDEN >= 3:
                b3 = _load_vector(b3_ptr, H3, H3P)
                e0, e1, e2, e3 = _act_params(act_ptr, 2, H3, H3P, HMAX)
            if NUM_HIDDEN == 1:
                wo = _load_vector(wo_ptr, H1, H1P)
            elif NUM_HIDDEN == 2:
                wo = _load_vector(wo_ptr, H2, H2P)
            else:
                wo = _load_vector(wo_ptr, H3, H3P)
            bo = tl.load(bo_ptr)
            # First layer z1 = u + k M_b, and g . k_t, chunk by chunk over D: the [D, H1] fold is
            # rebuilt from cached weights per chunk because the backward's live [BLOCK_T, H]
            # tiles leave no registers to hold it across tiles.
            z1 = tl.zeros([BLOCK_T, H1P], dtype=tl.float32) + _load_vector(u_ptr + sample * H1, H1, H1P)[None, :]
            grad_w = tl.load(grad_weights_ptr + sample * T + offs_t, mask=in_span, other=0.0)
            for chunk in range(0, DP // BD_FIRST):
                offs_c = chunk * BD_FIRST + tl.arange(0, BD_FIRST)
                c_ok = offs_c < D
                k = tl.load(keys_row + offs_t[:, None] * stride_kt + offs_c[None, :],
                            mask=in_span[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                q_c = tl.load(query_ptr + sample * stride_qb + offs_c, mask=c_ok, other=0.0).to(tl.float32)
                g_c = tl.load(grad_pooled_ptr + sample * D + offs_c, mask=c_ok, other=0.0)
                fold = (_load_fold_rows(wkd_ptr, offs_c, c_ok, H1, H1P, False)
                        + q_c[:, None] * _load_fold_rows(wp_ptr, offs_c, c_ok, H1, H1P, False))
                z1 += _mm(k, fold, IEEE)
                grad_w += tl.sum(k * g_c[None, :], axis=1)
            # Recompute the rest of the forward, keeping only pre-activations (activations are
            # recomputed where needed: registers, not arithmetic, bound this kernel).
            if HC < H1P:
                # H1-deep products run in chunks of HC read back from this program's scratch
                # tiles (z1, then dz1): a register tile cannot be sliced, and an H1-deep dot
                # operand costs every warp 16 x H1 registers.
                offs_row = tl.arange(0, BLOCK_T)
                z1_scratch = scratch_ptr + pid * 2 * BLOCK_T * H1P
                grad_scratch = z1_scratch + BLOCK_T * H1P
            if NUM_HIDDEN >= 2:
                if HC < H1P:
                    tl.store(z1_scratch + offs_row[:, None] * H1P + offs_h1[None, :], z1)
                    tl.debug_barrier()
                    z2 = tl.zeros([BLOCK_T, H2P], dtype=tl.float32) + b2[None, :]
                    for h_chunk in range(0, H1P // HC):
                        offs_hc = h_chunk * HC + tl.arange(0, HC)
                        z1_c = tl.load(z1_scratch + offs_row[:, None] * H1P + offs_hc[None, :])
                        p0, p1, p2, p3 = _act_params_at(act_ptr, 0, offs_hc, H1, HMAX)
                        z2 += _mm(_activation(z1_c, p0, p1, p2, p3, ACT),
                                  _load_w2_columns(w2_ptr, offs_hc, H1, H2, H2P, True), IEEE)
                else:
                    z2 = (_mm(_activation(z1, a0, a1, a2, a3, ACT), _load_matrix(w2_ptr, H2, H1, H2P, H1P, True), IEEE)
                          + b2[None, :])
                h = _activation(z2, c0, c1, c2, c3, ACT)
            else:
                h = _activation(z1, a0, a1, a2, a3, ACT)
            if NUM_HIDDEN >= 3:
                z3 = _mm(h, _load_matrix(w3_ptr, H3, H2, H3P, H2P, True), IEEE) + b3[None, :]
                h = _activation(z3, e0, e1, e2, e3, ACT)
            score = tl.sum(h * wo[None, :], axis=1) + bo

            # dL/dw_t = g . k_t + dL/dweights_t, through the normalization to the score.
            if NORM == 0:
                w = tl.where(valid, score, 0.0)
                grad_score = tl.where(valid, grad_w, 0.0)
            else:
                w = tl.where(valid, tl.exp(score * softmax_scale - row_max) / denom, 0.0)
                grad_score = softmax_scale * w * (grad_w - delta)

            if PHASE == 1:
                tl.store(part_bo_ptr + pid, tl.load(part_bo_ptr + pid) + tl.sum(grad_score, axis=0))
                if NUM_HIDDEN == 1:
                    _accumulate_vector(part_wo_ptr + pid * H1, tl.sum(grad_score[:, None] * h, axis=0), H1, H1P)
                elif NUM_HIDDEN == 2:
                    _accumulate_vector(part_wo_ptr + pid * H2, tl.sum(grad_score[:, None] * h, axis=0), H2, H2P)
                else:
                    _accumulate_vector(part_wo_ptr + pid * H3, tl.sum(grad_score[:, None] * h, axis=0), H3, H3P)
            grad_h = grad_score[:, None] * wo[None, :]
            if NUM_HIDDEN >= 3:
                grad_z, grad_param, grad_gate, direct = _activation_backward(z3, grad_h, e0, e1, e2, e3, ACT)
                grad_z = _dice_gate_terms(grad_z, direct, grad_gate, z3, e1, e2, keep, part_gate, corr_ptr, 2,
                                          tl.arange(0, H3P), H3, HMAX,
                                          (DICE_MODE == 1 and PHASE == 2) or (PHASE == 0 and STOP_LAYER == 3),
                                          DICE_MODE == 2)
                if PHASE == 1:
                    _accumulate_vector(part_act + 2 * HMAX, tl.sum(grad_param, axis=0), H3, H3P)
                    _accumulate_vector(part_b3_ptr + pid * H3, tl.sum(grad_z, axis=0), H3, H3P)
                    _accumulate_matrix(part_w3_ptr + pid * H3 * H2,
                                       _mm(tl.trans(grad_z), _activation(z2, c0, c1, c2, c3, ACT), IEEE),
                                       H3, H2, H3P, H2P)
                if PHASE != 0 or STOP_LAYER < 3:
                    grad_h = _mm(grad_z, _load_matrix(w3_ptr, H3, H2, H3P, H2P, False), IEEE)
            if NUM_HIDDEN >= 2 and (PHASE != 0 or STOP_LAYER < 3):
                grad_z, grad_param, grad_gate, direct = _activation_backward(z2, grad_h, c0, c1, c2, c3, ACT)
                grad_z = _dice_gate_terms(grad_z, direct, grad_gate, z2, c1, c2, keep, part_gate, corr_ptr, 1,
                                          tl.arange(0, H2P), H2, HMAX,
                                          (DICE_MODE == 1 and PHASE == 2) or (PHASE == 0 and STOP_LAYER == 2),
                                          DICE_MODE == 2)
                if PHASE == 1:
                    _accumulate_vector(part_act + HMAX, tl.sum(grad_param, axis=0), H2, H2P)
                    _accumulate_vector(part_b2_ptr + pid * H2, tl.sum(grad_z, axis=0), H2, H2P)
                if HC < H1P and (PHASE != 0 or STOP_LAYER == 1):
                    # Layer 2's weight gradient and dz1, H1 chunk by H1 chunk: dz1 goes to its
                    # own scratch tile (other threads may still read the z1 chunk).
                    offs_h2 = tl.arange(0, H2P)
                    for h_chunk in range(0, H1P // HC):
                        offs_hc = h_chunk * HC + tl.arange(0, HC)
                        z1_c = tl.load(z1_scratch + offs_row[:, None] * H1P + offs_hc[None, :])
                        p0, p1, p2, p3 = _act_params_at(act_ptr, 0, offs_hc, H1, HMAX)
                        hc_ok = offs_hc < H1
                        if PHASE == 1:
                            w2_offs = part_w2_ptr + pid * H2 * H1 + offs_h2[:, None] * H1 + offs_hc[None, :]
                            w2_ok = (offs_h2 < H2)[:, None] & hc_ok[None, :]
                            tl.store(w2_offs, tl.load(w2_offs, mask=w2_ok, other=0.0)
                                     + _mm(tl.trans(grad_z), _activation(z1_c, p0, p1, p2, p3, ACT), IEEE), mask=w2_ok)
                        grad_z1_c, grad_param_c, grad_gate_c, direct_c = _activation_backward(
                            z1_c, _mm(grad_z, _load_w2_columns(w2_ptr, offs_hc, H1, H2, H2P, False), IEEE),
                            p0, p1, p2, p3, ACT)
                        grad_z1_c = _dice_gate_terms(grad_z1_c, direct_c, grad_gate_c, z1_c, p1, p2, keep,
                                                     part_gate, corr_ptr, 0, offs_hc, H1, HMAX,
                                                     (DICE_MODE == 1 and PHASE == 2) or PHASE == 0, DICE_MODE == 2)
                        if PHASE == 1:
                            act_offs = part_act + offs_hc
                            tl.store(act_offs, tl.load(act_offs, mask=hc_ok, other=0.0) + tl.sum(grad_param_c, axis=0),
                                     mask=hc_ok)
                            u_offs = grad_u_ptr + sample * H1 + offs_hc
                            tl.store(u_offs, tl.load(u_offs, mask=hc_ok, other=0.0) + tl.sum(grad_z1_c, axis=0),
                                     mask=hc_ok)
                        if PHASE != 0:
                            tl.store(grad_scratch + offs_row[:, None] * H1P + offs_hc[None, :], grad_z1_c)
                elif PHASE != 0 or STOP_LAYER == 1:
                    if PHASE == 1:
                        _accumulate_matrix(part_w2_ptr + pid * H2 * H1,
                                           _mm(tl.trans(grad_z), _activation(z1, a0, a1, a2, a3, ACT), IEEE),
                                           H2, H1, H2P, H1P)
                    grad_h = _mm(grad_z, _load_matrix(w2_ptr, H2, H1, H2P, H1P, False), IEEE)
                    grad_z1 = _first_layer_backward(z1, grad_h, a0, a1, a2, a3, keep, part_act,
                                                    grad_u_ptr + sample * H1, part_gate, corr_ptr, ACT, PHASE, H1,
                                                    H1P, HMAX,
                                                    (DICE_MODE == 1 and PHASE == 2) or PHASE == 0, DICE_MODE == 2)
            if NUM_HIDDEN == 1:
                grad_z1 = _first_layer_backward(z1, grad_h, a0, a1, a2, a3, keep, part_act, grad_u_ptr + sample * H1,
                                                part_gate, corr_ptr, ACT, PHASE, H1, H1P, HMAX,
                                                (DICE_MODE == 1 and PHASE == 2) or PHASE == 0, DICE_MODE == 2)
                if HC < H1P and PHASE != 0:
                    tl.store(grad_scratch + offs_row[:, None] * H1P + offs_h1[None, :], grad_z1)
            if HC < H1P and PHASE != 0:
                tl.debug_barrier()

            # Through z1 = u + k M_b, M_b = (Wk - Wd)^T + diag(q) Wp^T, chunk by chunk over D.
            if PHASE >= 2 or (PHASE == 1 and DICE_MODE != 2):
                for chunk in range(0, DP // BD):
                    offs_c = chunk * BD + tl.arange(0, BD)
                    c_ok = offs_c < D
                    k = tl.load(keys_row + offs_t[:, None] * stride_kt + offs_c[None, :],
                                mask=in_span[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                    q_c = tl.load(query_ptr + sample * stride_qb + offs_c, mask=c_ok, other=0.0).to(tl.float32)
                    if PHASE == 3 or PHASE == 1:
                        g_c = tl.load(grad_pooled_ptr + sample * D + offs_c, mask=c_ok, other=0.0)
                        grad_k = w[:, None] * g_c[None, :]
                        if HC == H1P:
                            wp_t = _load_fold_rows(wp_ptr, offs_c, c_ok, H1, H1P, True)
                            fold_t = _load_fold_rows(wkd_ptr, offs_c, c_ok, H1, H1P, True) + wp_t * q_c[None, :]
                            grad_k += _mm(grad_z1, fold_t, IEEE)
                        else:
                            for h_chunk in range(0, H1P // HC):
                                offs_hc = h_chunk * HC + tl.arange(0, HC)
                                grad_z1_c = tl.load(grad_scratch + offs_row[:, None] * H1P + offs_hc[None, :])
                                wp_t = _load_fold_block(wp_ptr, offs_c, c_ok, offs_hc, H1)
                                fold_t = _load_fold_block(wkd_ptr, offs_c, c_ok, offs_hc, H1) + wp_t * q_c[None, :]
                                grad_k += _mm(grad_z1_c, fold_t, IEEE)
                        tl.store(grad_keys_row + offs_t[:, None] * stride_gkt + offs_c[None, :],
                                 grad_k.to(grad_keys_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & c_ok[None, :])
                    if PHASE == 2:
                        query_ptrs = grad_query_part_ptr + sample * D + offs_c
                        if HC == H1P:
                            through_wp = _mm(grad_z1, _load_fold_rows(wp_ptr, offs_c, c_ok, H1, H1P, True), IEEE)
                        else:
                            through_wp = tl.zeros([BLOCK_T, BD], dtype=tl.float32)
                            for h_chunk in range(0, H1P // HC):
                                offs_hc = h_chunk * HC + tl.arange(0, HC)
                                grad_z1_c = tl.load(grad_scratch + offs_row[:, None] * H1P + offs_hc[None, :])
                                through_wp += _mm(grad_z1_c, _load_fold_block(wp_ptr, offs_c, c_ok, offs_hc, H1),
                                                  IEEE)
                        tl.store(query_ptrs, tl.load(query_ptrs, mask=c_ok, other=0.0)
                                 + tl.sum(through_wp * k, axis=0), mask=c_ok)
                        if HC == H1P:
                            grad_z1_t = tl.trans(grad_z1)
                        else:
                            grad_z1_t = tl.load(grad_scratch + offs_row[None, :] * H1P + offs_h1[:, None])
                        part_offs = offs_h1[:, None] * D + offs_c[None, :]
                        part_ok = (offs_h1 < H1)[:, None] & c_ok[None, :]
                        tl.store(part_p + part_offs, tl.load(part_p + part_offs, mask=part_ok, other=0.0)
                                 + _mm(grad_z1_t, k, IEEE), mask=part_ok)
                        tl.store(part_pq + part_offs, tl.load(part_pq + part_offs, mask=part_ok, other=0.0)
                                 + _mm(grad_z1_t, k * q_c[None, :], IEEE), mask=part_ok)
        if PHASE == 3 or (PHASE == 1 and DICE_MODE != 2):
            for start in range(num_tiles * BLOCK_T, T, BLOCK_T):
                offs_t = start + tl.arange(0, BLOCK_T)
                for chunk in range(0, DP // BD):
                    offs_c = chunk * BD + tl.arange(0, BD)
                    tl.store(grad_keys_row + offs_t[:, None] * stride_gkt + offs_c[None, :],
                             tl.zeros([BLOCK_T, BD], dtype=grad_keys_ptr.dtype.element_ty),
                             mask=(offs_t < T)[:, None] & (offs_c < D)[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


class FoldedMLP:
    """The attention MLP in the kernels' fp32 layout.

    Built from ``weights``/``biases`` (``nn.Linear`` layout, first layer ``[H1, 4D]``) and the
    flat per-layer activation vectors ``act_vectors[i] = (p0, p1, p2, p3)`` (``[H_i]`` each;
    prelu weight, or dice alpha / mean / gate scale / gate bias; zeros when unused; a layer whose
    vectors are not known yet may get ``()`` and ``set_act_vectors`` later). ``gate_bias``: Dice
    with the affine gate (its bias p3 is read).
    """

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 act_vectors: Sequence[Sequence[torch.Tensor]], gate_bias: bool = False):
        self.gate_bias = gate_bias
        w1 = weights[0].detach().float()
        dim = w1.shape[1] // 4
        self.dim = dim
        self.hidden = [int(w.shape[0]) for w in weights[:-1]]
        unsupported = kernel_unsupported(dim, self.hidden)
        if unsupported:
            raise NotImplementedError(f"the triton attention kernels do not take {unsupported}")
        w_query, w_key, w_diff, w_prod = w1[:, :dim], w1[:, dim:2 * dim], w1[:, 2 * dim:3 * dim], w1[:, 3 * dim:]
        self.query_fold = (w_query + w_diff).contiguous()          # [H1, D]
        self.key_fold = (w_key - w_diff).t().contiguous()          # [D, H1]
        self.prod_fold = w_prod.t().contiguous()                   # [D, H1]
        self.b1 = biases[0].detach().float()
        self.layers = [(w.detach().float().contiguous(), b.detach().float().contiguous())
                       for w, b in zip(weights[1:-1], biases[1:-1])]
        self.score_weight = weights[-1].detach().float().reshape(-1).contiguous()
        self.score_bias = biases[-1].detach().float().reshape(-1).contiguous()
        self.hmax = max(self.hidden)
        device = w1.device
        self.act_packed = torch.zeros(len(self.hidden), 4, self.hmax, dtype=torch.float32, device=device)
        for i, vectors in enumerate(act_vectors):
            self.set_act_vectors(i, vectors)
        # Stands in for the pointers of absent layers and buffers.
        self.dummy = torch.zeros(1, dtype=torch.float32, device=device)
        # Unused pointers still type the compiled variant: these match the gated specs'.
        self.no_mask = torch.zeros(1, dtype=torch.uint8, device=device)
        self.no_counts = torch.zeros(1, dtype=torch.int32, device=device)

    def set_act_vectors(self, layer: int, vectors: Sequence[torch.Tensor]) -> None:
        """Hidden layer ``layer``'s ``(p0, ...)`` (up to four ``[H_layer]`` vectors)."""
        for j, vec in enumerate(vectors):
            self.act_packed[layer, j, :self.hidden[layer]] = vec.detach().float()

    def query_bias(self, query: torch.Tensor) -> torch.Tensor:
        """``u = q (Wq + Wd)^T + b1``: ``[B, D]`` -> ``[B, H1]`` fp32."""
        return torch.addmm(self.b1, query.float(), self.query_fold.t())

    def layer_pointers(self):
        w2, b2 = self.layers[0] if len(self.layers) >= 1 else (self.dummy, self.dummy)
        w3, b3 = self.layers[1] if len(self.layers) >= 2 else (self.dummy, self.dummy)
        return w2, b2, w3, b3


class _ForwardLaunch(NamedTuple):
    """Launch options of one forward (or Dice statistics) launch."""

    block_t: int               # BLOCK_T
    chunk: int                 # BD
    num_warps: int
    maxnreg: Optional[int]     # register limit; None leaves it to ptxas


class _BackwardLaunch(NamedTuple):
    """One launch of the backward kernel and its options."""

    suffix: str                # spec name suffix
    phase: int                 # PHASE
    chunk: int                 # BD
    dice_mode: int             # DICE_MODE
    stop_layer: int            # STOP_LAYER
    first_chunk: int           # BD_FIRST
    h_chunk: int               # HC
    num_warps: int
    maxnreg: Optional[int]
    num_stages: int            # software-pipelining depth of the inner loops


def _forward_config(constexprs: dict, seq_len: int, dtype: torch.dtype, statistics: bool = False) -> _ForwardLaunch:
    """Launch options of the forward: tiles large enough to feed ``tl.dot``, small enough that
    the ``[BLOCK_T, H]`` activations and the sample's ``[D, H1]`` fold stay in registers; 3xTF32
    dots (fp32) need about twice the registers, so fp32 works through D in chunks instead of
    holding the fold, and so does the affine Dice gate (its bias vectors leave no room for the
    fold). A 4-warp program holding a D = 128 fold works on 16-row tiles (32 rows spill on sm_80).

    16-bit forwards hold the fold up to D = 128; at D = 256 they work on 32-wide D chunks (holding
    it, or on 128-wide chunks, they need 200 to 292 KiB of shared memory, more than sm_80's 163).
    16-bit launches set the register limit ``MAX_REGISTERS``: left to itself, ptxas lowers their
    register target for occupancy (64 to 168 registers) and spills values held across the tile
    loop. A Dice statistics pass (``statistics``) keeps the forward's tiles and D chunks, so that
    it sees exactly the forward's pre-activations; it keeps fewer tiles live than the forward,
    and fp32 passes with H1 <= 128 run on 4 warps (on 8, ptxas spills as above), 16-bit passes
    on 8 (on 4 some hold more than 255 registers; the compile gate). With three hidden layers
    16-bit forwards work on 16-row tiles (32 spill), fp32 statistics passes run on 8 warps, and
    fp32 forwards of the pointwise activations at DP <= 64 on 16-wide D chunks (32 spills on
    sm_90; Dice keeps its backward's recomputing chunk, ``_first_layer_chunk``). Small shapes
    (``_small``) set ``MAX_REGISTERS`` in fp32 too."""
    dim_p, hidden_p = constexprs["DP"], _padded_hidden(constexprs)
    gate_bias = constexprs["ACT"] == DICE_AFFINE_CODE
    three_layers = len(hidden_p) == 3
    wide = dtype == torch.float32 or dim_p * hidden_p[0] > 64 * 128
    if dtype == torch.float32 or gate_bias:
        pointwise = constexprs["ACT"] < ACTIVATION_CODES["dice"]
        block, chunk = 16, 16 if three_layers and pointwise and dim_p <= 64 else _first_layer_chunk(dim_p)
    else:
        block = 32 if max(dim_p, *hidden_p) <= 128 and (wide or dim_p < 128) and not three_layers else 16
        chunk = dim_p if dim_p <= 128 else 32
    block = min(block, _padded(seq_len))
    if dtype != torch.float32:
        # From DP * H1P = 128 * 256 up (a held fold, or one built chunk by chunk) the forward
        # sits at the limit, where setting it spills; not the softmax forwards at DP = 256, whose
        # fp32 outputs (output_dtype) make ptxas, left to itself, pick 128 registers and spill.
        softmax = constexprs["NORM"] == NORMALIZATION_CODES["softmax"]
        at_limit = not statistics and dim_p * hidden_p[0] >= 128 * 256 and not (softmax and dim_p == 256)
        return _ForwardLaunch(block, chunk, 8 if wide or statistics else 4, None if at_limit else MAX_REGISTERS)
    return _ForwardLaunch(block, chunk, 4 if statistics and hidden_p[0] <= 128 and not three_layers else 8,
                          MAX_REGISTERS if _small(constexprs) else None)


def _small(constexprs: dict) -> bool:
    """Below the widths the launch rules were first tuned at (DP * H1P < 64 * 64): there ptxas
    lowers the register target of some passes for occupancy (to 64-128 registers) and spills, so
    every launch sets the limit ``MAX_REGISTERS``."""
    return constexprs["DP"] * constexprs["H1P"] < 64 * 64


def _first_layer_chunk(dim_p: int) -> int:
    """Width of the D chunks in which fp32 passes (and every backward pass) build z1: 32, or 16
    where 32 would be the whole padded D (DP = 32), which spills (up to 42 values in fp32 with
    three hidden layers, a few in 16-bit)."""
    return 32 if dim_p > 32 else 16


_BACKWARD_BLOCK_T = 16
# Pipelining depth of the backward's inner loops: Triton's default, and a shallower one where
# the default spills (see _backward_launches).
_DEFAULT_STAGES = 3
_SHALLOW_STAGES = 2


def _backward_launches(constexprs: dict, dice_mode: int) -> List[_BackwardLaunch]:
    """Every launch of the backward, in order. It keeps several ``[BLOCK_T, H]`` tiles live, so
    it works on 16-row tiles, D in chunks of BD, H1-deep products in chunks of HC, and in
    recomputing passes: PHASE 1 (keys, layers above the first), PHASE 2 (query and the first
    layer's weight sums, on narrower D chunks) and, with Dice's batch statistics, one summing
    pass per layer first (top down) and PHASE 3 (the keys); the affine gate on running
    statistics sums the gate in phase 2. Every pass recomputes z1 on BD_FIRST-wide D chunks:
    Dice's training passes on the fp32 forward's (16 for 16-bit inputs, which need the
    registers).

    The choices are the compile gate's, for the gated shapes on sm_80 and sm_90:

    * HC: 32 for a single hidden layer and for fp32 at D > 64, else 16. fp32 with H1 > 64, a
      second layer and D <= 64 sits at the 255-register limit, where ptxas spills a few values
      on one configuration or another whatever the choice; per pass: phase 1 on 16-wide D
      chunks with HC = 32, except sigmoid and ReLU on a padded D (D < DP, which spend registers
      on the column mask) on 32-wide chunks with HC = 16 (ReLU without normalization but with a
      mask excepted); phases 2 and 3 with HC = 32, except the affine gate's phase 2. With Dice's
      batch statistics, fp32 at D > 64 with a second layer and H1 <= 64 takes phases 2 and 3 on
      the whole H1 (HC = 32 spills one of them).
    * 16-bit inputs: the summing passes set the register limit ``MAX_REGISTERS`` (ptxas
      otherwise lowers it to 128 registers for occupancy and spills), and those above the first
      layer run on 4 warps; with H1 <= 64 phase 1 takes HC = 32 (16 spills Dice with a mask);
      the affine gate's phase 2 spills on 16-wide D chunks where a second layer follows, and
      phase 3 on 32-wide D chunks.
    * three hidden layers (hidden (80, 40, 20)): phase 1 takes HC = 32 (16 spills) in fp32 and
      in 16-bit at D > 64, and so does Dice's fp32 training phase 1; phase 2 takes 32-wide D
      and H1 chunks in 16-bit and in fp32 on a padded D (D < DP). In 16-bit, Dice's training
      passes and PReLU's phase 1 at D > 64 pipeline their inner loops 2 stages deep: at
      Triton's default of 3 four such configurations spill on sm_90, and no choice of chunks
      fixed them. Not the other passes: at the 255-register limit, depth 2 spills 14 of the
      1,056 16-bit three-layer backward compiles, depth 1 more.
    * small shapes (``_small``: DP * H1P < 64 * 64): every launch sets ``MAX_REGISTERS``
      (without it ptxas lowers some passes to 128 registers and spills); at DP = 32 z1 is built
      on 16-wide D chunks (``_first_layer_chunk``); with three hidden layers phase 1 (and fp32
      Dice's training phase 1) takes H1 whole up to 64 (16 or 32 spill a value on sm_80). Where
      every padded width is 16 the passes run on 2 warps (8 or 4 spill Dice's training phase 2,
      whose fp32 form holds about 255 registers on any number of warps), and that phase without
      a mask on 1 (on 2 it spills 2 to 4 values on sm_90; with a mask, 1 warp spills 2 or 3).
    """
    dim_p, hidden_p = constexprs["DP"], _padded_hidden(constexprs)
    half = not constexprs["IEEE"]
    two_layers = len(hidden_p) >= 2
    wide_h_chunk = min(hidden_p[0], 32)
    narrow = two_layers and (half or dim_p <= 64)
    h_chunk = min(hidden_p[0], 16) if narrow else wide_h_chunk
    z1_chunk, second_chunk = _first_layer_chunk(dim_p), 16
    first_chunk = z1_chunk
    small, tiny = _small(constexprs), max(dim_p, *hidden_p) <= 16
    num_warps = 2 if tiny else 8
    maxnreg = MAX_REGISTERS if small else None
    first_h_chunk = second_h_chunk = h_chunk
    if narrow and half and hidden_p[0] <= 64:
        first_h_chunk = wide_h_chunk
    if narrow and not half and hidden_p[0] >= 128:
        padded_pointwise = constexprs["D"] < dim_p and constexprs["ACT"] in (
            ACTIVATION_CODES["sigmoid"], ACTIVATION_CODES["relu"])
        relu_masked_sum = (constexprs["ACT"] == ACTIVATION_CODES["relu"] and constexprs["HAS_MASK"]
                           and constexprs["NORM"] == NORMALIZATION_CODES["none"])
        if not padded_pointwise or relu_masked_sum:
            first_chunk, first_h_chunk = 16, wide_h_chunk
        second_h_chunk = wide_h_chunk
    late_h_chunk = hidden_p[0] if two_layers and not narrow and hidden_p[0] <= 64 else second_h_chunk
    train_h_chunk, p2_chunk = h_chunk, second_chunk
    first_stages = train_stages = _DEFAULT_STAGES
    if len(hidden_p) == 3:
        if half:
            train_stages = _SHALLOW_STAGES
            if dim_p > 64:
                first_h_chunk = wide_h_chunk
                if constexprs["ACT"] == ACTIVATION_CODES["prelu"]:
                    first_stages = _SHALLOW_STAGES
        else:
            first_h_chunk = train_h_chunk = wide_h_chunk
        if small:
            first_h_chunk = min(hidden_p[0], 64)
            if not half:
                train_h_chunk = first_h_chunk
        if half or constexprs["D"] < dim_p:
            p2_chunk, second_h_chunk = min(dim_p, 32), wide_h_chunk
    phase_1 = _BackwardLaunch("_p1", 1, first_chunk, 0, 0, first_chunk, first_h_chunk, num_warps, maxnreg,
                              first_stages)
    if dice_mode == 0:
        return [phase_1, _BackwardLaunch("_p2", 2, p2_chunk, 0, 0, min(p2_chunk, z1_chunk), second_h_chunk,
                                         num_warps, maxnreg, _DEFAULT_STAGES)]
    if dice_mode == 1:
        gate_chunk = min(dim_p, 32) if half and two_layers else second_chunk
        return [phase_1, _BackwardLaunch("_p2", 2, gate_chunk, 1, 0, min(gate_chunk, z1_chunk), h_chunk,
                                         num_warps, maxnreg, _DEFAULT_STAGES)]
    recompute_chunk = 16 if half else z1_chunk
    tiny_p2_warps = (2 if constexprs["HAS_MASK"] else 1) if tiny else num_warps
    launches = [_BackwardLaunch(f"_train_p0s{stop}", 0, recompute_chunk, 2, stop, recompute_chunk, h_chunk,
                                min(4, num_warps) if half and stop > 1 else num_warps,
                                MAX_REGISTERS if half else maxnreg, train_stages)
                for stop in range(len(hidden_p), 0, -1)]
    return launches + [
        _BackwardLaunch(f"_train_p{phase}", phase, chunk, 2, 0, recompute_chunk, h, warps, maxnreg, train_stages)
        for phase, chunk, h, warps in ((1, recompute_chunk, train_h_chunk, num_warps),
                                       (2, second_chunk, late_h_chunk, tiny_p2_warps),
                                       (3, second_chunk, late_h_chunk, num_warps))]


def sequence_span(batch: int, seq_len: int, lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                  device) -> torch.Tensor:
    """int32 ``[B]``: one past each sample's last valid position (computed on the device, no sync).

    ``lengths`` are clamped to ``[0, T]``: where their range cannot be checked (``torch.compile``,
    CUDA-graph capture) no value reaches the kernels that would index outside the sample."""
    if lengths is not None:
        return lengths.clamp(0, seq_len).to(torch.int32).contiguous()
    if mask is not None:
        positions = torch.arange(1, seq_len + 1, device=device, dtype=torch.int32)
        return torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1).to(torch.int32) \
            if seq_len > 0 else torch.zeros(batch, dtype=torch.int32, device=device)
    return torch.full((batch,), seq_len, dtype=torch.int32, device=device)


def _activation_code(activation: str, gate_bias: bool) -> int:
    return DICE_AFFINE_CODE if activation == "dice" and gate_bias else ACTIVATION_CODES[activation]


def _shape_constexprs(dim: int, hidden: Sequence[int], act_code: int, normalization: str, has_mask: bool,
                      dtype: torch.dtype) -> dict:
    """The constexprs both kernels share: sizes (absent layers as width 1) and options."""
    sizes = list(hidden) + [1] * (3 - len(hidden))
    return dict(D=dim, DP=_padded(dim), H1=sizes[0], H1P=_padded(sizes[0]), H2=sizes[1], H2P=_padded(sizes[1]),
                H3=sizes[2], H3P=_padded(sizes[2]), HMAX=max(hidden), NUM_HIDDEN=len(hidden), ACT=act_code,
                NORM=NORMALIZATION_CODES[normalization], HAS_MASK=has_mask, IEEE=dtype == torch.float32)


def _common_constexprs(mlp: FoldedMLP, normalization: str, activation: str, has_mask: bool,
                       dtype: torch.dtype) -> dict:
    return _shape_constexprs(mlp.dim, mlp.hidden, _activation_code(activation, mlp.gate_bias), normalization,
                             has_mask, dtype)


def _padded_hidden(constexprs: dict) -> List[int]:
    return [constexprs["H1P"], constexprs["H2P"], constexprs["H3P"]][:constexprs["NUM_HIDDEN"]]


def _mask_bytes(mask: Optional[torch.Tensor], no_mask: torch.Tensor) -> torch.Tensor:
    return no_mask if mask is None else mask.contiguous().view(torch.uint8)


def output_dtype(keys_dtype: torch.dtype, normalization: str) -> torch.dtype:
    """The dtype the forward writes pooled and weights in: keys', but fp32 with softmax, whose
    backward forms ``delta_b = sum_t w_t dL/dw_t`` from them; rounded to 16 bits, they would
    carry that rounding into the score layer's gradients, sums that cancel exactly."""
    return torch.float32 if normalization == "softmax" else keys_dtype


def attention_forward(query: torch.Tensor, keys: torch.Tensor, mlp: FoldedMLP, span: torch.Tensor,
                      mask: Optional[torch.Tensor], *, normalization: str, activation: str, softmax_scale: float,
                      pooled: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward kernel.

    Args:
        query: ``[B, D]`` (last stride 1); keys: ``[B, T, D]`` (last stride 1, any batch stride,
            including 0); span: int32 ``[B]``; mask: optional bool ``[B, T]``.
        pooled, weights: optional preallocated outputs ``[B, D]`` and ``[B, T]`` in
            ``output_dtype(keys.dtype, normalization)``.

    Returns:
        ``(pooled [B, D], weights [B, T], row_max, row_sum)``: the softmax statistics, fp32
        ``[B]``, or empty ``[0]`` for ``normalization="none"``, which has none (every output
        an op returns is written).
    """
    batch, seq_len, dim = keys.shape
    device = keys.device
    out_dtype = output_dtype(keys.dtype, normalization)
    if pooled is None:
        pooled = torch.empty(batch, dim, dtype=out_dtype, device=device)
    if weights is None:
        weights = torch.empty(batch, seq_len, dtype=out_dtype, device=device)
    statistics = batch if normalization == "softmax" else 0
    row_max = torch.empty(statistics, dtype=torch.float32, device=device)
    row_sum = torch.empty(statistics, dtype=torch.float32, device=device)
    if batch == 0:
        return pooled, weights, row_max, row_sum
    logits = (torch.empty(batch, seq_len, dtype=torch.float32, device=device)
              if normalization == "softmax" else mlp.dummy)
    u = mlp.query_bias(query)
    w2, b2, w3, b3 = mlp.layer_pointers()
    constexprs = _common_constexprs(mlp, normalization, activation, mask is not None, keys.dtype)
    launch = _forward_config(constexprs, seq_len, keys.dtype)
    _din_attention_fwd_kernel[(batch,)](
        query, keys, u, mlp.key_fold, mlp.prod_fold, w2, b2, w3, b3, mlp.score_weight, mlp.score_bias,
        mlp.act_packed, span, _mask_bytes(mask, mlp.no_mask), pooled, weights, logits, row_max, row_sum,
        mlp.no_counts, mlp.dummy, mlp.dummy, seq_len, query.stride(0), keys.stride(0), keys.stride(1),
        float(softmax_scale), **constexprs, BLOCK_T=launch.block_t, BD=launch.chunk, STAT_LAYER=0,
        num_warps=launch.num_warps, maxnreg=launch.maxnreg)
    return pooled, weights, row_max, row_sum


def dice_layer_statistics(query: torch.Tensor, keys: torch.Tensor, mlp: FoldedMLP, span: torch.Tensor,
                          mask: Optional[torch.Tensor], layer: int
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics of hidden layer ``layer``'s (0-based) Dice pre-activation over the valid
    positions (span and mask as in ``attention_forward``), the layers below it taken with the
    activation vectors ``mlp`` holds. One statistics pass of the forward kernel writes each
    sample's moments; they are merged on the device in a fixed order (Chan's parallel formula).

    Returns fp32 ``(mean [H_layer], biased var [H_layer], count [])``; an empty selection has
    mean and variance 0 and count 0.
    """
    batch, seq_len, _ = keys.shape
    device = keys.device
    width = mlp.hidden[layer]
    counts = torch.zeros(batch, dtype=torch.int32, device=device)
    means = torch.zeros(batch, width, dtype=torch.float32, device=device)
    m2s = torch.zeros(batch, width, dtype=torch.float32, device=device)
    if batch > 0:
        u = mlp.query_bias(query)
        w2, b2, w3, b3 = mlp.layer_pointers()
        constexprs = _common_constexprs(mlp, "none", "dice", mask is not None, keys.dtype)
        launch = _forward_config(constexprs, seq_len, keys.dtype, statistics=True)
        _din_attention_fwd_kernel[(batch,)](
            query, keys, u, mlp.key_fold, mlp.prod_fold, w2, b2, w3, b3, mlp.score_weight, mlp.score_bias,
            mlp.act_packed, span, _mask_bytes(mask, mlp.no_mask), mlp.dummy, mlp.dummy, mlp.dummy, mlp.dummy,
            mlp.dummy, counts, means, m2s, seq_len, query.stride(0), keys.stride(0), keys.stride(1), 1.0,
            **constexprs, BLOCK_T=launch.block_t, BD=launch.chunk, STAT_LAYER=layer + 1,
            num_warps=launch.num_warps, maxnreg=launch.maxnreg)
    weight = counts.float()
    count = weight.sum()
    mean = (weight[:, None] * means).sum(0) / count.clamp(min=1)
    m2 = m2s.sum(0) + (weight[:, None] * (means - mean) ** 2).sum(0)
    return mean, m2 / count.clamp(min=1), count


def _num_backward_programs(batch: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(batch, 2 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(batch, 2)


class DiceGate:
    """What the backward needs of Dice's gate beyond the activation vectors: ``rstd`` per hidden
    layer (fp32 ``[NUM_HIDDEN, HMAX]``, zero past each layer's width); ``count`` (fp32 ``[]``, the
    number of kept positions) marks batch statistics (training), None running ones; ``keep_all``:
    the batch statistics ran over every position ``t < span``, not only the valid ones."""

    def __init__(self, rstd: torch.Tensor, count: Optional[torch.Tensor] = None, keep_all: bool = False):
        self.rstd, self.count, self.keep_all = rstd, count, keep_all


def attention_backward(query: torch.Tensor, keys: torch.Tensor, mlp: FoldedMLP, span: torch.Tensor,
                       mask: Optional[torch.Tensor], pooled: torch.Tensor, weights: torch.Tensor,
                       row_max: torch.Tensor, row_sum: torch.Tensor, grad_pooled: torch.Tensor,
                       grad_weights: torch.Tensor, *, normalization: str, activation: str, softmax_scale: float,
                       dice_gate: Optional[DiceGate] = None) -> Dict[str, object]:
    """Launches the backward kernel and reduces its partial buffers.

    ``dice_gate`` (Dice only): given, the gate's sums S0 and S1 are computed; with batch
    statistics (``dice_gate.count``), one summing pass per Dice layer first (top down), then the
    ordinary passes with every layer's cross-sample terms.

    Returns fp32 gradients: ``query [B, D]``, ``keys [B, T, D]`` (keys' dtype), ``first_weight
    [H1, 4D]``, ``first_bias [H1]``, ``layers`` (list of (weight, bias) for hidden layers 2..n),
    ``score_weight [Hn]``, ``score_bias [1]``, ``act`` (list of ``[H_i]``: prelu weight or dice
    alpha gradient per layer), ``gate`` (list of ``(S0, S1)`` ``[H_i]`` per layer, with
    ``dice_gate``; else None).
    """
    batch, seq_len, dim = keys.shape
    device = keys.device
    hidden = mlp.hidden
    num_programs = max(1, _num_backward_programs(batch, device))
    grad_pooled = grad_pooled.float().contiguous()
    grad_weights = grad_weights.float().contiguous()
    if normalization == "softmax":
        # pooled and weights are the forward's fp32 outputs (output_dtype).
        delta = (grad_pooled * pooled.float()).sum(-1) + (grad_weights * weights.float()).sum(-1)
    else:
        delta = mlp.dummy
    grad_keys = torch.empty(batch, seq_len, dim, dtype=keys.dtype, device=device)
    grad_u = torch.zeros(batch, hidden[0], dtype=torch.float32, device=device)
    grad_query_part = torch.zeros(batch, dim, dtype=torch.float32, device=device)

    def zeros(*shape):
        return torch.zeros(num_programs, *shape, dtype=torch.float32, device=device)

    part_p, part_pq = zeros(hidden[0], dim), zeros(hidden[0], dim)
    part_layers = [(zeros(hidden[i + 1], hidden[i]), zeros(hidden[i + 1])) for i in range(len(hidden) - 1)]
    dummy_layers = part_layers + [(mlp.dummy, mlp.dummy)] * (2 - len(part_layers))
    part_wo, part_bo = zeros(hidden[-1]), zeros()
    part_act = zeros(len(hidden), mlp.hmax)
    training = dice_gate is not None and dice_gate.count is not None
    dice_mode = 0 if dice_gate is None else (2 if training else 1)
    if dice_gate is not None:
        part_gate = zeros(len(hidden), 3, mlp.hmax)
        corr = torch.zeros(len(hidden), 2, mlp.hmax, dtype=torch.float32, device=device)
    else:
        part_gate = corr = mlp.dummy
    if batch > 0:
        u = mlp.query_bias(query)
        w2, b2, w3, b3 = mlp.layer_pointers()
        constexprs = _common_constexprs(mlp, normalization, activation, mask is not None, keys.dtype)
        launches = _backward_launches(constexprs, dice_mode)
        scratch = (torch.empty(num_programs, 2, _BACKWARD_BLOCK_T, constexprs["H1P"], dtype=torch.float32,
                               device=device)
                   if any(launch.h_chunk < constexprs["H1P"] for launch in launches) else mlp.dummy)
        count = dice_gate.count.clamp(min=1) if training else None
        for launch in launches:
            _din_attention_bwd_kernel[(num_programs,)](
                query, keys, u, mlp.key_fold, mlp.prod_fold, w2, b2, w3, b3, mlp.score_weight, mlp.score_bias,
                mlp.act_packed, span, _mask_bytes(mask, mlp.no_mask),
                grad_pooled, grad_weights, row_max, row_sum, delta,
                grad_keys, grad_u, grad_query_part,
                part_p, part_pq, dummy_layers[0][0], dummy_layers[0][1], dummy_layers[1][0], dummy_layers[1][1],
                part_wo, part_bo, part_act, scratch, corr, part_gate,
                batch, seq_len, query.stride(0), keys.stride(0), keys.stride(1), grad_keys.stride(0),
                grad_keys.stride(1), float(softmax_scale), int(dice_gate is not None and dice_gate.keep_all),
                **constexprs, BLOCK_T=_BACKWARD_BLOCK_T, BD=launch.chunk, PHASE=launch.phase, HC=launch.h_chunk,
                DICE_MODE=launch.dice_mode, STOP_LAYER=launch.stop_layer, BD_FIRST=launch.first_chunk,
                num_warps=launch.num_warps, maxnreg=launch.maxnreg, num_stages=launch.num_stages)
            if launch.phase == 0:
                # Layer l's terms, for the passes after it: its sums needed those of every
                # layer above it, which the passes before it had. A = (S0 - B Sc) / n and
                # B = rstd^2 (S1 - Sc S0 / n) / n are S0 / n and rstd^2 S1 / n with z - mean
                # re-centred over the kept positions: the fp32 mean's rounding, times rstd^2
                # (huge where a channel's batch variance is tiny), would reach every gradient.
                layer = launch.stop_layer - 1
                s0, s1, s_centred = part_gate[:, layer].sum(0)
                offset = s_centred / count
                corr[layer, 1] = dice_gate.rstd[layer] ** 2 * (s1 - offset * s0) / count
                corr[layer, 0] = s0 / count - corr[layer, 1] * offset
    # z1 = u + k M with u = q (Wq + Wd)^T + b1 and M = (Wk - Wd)^T + diag(q) Wp^T.
    sum_p, sum_pq = part_p.sum(0), part_pq.sum(0)
    grad_uq = grad_u.t() @ query.float()                       # sum_b G_b q_b^T  [H1, D]
    first_weight = torch.cat([grad_uq, sum_p, grad_uq - sum_p, sum_pq], dim=1)
    grad_query = grad_query_part + grad_u @ mlp.query_fold
    gate = None
    if dice_gate is not None:
        gate = [(part_gate[:, i, 0, :h].sum(0), part_gate[:, i, 1, :h].sum(0)) for i, h in enumerate(hidden)]
    return dict(query=grad_query, keys=grad_keys, first_weight=first_weight, first_bias=grad_u.sum(0),
                layers=[(w.sum(0), b.sum(0)) for w, b in part_layers], score_weight=part_wo.sum(0),
                score_bias=part_bo.sum(0).reshape(1), act=[part_act[:, i, :h].sum(0) for i, h in enumerate(hidden)],
                gate=gate)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------------------------

_DTYPE_SIG = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_SPEC_ACTIVATIONS = dict(ACTIVATION_CODES, dice_affine=DICE_AFFINE_CODE)


def _spec(name, fn, pointer_types: Dict[str, str], scalars: Dict[str, str], constexprs: dict, num_warps: int,
          maxnreg: Optional[int], group: str, num_stages: Optional[int] = None):
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointer_types:
            signature[arg] = pointer_types[arg]
        elif arg in scalars:
            signature[arg] = scalars[arg]
        else:
            signature[arg] = "*fp32"
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs, "num_warps": num_warps,
            "maxnreg": maxnreg, "group": group, **({} if num_stages is None else {"num_stages": num_stages})}


def _pass_name(launch: _BackwardLaunch) -> str:
    """``p1``, ``p2``, the affine gate's ``gate p2``, ``train p0s`` (every summing pass) or ``train p1..p3``."""
    prefix = ("train " if launch.dice_mode == 2 else "gate " if launch.dice_mode == 1 and launch.phase == 2 else "")
    return prefix + ("p0s" if launch.phase == 0 else f"p{launch.phase}")


def _aot_specs(shapes: Sequence[Tuple[int, Sequence[int]]] = GATED_SHAPES) -> List[dict]:
    """Every launch of the attention kernels for the (D, hidden) ``shapes``, for each dtype,
    activation, normalization and mask (a specs file for the gate may probe other shapes)."""
    specs = []
    index_types = {"mask_ptr": "*u8", "span_ptr": "*i32", "stat_count_ptr": "*i32"}
    forward_scalars = dict(T="i32", stride_qb="i32", stride_kb="i32", stride_kt="i32", softmax_scale="fp32")
    backward_scalars = dict(B="i32", T="i32", stride_qb="i32", stride_kb="i32", stride_kt="i32", stride_gkb="i32",
                            stride_gkt="i32", softmax_scale="fp32", keep_all="i32")
    for dtype, io in _DTYPE_SIG.items():
        forward_pointers = dict(query_ptr=io, keys_ptr=io, **index_types)
        backward_pointers = dict(query_ptr=io, keys_ptr=io, grad_keys_ptr=io, **index_types)
        for dim, hidden in shapes:
            for activation, act_code in _SPEC_ACTIVATIONS.items():
                for normalization in NORMALIZATION_CODES:
                    for has_mask in (False, True):
                        constexprs = _shape_constexprs(dim, hidden, act_code, normalization, has_mask, dtype)
                        dtype_name = str(dtype).split('.')[-1]
                        layers = ", 3 layers" if len(hidden) == 3 else ""
                        tag = (f"{dtype_name}_d{dim}_h{'x'.join(map(str, hidden))}_{activation}_"
                               f"{normalization}{'_mask' if has_mask else ''}")
                        # The forward's BLOCK_T shrinks for sequences shorter than its tile.
                        # Dice statistics passes: one per hidden layer (the normalization
                        # plays no part in them; the launcher passes "none").
                        dice = act_code >= ACTIVATION_CODES["dice"]
                        stat_layers = range(1, len(hidden) + 1) if dice and normalization == "none" else ()
                        seq_lens = {_forward_config(constexprs, t, dtype).block_t: t for t in (1, 4096)}
                        for _, seq_len in sorted(seq_lens.items()):
                            for stat_layer in (0, *stat_layers):
                                launch = _forward_config(constexprs, seq_len, dtype, statistics=stat_layer > 0)
                                stage = f"_stats{stat_layer}" if stat_layer else ""
                                # A statistics pass writes neither output: the launcher passes
                                # its fp32 dummy for both.
                                out = "*fp32" if stat_layer else _DTYPE_SIG[output_dtype(dtype, normalization)]
                                pointers = dict(forward_pointers, pooled_ptr=out, weights_ptr=out)
                                specs.append(_spec(
                                    f"din_attention_fwd_{tag}{stage}_t{launch.block_t}",
                                    _din_attention_fwd_kernel, pointers, forward_scalars,
                                    dict(constexprs, BLOCK_T=launch.block_t, BD=launch.chunk,
                                         STAT_LAYER=stat_layer),
                                    launch.num_warps, launch.maxnreg,
                                    f"fwd {dtype_name}{' statistics' if stat_layer else ''}{layers}"))
                        # Dice adds the affine gate's phase 2 (DICE_MODE 1) and, with batch
                        # statistics, every launch of DICE_MODE 2.
                        modes = ((0, 2) if act_code == ACTIVATION_CODES["dice"]
                                 else (1, 2) if act_code == DICE_AFFINE_CODE else (0,))
                        for launch in [launch for mode in modes for launch in _backward_launches(constexprs, mode)]:
                            specs.append(_spec(
                                f"din_attention_bwd_{tag}{launch.suffix}", _din_attention_bwd_kernel,
                                backward_pointers, backward_scalars,
                                dict(constexprs, BLOCK_T=_BACKWARD_BLOCK_T, BD=launch.chunk, PHASE=launch.phase,
                                     HC=launch.h_chunk, DICE_MODE=launch.dice_mode, STOP_LAYER=launch.stop_layer,
                                     BD_FIRST=launch.first_chunk),
                                launch.num_warps, launch.maxnreg,
                                f"bwd {dtype_name} {_pass_name(launch)}{layers}", launch.num_stages))
    return specs


AOT_SPECS = _aot_specs()
