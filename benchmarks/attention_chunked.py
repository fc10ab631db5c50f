"""A candidate design for the attention kernels, timed against the shipped ones by
``benchmarks.launch_sweep``; the library does not use it.

On an H200 the shipped kernels ran at 0.44x of eager PyTorch's forward and 0.19x of its
forward+backward at B=4096 T=100 D=36, hidden (80, 40) (``benchmarks/README.md``). They work on
16-row tiles holding whole ``[16, H1P]`` activations, with about 255 registers on 8 warps (one
program per multiprocessor); their backward passes ``z1`` and ``dz1`` through scratch memory
between barriers and adds each tile's partial weight gradients by loading, adding and storing
them, a round trip to the cache each, with nothing else resident to hide it. This design:

* Runs the first layer in chunks of ``HC`` of its ``H1`` channels, recomputed from the keys
  where needed: per chunk, the sample's fold ``M_b[:, c] = (Wk - Wd)^T[:, c] + q (Wp^T)[:, c]``
  (``[DP, HC]``, from cached weights), ``z1_c = u_c + k M_b[:, c]``, its activation, and its
  share of the second layer, ``z2 += h1_c W2[:, c]^T``. No ``[BLOCK_T, H1P]`` tile and no
  scratch memory: tiles of 32 to 128 rows.
* ``_chunked_fwd_kernel``: one program per sample, tile by tile over its valid positions:
  ``z2`` by chunks, the score, raw or online-softmax weights and the weighted sum of the keys.
* ``_chunked_bwd_kernel``: persistent programs, each over samples ``pid, pid + P, ...``, in two
  recomputing passes (each keeps fewer tiles live than one would): ``z2`` by chunks, the
  score's gradient and ``dz2``, then per chunk ``z1_c`` again and ``dz1_c``. Pass 1 adds the
  keys' gradient ``dk += dz1_c M_b[:, c]^T`` and the vector sums; pass 2 ``dW2[:, c]`` and
  ``G_c = dz1_c^T k``: the first layer's weight sums ``sum dz1^T k`` and ``sum dz1^T (k * q)``,
  and the query's share ``sum_j G[j, d] Wp[d, j]``.
* Partial sums go to fp32 buffers each owned by one program (weight gradients ``[P, ...]``)
  or by the program of one sample (``dL/du`` ``[B, H1]``, the query's share ``[B, D]``) through
  relaxed atomic adds, which the issuing warp does not wait for. Deterministic all the same: a
  buffer element is added to by one thread of one program, in program order, so its additions
  happen in one fixed order (the sweep checks that two runs agree bit for bit). The launcher
  sums the ``P`` partials in a fixed order.

Two hidden layers, sigmoid, ReLU or PReLU, raw scores or softmax, lengths (no mask), float32
(3xTF32 products) and 16-bit inputs (TF32), as the shipped kernels compute them.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from din_fast.kernels.attention import (_DTYPE_SIG, _NEG_BIG, ACTIVATION_CODES, NORMALIZATION_CODES, FoldedMLP,
                                        _act_params, _act_params_at, _activation, _activation_backward,
                                        _load_vector, _load_w2_columns, _mm, _padded, _spec, output_dtype,
                                        sequence_span)


@triton.jit
def _fold_chunk(q, wkd_ptr, wp_ptr, offs_d, d_ok, offs_h, h_ok, H1: tl.constexpr):
    """Columns ``offs_h`` of the sample's fold ``M_b = (Wk - Wd)^T + diag(q) Wp^T`` (from the
    fp32 ``[D, H1]`` row-major matrices): ``[DP, HC]``."""
    offs = offs_d[:, None] * H1 + offs_h[None, :]
    keep = d_ok[:, None] & h_ok[None, :]
    return tl.load(wkd_ptr + offs, mask=keep, other=0.0) + q[:, None] * tl.load(wp_ptr + offs, mask=keep, other=0.0)


@triton.jit
def _first_layer_chunk(k, q, u_row, wkd_ptr, wp_ptr, act_ptr, offs_d, d_ok, start, H1: tl.constexpr,
                       HMAX: tl.constexpr, IEEE: tl.constexpr, HC: tl.constexpr):
    """First-layer channels ``start .. start + HC``: their offsets and mask, the fold's columns
    ``[DP, HC]``, ``z1 = u + k M_b`` on them ``[BLOCK_T, HC]`` and their activation parameters."""
    offs_h = start + tl.arange(0, HC)
    h_ok = offs_h < H1
    fold = _fold_chunk(q, wkd_ptr, wp_ptr, offs_d, d_ok, offs_h, h_ok, H1)
    z1 = tl.load(u_row + offs_h, mask=h_ok, other=0.0)[None, :] + _mm(k, fold, IEEE)
    p0, p1, p2, p3 = _act_params_at(act_ptr, 0, offs_h, H1, HMAX)
    return offs_h, h_ok, fold, z1, p0, p1, p2, p3


@triton.jit
def _second_layer_input(k, q, u_row, wkd_ptr, wp_ptr, w2_ptr, b2, act_ptr, offs_d, d_ok, H1: tl.constexpr,
                        H2: tl.constexpr, H2P: tl.constexpr, HMAX: tl.constexpr, ACT: tl.constexpr,
                        IEEE: tl.constexpr, HC: tl.constexpr):
    """``z2 = act(u + k M_b) W2^T + b2`` ``[BLOCK_T, H2P]``, the first layer ``HC`` channels at a time."""
    z2 = tl.zeros([k.shape[0], H2P], dtype=tl.float32) + b2[None, :]
    for start in range(0, H1, HC):
        offs_h, _, _, z1, p0, p1, p2, p3 = _first_layer_chunk(k, q, u_row, wkd_ptr, wp_ptr, act_ptr, offs_d, d_ok,
                                                             start, H1, HMAX, IEEE, HC)
        # Channels past H1 meet zero rows of W2^T.
        z2 += _mm(_activation(z1, p0, p1, p2, p3, ACT), _load_w2_columns(w2_ptr, offs_h, H1, H2, H2P, True), IEEE)
    return z2


@triton.jit
def _chunked_fwd_kernel(query_ptr, keys_ptr, u_ptr, wkd_ptr, wp_ptr, w2_ptr, b2_ptr, wo_ptr, bo_ptr, act_ptr,
                        span_ptr, pooled_ptr, weights_ptr, logits_ptr,
                        T, stride_qb, stride_kb, stride_kt, softmax_scale,
                        D: tl.constexpr, DP: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr,
                        HMAX: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_T: tl.constexpr, HC: tl.constexpr):
    """One program per sample. query ``[B, D]``, keys ``[B, T, D]`` (unit last stride), u
    ``[B, H1]`` fp32, ``(Wk - Wd)^T`` and ``Wp^T`` fp32 ``[D, H1]``, W2 fp32 ``[H2, H1]``, span
    ``[B]`` int32. Writes pooled ``[B, D]`` and weights ``[B, T]`` (for softmax fp32, which the
    backward reads), for softmax through fp32 logits ``[B, T]`` (scratch)."""
    sample = tl.program_id(0).to(tl.int64)
    span = tl.load(span_ptr + sample)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    q = tl.load(query_ptr + sample * stride_qb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    b2 = _load_vector(b2_ptr, H2, H2P)
    c0, c1, c2, c3 = _act_params(act_ptr, 1, H2, H2P, HMAX)
    wo = _load_vector(wo_ptr, H2, H2P)
    bo = tl.load(bo_ptr)
    row_max = tl.full([], _NEG_BIG, tl.float32)
    row_sum = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([DP], dtype=tl.float32)
    keys_row = keys_ptr + sample * stride_kb
    num_tiles = tl.cdiv(span, BLOCK_T)
    for tile in range(0, num_tiles):
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        in_span = offs_t < span
        k = tl.load(keys_row + offs_t[:, None] * stride_kt + offs_d[None, :], mask=in_span[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        z2 = _second_layer_input(k, q, u_ptr + sample * H1, wkd_ptr, wp_ptr, w2_ptr, b2, act_ptr, offs_d, d_ok, H1,
                                 H2, H2P, HMAX, ACT, IEEE, HC)
        score = tl.sum(_activation(z2, c0, c1, c2, c3, ACT) * wo[None, :], axis=1) + bo
        if NORM == 0:
            w = tl.where(in_span, score, 0.0)
            acc += tl.sum(w[:, None] * k, axis=0)
            tl.store(weights_ptr + sample * T + offs_t, w.to(weights_ptr.dtype.element_ty), mask=offs_t < T)
        else:
            logit = tl.where(in_span, score * softmax_scale, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logit, axis=0))
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(logit - new_max)
            row_sum = row_sum * rescale + tl.sum(p, axis=0)
            acc = acc * rescale + tl.sum(p[:, None] * k, axis=0)
            row_max = new_max
            tl.store(logits_ptr + sample * T + offs_t, logit, mask=in_span)
    for start in range(num_tiles * BLOCK_T, T, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        tl.store(weights_ptr + sample * T + offs_t, tl.zeros([BLOCK_T], dtype=weights_ptr.dtype.element_ty),
                 mask=offs_t < T)
    if NORM == 1:
        denom = tl.where(row_sum > 0, row_sum, 1.0)
        acc = acc / denom
        # The logits were written by other threads of this program.
        tl.debug_barrier()
        for tile in range(0, num_tiles):
            offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
            in_span = offs_t < span
            logit = tl.load(logits_ptr + sample * T + offs_t, mask=in_span, other=float("-inf"))
            w = tl.exp(logit - row_max) / denom
            tl.store(weights_ptr + sample * T + offs_t, w.to(weights_ptr.dtype.element_ty), mask=offs_t < T)
    tl.store(pooled_ptr + sample * D + offs_d, acc.to(pooled_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _chunked_bwd_kernel(query_ptr, keys_ptr, u_ptr, wkd_ptr, wp_ptr, w2_ptr, b2_ptr, wo_ptr, bo_ptr, act_ptr,
                        span_ptr, grad_pooled_ptr, grad_weights_ptr, weights_ptr, delta_ptr,
                        grad_keys_ptr, grad_u_ptr, grad_query_ptr, part_kd_ptr, part_pq_ptr, part_w2_ptr,
                        part_b2_ptr, part_wo_ptr, part_bo_ptr, part_act_ptr,
                        B, T, stride_qb, stride_kb, stride_kt, stride_gkb, stride_gkt, softmax_scale,
                        D: tl.constexpr, DP: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr,
                        HMAX: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_T: tl.constexpr, HC: tl.constexpr, PASS: tl.constexpr):
    """Persistent programs; program ``pid`` handles samples ``pid, pid + P, ...``, recomputing
    the MLP tile by tile. PASS 1 writes the keys' gradient and the vector sums, PASS 2 the
    weight matrices' sums and the query's share (each pass alone keeps fewer tiles live).

    Inputs as in the forward, plus grad_pooled ``[B, D]`` fp32, grad_weights ``[B, T]`` fp32,
    and for softmax the forward's fp32 weights ``[B, T]`` and ``delta_b = sum_t w_t dL/dw_t``
    ``[B]`` fp32: the weights are read, not recomputed, so that the backward differentiates the
    very weights the forward pooled with (a sample with one valid position gets w = 1 exactly).
    PASS 1 writes grad_keys ``[B, T, D]`` (zero past each sample's span) and adds into zeroed
    fp32 buffers grad_u ``[B, H1]`` (``sum_t dz1``) and this program's partials of b2 and the
    score weight ``[P, H2]``, the score bias ``[P]``, the PReLU weights ``[P, 2, HMAX]``; PASS 2
    adds into grad_query ``[B, D]`` (the query's share through ``Wp``) and this program's
    ``sum dz1^T k`` and ``sum dz1^T (k * q)`` ``[P, H1, D]`` and W2 ``[P, H2, H1]``."""
    pid = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    offs_h2 = tl.arange(0, H2P)
    h2_ok = offs_h2 < H2
    part_kd = part_kd_ptr + pid * H1 * D
    part_pq = part_pq_ptr + pid * H1 * D
    part_w2 = part_w2_ptr + pid * H2 * H1
    part_act = part_act_ptr + pid * 2 * HMAX
    for sample in range(pid, B, tl.num_programs(0)):
        span = tl.load(span_ptr + sample)
        q = tl.load(query_ptr + sample * stride_qb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        g = tl.load(grad_pooled_ptr + sample * D + offs_d, mask=d_ok, other=0.0)
        if NORM == 1:
            delta = tl.load(delta_ptr + sample)
        u_row = u_ptr + sample * H1
        num_tiles = tl.cdiv(span, BLOCK_T)
        for tile in range(0, num_tiles):
            offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
            in_span = offs_t < span
            k = tl.load(keys_ptr + sample * stride_kb + offs_t[:, None] * stride_kt + offs_d[None, :],
                        mask=in_span[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            # Per-channel vectors are re-read each tile (cache hits) to keep registers free.
            b2 = _load_vector(b2_ptr, H2, H2P)
            c0, c1, c2, c3 = _act_params(act_ptr, 1, H2, H2P, HMAX)
            wo = _load_vector(wo_ptr, H2, H2P)
            z2 = _second_layer_input(k, q, u_row, wkd_ptr, wp_ptr, w2_ptr, b2, act_ptr, offs_d, d_ok, H1, H2, H2P,
                                     HMAX, ACT, IEEE, HC)
            h2 = _activation(z2, c0, c1, c2, c3, ACT)
            # dL/dw_t = g . k_t + dL/dweights_t, through the normalization to the score.
            grad_w = tl.sum(k * g[None, :], axis=1) + tl.load(grad_weights_ptr + sample * T + offs_t, mask=in_span,
                                                              other=0.0)
            if NORM == 0:
                w = tl.where(in_span, tl.sum(h2 * wo[None, :], axis=1) + tl.load(bo_ptr), 0.0)
                grad_score = tl.where(in_span, grad_w, 0.0)
            else:
                w = tl.load(weights_ptr + sample * T + offs_t, mask=in_span, other=0.0)
                grad_score = softmax_scale * w * (grad_w - delta)
            grad_z2, grad_c0 = _activation_backward(z2, grad_score[:, None] * wo[None, :], c0, c1, c2, c3, ACT)[:2]
            if PASS == 1:
                tl.atomic_add(part_bo_ptr + pid, tl.sum(grad_score, axis=0), sem="relaxed")
                tl.atomic_add(part_wo_ptr + pid * H2 + offs_h2, tl.sum(grad_score[:, None] * h2, axis=0),
                              mask=h2_ok, sem="relaxed")
                tl.atomic_add(part_b2_ptr + pid * H2 + offs_h2, tl.sum(grad_z2, axis=0), mask=h2_ok, sem="relaxed")
                tl.atomic_add(part_act + HMAX + offs_h2, tl.sum(grad_c0, axis=0), mask=h2_ok, sem="relaxed")
                grad_k = w[:, None] * g[None, :]
            for start in range(0, H1, HC):
                offs_h, h_ok, fold, z1, p0, p1, p2, p3 = _first_layer_chunk(k, q, u_row, wkd_ptr, wp_ptr, act_ptr,
                                                                            offs_d, d_ok, start, H1, HMAX, IEEE, HC)
                if PASS == 2:
                    tl.atomic_add(part_w2 + offs_h2[:, None] * H1 + offs_h[None, :],
                                  _mm(tl.trans(grad_z2), _activation(z1, p0, p1, p2, p3, ACT), IEEE),
                                  mask=h2_ok[:, None] & h_ok[None, :], sem="relaxed")
                grad_z1, grad_p0 = _activation_backward(
                    z1, _mm(grad_z2, _load_w2_columns(w2_ptr, offs_h, H1, H2, H2P, False), IEEE), p0, p1, p2, p3,
                    ACT)[:2]
                if PASS == 1:
                    tl.atomic_add(part_act + offs_h, tl.sum(grad_p0, axis=0), mask=h_ok, sem="relaxed")
                    tl.atomic_add(grad_u_ptr + sample * H1 + offs_h, tl.sum(grad_z1, axis=0), mask=h_ok,
                                  sem="relaxed")
                    grad_k += _mm(grad_z1, tl.trans(fold), IEEE)
                else:
                    sums = _mm(tl.trans(grad_z1), k, IEEE)                       # G_c [HC, DP]
                    part_offs = offs_h[:, None] * D + offs_d[None, :]
                    part_ok = h_ok[:, None] & d_ok[None, :]
                    tl.atomic_add(part_kd + part_offs, sums, mask=part_ok, sem="relaxed")
                    tl.atomic_add(part_pq + part_offs, sums * q[None, :], mask=part_ok, sem="relaxed")
                    # Wp^T's columns read in the orientation of G (cache hits), not transposed.
                    wp_t = tl.load(wp_ptr + offs_d[None, :] * H1 + offs_h[:, None], mask=part_ok, other=0.0)
                    tl.atomic_add(grad_query_ptr + sample * D + offs_d, tl.sum(sums * wp_t, axis=0), mask=d_ok,
                                  sem="relaxed")
            if PASS == 1:
                # Rows past the span have w = 0 and dz1 = 0: their gradient is written as 0.
                tl.store(grad_keys_ptr + sample * stride_gkb + offs_t[:, None] * stride_gkt + offs_d[None, :],
                         grad_k.to(grad_keys_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & d_ok[None, :])
        if PASS == 1:
            for start in range(num_tiles * BLOCK_T, T, BLOCK_T):
                offs_t = start + tl.arange(0, BLOCK_T)
                tl.store(grad_keys_ptr + sample * stride_gkb + offs_t[:, None] * stride_gkt + offs_d[None, :],
                         tl.zeros([BLOCK_T, DP], dtype=grad_keys_ptr.dtype.element_ty),
                         mask=(offs_t < T)[:, None] & d_ok[None, :])


def _prepare(query: torch.Tensor, keys: torch.Tensor, weights: Sequence[torch.Tensor],
             biases: Sequence[torch.Tensor], lengths: Optional[torch.Tensor], activation: str,
             act_params: Sequence[torch.Tensor]):
    """``(mlp, span, u)``: the folded MLP, each sample's span ``[B]`` int32 and ``u`` ``[B, H1]``
    fp32, after checking what this candidate takes. ``act_params``: the PReLU weight of each
    hidden layer (``[H]`` or ``[1]``), else empty."""
    if activation not in ("sigmoid", "relu", "prelu"):
        raise ValueError(f"activation must be 'sigmoid', 'relu' or 'prelu' in this candidate, got {activation!r}")
    if len(weights) != 3:
        raise ValueError(f"this candidate takes two hidden layers, got {len(weights) - 1}")
    if query.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError("query and keys need a unit last stride")
    vectors = ([(p.float().expand(w.shape[0]),) for p, w in zip(act_params, weights[:-1])] if activation == "prelu"
               else [(), ()])
    mlp = FoldedMLP(weights, biases, vectors)
    span = sequence_span(keys.shape[0], keys.shape[1], lengths, None, keys.device)
    return mlp, span, mlp.query_bias(query)


def _constexprs(mlp: FoldedMLP, activation: str, normalization: str, dtype: torch.dtype, block_t: int,
                h_chunk: int) -> dict:
    dim, (h1, h2) = mlp.dim, mlp.hidden
    return dict(D=dim, DP=_padded(dim), H1=h1, H2=h2, H2P=_padded(h2), HMAX=mlp.hmax, ACT=ACTIVATION_CODES[activation],
                NORM=NORMALIZATION_CODES[normalization], IEEE=dtype == torch.float32, BLOCK_T=block_t, HC=h_chunk)


def _forward(query, keys, mlp, span, u, activation, normalization, softmax_scale, block_t, h_chunk, num_warps,
             max_registers):
    """``(pooled [B, D], weights [B, T])`` in ``output_dtype``."""
    batch, seq_len, dim = keys.shape
    device = keys.device
    out_dtype = output_dtype(keys.dtype, normalization)
    pooled = torch.empty(batch, dim, dtype=out_dtype, device=device)
    attn = torch.empty(batch, seq_len, dtype=out_dtype, device=device)
    if batch == 0:
        return pooled, attn
    logits = (torch.empty(batch, seq_len, dtype=torch.float32, device=device) if normalization == "softmax"
              else mlp.dummy)
    w2, b2, _, _ = mlp.layer_pointers()
    _chunked_fwd_kernel[(batch,)](
        query, keys, u, mlp.key_fold, mlp.prod_fold, w2, b2, mlp.score_weight, mlp.score_bias, mlp.act_packed, span,
        pooled, attn, logits, seq_len, query.stride(0), keys.stride(0), keys.stride(1),
        float(softmax_scale), **_constexprs(mlp, activation, normalization, keys.dtype, block_t, h_chunk),
        num_warps=num_warps, maxnreg=max_registers)
    return pooled, attn


def attention_forward(query: torch.Tensor, keys: torch.Tensor, weights: Sequence[torch.Tensor],
                      biases: Sequence[torch.Tensor], lengths: Optional[torch.Tensor] = None, *,
                      activation: str = "sigmoid", act_params: Sequence[torch.Tensor] = (),
                      normalization: str = "none", softmax_scale: float = 1.0, block_t: int = 64, h_chunk: int = 16,
                      num_warps: int = 4, max_registers: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [B, D], weights [B, T])`` as ``din_fast.reference.attention_pooling`` (no
    gradients): query ``[B, D]``, keys ``[B, T, D]`` (unit last stride), ``nn.Linear`` weights
    of two hidden layers and the score layer, lengths ``[B]`` or None (every position valid);
    ``block_t`` positions per tile, the first layer ``h_chunk`` channels at a time; a register
    limit ``max_registers`` trades spills for programs per multiprocessor."""
    mlp, span, u = _prepare(query, keys, weights, biases, lengths, activation, act_params)
    return _forward(query, keys, mlp, span, u, activation, normalization, softmax_scale, block_t, h_chunk,
                    num_warps, max_registers)


def attention_forward_backward(query: torch.Tensor, keys: torch.Tensor, weights: Sequence[torch.Tensor],
                               biases: Sequence[torch.Tensor], grad_pooled: torch.Tensor,
                               lengths: Optional[torch.Tensor] = None, *, activation: str = "sigmoid",
                               act_params: Sequence[torch.Tensor] = (), normalization: str = "none",
                               softmax_scale: float = 1.0, block_t: int = 64, h_chunk: int = 16, num_warps: int = 4,
                               backward_block_t: int = 64, backward_h_chunk: int = 16, backward_warps: int = 4,
                               backward_max_registers: Optional[int] = None, programs: int = 2) -> List[torch.Tensor]:
    """``[pooled, grad query, grad keys, *grad weights, *grad biases, *grad act_params]`` for the
    upstream gradient ``grad_pooled`` ``[B, D]`` (none for the weights): the forward above, then
    ``_chunked_bwd_kernel`` on ``programs`` persistent programs."""
    mlp, span, u = _prepare(query, keys, weights, biases, lengths, activation, act_params)
    pooled, attn = _forward(query, keys, mlp, span, u, activation, normalization, softmax_scale, block_t, h_chunk,
                            num_warps, None)
    batch, seq_len, dim = keys.shape
    (h1, h2), device = mlp.hidden, keys.device
    programs = max(1, min(programs, batch))
    grad_pooled = grad_pooled.float().contiguous()
    # No upstream gradient for the weights: zeros, and delta_b = g_b . pooled_b alone.
    grad_attn = torch.zeros(batch, seq_len, dtype=torch.float32, device=device)
    delta = (grad_pooled * pooled.float()).sum(-1) if normalization == "softmax" else mlp.dummy

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float32, device=device)
    part_kd, part_pq, part_w2 = zeros(programs, h1, dim), zeros(programs, h1, dim), zeros(programs, h2, h1)
    part_b2, part_wo, part_bo, part_act = zeros(programs, h2), zeros(programs, h2), zeros(programs), \
        zeros(programs, 2, mlp.hmax)
    grad_u, grad_query_part = zeros(batch, h1), zeros(batch, dim)
    grad_keys = torch.empty_like(keys)
    if batch > 0:
        w2, b2, _, _ = mlp.layer_pointers()
        for backward_pass in (1, 2):
            _chunked_bwd_kernel[(programs,)](
                query, keys, u, mlp.key_fold, mlp.prod_fold, w2, b2, mlp.score_weight, mlp.score_bias,
                mlp.act_packed, span, grad_pooled, grad_attn, attn, delta, grad_keys, grad_u,
                grad_query_part, part_kd, part_pq, part_w2, part_b2, part_wo, part_bo, part_act, batch, seq_len,
                query.stride(0), keys.stride(0), keys.stride(1), grad_keys.stride(0), grad_keys.stride(1),
                float(softmax_scale),
                **_constexprs(mlp, activation, normalization, keys.dtype, backward_block_t, backward_h_chunk),
                PASS=backward_pass, num_warps=backward_warps, maxnreg=backward_max_registers)
    # z1 = u + k M with u = q (Wq + Wd)^T + b1 and M = (Wk - Wd)^T + diag(q) Wp^T.
    grad_uq = grad_u.t() @ query.float()
    sum_kd = part_kd.sum(0)
    grad_weights = [torch.cat([grad_uq, sum_kd, grad_uq - sum_kd, part_pq.sum(0)], dim=1), part_w2.sum(0),
                    part_wo.sum(0).reshape(1, -1)]
    grad_biases = [grad_u.sum(0), part_b2.sum(0), part_bo.sum(0).reshape(1)]
    grad_query = grad_query_part + grad_u @ mlp.query_fold
    cast = [g.to(w.dtype) for g, w in zip(grad_weights + grad_biases, list(weights) + list(biases))]
    grad_act = [part_act[:, i, :width].sum(0) for i, width in enumerate((h1, h2))] if activation == "prelu" else []
    # A single PReLU weight per layer gets the sum over its channels.
    grad_act = [(g if p.numel() == g.numel() else g.sum().reshape(1)).to(p.dtype) for g, p in zip(grad_act, act_params)]
    return [pooled, grad_query.to(query.dtype), grad_keys] + cast + grad_act


def _aot_specs() -> list:
    """The sweep's launches at its headline case (D=36, hidden (80, 40), sigmoid, raw scores,
    T=100) in float32 and bfloat16, for the compile gate's registers and spills:
    ``python -m benchmarks.compile_gate --specs-file benchmarks/attention_chunked.py``."""
    specs = []
    for dtype in (torch.float32, torch.bfloat16):
        io, name = _DTYPE_SIG[dtype], str(dtype).split(".")[-1]
        pointers = dict(query_ptr=io, keys_ptr=io, span_ptr="*i32", grad_keys_ptr=io, pooled_ptr=io, weights_ptr=io)
        scalars = dict(B="i32", T="i32", stride_qb="i32", stride_kb="i32", stride_kt="i32", stride_gkb="i32",
                       stride_gkt="i32", softmax_scale="fp32")
        shape = dict(D=36, DP=64, H1=80, H2=40, H2P=64, HMAX=80, ACT=ACTIVATION_CODES["sigmoid"], NORM=0,
                     IEEE=dtype == torch.float32)
        kinds = [("fwd", _chunked_fwd_kernel, (32, 64, 128), {})] + [
            (f"bwd_p{backward_pass}", _chunked_bwd_kernel, (32, 64), dict(PASS=backward_pass))
            for backward_pass in (1, 2)]
        for kind, kernel, tiles, extra in kinds:
            for block_t in tiles:
                for h_chunk in (16, 32):
                    for num_warps in (4, 8):
                        specs.append(_spec(f"chunked_{kind}_{name}_t{block_t}_hc{h_chunk}_w{num_warps}", kernel,
                                           pointers, scalars, dict(shape, BLOCK_T=block_t, HC=h_chunk, **extra),
                                           num_warps, None, f"chunked {kind} {name}"))
    return specs


AOT_SPECS = _aot_specs()
