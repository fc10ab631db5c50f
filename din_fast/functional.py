"""Checked, backend-dispatching functional API.

Each function checks its arguments (clear ``TypeError``/``ValueError`` naming the argument), then
calls the op of the chosen backend (see ``din_fast.backend``). The modules in
``din_fast.modules`` are thin wrappers around these.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _validation as V
from ._attention_shapes import kernel_unsupported
from ._numerics import ATTENTION_KERNEL_INDEX_LIMIT, DICE_KERNEL_MAX_POSITIONS
from .backend import get_op, resolve_backend

Tensor = torch.Tensor


def _check_channel_vector(name: str, value: Optional[Tensor], channels: int, like: Tensor,
                          sizes: Tuple[int, ...] = (), same_dtype: bool = False) -> None:
    if value is None:
        return
    V.check_tensor(name, value, ndim=(1,), floating=True)
    if same_dtype and value.dtype != like.dtype:
        raise TypeError(f"{name} must have the inputs' dtype {like.dtype}, got {value.dtype}")
    allowed = sizes or (channels,)
    # Compared one by one: torch.compile does not trace `in` on a symbolic size.
    if not any(value.shape[0] == size for size in allowed):
        expected = " or ".join(f"[{n}]" for n in allowed)
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the input, got {value.device}")


def dice(x: Tensor, alpha: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
         mask: Optional[Tensor] = None, *, training: bool, momentum: float = 0.1, eps: float = 1e-8,
         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, process_group=None,
         backend: str = "auto") -> Tensor:
    """Dice activation (eq. 9) of ``x`` ``[N, C]`` or ``[N, T, C]`` (channels last).

    ``mask`` (bool, ``x.shape[:-1]``) limits the batch statistics to its true positions. In
    training the running statistics (``[C]`` each, optional) are updated in place with
    BatchNorm's conventions; in inference they are required and used. ``weight`` and ``bias``
    (``[C]``, given together) make the gate affine: ``sigmoid(weight * x_hat + bias)``. With a
    ``torch.distributed`` ``process_group``, training statistics (and their gradient terms) run
    over the positions of every rank in it, as ``nn.SyncBatchNorm``'s do.
    """
    V.check_tensor("x", x, ndim=(2, 3), floating=True)
    channels = x.shape[-1]
    for name, value in (("alpha", alpha), ("running_mean", running_mean), ("running_var", running_var),
                        ("weight", weight), ("bias", bias)):
        _check_channel_vector(name, value, channels, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias (the affine gate) must be given together")
    if not training and running_mean is None:
        raise ValueError("inference (training=False) needs running_mean and running_var")
    if mask is not None:
        V.check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask must have shape {list(x.shape[:-1])} (x.shape[:-1]), got {list(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask must be on {x.device} like x, got {mask.device}")
    V.check_momentum(momentum)
    V.check_positive_float("eps", eps)
    group = _training_process_group(process_group, training)
    unsupported = _SYNC_UNSUPPORTED if group else None
    if x.numel() // max(channels, 1) >= DICE_KERNEL_MAX_POSITIONS:
        unsupported = f"Dice of {DICE_KERNEL_MAX_POSITIONS} or more positions (x.shape[:-1] = {list(x.shape[:-1])})"
    op = get_op(resolve_backend(backend, x.device, "dice", x.dtype, unsupported), "dice")
    return op(x, alpha, running_mean, running_var, mask, training=training, momentum=momentum, eps=eps,
              weight=weight, bias=bias, **group)


_SYNC_UNSUPPORTED = "Dice statistics synchronized over a process group"


def _attention_kernel_unsupported(seq_len: int, dim: int, weights: Sequence[Tensor]) -> Optional[str]:
    """What of this call the attention kernels do not take (``din_fast._attention_shapes``), or None."""
    if seq_len * dim >= ATTENTION_KERNEL_INDEX_LIMIT:
        return f"keys with T * D >= {ATTENTION_KERNEL_INDEX_LIMIT} (T={seq_len}, D={dim})"
    return kernel_unsupported(dim, [w.shape[0] for w in weights[:-1]])


def _training_process_group(process_group, training: bool) -> dict:
    """The ``process_group`` keyword for the op (``din_fast.distributed.WORLD`` resolved): only
    training statistics are synchronized."""
    if process_group is None or not training:
        return {}
    # Imported here: din_fast.distributed imports the modules, which import this one.
    from .distributed import _resolve_group
    return {"process_group": _resolve_group(process_group)}


def _check_mlp(embedding_dim: int, weights: Sequence[Tensor], biases: Sequence[Tensor], activation: str,
               act_params: Optional[Sequence[Sequence[Tensor]]], like: Tensor) -> tuple:
    V.check_choice("activation", activation, V.ACTIVATIONS)
    if len(weights) < 2 or len(weights) != len(biases):
        raise ValueError(f"weights and biases must be sequences of equal length >= 2 (hidden layers and the score "
                         f"layer), got {len(weights)} weights and {len(biases)} biases")
    fan_in = 4 * embedding_dim
    for i, (w, b) in enumerate(zip(weights, biases)):
        V.check_tensor(f"weights[{i}]", w, ndim=(2,), floating=True)
        V.check_tensor(f"biases[{i}]", b, ndim=(1,), floating=True)
        if w.shape[1] != fan_in:
            raise ValueError(f"weights[{i}] must have shape [out, {fan_in}], got {tuple(w.shape)}"
                             + (" (the first layer takes the 4 * D features [q, k, q-k, q*k])" if i == 0 else ""))
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"biases[{i}] must have shape [{w.shape[0]}], got {tuple(b.shape)}")
        if w.device != like.device or b.device != like.device:
            raise ValueError(f"weights[{i}] and biases[{i}] must be on {like.device} like keys, "
                             f"got {w.device} and {b.device}")
        if w.dtype != like.dtype or b.dtype != like.dtype:
            raise TypeError(f"weights[{i}] and biases[{i}] must have keys' dtype {like.dtype}, "
                            f"got {w.dtype} and {b.dtype}")
        fan_in = w.shape[0]
    if weights[-1].shape[0] != 1:
        raise ValueError(f"the last layer must output one score, got weights[-1] of shape {tuple(weights[-1].shape)}")
    hidden = [w.shape[0] for w in weights[:-1]]
    # Dice: (alpha, running_mean, running_var), plus (weight, bias) for the affine gate.
    arities = {"sigmoid": (0,), "relu": (0,), "prelu": (1,), "dice": (3, 5)}[activation]
    if act_params is None:
        if arities[0]:
            raise ValueError(f"activation={activation!r} needs act_params, one tuple per hidden layer")
        return tuple(() for _ in hidden)
    if len(act_params) != len(hidden):
        raise ValueError(f"act_params must hold one tuple per hidden layer ({len(hidden)}), got {len(act_params)}")
    expected = " or ".join(str(n) for n in arities)
    for i, (params, width) in enumerate(zip(act_params, hidden)):
        if len(params) not in arities or len(params) != len(act_params[0]):
            raise ValueError(f"act_params[{i}] must hold {expected} tensors for activation={activation!r}, the same "
                             f"number in every layer, got {len(params)}")
        for j, p in enumerate(params):
            if p is None:
                raise TypeError(f"act_params[{i}][{j}] must be a tensor, got None")
            sizes = (width, 1) if activation == "prelu" else (width,)
            # Dice's running statistics may stay float32 with 16-bit inputs, as BatchNorm's may.
            statistics = activation == "dice" and j in (1, 2)
            _check_channel_vector(f"act_params[{i}][{j}]", p, width, like, sizes, same_dtype=not statistics)
    return tuple(tuple(p) for p in act_params)


def _check_query_keys(query: Tensor, keys: Tensor) -> Tensor:
    V.check_tensor("query", query, ndim=(2, 3), floating=True)
    V.check_tensor("keys", keys, ndim=(3,), floating=True)
    if query.dim() == 3:
        if query.shape[1] != 1:
            raise ValueError(f"query must have shape [B, D] or [B, 1, D], got {tuple(query.shape)}")
        query = query[:, 0]
    if query.shape[0] != keys.shape[0]:
        raise ValueError(f"query and keys must share the batch size B, got query {tuple(query.shape)} "
                         f"and keys {tuple(keys.shape)}")
    if query.shape[1] != keys.shape[2]:
        raise ValueError(f"query and keys must share the embedding size D, got query {tuple(query.shape)} "
                         f"and keys {tuple(keys.shape)}")
    V.check_same_device(query=query, keys=keys)
    V.check_same_dtype(query=query, keys=keys)
    return query


def attention_pooling(query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                      lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None, activation: str = "sigmoid",
                      act_params: Optional[Sequence[Sequence[Tensor]]] = None, normalization: str = "none",
                      softmax_scale: float = 1.0, dice_stats: str = "valid", training: bool = False,
                      momentum: float = 0.1, eps: float = 1e-8, process_group=None, backend: str = "auto"
                      ) -> Tuple[Tensor, Tensor]:
    """DIN attention pooling; see ``din_fast.reference.attention_pooling`` for the math.

    Args:
        query: ``[B, D]`` or ``[B, 1, D]``; keys: ``[B, T, D]``, same floating dtype and device.
        weights, biases: the MLP in ``nn.Linear`` layout, first layer ``[H1, 4D]``, last ``[1, H_n]``.
        lengths: ``[B]`` or ``[B, 1]`` ints in ``[0, T]``; or mask: ``[B, T]`` bool; or neither.
        process_group: with Dice in training, synchronizes its statistics over the group's ranks
            (see ``dice``).

    Returns:
        ``(pooled [B, D], weights [B, T])``.
    """
    query = _check_query_keys(query, keys)
    batch, seq_len, dim = keys.shape
    lengths, mask = V.check_lengths_or_mask(lengths, mask, batch, seq_len, keys.device)
    act_params = _check_mlp(dim, weights, biases, activation, act_params, keys)
    V.check_choice("normalization", normalization, V.NORMALIZATIONS)
    V.check_choice("dice_stats", dice_stats, V.DICE_STATS)
    V.check_positive_float("softmax_scale", softmax_scale)
    V.check_momentum(momentum)
    V.check_positive_float("eps", eps)
    group = _training_process_group(process_group if activation == "dice" else None, training)
    backend = resolve_backend(backend, keys.device, "attention_pooling", keys.dtype,
                              _SYNC_UNSUPPORTED if group else _attention_kernel_unsupported(seq_len, dim, weights))
    return get_op(backend, "attention_pooling")(
        query, keys, tuple(weights), tuple(biases), lengths=lengths, mask=mask, activation=activation,
        act_params=act_params, normalization=normalization, softmax_scale=float(softmax_scale),
        dice_stats=dice_stats, training=training, momentum=momentum, eps=eps, **group)


def local_activation_scores(query: Tensor, keys: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                            activation: str = "sigmoid", act_params: Optional[Sequence[Sequence[Tensor]]] = None,
                            training: bool = False, momentum: float = 0.1, eps: float = 1e-8, process_group=None,
                            backend: str = "auto") -> Tensor:
    """The activation unit's raw scores ``[B, T]`` for query ``[B, D]`` (or ``[B, 1, D]``) and keys
    ``[B, T, D]``; every position counts as valid (Dice statistics over all ``B * T``)."""
    _, scores = attention_pooling(query, keys, weights, biases, activation=activation, act_params=act_params,
                                  normalization="none", dice_stats="all", training=training, momentum=momentum,
                                  eps=eps, process_group=process_group, backend=backend)
    return scores


def score_candidates(history: Tensor, candidates: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], *,
                     activation: str = "sigmoid", act_params: Optional[Sequence[Sequence[Tensor]]] = None,
                     normalization: str = "none", softmax_scale: float = 1.0, eps: float = 1e-8,
                     backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Serving: one user's ``history`` ``[T, D]`` against ``candidates`` ``[C, D]`` with inference
    semantics; the history is never copied per candidate.

    Returns ``(pooled [C, D], weights [C, T])``.
    """
    V.check_tensor("history", history, ndim=(2,), floating=True)
    V.check_tensor("candidates", candidates, ndim=(2,), floating=True)
    if history.shape[1] != candidates.shape[1]:
        raise ValueError(f"history [T, D] and candidates [C, D] must share D, got {tuple(history.shape)} "
                         f"and {tuple(candidates.shape)}")
    V.check_same_device(history=history, candidates=candidates)
    V.check_same_dtype(history=history, candidates=candidates)
    act_params = _check_mlp(history.shape[1], weights, biases, activation, act_params, history)
    V.check_choice("normalization", normalization, V.NORMALIZATIONS)
    V.check_positive_float("softmax_scale", softmax_scale)
    V.check_positive_float("eps", eps)
    backend = resolve_backend(backend, history.device, "score_candidates", history.dtype,
                              _attention_kernel_unsupported(*history.shape, weights))
    op = get_op(backend, "score_candidates")
    return op(history, candidates, tuple(weights), tuple(biases), activation=activation, act_params=act_params,
              normalization=normalization, softmax_scale=float(softmax_scale), eps=eps)


