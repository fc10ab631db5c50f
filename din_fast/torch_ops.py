"""The ``torch`` backend: fast pure-PyTorch implementations of every op, for any device.

Same signatures and semantics as ``din_fast.reference``; faster because the first layer of the
activation unit is folded:

    h1 = [q, k, q-k, q*k] W1^T + b1 = [q (Wq + Wd)^T + b1] + k [(Wk - Wd)^T + diag(q) Wp^T]
       = u_b + k M_b,

with ``u_b`` ``[H1]`` and ``M_b`` ``[D, H1]`` built once per sample, so each behaviour costs
``D * H1`` multiply-adds instead of ``4 * D * H1`` and no ``[B, T, 4D]`` tensor exists.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._numerics import autocast_disabled, compute_dtype
from ._running_stats import update_running_stats

Tensor = torch.Tensor


def _sum_over_ranks(*values: Tensor, process_group) -> Tuple[Tensor, ...]:
    """Each of ``values`` summed over the ranks of ``process_group`` in one all-reduce (in at
    least float32, so that counts stay exact); unchanged without a group."""
    if process_group is None:
        return values
    import torch.distributed as dist
    dtype = compute_dtype(values[0].dtype)
    packed = torch.cat([v.reshape(-1).to(dtype) for v in values])
    dist.all_reduce(packed, group=process_group)
    return tuple(part.view_as(v).to(v.dtype if v.is_floating_point() else dtype)
                 for part, v in zip(packed.split([v.numel() for v in values]), values))


def _masked_mean_var(flat: Tensor, keep: Optional[Tensor], process_group=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance per channel of ``flat`` [M, C] over rows where ``keep`` [M] is
    true (all rows if None), and over every rank of ``process_group`` when given; in two passes
    (a column reduction of ``torch.var_mean`` is several times slower on the CPU)."""
    zero = flat.new_zeros(())
    if keep is None:
        # new_full, not torch.tensor: no copy from host memory (CUDA-graph capture forbids it).
        count = flat.new_full((), flat.shape[0], dtype=torch.int64)
        total = flat.sum(0)
    else:
        count = keep.sum()
        total = torch.where(keep[:, None], flat, zero).sum(0)
    total, count = _sum_over_ranks(total, count, process_group=process_group)
    denom = count.clamp(min=1).to(flat.dtype)
    mean = total / denom
    centered = flat - mean
    if keep is not None:
        centered = centered.masked_fill_(~keep[:, None], 0)
    (squares,) = _sum_over_ranks(centered.mul_(centered).sum(0), process_group=process_group)
    return mean, squares / denom, count


