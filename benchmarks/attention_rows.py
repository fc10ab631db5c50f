"""A candidate design for the attention kernels, timed against the shipped ones by
``benchmarks.launch_sweep``; the library does not use it.

On an H200 the shipped kernels (one program per sample on 16-row tiles, ``kernels/attention.py``)
ran at 0.44x of eager PyTorch's forward and 0.19x of its forward+backward at B=4096 T=100 D=36
(``benchmarks/README.md``). This design gives the tensor cores larger tiles whatever T is:

1. ``_rows_scores_kernel``: one program per ``BLOCK_R`` rows of the flattened ``[B * T]``
   positions, of any samples. The first layer is a product with shared weights,
   ``z1 = u_b + k (Wk - Wd)^T + (q_b * k) Wp^T`` (two ``[BLOCK_R, D] x [D, H1]`` dots; the fold
   ``M_b`` would differ per row), then the hidden layers and the score; fp32 logits ``[B, T]``.
2. ``_rows_pool_kernel``: one program per sample: the raw scores or the softmax of its logits
   (masked past its length) and the weighted sum of its keys.
3. ``_rows_backward_kernel``: one program per group of whole samples (each padded to a power of
   two TP >= T rows, T <= 256): recomputes the MLP in one pass, back-propagates, writes the keys'
   gradient and each sample's sums (a reshape of the tile), and its own fp32 partial weight
   gradients, summed on the host (deterministic, no atomics).

The forward reads the keys twice, and writes and reads the logits once: at B=4096 T=100 D=36 in
fp32, 59 MB of keys a pass against 1.6 MB of logits. Sigmoid and ReLU, one to three hidden
layers, lengths (no mask), float32 (3xTF32 products) and 16-bit inputs (TF32), as the shipped
kernels compute them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from din_fast.kernels.attention import (_DTYPE_SIG, ACTIVATION_CODES, NORMALIZATION_CODES, FoldedMLP, _activation,
                                        _activation_backward, _load_matrix, _mlp_vectors, _mm, _padded,
                                        _shape_constexprs, _spec, output_dtype, sequence_span)

_NEG_BIG = tl.constexpr(-1.0e30)
# Positions per tile of the pooling kernel.
_POOL_BLOCK_T = 32


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


@triton.jit
def _rows_backward_kernel(query_ptr, keys_ptr, u_ptr, wkd_ptr, wp_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, wo_ptr, bo_ptr,
                          act_ptr, span_ptr, attn_ptr, grad_pooled_ptr, grad_attn_ptr, delta_ptr, grad_keys_ptr,
                          grad_u_ptr, grad_query_ptr, part_kd_ptr, part_p_ptr, part_w2_ptr, part_b2_ptr, part_w3_ptr,
                          part_b3_ptr, part_wo_ptr, part_bo_ptr, B, T, stride_qb, stride_kb, stride_kt, softmax_scale,
                          D: tl.constexpr, DP: tl.constexpr, H1: tl.constexpr, H1P: tl.constexpr, H2: tl.constexpr,
                          H2P: tl.constexpr, H3: tl.constexpr, H3P: tl.constexpr, HMAX: tl.constexpr,
                          NUM_HIDDEN: tl.constexpr, HLP: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr,
                          IEEE: tl.constexpr, TP: tl.constexpr, SAMPLES: tl.constexpr):
    """One program per SAMPLES whole samples (TP >= T rows each): recomputes the MLP, back-
    propagates the scores' gradient, writes the keys' gradient, each sample's ``dL/du`` ``[H1]``
    and query share ``[D]``, and this program's fp32 partial weight gradients."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, SAMPLES * TP)
    sample = pid * SAMPLES + rows // TP
    position = rows % TP
    in_batch = sample < B
    valid = in_batch & (position < tl.load(span_ptr + sample, mask=in_batch, other=0))
    offs_d = tl.arange(0, DP)
    d_ok = (offs_d < D)[None, :]
    rows_d = valid[:, None] & d_ok
    k = tl.load(keys_ptr + sample[:, None] * stride_kb + position[:, None] * stride_kt + offs_d[None, :],
                mask=rows_d, other=0.0).to(tl.float32)
    q = tl.load(query_ptr + sample[:, None] * stride_qb + offs_d[None, :], mask=rows_d, other=0.0).to(tl.float32)
    offs_h1 = tl.arange(0, H1P)
    h1_ok = (offs_h1 < H1)[None, :]
    u = tl.load(u_ptr + sample[:, None] * H1 + offs_h1[None, :], mask=valid[:, None] & h1_ok, other=0.0)
    wkd = _load_matrix(wkd_ptr, D, H1, DP, H1P, False)
    wp = _load_matrix(wp_ptr, D, H1, DP, H1P, False)
    qk = q * k
    z1 = u + _mm(k, wkd, IEEE) + _mm(qk, wp, IEEE)
    a0, a1, a2, a3, b2, c0, c1, c2, c3, b3, e0, e1, e2, e3, wo, bo = _mlp_vectors(
        act_ptr, b2_ptr, b3_ptr, wo_ptr, bo_ptr, H1, H1P, H2, H2P, H3, H3P, HMAX, NUM_HIDDEN)
    h1 = _activation(z1, a0, a1, a2, a3, ACT)
    h = h1
    if NUM_HIDDEN >= 2:
        w2 = _load_matrix(w2_ptr, H2, H1, H2P, H1P, False)
        z2 = _mm(h1, tl.trans(w2), IEEE) + b2[None, :]
        h2 = _activation(z2, c0, c1, c2, c3, ACT)
        h = h2
    if NUM_HIDDEN >= 3:
        w3 = _load_matrix(w3_ptr, H3, H2, H3P, H2P, False)
        z3 = _mm(h2, tl.trans(w3), IEEE) + b3[None, :]
        h = _activation(z3, e0, e1, e2, e3, ACT)
    score = tl.sum(h * wo[None, :], axis=1) + bo
    grad_pooled = tl.load(grad_pooled_ptr + sample[:, None] * D + offs_d[None, :], mask=rows_d, other=0.0)
    grad_w = tl.sum(grad_pooled * k, axis=1) + tl.load(grad_attn_ptr + sample * T + position, mask=valid, other=0.0)
    if NORM == 0:
        w = tl.where(valid, score, 0.0)
        grad_score = tl.where(valid, grad_w, 0.0)
    else:
        w = tl.load(attn_ptr + sample * T + position, mask=valid, other=0.0)
        grad_score = softmax_scale * w * (grad_w - tl.load(delta_ptr + sample, mask=in_batch, other=0.0))
    tl.store(part_bo_ptr + pid, tl.sum(grad_score, axis=0))
    tl.store(part_wo_ptr + pid * HLP + tl.arange(0, HLP), tl.sum(grad_score[:, None] * h, axis=0))
    grad_h = grad_score[:, None] * wo[None, :]
    if NUM_HIDDEN >= 3:
        grad_z3, _, _, _ = _activation_backward(z3, grad_h, e0, e1, e2, e3, ACT)
        offs_h3 = tl.arange(0, H3P)
        tl.store(part_b3_ptr + pid * H3P + offs_h3, tl.sum(grad_z3, axis=0))
        tl.store(part_w3_ptr + pid * H3P * H2P + offs_h3[:, None] * H2P + tl.arange(0, H2P)[None, :],
                 _mm(tl.trans(grad_z3), h2, IEEE))
        grad_h = _mm(grad_z3, w3, IEEE)
    if NUM_HIDDEN >= 2:
        grad_z2, _, _, _ = _activation_backward(z2, grad_h, c0, c1, c2, c3, ACT)
        offs_h2 = tl.arange(0, H2P)
        tl.store(part_b2_ptr + pid * H2P + offs_h2, tl.sum(grad_z2, axis=0))
        tl.store(part_w2_ptr + pid * H2P * H1P + offs_h2[:, None] * H1P + offs_h1[None, :],
                 _mm(tl.trans(grad_z2), h1, IEEE))
        grad_h = _mm(grad_z2, w2, IEEE)
    grad_z1, _, _, _ = _activation_backward(z1, grad_h, a0, a1, a2, a3, ACT)
    grad_z1 = tl.where(valid[:, None], grad_z1, 0.0)
    part = pid * DP * H1P + offs_d[:, None] * H1P + offs_h1[None, :]
    tl.store(part_kd_ptr + part, _mm(tl.trans(k), grad_z1, IEEE))
    tl.store(part_p_ptr + part, _mm(tl.trans(qk), grad_z1, IEEE))
    grad_prod = _mm(grad_z1, tl.trans(wp), IEEE)
    grad_k = _mm(grad_z1, tl.trans(wkd), IEEE) + q * grad_prod + w[:, None] * grad_pooled
    # Every position t < T of the batch is written: 0 past a sample's length.
    tl.store(grad_keys_ptr + sample[:, None] * stride_kb + position[:, None] * stride_kt + offs_d[None, :],
             grad_k.to(grad_keys_ptr.dtype.element_ty), mask=(in_batch & (position < T))[:, None] & d_ok)
    # Each sample's rows are TP consecutive rows of the tile: its sums are one reshape away.
    samples = pid * SAMPLES + tl.arange(0, SAMPLES)
    sample_ok = (samples < B)[:, None]
    tl.store(grad_u_ptr + samples[:, None] * H1 + offs_h1[None, :],
             tl.sum(tl.reshape(grad_z1, (SAMPLES, TP, H1P)), axis=1), mask=sample_ok & h1_ok)
    tl.store(grad_query_ptr + samples[:, None] * D + offs_d[None, :],
             tl.sum(tl.reshape(k * grad_prod, (SAMPLES, TP, DP)), axis=1), mask=sample_ok & d_ok)


