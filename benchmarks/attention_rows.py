"""A candidate design for the attention forward, timed against the shipped kernels by
``benchmarks.launch_sweep``; the library does not use it.

On an H200 the shipped forward (one program per sample, ``kernels/attention.py``) ran at 0.44x
of eager PyTorch at B=4096 T=100 D=36 (``benchmarks/README.md``). This design feeds the tensor
cores larger tiles whatever T is:

1. ``_rows_scores_kernel``: one program per ``BLOCK_R`` rows of the flattened ``[B * T]``
   positions, of any samples. The first layer is a product with shared weights,
   ``z1 = u_b + k (Wk - Wd)^T + (q_b * k) Wp^T`` (two ``[BLOCK_R, D] x [D, H1]`` dots; the fold
   ``M_b`` would differ per row), then the hidden layers and the score; fp32 logits ``[B, T]``.
2. ``_rows_pool_kernel``: one program per sample: the raw scores or the softmax of its logits
   (masked past its length) and the weighted sum of its keys.

The keys are read twice, and the logits written and read once: at B=4096 T=100 D=36 in fp32,
59 MB of keys a pass against 1.6 MB of logits. Sigmoid and ReLU, one to three hidden layers,
lengths (no mask), float32 (3xTF32 products) and 16-bit inputs (TF32), as the shipped kernels
compute them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from din_fast.kernels.attention import (ACTIVATION_CODES, NORMALIZATION_CODES, FoldedMLP, _activation, _load_matrix,
                                        _mlp_vectors, _mm, _padded, output_dtype, sequence_span)

_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _rows_scores_kernel(query_ptr, keys_ptr, u_ptr, wkd_ptr, wp_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, wo_ptr, bo_ptr,
                        act_ptr, span_ptr, logits_ptr, num_rows, T, stride_qb, stride_kb, stride_kt,
                        D: tl.constexpr, DP: tl.constexpr, H1: tl.constexpr, H1P: tl.constexpr, H2: tl.constexpr,
                        H2P: tl.constexpr, H3: tl.constexpr, H3P: tl.constexpr, HMAX: tl.constexpr,
                        NUM_HIDDEN: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < num_rows
    sample = (rows // T).to(tl.int64)
    position = rows % T
    valid = in_range & (position < tl.load(span_ptr + sample, mask=in_range, other=0))
    offs_d = tl.arange(0, DP)
    rows_d = valid[:, None] & (offs_d < D)[None, :]
    k = tl.load(keys_ptr + sample[:, None] * stride_kb + position[:, None] * stride_kt + offs_d[None, :],
                mask=rows_d, other=0.0).to(tl.float32)
    q = tl.load(query_ptr + sample[:, None] * stride_qb + offs_d[None, :], mask=rows_d, other=0.0).to(tl.float32)
    offs_h1 = tl.arange(0, H1P)
    u = tl.load(u_ptr + sample[:, None] * H1 + offs_h1[None, :], mask=valid[:, None] & (offs_h1 < H1)[None, :],
                other=0.0)
    z1 = (u + _mm(k, _load_matrix(wkd_ptr, D, H1, DP, H1P, False), IEEE)
          + _mm(q * k, _load_matrix(wp_ptr, D, H1, DP, H1P, False), IEEE))
    a0, a1, a2, a3, b2, c0, c1, c2, c3, b3, e0, e1, e2, e3, wo, bo = _mlp_vectors(
        act_ptr, b2_ptr, b3_ptr, wo_ptr, bo_ptr, H1, H1P, H2, H2P, H3, H3P, HMAX, NUM_HIDDEN)
    h = _activation(z1, a0, a1, a2, a3, ACT)
    if NUM_HIDDEN >= 2:
        h = _activation(_mm(h, _load_matrix(w2_ptr, H2, H1, H2P, H1P, True), IEEE) + b2[None, :], c0, c1, c2, c3,
                        ACT)
    if NUM_HIDDEN >= 3:
        h = _activation(_mm(h, _load_matrix(w3_ptr, H3, H2, H3P, H2P, True), IEEE) + b3[None, :], e0, e1, e2, e3,
                        ACT)
    tl.store(logits_ptr + rows, tl.sum(h * wo[None, :], axis=1) + bo, mask=in_range)


@triton.jit
def _rows_pool_kernel(keys_ptr, logits_ptr, span_ptr, pooled_ptr, weights_ptr, T, stride_kb, stride_kt,
                      softmax_scale, D: tl.constexpr, DP: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr):
    sample = tl.program_id(0).to(tl.int64)
    span = tl.load(span_ptr + sample)
    row_max = tl.full([], _NEG_BIG, tl.float32)
    denom = tl.full([], 1.0, tl.float32)
    if NORM == 1:
        row_sum = tl.full([], 0.0, tl.float32)
        for start in range(0, span, BLOCK_T):
            offs_t = start + tl.arange(0, BLOCK_T)
            logit = tl.load(logits_ptr + sample * T + offs_t, mask=offs_t < span, other=float("-inf")) * softmax_scale
            new_max = tl.maximum(row_max, tl.max(logit, axis=0))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logit - new_max), axis=0)
            row_max = new_max
        denom = tl.where(row_sum > 0, row_sum, 1.0)
    offs_d = tl.arange(0, DP)
    acc = tl.zeros([DP], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        in_span = offs_t < span
        logit = tl.load(logits_ptr + sample * T + offs_t, mask=in_span, other=0.0)
        if NORM == 0:
            w = tl.where(in_span, logit, 0.0)
        else:
            w = tl.exp(tl.where(in_span, logit * softmax_scale - row_max, float("-inf"))) / denom
        tl.store(weights_ptr + sample * T + offs_t, w.to(weights_ptr.dtype.element_ty), mask=offs_t < T)
        k = tl.load(keys_ptr + sample * stride_kb + offs_t[:, None] * stride_kt + offs_d[None, :],
                    mask=in_span[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None] * k, axis=0)
    tl.store(pooled_ptr + sample * D + offs_d, acc.to(pooled_ptr.dtype.element_ty), mask=offs_d < D)


def attention_forward(query: torch.Tensor, keys: torch.Tensor, weights: Sequence[torch.Tensor],
                      biases: Sequence[torch.Tensor], lengths: Optional[torch.Tensor] = None, *,
                      activation: str = "sigmoid", normalization: str = "none", softmax_scale: float = 1.0,
                      block_r: int = 64, num_warps: int = 4, pool_block_t: int = 32
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [B, D], weights [B, T])`` as ``din_fast.reference.attention_pooling`` (no
    gradients): query ``[B, D]``, keys ``[B, T, D]`` (unit last stride), ``nn.Linear`` weights,
    lengths ``[B]`` or None (every position valid)."""
    if activation not in ("sigmoid", "relu"):
        raise ValueError(f"activation must be 'sigmoid' or 'relu' in this candidate, got {activation!r}")
    if query.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError("query and keys need a unit last stride")
    batch, seq_len, dim = keys.shape
    mlp = FoldedMLP(weights, biases, [() for _ in weights[:-1]])
    span = sequence_span(batch, seq_len, lengths, None, keys.device)
    hidden = mlp.hidden + [1] * (3 - len(mlp.hidden))
    logits = torch.empty(batch, seq_len, dtype=torch.float32, device=keys.device)
    out_dtype = output_dtype(keys.dtype, normalization)
    pooled = torch.empty(batch, dim, dtype=out_dtype, device=keys.device)
    attn = torch.empty(batch, seq_len, dtype=out_dtype, device=keys.device)
    if batch * seq_len == 0:
        return pooled.zero_(), attn
    w2, b2, w3, b3 = mlp.layer_pointers()
    _rows_scores_kernel[(triton.cdiv(batch * seq_len, block_r),)](
        query, keys, mlp.query_bias(query), mlp.key_fold, mlp.prod_fold, w2, b2, w3, b3, mlp.score_weight,
        mlp.score_bias, mlp.act_packed, span, logits, batch * seq_len, seq_len, query.stride(0), keys.stride(0),
        keys.stride(1), D=dim, DP=_padded(dim), H1=hidden[0], H1P=_padded(hidden[0]), H2=hidden[1],
        H2P=_padded(hidden[1]), H3=hidden[2], H3P=_padded(hidden[2]), HMAX=mlp.hmax, NUM_HIDDEN=len(mlp.hidden),
        ACT=ACTIVATION_CODES[activation], IEEE=keys.dtype == torch.float32, BLOCK_R=block_r, num_warps=num_warps)
    _rows_pool_kernel[(batch,)](
        keys, logits, span, pooled, attn, seq_len, keys.stride(0), keys.stride(1), float(softmax_scale), D=dim,
        DP=_padded(dim), NORM=NORMALIZATION_CODES[normalization], BLOCK_T=pool_block_t, num_warps=4)
    return pooled, attn