class _DiceFunction(torch.autograd.Function):
    """Dice with its closed-form backward.

    Autograd through the batch statistics adds and then subtracts terms of size ``rstd * g``; when
    a channel's variance is near 0 (``rstd`` up to ``eps ** -0.5``) that cancellation wipes out
    float32 gradients. The closed form combines the statistics terms before they meet the small
    direct term. Only ``x`` and per-channel statistics are saved (the gate is recomputed), and
    both passes work in place on a few temporaries: at these sizes the CPU time goes to memory.
    """

    @staticmethod
    def forward(ctx, x, alpha, mean, rstd, batch_stats, keep, count, weight, bias, process_group):
        """x [M, C]; alpha, mean, rstd [C]; batch_stats: whether mean and rstd are this batch's
        (their gradient terms apply); keep [M] bool: the positions behind them (None: all);
        count []: how many; weight, bias [C] or None: the affine gate; process_group: the
        ranks whose positions share the statistics, or None."""
        ctx.batch_stats = batch_stats
        ctx.process_group = process_group
        ctx.save_for_backward(x, alpha, mean, rstd, keep, count, weight, bias)
        gate_input = (x - mean).mul_(rstd)
        if weight is not None:
            gate_input = gate_input.mul_(weight).add_(bias)
        # The last product out of place: an output made in place by an op that reads an input
        # gets wrong gradients under torch.compile on torch 2.11.
        return gate_input.sigmoid_().mul_(1 - alpha).add_(alpha) * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        # Five [M, C] buffers in all: allocating a fresh one costs several in-place passes (page
        # faults on first touch), so each is reused as far as the math allows.
        x, alpha, mean, rstd, keep, count, weight, bias = ctx.saved_tensors
        x_hat = (x - mean).mul_(rstd)
        gate = torch.sigmoid(x_hat) if weight is None else torch.addcmul(bias, x_hat, weight).sigmoid_()
        grad_gate_input = grad_y * x
        grad_alpha = grad_gate_input.sum(0)
        grad_gate_input = grad_gate_input.mul_(gate)
        grad_alpha = grad_alpha.sub_(grad_gate_input.sum(0))
        grad_gate_input = grad_gate_input.addcmul_(grad_gate_input, gate, value=-1).mul_(1 - alpha)
        grad_x = gate.mul_(1 - alpha).add_(alpha).mul_(grad_y)
        needs_sums = weight is not None or ctx.batch_stats
        if needs_sums:
            x_hat_offset = None
            if ctx.batch_stats:
                # The kept x_hat sum to 0 in exact arithmetic; their computed mean is the rounding
                # of the batch mean times rstd (up to eps ** -0.5), removed before it is amplified.
                denom = count.clamp(min=1).to(x.dtype)
                kept_x_hat = x_hat if keep is None else torch.where(keep[:, None], x_hat, x.new_zeros(()))
                (x_hat_total,) = _sum_over_ranks(kept_x_hat.sum(0), process_group=ctx.process_group)
                x_hat_offset = x_hat_total / denom
                x_hat = x_hat.sub_(x_hat_offset)
            gate_input_sum = grad_gate_input.sum(0)
            gate_input_dot_x_hat = (grad_gate_input * x_hat).sum(0)
        grad_weight = grad_bias = None
        if weight is not None:
            # x_hat is re-centred; the un-centred x_hat is what the affine weight multiplied.
            grad_bias = gate_input_sum
            grad_weight = gate_input_dot_x_hat if x_hat_offset is None \
                else gate_input_dot_x_hat + x_hat_offset * gate_input_sum
            grad_gate_input = grad_gate_input.mul_(weight)
        grad_x_hat = grad_gate_input
        if ctx.batch_stats:
            # Every position's output depends on the batch mean and variance; only kept
            # positions feed them: d x_hat_i -= keep_i / n * (sum(g) + x_hat_i * sum(g * x_hat)),
            # summed over every rank's positions with a process group.
            scale = 1 if weight is None else weight
            dot, total = _sum_over_ranks(scale * gate_input_dot_x_hat, scale * gate_input_sum,
                                         process_group=ctx.process_group)
            correction = x_hat.mul_(dot).add_(total).div_(denom)
            if keep is not None:
                correction = correction.masked_fill_(~keep[:, None], 0)
            grad_x_hat = grad_x_hat.sub_(correction)
        return (grad_x.add_(grad_x_hat.mul_(rstd)), grad_alpha, None, None, None, None, None, grad_weight,
                grad_bias, None)


def dice(x: Tensor, alpha: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
         mask: Optional[Tensor] = None, *, training: bool, momentum: float = 0.1, eps: float = 1e-8,
         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, process_group=None) -> Tensor:
    """Dice of ``x`` ``[..., C]``; see ``din_fast.reference.dice``. 16-bit inputs compute in
    float32: their sums of squares overflow float16, and eps = 1e-8 rounds to 0 in it."""
    compute = compute_dtype(x.dtype)
    flat = x.reshape(-1, x.shape[-1]).to(compute)
    keep = None if mask is None else mask.reshape(-1)
    if training:
        # Constants to autograd: _DiceFunction's backward carries their gradient terms itself.
        with torch.no_grad():
            mean, var, count = _masked_mean_var(flat, keep, process_group)
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        # Copies: the function saves them, and a later training step updates the buffers in place.
        mean, var, count = running_mean.to(compute, copy=True), running_var.to(compute, copy=True), None
    rstd = torch.rsqrt(var + eps)
    if weight is not None:
        weight, bias = weight.to(compute), bias.to(compute)
    return _DiceFunction.apply(flat, alpha.to(compute), mean, rstd, training, keep, count, weight, bias,
                               process_group if training else None).reshape(x.shape).to(x.dtype)


def _activate(h: Tensor, activation: str, params: Sequence[Tensor], dice_mask: Optional[Tensor], training: bool,
              momentum: float, eps: float, process_group=None) -> Tensor:
    # In place: h is always a fresh layer output that no backward needs.
    if activation == "sigmoid":
        return h.sigmoid_()
    if activation == "relu":
        return h.relu_()
    if activation == "prelu":
        return torch.where(h >= 0, h, params[0] * h)
    alpha, running_mean, running_var, *affine = params
    weight, bias = affine or (None, None)
    return dice(h, alpha, running_mean, running_var, dice_mask, training=training, momentum=momentum, eps=eps,
                weight=weight, bias=bias, process_group=process_group)


