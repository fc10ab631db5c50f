"""Triton backend of ``attention_pooling`` and ``score_candidates`` (same signatures and
semantics as ``din_fast.reference``).

One autograd formula over two custom ops registered with ``torch.library``:
``din_fast::attention_pooling_fwd`` (pooled, weights and the per-sample softmax statistics) and
``din_fast::attention_pooling_bwd`` (every gradient, by recomputation). ``torch.compile`` traces
both without graph breaks; neither synchronises with the host.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from din_fast.kernels import attention as _k

Tensor = torch.Tensor

_PARAMS_PER_LAYER = {"sigmoid": 0, "relu": 0, "prelu": 1, "dice": 3}
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _act_vectors(activation: str, hidden: Sequence[int], act_flat: Sequence[Tensor], eps: float):
    """Per hidden layer ``(p0, p1, p2)`` in the kernels' convention: prelu weight (broadcast to
    ``[H]``), or dice alpha, running mean and ``1 / sqrt(running_var + eps)``."""
    vectors = []
    for i, width in enumerate(hidden):
        if activation == "prelu":
            weight = act_flat[i].float().expand(width)
            vectors.append((weight,))
        elif activation == "dice":
            alpha, mean, var = act_flat[3 * i:3 * i + 3]
            vectors.append((alpha.float(), mean.float(), torch.rsqrt(var.float() + eps)))
        else:
            vectors.append(())
    return vectors


def _prepare(query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
             lengths: Optional[Tensor], mask: Optional[Tensor], activation: str, act_flat: Sequence[Tensor],
             eps: float):
    if query.stride(-1) != 1:
        query = query.contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    hidden = [int(w.shape[0]) for w in weights[:-1]]
    mlp = _k.FoldedMLP(weights, biases, _act_vectors(activation, hidden, act_flat, eps))
    batch, seq_len, _ = keys.shape
    span = _k.sequence_span(batch, seq_len, lengths, mask, keys.device)
    return query, keys, mlp, span


@torch.library.custom_op("din_fast::attention_pooling_fwd", mutates_args=())
def _attention_pooling_fwd(query: Tensor, keys: Tensor, weights: List[Tensor], biases: List[Tensor],
                           lengths: Optional[Tensor], mask: Optional[Tensor], act_flat: List[Tensor],
                           activation: str, normalization: str, softmax_scale: float, eps: float
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    query, keys, mlp, span = _prepare(query, keys, weights, biases, lengths, mask, activation, act_flat, eps)
    return _k.attention_forward(query, keys, mlp, span, mask, normalization=normalization, activation=activation,
                                softmax_scale=softmax_scale)


@_attention_pooling_fwd.register_fake
def _(query, keys, weights, biases, lengths, mask, act_flat, activation, normalization, softmax_scale, eps):
    batch, seq_len, dim = keys.shape
    return (keys.new_empty(batch, dim), keys.new_empty(batch, seq_len),
            keys.new_empty(batch, dtype=torch.float32), keys.new_empty(batch, dtype=torch.float32))


@torch.library.custom_op("din_fast::attention_pooling_bwd", mutates_args=())
def _attention_pooling_bwd(query: Tensor, keys: Tensor, weights: List[Tensor], biases: List[Tensor],
                           lengths: Optional[Tensor], mask: Optional[Tensor], act_flat: List[Tensor],
                           pooled: Tensor, attn_weights: Tensor, row_max: Tensor, row_sum: Tensor,
                           grad_pooled: Tensor, grad_weights: Tensor, activation: str, normalization: str,
                           softmax_scale: float, eps: float) -> List[Tensor]:
    """Returns ``[grad_query, grad_keys, *grad_weights, *grad_biases, *grad_act_params]`` (one
    per element of ``act_flat``; zeros for dice running statistics, which get no gradient)."""
    query_c, keys_c, mlp, span = _prepare(query, keys, weights, biases, lengths, mask, activation, act_flat, eps)
    grads = _k.attention_backward(query_c, keys_c, mlp, span, mask, pooled, attn_weights, row_max, row_sum,
                                  grad_pooled, grad_weights, normalization=normalization, activation=activation,
                                  softmax_scale=softmax_scale)
    layer_grads = [(grads["first_weight"], grads["first_bias"])] + grads["layers"] + \
        [(grads["score_weight"].reshape(1, -1), grads["score_bias"])]
    out = [grads["query"].to(query.dtype), grads["keys"]]
    out += [g.to(w.dtype) for (g, _), w in zip(layer_grads, weights)]
    out += [g.to(b.dtype) for (_, g), b in zip(layer_grads, biases)]
    for i, act_grad in enumerate(grads["act"]):
        if activation == "prelu":
            param = act_flat[i]
            out.append((act_grad if param.shape[0] == act_grad.shape[0] else act_grad.sum().reshape(1)).to(param.dtype))
        elif activation == "dice":
            alpha, mean, var = act_flat[3 * i:3 * i + 3]
            out += [act_grad.to(alpha.dtype), torch.zeros_like(mean), torch.zeros_like(var)]
    return out


@_attention_pooling_bwd.register_fake
def _(query, keys, weights, biases, lengths, mask, act_flat, pooled, attn_weights, row_max, row_sum, grad_pooled,
      grad_weights, activation, normalization, softmax_scale, eps):
    return ([torch.empty_like(query), torch.empty_like(keys, memory_format=torch.contiguous_format)]
            + [torch.empty_like(w) for w in weights] + [torch.empty_like(b) for b in biases]
            + [torch.empty_like(p) for p in act_flat])


def _setup_context(ctx, inputs, output):
    query, keys, weights, biases, lengths, mask, act_flat, activation, normalization, softmax_scale, eps = inputs
    pooled, attn_weights, row_max, row_sum = output
    ctx.num_layers = len(weights)
    ctx.num_act = len(act_flat)
    ctx.options = (activation, normalization, softmax_scale, eps)
    ctx.save_for_backward(query, keys, lengths, mask, pooled, attn_weights, row_max, row_sum, *weights, *biases,
                          *act_flat)


def _backward(ctx, grad_pooled, grad_weights, _grad_row_max, _grad_row_sum):
    query, keys, lengths, mask, pooled, attn_weights, row_max, row_sum, *params = ctx.saved_tensors
    n = ctx.num_layers
    weights, biases, act_flat = params[:n], params[n:2 * n], params[2 * n:]
    if grad_pooled is None:
        grad_pooled = torch.zeros_like(pooled)
    if grad_weights is None:
        grad_weights = torch.zeros_like(attn_weights)
    activation, normalization, softmax_scale, eps = ctx.options
    grads = _attention_pooling_bwd(query, keys, list(weights), list(biases), lengths, mask, list(act_flat), pooled,
                                   attn_weights, row_max, row_sum, grad_pooled, grad_weights, activation,
                                   normalization, softmax_scale, eps)
    grad_query, grad_keys = grads[0], grads[1]
    grad_w, grad_b, grad_act = grads[2:2 + n], grads[2 + n:2 + 2 * n], grads[2 + 2 * n:]
    if activation == "dice":
        # Running statistics are buffers, not differentiable inputs.
        grad_act = [g if i % 3 == 0 else None for i, g in enumerate(grad_act)]
    return grad_query, grad_keys, list(grad_w), list(grad_b), None, None, list(grad_act), None, None, None, None


_attention_pooling_fwd.register_autograd(_backward, setup_context=_setup_context)


def _flatten_act_params(activation: str, act_params: Sequence[Sequence[Tensor]]) -> List[Tensor]:
    return [p for layer in act_params for p in layer] if _PARAMS_PER_LAYER[activation] else []


def attention_pooling(query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                      lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None, activation: str = "sigmoid",
                      act_params: Sequence[Sequence[Tensor]] = (), normalization: str = "none",
                      softmax_scale: float = 1.0, dice_stats: str = "valid", training: bool = False,
                      momentum: float = 0.1, eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """See ``din_fast.reference.attention_pooling``: query ``[B, D]``, keys ``[B, T, D]`` ->
    ``(pooled [B, D], weights [B, T])`` in keys' dtype.

    Raises:
        TypeError: float64 (or other) inputs; the kernels compute in fp32.
        NotImplementedError: ``activation="dice"`` with ``training=True`` (batch statistics
            inside the attention MLP are not implemented in the Triton kernels; use
            ``backend="torch"``).
    """
    if keys.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports keys/query in float32, bfloat16 or float16, got {keys.dtype}; "
                        "use backend='torch' or 'reference' for it")
    if activation == "dice" and training:
        raise NotImplementedError(
            "the triton backend does not implement training-mode Dice inside the attention MLP (batch "
            "statistics); use backend='torch' or 'reference' for it, or training=False for running statistics")
    if len(weights) > 4:
        raise NotImplementedError(f"the triton attention kernels support 1 to 3 hidden layers, got {len(weights) - 1}")
    pooled, attn_weights, _, _ = _attention_pooling_fwd(
        query, keys, list(weights), list(biases), lengths, mask, _flatten_act_params(activation, act_params),
        activation, normalization, float(softmax_scale), float(eps))
    return pooled, attn_weights


def score_candidates(history: Tensor, candidates: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                     activation: str = "sigmoid", act_params: Sequence[Sequence[Tensor]] = (),
                     normalization: str = "none", softmax_scale: float = 1.0, eps: float = 1e-8
                     ) -> Tuple[Tensor, Tensor]:
    """See ``din_fast.reference.score_candidates``: history ``[T, D]``, candidates ``[C, D]`` ->
    ``(pooled [C, D], weights [C, T])``, inference semantics, one launch.

    The history is handed to the kernel as a batch-stride-0 view, so every program reads the
    same ``[T, D]`` rows and no per-candidate copy exists.
    """
    keys = history[None].expand(candidates.shape[0], -1, -1)
    return attention_pooling(candidates, keys, weights, biases, activation=activation, act_params=act_params,
                             normalization=normalization, softmax_scale=softmax_scale, training=False, eps=eps)
