"""Triton backend of ``attention_pooling`` and ``score_candidates`` (same signatures and
semantics as ``din_fast.reference``).

One autograd formula over two custom ops registered with ``torch.library``:
``din_fast::attention_pooling_fwd`` (pooled, weights, the per-sample softmax statistics and, for
training-mode Dice, each layer's batch statistics) and ``din_fast::attention_pooling_bwd`` (every
gradient, by recomputation, with Dice's cross-sample terms). Both are functional: the running
statistics are updated by ``attention_pooling`` from the forward's batch statistics, on the
device. ``torch.compile`` traces both without graph breaks; neither synchronises with the host.

Dice parameters per hidden layer: ``(alpha, running_mean, running_var)`` or, for the affine gate,
``(alpha, running_mean, running_var, weight, bias)``; the kernels take the gate as
``sigmoid((z - mean) * scale + bias)``, ``scale = weight * rstd``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from din_fast._numerics import ATTENTION_KERNEL_INDEX_LIMIT, autocast_disabled
from din_fast._running_stats import update_running_stats
from din_fast.kernels import attention as _k

Tensor = torch.Tensor

_PARAMS_PER_LAYER = {"sigmoid": 0, "relu": 0, "prelu": 1, "dice": 3}
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dice_layers(hidden: Sequence[int], act_flat: Sequence[Tensor]) -> List[Sequence[Tensor]]:
    """``act_flat`` split per hidden layer: ``(alpha, running_mean, running_var)`` or
    ``(alpha, running_mean, running_var, weight, bias)``."""
    arity = len(act_flat) // len(hidden)
    return [act_flat[arity * i:arity * (i + 1)] for i in range(len(hidden))]


def _gate_vectors(params: Sequence[Tensor], mean: Tensor, rstd: Tensor) -> Tuple[Tensor, ...]:
    """One Dice layer's ``(alpha, mean, scale[, bias])`` (fp32): the gate
    ``sigmoid((z - mean) * scale + bias)`` with ``scale = weight * rstd``; without the affine
    gate ``scale = rstd`` and the bias is the packed buffer's 0."""
    if len(params) == 3:
        return params[0].float(), mean, rstd
    return params[0].float(), mean, params[3].float() * rstd, params[4].float()


def _act_vectors(activation: str, hidden: Sequence[int], act_flat: Sequence[Tensor], eps: float):
    """Per hidden layer the kernels' activation vectors: prelu weight (broadcast to ``[H]``), or
    dice ``(alpha, mean, scale, bias)`` from the running statistics."""
    if activation == "dice":
        return [_gate_vectors(params, params[1].float(), torch.rsqrt(params[2].float() + eps))
                for params in _dice_layers(hidden, act_flat)]
    if activation == "prelu":
        return [(act_flat[i].float().expand(width),) for i, width in enumerate(hidden)]
    return [() for _ in hidden]


def _indexable(t: Tensor) -> bool:
    """Whether the kernels can index ``t`` (``[B, D]`` or ``[B, T, D]``) as it is: a unit last
    stride, and the batch stride and every offset within a sample in int32."""
    within_sample = sum(stride * (size - 1) for stride, size in zip(t.stride()[1:], t.shape[1:]))
    return (t.stride(-1) == 1 and t.stride(0) < ATTENTION_KERNEL_INDEX_LIMIT
            and within_sample < ATTENTION_KERNEL_INDEX_LIMIT)