def check_counts(counts: Tensor, num_rows: int, like: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """``counts``: ``[K]`` feature frequencies ``n_j >= 1`` on ``like``'s device.

    With ``rows`` (int ids), only those entries' values are checked, so that a per-batch check
    costs the batch's size, never ``K``.
    """
    V.check_tensor("counts", counts, ndim=(1,))
    if counts.shape[0] != num_rows:
        raise ValueError(f"counts must have shape [{num_rows}] (one per table row), got {tuple(counts.shape)}")
    if counts.device != like.device:
        raise ValueError(f"counts must be on {like.device} like weight, got {counts.device}")
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"counts must be a real tensor, got {counts.dtype}")
    checked = counts if rows is None else counts.index_select(0, rows.reshape(-1).long())
    # ">= 1 everywhere", not "min < 1": a NaN count fails the first and passes the second.
    if checked.numel() and V.values_checkable() and not bool((checked >= 1).all()):
        raise ValueError(f"counts must be >= 1 (n_j counts occurrences; unseen ids count as 1), "
                         f"got minimum {float(checked.min())}")
    return counts


def mba_penalty(weight: Tensor, ids: Tensor, counts: Tensor, lam: float, *, backend: str = "auto") -> Tensor:
    """Mini-batch aware L2 penalty ``lam / 2 * sum_{j in unique(ids)} ||w_j||^2 / n_j``.

    Args:
        weight: ``[K, D]`` embedding table (floating).
        ids: ids of any shape (int32/int64) in ``[0, K)``: the rows the batch looks up.
        counts: ``[K]`` feature frequencies ``n_j >= 1``.
        lam: regularization strength ``lambda >= 0``.

    Returns:
        A scalar; its gradient is ``lam * w_j / n_j`` on the batch's rows and 0 elsewhere.
    """
    V.check_tensor("weight", weight, ndim=(2,), floating=True)
    V.check_tensor("ids", ids)
    V.check_same_device(weight=weight, ids=ids)
    V.check_index_tensor("ids", ids, weight.shape[0])
    check_counts(counts, weight.shape[0], weight, rows=ids)
    V.check_positive_float("lam", lam, allow_zero=True)
    op = get_op(resolve_backend(backend, weight.device, "mba_penalty", weight.dtype), "mba_penalty")
    return op(weight, ids, counts, float(lam))