def _prepare(query: torch.Tensor, keys: torch.Tensor, weights: Sequence[torch.Tensor],
             biases: Sequence[torch.Tensor], lengths: Optional[torch.Tensor], activation: str):
    """``(mlp, span, u)``: the folded MLP, each sample's span ``[B]`` int32 and ``u`` ``[B, H1]``
    fp32, after checking what this candidate takes."""
    if activation not in ("sigmoid", "relu"):
        raise ValueError(f"activation must be 'sigmoid' or 'relu' in this candidate, got {activation!r}")
    if query.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError("query and keys need a unit last stride")
    mlp = FoldedMLP(weights, biases, [() for _ in weights[:-1]])
    span = sequence_span(keys.shape[0], keys.shape[1], lengths, None, keys.device)
    return mlp, span, mlp.query_bias(query)


def _forward(query, keys, mlp, span, u, activation, normalization, softmax_scale, block_r, num_warps, pool_block_t):
    """The two forward launches; ``(pooled [B, D], weights [B, T])`` in ``output_dtype``."""
    batch, seq_len, dim = keys.shape
    hidden = mlp.hidden + [1] * (3 - len(mlp.hidden))
    logits = torch.empty(batch, seq_len, dtype=torch.float32, device=keys.device)
    out_dtype = output_dtype(keys.dtype, normalization)
    pooled = torch.empty(batch, dim, dtype=out_dtype, device=keys.device)
    attn = torch.empty(batch, seq_len, dtype=out_dtype, device=keys.device)
    if batch * seq_len == 0:
        return pooled.zero_(), attn
    w2, b2, w3, b3 = mlp.layer_pointers()
    _rows_scores_kernel[(triton.cdiv(batch * seq_len, block_r),)](
        query, keys, u, mlp.key_fold, mlp.prod_fold, w2, b2, w3, b3, mlp.score_weight, mlp.score_bias,
        mlp.act_packed, span, logits, batch * seq_len, seq_len, query.stride(0), keys.stride(0), keys.stride(1),
        D=dim, DP=_padded(dim), H1=hidden[0], H1P=_padded(hidden[0]), H2=hidden[1], H2P=_padded(hidden[1]),
        H3=hidden[2], H3P=_padded(hidden[2]), HMAX=mlp.hmax, NUM_HIDDEN=len(mlp.hidden),
        ACT=ACTIVATION_CODES[activation], IEEE=keys.dtype == torch.float32, BLOCK_R=block_r, num_warps=num_warps)
    _rows_pool_kernel[(batch,)](
        keys, logits, span, pooled, attn, seq_len, keys.stride(0), keys.stride(1), float(softmax_scale), D=dim,
        DP=_padded(dim), NORM=NORMALIZATION_CODES[normalization], BLOCK_T=pool_block_t, num_warps=4)
    return pooled, attn