def _prepare(query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
             lengths: Optional[Tensor], mask: Optional[Tensor], activation: str, act_flat: Sequence[Tensor],
             eps: float, batch_statistics: bool):
    """Inputs the kernels can index (unit last stride, strides and offsets within int32), the
    folded MLP (Dice layers with batch statistics get their vectors later) and the span."""
    if not _indexable(query):
        query = query.contiguous()
    if not _indexable(keys):
        keys = keys.contiguous()
    batch, seq_len, _ = keys.shape
    hidden = [int(w.shape[0]) for w in weights[:-1]]
    act_vectors = [() for _ in hidden] if batch_statistics else _act_vectors(activation, hidden, act_flat, eps)
    mlp = _k.FoldedMLP(weights, biases, act_vectors,
                       gate_bias=activation == "dice" and len(act_flat) == 5 * len(hidden))
    span = _k.sequence_span(batch, seq_len, lengths, mask, keys.device)
    return query, keys, mlp, span


def _all_positions(keys: Tensor, lengths: Optional[Tensor], mask: Optional[Tensor]):
    """``(span, mask)`` that walk every position of every sample (Dice statistics over all
    ``B * T``) while the mask still tells the valid ones."""
    batch, seq_len, _ = keys.shape
    span = torch.full((batch,), seq_len, dtype=torch.int32, device=keys.device)
    if lengths is not None:
        mask = torch.arange(seq_len, device=keys.device)[None, :] < lengths[:, None]
    return span, mask


def _batch_statistics(activation: str, training: bool) -> bool:
    return activation == "dice" and training