def _score_layers(h1: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], activation: str,
                  act_params: Sequence[Sequence[Tensor]], dice_mask: Optional[Tensor], training: bool,
                  momentum: float, eps: float, process_group=None) -> Tensor:
    """From the first layer's pre-activations ``[..., H1]`` to the scores ``[...]``."""
    h = h1
    for i in range(len(weights) - 1):
        if i:
            h = F.linear(h, weights[i], biases[i])
        h = _activate(h, activation, act_params[i] if act_params else (), dice_mask, training, momentum, eps,
                      process_group)
    return F.linear(h, weights[-1], biases[-1]).squeeze(-1)


def _split_first_layer(weight: Tensor, dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``W1`` ``[H1, 4D]`` -> ``(Wq + Wd, Wk - Wd, Wp)``, each ``[H1, D]``."""
    w_query, w_key, w_diff, w_prod = weight.split(dim, dim=1)
    return w_query + w_diff, w_key - w_diff, w_prod


def _transposed_fold(query: Tensor, w_k: Tensor, w_p: Tensor) -> Tensor:
    """``M_b^T = (Wk - Wd) + Wp diag(q_b)`` ``[B, H1, D]`` from query ``[B, D]`` and the ``[H1, D]``
    weights: built from the contiguous weights, and the faster layout for both ``k M_b`` and the
    backward's ``G M_b^T``."""
    return torch.addcmul(w_k, query[:, None, :], w_p)


def _folded_first_layer(query: Tensor, keys: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``h1 = u_b + k M_b`` ``[B, T, H1]``: query ``[B, D]``, keys ``[B, T, D]``, ``W1`` ``[H1, 4D]``,
    ``b1`` ``[H1]``."""
    w_u, w_k, w_p = _split_first_layer(weight, query.shape[-1])
    # bmm then a broadcast add_: baddbmm would first copy the broadcast bias per sample.
    return torch.bmm(keys, _transposed_fold(query, w_k, w_p).transpose(1, 2)).add_(
        F.linear(query, w_u, bias)[:, None, :])


def _normalize(scores: Tensor, valid: Optional[Tensor], normalization: str, softmax_scale: float) -> Tensor:
    """Scores ``[B, T]`` -> weights ``[B, T]``, 0 on padding; an all-padding row gets zeros."""
    if normalization == "none":
        return scores if valid is None else torch.where(valid, scores, scores.new_zeros(()))
    logits = scores * softmax_scale
    if valid is None:
        return torch.softmax(logits, dim=-1)
    # The most negative finite value instead of -inf keeps an all-padding row's softmax (and its
    # gradient) finite; the where below then zeroes it.
    logits = torch.where(valid, logits, logits.new_full((), torch.finfo(logits.dtype).min))
    return torch.where(valid, torch.softmax(logits, dim=-1), logits.new_zeros(()))


# Pack the valid positions when at most this fraction of B * T is valid: the packed first layer
# costs 2 * D * H1 per valid key against the fold's D * H1 per position.
PACK_MAX_VALID_FRACTION = 0.75

# Positions per block of the MLP. A block's layers (1.25 MiB at H = 80 in float32) stay in the
# cache from one op to the next, and its buffers, far below glibc's 32 MiB mmap threshold, reuse
# freed heap memory: a single [B * T, H] buffer is mapped afresh and page-faulted on every call.
# 2,048 to 4,096 measured fastest at B = 1024, T = 50 and 100 on one thread (8,192: 5-10% slower).
BLOCK_ROWS = 4096


def _row_blocks(batch: int, seq_len: int, packed_rows: Optional[Tensor], device: torch.device
                ) -> List[Tuple[int, int]]:
    """``[start, end)`` ranges: of samples (``T`` positions each) with the fold, of packed rows
    otherwise, each about ``BLOCK_ROWS`` positions; on a GPU one range: blocks serve the CPU's
    caches and heap, and on a GPU each costs a dozen kernel launches (at B = 4096, T = 100 the
    blocked forward took 20x the eager reference's time on an H200)."""
    if packed_rows is None:
        total, step = batch, max(1, BLOCK_ROWS // max(seq_len, 1))
    else:
        total, step = packed_rows.numel(), BLOCK_ROWS
    if device.type == "cuda":
        step = max(total, 1)
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _mlp_backward(grad_scores: Tensor, hidden: Sequence[Tensor], pre_activations: Sequence[Tensor],
                  weights: Sequence[Tensor], slopes: Sequence[Tensor], activation: str, grads_w: List[Tensor],
                  grads_b: List[Tensor], grads_slope: List[Tensor]) -> Tensor:
    """One block from the scores' gradient ``[R]`` to the first layer's pre-activation gradient
    ``[R, H1]``; adds the block's share of every later layer's weight, bias and slope gradient
    to ``grads_w[1:]``, ``grads_b[1:]``, ``grads_slope``."""
    grad_scores = grad_scores[:, None]
    grads_w[-1].add_(grad_scores.t() @ hidden[-1])
    grads_b[-1].add_(grad_scores.sum(0))
    grad_h = grad_scores * weights[-1]
    for i in reversed(range(len(hidden))):
        if activation == "sigmoid":
            grad_h = torch.ops.aten.sigmoid_backward(grad_h, hidden[i])
        elif activation == "relu":
            grad_h = torch.ops.aten.threshold_backward(grad_h, hidden[i], 0)
        else:
            negative = pre_activations[i] < 0
            slope_terms = torch.where(negative, grad_h * pre_activations[i], grad_h.new_zeros(()))
            grads_slope[i].add_(slope_terms.sum(0) if slopes[i].numel() > 1 else slope_terms.sum().reshape(1))
            grad_h = torch.where(negative, grad_h * slopes[i], grad_h)
        if i:
            grads_w[i].add_(grad_h.t() @ hidden[i - 1])
            grads_b[i].add_(grad_h.sum(0))
            grad_h = grad_h @ weights[i]
    return grad_h


class _PointwiseAttention(torch.autograd.Function):
    """Attention pooling for the pointwise activations (sigmoid, relu, prelu) with a
    hand-written backward.

    Activations are applied in place and differentiated from their saved outputs, so each hidden
    layer keeps one ``[R, H]`` tensor instead of autograd's several. The MLP runs on ``R`` rows:
    all ``B * T`` positions, with the first layer folded per sample (``u_b + k M_b``), or, when
    few are valid, only the valid positions (packed), with the first layer as one product
    ``[k, k * q_b] [Wk - Wd | Wp]^T + u_b``; in blocks of about ``BLOCK_ROWS`` rows, forward and
    backward. Gradients summed over blocks accumulate in at least float32. Dice needs batch
    statistics and goes through autograd instead.
    """

    @staticmethod
    def forward(ctx, query, keys, valid, packed_rows, activation, normalization, softmax_scale, n_layers, *params):
        """``packed_rows``: int64 ``[N]`` flat indices of the valid positions to pack, or None."""
        weights, biases, slopes = params[:n_layers], params[n_layers:2 * n_layers], params[2 * n_layers:]
        batch, seq_len, dim = keys.shape
        w_u, w_k, w_p = _split_first_layer(weights[0], dim)
        per_sample = F.linear(query, w_u, biases[0])
        blocks = _row_blocks(batch, seq_len, packed_rows, keys.device)
        if packed_rows is None:
            scores = keys.new_empty(batch * seq_len)
        else:
            scores = keys.new_zeros(batch * seq_len)
            key_rows_all, packed_weight = keys.reshape(-1, dim), torch.cat([w_k, w_p], 1).t()
        saved = []
        for start, end in blocks:
            if packed_rows is None:
                folded_t = _transposed_fold(query[start:end], w_k, w_p)
                h = torch.bmm(keys[start:end], folded_t.transpose(1, 2)).add_(per_sample[start:end, None, :])
                h = h.view(-1, w_k.shape[0])
            else:
                rows = packed_rows[start:end]
                sample = rows // seq_len
                key_rows = key_rows_all.index_select(0, rows)
                first_layer_input = torch.cat([key_rows, key_rows * query.index_select(0, sample)], dim=1)
                h = torch.addmm(per_sample.index_select(0, sample), first_layer_input, packed_weight)
                saved.append(first_layer_input)
            hidden, pre_activations = [], []
            for i in range(n_layers - 1):
                if i:
                    h = torch.addmm(biases[i], h, weights[i].t())
                if activation == "sigmoid":
                    h = h.sigmoid_()
                elif activation == "relu":
                    h = h.relu_()
                else:
                    pre_activations.append(h)
                    h = torch.where(h >= 0, h, slopes[i] * h)
                hidden.append(h)
            block_scores = F.linear(h, weights[-1], biases[-1]).view(-1)
            if packed_rows is None:
                scores[start * seq_len:end * seq_len] = block_scores
            else:
                scores.index_copy_(0, rows, block_scores)
            saved += hidden + pre_activations
        attn = _normalize(scores.view(batch, seq_len), valid, normalization, softmax_scale)
        values = keys if valid is None else torch.where(valid[..., None], keys, keys.new_zeros(()))
        pooled = torch.bmm(attn[:, None, :], values)[:, 0]
        ctx.config = (activation, normalization, softmax_scale, n_layers, len(params), blocks)
        ctx.save_for_backward(query, keys, valid, packed_rows, attn, values, *params, *saved)
        return pooled, attn

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_disabled  # as in the forward, for a backward called under autocast
    def backward(ctx, grad_pooled, grad_attn):
        activation, normalization, softmax_scale, n_layers, n_params, blocks = ctx.config
        query, keys, valid, packed_rows, attn, values, *rest = ctx.saved_tensors
        params, saved = rest[:n_params], rest[n_params:]
        weights, biases, slopes = params[:n_layers], params[n_layers:2 * n_layers], params[2 * n_layers:]
        batch, seq_len, dim = keys.shape

        grad_weights_of_attn = (values * grad_pooled[:, None, :]).sum(-1)
        if grad_attn is not None:
            grad_weights_of_attn = grad_weights_of_attn + grad_attn
        if normalization == "softmax":
            # attn is 0 on padding, so the softmax's Jacobian needs no mask.
            centered = grad_weights_of_attn - (attn * grad_weights_of_attn).sum(1, keepdim=True)
            grad_scores = attn * centered * softmax_scale
        elif valid is None:
            grad_scores = grad_weights_of_attn
        else:
            grad_scores = torch.where(valid, grad_weights_of_attn, grad_weights_of_attn.new_zeros(()))
        grad_scores = grad_scores.reshape(-1)

        # Sums over blocks in at least float32: a 16-bit running sum would round at every block.
        acc_dtype = compute_dtype(keys.dtype)
        grads_w = [None] + [torch.zeros_like(w, dtype=acc_dtype) for w in weights[1:]]
        grads_b = [None] + [torch.zeros_like(b, dtype=acc_dtype) for b in biases[1:]]
        grads_slope = [torch.zeros_like(a, dtype=acc_dtype) for a in slopes]
        grad_w_k = keys.new_zeros(dim, weights[0].shape[0], dtype=acc_dtype)   # [D, H1]
        grad_w_p = torch.zeros_like(grad_w_k)
        w_u, w_k, w_p = _split_first_layer(weights[0], dim)
        if packed_rows is None:
            w_p_t = w_p.t().contiguous()
            grad_keys = keys.new_empty(keys.shape)
            grad_query, grad_per_sample = query.new_empty(batch, dim), query.new_empty(batch, w_k.shape[0])
        else:
            grad_keys = attn[:, :, None] * grad_pooled[:, None, :]
            grad_query, grad_per_sample = query.new_zeros(batch, dim), query.new_zeros(batch, w_k.shape[0])
            packed_weight = torch.cat([w_k, w_p], 1)
        per_block = len(saved) // max(len(blocks), 1)
        for index, (start, end) in enumerate(blocks):
            block = saved[index * per_block:(index + 1) * per_block]
            if packed_rows is not None:
                first_layer_input, block = block[0], block[1:]
            hidden, pre_activations = block[:n_layers - 1], block[n_layers - 1:]
            if packed_rows is None:
                block_grad_scores = grad_scores[start * seq_len:end * seq_len]
            else:
                rows = packed_rows[start:end]
                block_grad_scores = grad_scores.index_select(0, rows)
            grad_h = _mlp_backward(block_grad_scores, hidden, pre_activations, weights, slopes, activation, grads_w,
                                   grads_b, grads_slope)
            if packed_rows is None:
                block_query = query[start:end]
                grad_h1 = grad_h.view(end - start, seq_len, w_k.shape[0])
                torch.sum(grad_h1, 1, out=grad_per_sample[start:end])
                grad_folded = torch.bmm(keys[start:end].transpose(1, 2), grad_h1)
                folded_t = _transposed_fold(block_query, w_k, w_p)
                torch.bmm(grad_h1, folded_t, out=grad_keys[start:end])
                grad_keys[start:end].addcmul_(attn[start:end, :, None], grad_pooled[start:end, None, :])
                torch.sum(grad_folded * w_p_t, -1, out=grad_query[start:end])
                grad_w_k.add_(grad_folded.sum(0))
                grad_w_p.add_((grad_folded * block_query[:, :, None]).sum(0))
            else:
                sample = rows // seq_len
                grad_per_sample.index_add_(0, sample, grad_h)
                grad_input = grad_h @ packed_weight
                grad_w_kp = (first_layer_input.t() @ grad_h).split(dim)
                grad_w_k.add_(grad_w_kp[0])
                grad_w_p.add_(grad_w_kp[1])
                key_rows = first_layer_input[:, :dim]
                grad_key_rows = grad_input[:, dim:].mul(query.index_select(0, sample)).add_(grad_input[:, :dim])
                grad_keys.view(-1, dim).index_add_(0, rows, grad_key_rows)
                grad_query.index_add_(0, sample, grad_input[:, dim:] * key_rows)
        grads_b[0] = grad_per_sample.sum(0)
        grad_query = grad_query.addmm_(grad_per_sample, w_u)
        grad_w_u = grad_per_sample.t() @ query
        grad_w_k, grad_w_p = grad_w_k.t().to(keys.dtype), grad_w_p.t().to(keys.dtype)
        # W1 = [Wq | Wk | Wd | Wp] enters as Wu = Wq + Wd and Wk' = Wk - Wd.
        grads_w[0] = torch.cat([grad_w_u, grad_w_k, grad_w_u - grad_w_k, grad_w_p], dim=1)
        return (grad_query, grad_keys, None, None, None, None, None, None,
                grads_w[0], *(g.to(keys.dtype) for g in grads_w[1:]), grads_b[0],
                *(g.to(keys.dtype) for g in grads_b[1:]),
                *(g.to(keys.dtype) for g in grads_slope))


def _mask_and_rows_to_pack(valid: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(valid, packed_rows)``: ``valid`` becomes None when every position is valid (no masking
    needed), and ``packed_rows`` holds the flat indices of the valid positions when packing pays
    (see ``PACK_MAX_VALID_FRACTION``).

    Reading the count syncs with the device, and the packed size is data-dependent, so neither
    happens while ``torch.compile`` traces.
    """
    if valid is None or torch.compiler.is_compiling():
        return valid, None
    rows = valid.reshape(-1).nonzero().squeeze(1)
    if rows.numel() == valid.numel():
        return None, None
    return valid, rows if rows.numel() <= PACK_MAX_VALID_FRACTION * valid.numel() else None


def _in_float32(activation: str, inputs: Sequence[Tensor], weights: Sequence[Tensor], biases: Sequence[Tensor],
                act_params: Sequence[Sequence[Tensor]]):
    """float32 casts (autograd follows them) of 16-bit inputs and parameters: the attention then
    computes in float32 like the kernels (in 16-bit arithmetic its sums over B * T positions
    lose several digits). Dice's running statistics stay the caller's buffers, which ``dice``
    updates in place."""
    if activation == "dice":
        act_params = [(layer[0].float(), *layer[1:3], *(p.float() for p in layer[3:])) for layer in act_params]
    else:
        act_params = [tuple(p.float() for p in layer) for layer in act_params]
    return [t.float() for t in inputs], [w.float() for w in weights], [b.float() for b in biases], act_params


@autocast_disabled
def attention_pooling(query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                      lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None, activation: str = "sigmoid",
                      act_params: Sequence[Sequence[Tensor]] = (), normalization: str = "none",
                      softmax_scale: float = 1.0, dice_stats: str = "valid", training: bool = False,
                      momentum: float = 0.1, eps: float = 1e-8, process_group=None) -> Tuple[Tensor, Tensor]:
    """Folded attention pooling; see ``din_fast.reference.attention_pooling``. 16-bit inputs
    compute in float32 (outputs in their dtype). Autocast does not apply: under it the result,
    and its dtype, are those of the same call outside it.

    Returns ``(pooled [B, D], weights [B, T])``.
    """
    if compute_dtype(keys.dtype) != keys.dtype:
        (query, keys_32), weights, biases, act_params = _in_float32(activation, (query, keys), weights, biases,
                                                                    act_params)
        pooled, attn = attention_pooling(query, keys_32, weights, biases, lengths=lengths, mask=mask,
                                         activation=activation, act_params=act_params, normalization=normalization,
                                         softmax_scale=softmax_scale, dice_stats=dice_stats, training=training,
                                         momentum=momentum, eps=eps, process_group=process_group)
        return pooled.to(keys.dtype), attn.to(keys.dtype)
    seq_len = keys.shape[1]
    if lengths is not None:
        mask = torch.arange(seq_len, device=keys.device)[None, :] < lengths[:, None]
    if activation != "dice":
        slopes = tuple(layer[0] for layer in act_params) if activation == "prelu" else ()
        mask, packed_rows = _mask_and_rows_to_pack(mask)
        return _PointwiseAttention.apply(query, keys, mask, packed_rows, activation, normalization, softmax_scale,
                                         len(weights), *weights, *biases, *slopes)
    h1 = _folded_first_layer(query, keys, weights[0], biases[0])
    dice_mask = mask if dice_stats == "valid" else None
    scores = _score_layers(h1, weights, biases, activation, act_params, dice_mask, training, momentum, eps,
                           process_group)
    attn = _normalize(scores, mask, normalization, softmax_scale)
    values = keys if mask is None else torch.where(mask[..., None], keys, keys.new_zeros(()))
    return torch.bmm(attn[:, None, :], values)[:, 0], attn


@autocast_disabled
def score_candidates(history: Tensor, candidates: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                     activation: str = "sigmoid", act_params: Sequence[Sequence[Tensor]] = (),
                     normalization: str = "none", softmax_scale: float = 1.0, eps: float = 1e-8
                     ) -> Tuple[Tensor, Tensor]:
    """Serving: ``history`` ``[T, D]`` against ``candidates`` ``[C, D]`` with the fold; 16-bit
    inputs compute in float32 (outputs in their dtype), and autocast does not apply.

    The candidates go in blocks of about ``BLOCK_ROWS`` pairs on the CPU (one block on a GPU), as
    the training path's samples do, so that a block's layers stay in the cache. A block's first
    layer is one ``[T, D] x [D, C_block * H1]`` product against its candidates' ``M_c`` side by
    side, with their ``u_c`` as the product's bias row, so no ``[T, C, H1]`` term is added
    afterwards; rows are laid out time-major (``[T, C_block]``) for that product.

    Returns ``(pooled [C, D], weights [C, T])``.
    """
    if compute_dtype(history.dtype) != history.dtype:
        (history_32, candidates), weights, biases, act_params = _in_float32(activation, (history, candidates),
                                                                            weights, biases, act_params)
        pooled, attn = score_candidates(history_32, candidates, weights, biases, activation=activation,
                                        act_params=act_params, normalization=normalization,
                                        softmax_scale=softmax_scale, eps=eps)
        return pooled.to(history.dtype), attn.to(history.dtype)
    (seq_len, dim), num_candidates = history.shape, candidates.shape[0]
    w_u, w_k, w_p = _split_first_layer(weights[0], dim)
    query_bias = F.linear(candidates, w_u, biases[0])
    scores = history.new_empty(num_candidates, seq_len)
    for start, end in _row_blocks(num_candidates, seq_len, None, history.device):
        folds = _transposed_fold(candidates[start:end], w_k, w_p).view(-1, dim).t()
        h1 = torch.addmm(query_bias[start:end].reshape(1, -1), history, folds).view(seq_len, end - start,
                                                                                    w_k.shape[0])
        scores[start:end] = _score_layers(h1, weights, biases, activation, act_params, None, False, 0.0, eps).t()
    attn = _normalize(scores, None, normalization, softmax_scale)
    return attn @ history, attn


def mba_penalty(weight: Tensor, ids: Tensor, counts: Tensor, lam: float) -> Tensor:
    """``lam / 2 * sum_{j in unique(ids)} ||w_j||^2 / n_j``, reading only the batch's rows."""
    rows = torch.unique(ids.reshape(-1))
    # In at least float32, as the kernels: float16 squares overflow, and n_j = 257 is 256 in bfloat16.
    compute = compute_dtype(weight.dtype)
    picked = weight.index_select(0, rows).to(compute)
    per_row = (picked * picked).sum(dim=1) / counts.index_select(0, rows).to(compute)
    return (0.5 * lam * per_row.sum()).to(weight.dtype)