def attention_forward(query: torch.Tensor, keys: torch.Tensor, weights: Sequence[torch.Tensor],
                      biases: Sequence[torch.Tensor], lengths: Optional[torch.Tensor] = None, *,
                      activation: str = "sigmoid", normalization: str = "none", softmax_scale: float = 1.0,
                      block_r: int = 64, num_warps: int = 4, pool_block_t: int = _POOL_BLOCK_T
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [B, D], weights [B, T])`` as ``din_fast.reference.attention_pooling`` (no
    gradients): query ``[B, D]``, keys ``[B, T, D]`` (unit last stride), ``nn.Linear`` weights,
    lengths ``[B]`` or None (every position valid)."""
    mlp, span, u = _prepare(query, keys, weights, biases, lengths, activation)
    return _forward(query, keys, mlp, span, u, activation, normalization, softmax_scale, block_r, num_warps,
                    pool_block_t)


def attention_forward_backward(query: torch.Tensor, keys: torch.Tensor, weights: Sequence[torch.Tensor],
                               biases: Sequence[torch.Tensor], grad_pooled: torch.Tensor,
                               lengths: Optional[torch.Tensor] = None, *, activation: str = "sigmoid",
                               normalization: str = "none", softmax_scale: float = 1.0, block_r: int = 64,
                               num_warps: int = 4, backward_rows: int = 128, backward_warps: int = 8) -> list:
    """``[pooled, grad query, grad keys, *grad weights, *grad biases]`` for the upstream gradient
    ``grad_pooled`` ``[B, D]`` (none for the weights): the forward above, then
    ``_rows_backward_kernel`` on ``backward_rows`` rows per program, whole samples (T <= 256)."""
    batch, seq_len, dim = keys.shape
    if not 1 <= seq_len <= 256:
        raise ValueError(f"the candidate backward takes 1 <= T <= 256, got T={seq_len}")
    mlp, span, u = _prepare(query, keys, weights, biases, lengths, activation)
    pooled, attn = _forward(query, keys, mlp, span, u, activation, normalization, softmax_scale, block_r, num_warps,
                            _POOL_BLOCK_T)
    hidden = mlp.hidden + [1] * (3 - len(mlp.hidden))
    dim_p, (h1p, h2p, h3p) = _padded(dim), [_padded(h) for h in hidden]
    seq_p = _padded(seq_len)
    samples = max(1, backward_rows // seq_p)
    programs = triton.cdiv(batch, samples)
    device = keys.device
    grad_pooled = grad_pooled.float().contiguous()
    grad_attn = torch.zeros(batch, seq_len, dtype=torch.float32, device=device)
    delta = ((grad_pooled * pooled.float()).sum(-1) + (grad_attn * attn.float()).sum(-1)
             if normalization == "softmax" else mlp.dummy)

    def part(*shape):
        return torch.empty(programs, *shape, dtype=torch.float32, device=device)
    part_kd, part_p = part(dim_p, h1p), part(dim_p, h1p)
    part_w2, part_b2, part_w3, part_b3 = part(h2p, h1p), part(h2p), part(h3p, h2p), part(h3p)
    last_p = [h1p, h2p, h3p][len(mlp.hidden) - 1]
    part_wo, part_bo = part(last_p), part()
    grad_keys = torch.empty_like(keys)
    grad_u = torch.empty(batch, hidden[0], dtype=torch.float32, device=device)
    grad_query_part = torch.empty(batch, dim, dtype=torch.float32, device=device)
    w2, b2, w3, b3 = mlp.layer_pointers()
    _rows_backward_kernel[(programs,)](
        query, keys, u, mlp.key_fold, mlp.prod_fold, w2, b2, w3, b3, mlp.score_weight,
        mlp.score_bias, mlp.act_packed, span, attn, grad_pooled, grad_attn, delta, grad_keys, grad_u,
        grad_query_part, part_kd, part_p, part_w2, part_b2, part_w3, part_b3, part_wo, part_bo, batch, seq_len,
        query.stride(0), keys.stride(0), keys.stride(1), float(softmax_scale), D=dim, DP=dim_p, H1=hidden[0],
        H1P=h1p, H2=hidden[1], H2P=h2p, H3=hidden[2], H3P=h3p, HMAX=mlp.hmax, NUM_HIDDEN=len(mlp.hidden),
        HLP=last_p, ACT=ACTIVATION_CODES[activation], NORM=NORMALIZATION_CODES[normalization],
        IEEE=keys.dtype == torch.float32, TP=seq_p, SAMPLES=samples, num_warps=backward_warps)
    h1 = hidden[0]
    grad_uq = grad_u.t() @ query.float()
    sum_kd = part_kd.sum(0)[:dim, :h1].t()
    grad_first = torch.cat([grad_uq, sum_kd, grad_uq - sum_kd, part_p.sum(0)[:dim, :h1].t()], dim=1)
    grad_weights, grad_biases = [grad_first], [grad_u.sum(0)]
    for w_part, b_part, (out, inp) in ((part_w2, part_b2, hidden[1::-1]), (part_w3, part_b3, hidden[2:0:-1])):
        if len(grad_weights) < len(mlp.hidden):
            grad_weights.append(w_part.sum(0)[:out, :inp])
            grad_biases.append(b_part.sum(0)[:out])
    grad_weights.append(part_wo.sum(0)[:mlp.hidden[-1]].reshape(1, -1))
    grad_biases.append(part_bo.sum(0).reshape(1))
    grad_query = grad_query_part + grad_u @ mlp.query_fold
    cast = [g.to(w.dtype) for g, w in zip(grad_weights + grad_biases, list(weights) + list(biases))]
    return [pooled, grad_query.to(query.dtype), grad_keys] + cast


def _aot_specs() -> list:
    """The sweep's launches at its headline case (D=36, hidden (80, 40), sigmoid, raw scores,
    T=100) in float32 and bfloat16, for the compile gate's registers and spills:
    ``python -m benchmarks.compile_gate --specs-file benchmarks/attention_rows.py``."""
    specs = []
    for dtype in (torch.float32, torch.bfloat16):
        io, name = _DTYPE_SIG[dtype], str(dtype).split(".")[-1]
        shape = {k: v for k, v in _shape_constexprs(36, (80, 40), ACTIVATION_CODES["sigmoid"], "none", False,
                                                    dtype).items() if k not in ("NORM", "HAS_MASK")}
        pointers = dict(query_ptr=io, keys_ptr=io, span_ptr="*i32", grad_keys_ptr=io, pooled_ptr=io, weights_ptr=io)
        scalars = dict(num_rows="i32", B="i32", T="i32", stride_qb="i32", stride_kb="i32", stride_kt="i32",
                       softmax_scale="fp32")
        for block_r in (32, 64, 128):
            for num_warps in (4, 8):
                specs.append(_spec(f"rows_scores_{name}_r{block_r}_w{num_warps}", _rows_scores_kernel, pointers,
                                   scalars, dict(shape, BLOCK_R=block_r), num_warps, None, f"rows scores {name}"))
        specs.append(_spec(f"rows_pool_{name}", _rows_pool_kernel, pointers, scalars,
                           dict(D=36, DP=64, NORM=0, BLOCK_T=_POOL_BLOCK_T), 4, None, f"rows pool {name}"))
        for samples in (1, 2):
            for num_warps in (4, 8):
                specs.append(_spec(f"rows_backward_{name}_s{samples}_w{num_warps}", _rows_backward_kernel, pointers,
                                   scalars, dict(shape, NORM=0, HLP=64, TP=128, SAMPLES=samples), num_warps, None,
                                   f"rows backward {name}"))
    return specs


AOT_SPECS = _aot_specs()