@torch.library.custom_op("din_fast::attention_pooling_fwd", mutates_args=())
def _attention_pooling_fwd(query: Tensor, keys: Tensor, weights: List[Tensor], biases: List[Tensor],
                           lengths: Optional[Tensor], mask: Optional[Tensor], act_flat: List[Tensor],
                           activation: str, normalization: str, softmax_scale: float, eps: float, training: bool,
                           dice_stats: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(pooled, weights, row_max, row_sum, dice_mean, dice_var, dice_count)``: pooled
    and weights in ``output_dtype`` (fp32 with softmax, for the backward), the last three the
    Dice layers' fp32 batch statistics ``[NUM_HIDDEN, HMAX]`` (zero past each layer's width) and
    the number of positions they ran over ``[]``, with training-mode Dice; else empty."""
    batch_statistics = _batch_statistics(activation, training)
    query, keys, mlp, span = _prepare(query, keys, weights, biases, lengths, mask, activation, act_flat, eps,
                                      batch_statistics)
    if not batch_statistics:
        empty = keys.new_empty(0, dtype=torch.float32)
        return _k.attention_forward(query, keys, mlp, span, mask, normalization=normalization,
                                    activation=activation, softmax_scale=softmax_scale) + (empty, empty.clone(),
                                                                                           empty.clone())
    stat_span, stat_mask = (span, mask) if dice_stats == "valid" else (_all_positions(keys, None, None)[0], None)
    means = torch.zeros(len(mlp.hidden), mlp.hmax, dtype=torch.float32, device=keys.device)
    variances = torch.zeros_like(means)
    for layer, params in enumerate(_dice_layers(mlp.hidden, act_flat)):
        mean, var, count = _k.dice_layer_statistics(query, keys, mlp, stat_span, stat_mask, layer)
        mlp.set_act_vectors(layer, _gate_vectors(params, mean, torch.rsqrt(var + eps)))
        means[layer, :mlp.hidden[layer]] = mean
        variances[layer, :mlp.hidden[layer]] = var
    return _k.attention_forward(query, keys, mlp, span, mask, normalization=normalization, activation=activation,
                                softmax_scale=softmax_scale) + (means, variances, count)


@_attention_pooling_fwd.register_fake
def _(query, keys, weights, biases, lengths, mask, act_flat, activation, normalization, softmax_scale, eps, training,
      dice_stats):
    batch, seq_len, dim = keys.shape
    if _batch_statistics(activation, training):
        stats_shape = (len(weights) - 1, max(int(w.shape[0]) for w in weights[:-1]))
        count_shape = ()
    else:
        stats_shape = count_shape = (0,)
    out_dtype = _k.output_dtype(keys.dtype, normalization)
    softmax_statistics = batch if normalization == "softmax" else 0
    return (keys.new_empty(batch, dim, dtype=out_dtype), keys.new_empty(batch, seq_len, dtype=out_dtype),
            keys.new_empty(softmax_statistics, dtype=torch.float32),
            keys.new_empty(softmax_statistics, dtype=torch.float32),
            keys.new_empty(stats_shape, dtype=torch.float32), keys.new_empty(stats_shape, dtype=torch.float32),
            keys.new_empty(count_shape, dtype=torch.float32))


def _dice_gate(hidden: Sequence[int], act_flat: Sequence[Tensor], eps: float, batch_statistics: bool,
               dice_mean: Tensor, dice_var: Tensor, dice_count: Tensor, keep_all: bool):
    """The kernels' ``DiceGate`` and the gate vectors per layer (from the batch or the running
    statistics), or ``(None, None)`` where the gate needs no sums (Dice without the affine gate
    on running statistics)."""
    layers = _dice_layers(hidden, act_flat)
    if not batch_statistics and len(layers[0]) == 3:
        return None, None
    rstd = torch.zeros(len(hidden), max(hidden), dtype=torch.float32, device=act_flat[0].device)
    means = []
    for i, (width, params) in enumerate(zip(hidden, layers)):
        if batch_statistics:
            mean, var = dice_mean[i, :width], dice_var[i, :width]
        else:
            mean, var = params[1].float(), params[2].float()
        rstd[i, :width] = torch.rsqrt(var + eps)
        means.append(mean)
    if batch_statistics:
        # Statistics of one position: its centred value is exactly 0 and they pass no gradient
        # (d(z - mean)/dz = 1 - 1/n = 0). A zero rstd says so exactly. With rsqrt(eps) instead,
        # the backward's recomputed z, whose sums may round otherwise than the statistics
        # pass's, would sit off the mean by a rounding error times 1e4 at every Dice layer.
        rstd.mul_(dice_count > 1)
    vectors = [_gate_vectors(params, mean, rstd[i, :width])
               for i, (width, params, mean) in enumerate(zip(hidden, layers, means))]
    return _k.DiceGate(rstd, dice_count if batch_statistics else None, keep_all), vectors


@torch.library.custom_op("din_fast::attention_pooling_bwd", mutates_args=())
def _attention_pooling_bwd(query: Tensor, keys: Tensor, weights: List[Tensor], biases: List[Tensor],
                           lengths: Optional[Tensor], mask: Optional[Tensor], act_flat: List[Tensor],
                           pooled: Tensor, attn_weights: Tensor, row_max: Tensor, row_sum: Tensor,
                           dice_mean: Tensor, dice_var: Tensor, dice_count: Tensor,
                           grad_pooled: Tensor, grad_weights: Tensor, activation: str, normalization: str,
                           softmax_scale: float, eps: float, training: bool, dice_stats: str) -> List[Tensor]:
    """Returns ``[grad_query, grad_keys, *grad_weights, *grad_biases, *grad_act_params]`` (one
    per element of ``act_flat``; zeros for dice running statistics, which get no gradient)."""
    batch_statistics = _batch_statistics(activation, training)
    query_c, keys_c, mlp, span = _prepare(query, keys, weights, biases, lengths, mask, activation, act_flat, eps,
                                          batch_statistics)
    hidden = mlp.hidden
    dice_gate = None
    if activation == "dice":
        keep_all = batch_statistics and dice_stats == "all"
        dice_gate, vectors = _dice_gate(hidden, act_flat, eps, batch_statistics, dice_mean, dice_var, dice_count,
                                        keep_all)
        if batch_statistics:
            for layer, layer_vectors in enumerate(vectors):
                mlp.set_act_vectors(layer, layer_vectors)
        if keep_all:
            span, mask = _all_positions(keys, lengths, mask)
    grads = _k.attention_backward(query_c, keys_c, mlp, span, mask, pooled, attn_weights, row_max, row_sum,
                                  grad_pooled, grad_weights, normalization=normalization, activation=activation,
                                  softmax_scale=softmax_scale, dice_gate=dice_gate)
    layer_grads = [(grads["first_weight"], grads["first_bias"])] + grads["layers"] + \
        [(grads["score_weight"].reshape(1, -1), grads["score_bias"])]
    out = [grads["query"].to(query.dtype), grads["keys"]]
    out += [g.to(w.dtype) for (g, _), w in zip(layer_grads, weights)]
    out += [g.to(b.dtype) for (_, g), b in zip(layer_grads, biases)]
    if activation == "prelu":
        for i, act_grad in enumerate(grads["act"]):
            param = act_flat[i]
            out.append((act_grad if param.shape[0] == act_grad.shape[0] else act_grad.sum().reshape(1)).to(param.dtype))
    elif activation == "dice":
        for i, params in enumerate(_dice_layers(hidden, act_flat)):
            out += [grads["act"][i].to(params[0].dtype), params[1].new_zeros(params[1].shape),
                    params[2].new_zeros(params[2].shape)]
            if len(params) == 5:
                # gate = sigmoid(weight * (z - mean) * rstd + bias): dweight = rstd S1, dbias = S0.
                gate_bias, gate_centred = grads["gate"][i]
                out += [(dice_gate.rstd[i, :hidden[i]] * gate_centred).to(params[3].dtype),
                        gate_bias.to(params[4].dtype)]
    return out


@_attention_pooling_bwd.register_fake
def _(query, keys, weights, biases, lengths, mask, act_flat, pooled, attn_weights, row_max, row_sum, dice_mean,
      dice_var, dice_count, grad_pooled, grad_weights, activation, normalization, softmax_scale, eps, training,
      dice_stats):
    # Contiguous like the real op's gradients, whatever the inputs' strides.
    return [t.new_empty(t.shape) for t in (query, keys, *weights, *biases, *act_flat)]


def _setup_context(ctx, inputs, output):
    (query, keys, weights, biases, lengths, mask, act_flat, activation, normalization, softmax_scale, eps, training,
     dice_stats) = inputs
    pooled, attn_weights, row_max, row_sum, dice_mean, dice_var, dice_count = output
    ctx.num_layers = len(weights)
    ctx.num_act = len(act_flat)
    ctx.options = (activation, normalization, softmax_scale, eps, training, dice_stats)
    if activation == "dice":
        arity = len(act_flat) // (len(weights) - 1)
        if _batch_statistics(activation, training):
            # The running statistics are updated in place after the forward and the backward
            # does not read them: their slots carry the layer's alpha (same shape), not a copy.
            act_flat = [act_flat[i - i % arity] if i % arity in (1, 2) else p for i, p in enumerate(act_flat)]
        else:
            # The backward reads them, and a training forward may update them in place before
            # it runs: it gets the values this forward used.
            act_flat = [p.detach().clone() if i % arity in (1, 2) else p for i, p in enumerate(act_flat)]
    ctx.save_for_backward(query, keys, lengths, mask, pooled, attn_weights, row_max, row_sum, dice_mean, dice_var,
                          dice_count, *weights, *biases, *act_flat)


@autocast_disabled  # as in the forward, for a backward called under autocast
def _backward(ctx, grad_pooled, grad_weights, *_grad_statistics):
    (query, keys, lengths, mask, pooled, attn_weights, row_max, row_sum, dice_mean, dice_var, dice_count,
     *params) = ctx.saved_tensors
    n = ctx.num_layers
    weights, biases, act_flat = params[:n], params[n:2 * n], params[2 * n:]
    if grad_pooled is None:
        grad_pooled = torch.zeros_like(pooled)
    if grad_weights is None:
        grad_weights = torch.zeros_like(attn_weights)
    activation, normalization, softmax_scale, eps, training, dice_stats = ctx.options
    grads = _attention_pooling_bwd(query, keys, list(weights), list(biases), lengths, mask, list(act_flat), pooled,
                                   attn_weights, row_max, row_sum, dice_mean, dice_var, dice_count, grad_pooled,
                                   grad_weights, activation, normalization, softmax_scale, eps, training, dice_stats)
    grad_query, grad_keys = grads[0], grads[1]
    grad_w, grad_b, grad_act = grads[2:2 + n], grads[2 + n:2 + 2 * n], grads[2 + 2 * n:]
    if activation == "dice":
        # Running statistics are buffers, not differentiable inputs.
        arity = len(grad_act) // (n - 1)
        grad_act = [None if i % arity in (1, 2) else g for i, g in enumerate(grad_act)]
    return (grad_query, grad_keys, list(grad_w), list(grad_b), None, None, list(grad_act), None, None, None, None,
            None, None)


_attention_pooling_fwd.register_autograd(_backward, setup_context=_setup_context)


def _flatten_act_params(activation: str, act_params: Sequence[Sequence[Tensor]]) -> List[Tensor]:
    return [p for layer in act_params for p in layer] if _PARAMS_PER_LAYER[activation] else []


@autocast_disabled
def attention_pooling(query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                      lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None, activation: str = "sigmoid",
                      act_params: Sequence[Sequence[Tensor]] = (), normalization: str = "none",
                      softmax_scale: float = 1.0, dice_stats: str = "valid", training: bool = False,
                      momentum: float = 0.1, eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """See ``din_fast.reference.attention_pooling``: query ``[B, D]``, keys ``[B, T, D]`` ->
    ``(pooled [B, D], weights [B, T])`` in keys' dtype.

    Training-mode Dice takes its batch statistics per hidden layer by a statistics pass of the
    kernels (nothing ``[B, T, H]`` is stored) and updates the running statistics in place like
    ``BatchNorm`` (on the device; a batch with no position to count leaves them untouched).

    Raises:
        TypeError: float64 (or other) inputs; the kernels compute in fp32.
    """
    if keys.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports keys/query in float32, bfloat16 or float16, got {keys.dtype}; "
                        "use backend='torch' or 'reference' for it")
    act_flat = _flatten_act_params(activation, act_params)
    pooled, attn_weights, _, _, dice_mean, dice_var, dice_count = _attention_pooling_fwd(
        query, keys, list(weights), list(biases), lengths, mask, act_flat, activation, normalization,
        float(softmax_scale), float(eps), bool(training), dice_stats)
    if _batch_statistics(activation, training):
        for i, params in enumerate(act_params):
            width = params[0].shape[0]
            update_running_stats(params[1], params[2], dice_mean[i, :width], dice_var[i, :width], dice_count,
                                 momentum)
    return pooled.to(keys.dtype), attn_weights.to(keys.dtype)


@autocast_disabled
def score_candidates(history: Tensor, candidates: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                     activation: str = "sigmoid", act_params: Sequence[Sequence[Tensor]] = (),
                     normalization: str = "none", softmax_scale: float = 1.0, eps: float = 1e-8
                     ) -> Tuple[Tensor, Tensor]:
    """See ``din_fast.reference.score_candidates``: history ``[T, D]``, candidates ``[C, D]`` ->
    ``(pooled [C, D], weights [C, T])``, inference semantics, one launch.

    The history is handed to the kernel as a batch-stride-0 view, so every program reads the
    same ``[T, D]`` rows and no per-candidate copy exists.
    """
    if not _indexable(history[None]):
        # Made contiguous once here: the launcher would copy the expanded view per candidate.
        history = history.contiguous()
    keys = history[None].expand(candidates.shape[0], -1, -1)
    return attention_pooling(candidates, keys, weights, biases, activation=activation, act_params=act_params,
                             normalization=normalization, softmax_scale=softmax_scale, training=False, eps=eps)
