"""Drop-in ``nn.Module``s over ``din_fast.functional``.

Each module holds its parameters and buffers the PyTorch way (``state_dict``, ``train()`` /
``eval()``, ``extra_repr``) and takes a ``backend`` (``"auto"``, ``"triton"``, ``"torch"`` or
``"reference"``; see ``din_fast.backend``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _validation as V
from . import functional
from .backend import BACKENDS

Tensor = torch.Tensor


class Dice(nn.Module):
    """Dice activation (eq. 9): ``f(s) = p(s) s + (1 - p(s)) alpha s``, ``p(s) =
    sigmoid((s - E[s]) / sqrt(Var[s] + eps))``, per channel.

    Training uses the batch's mean and biased variance over all leading positions (or over the
    true positions of ``mask``) and updates ``running_mean`` / ``running_var`` like BatchNorm
    (``momentum``; unbiased running variance); evaluation uses the running statistics.

    Args:
        num_features: channels ``C``.
        eps: added to the variance.
        momentum: weight of the new batch in the running statistics.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0) applied to the
            normalized input before the sigmoid, as the peer libraries' Dice (a ``BatchNorm1d``)
            does; the paper's Dice has none.
        process_group: a ``torch.distributed`` group whose ranks share the training statistics
            (``nn.SyncBatchNorm``'s semantics), or ``din_fast.distributed.WORLD`` for the default
            group (what ``sync_dice_statistics`` sets: unlike the group, it survives
            ``copy.deepcopy`` and pickling); None (the default) keeps them per process. See
            ``din_fast.distributed.sync_dice_statistics``.
        backend: see ``din_fast.backend``.

    Shape:
        x: ``[N, C]`` or ``[N, T, C]``, floating (the triton backend: float32, bfloat16 or
        float16); every backend computes 16-bit inputs in float32; mask: bool ``x.shape[:-1]``;
        output like x, in x's dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1, affine: bool = False,
                 process_group=None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.eps = V.check_positive_float("eps", eps)
        self.momentum = V.check_momentum(momentum)
        self.backend = V.check_choice("backend", backend, BACKENDS)
        factory = dict(device=device, dtype=dtype)
        self.alpha = nn.Parameter(torch.zeros(num_features, **factory))
        self.affine = bool(affine)
        self.process_group = process_group
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        V.check_tensor("x", x, ndim=(2, 3), floating=True)
        if x.shape[-1] != self.num_features:
            raise ValueError(f"x must have {self.num_features} channels in its last dimension (num_features), "
                             f"got shape {tuple(x.shape)}")
        return functional.dice(x, self.alpha, self.running_mean, self.running_var, mask, training=self.training,
                               momentum=self.momentum, eps=self.eps, weight=self.weight, bias=self.bias,
                               process_group=self.process_group, backend=self.backend)

    def parameters_for_mlp(self) -> Tuple[Tensor, ...]:
        """This activation's entry of ``act_params`` (see ``din_fast.reference``)."""
        own = (self.alpha, self.running_mean, self.running_var)
        return own + (self.weight, self.bias) if self.affine else own

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"backend={self.backend!r}")


class LocalActivationUnit(nn.Module):
    """DIN's local activation unit: an MLP on ``[q, k, q - k, q * k]`` giving one score per
    behaviour.

    Args:
        embedding_dim: ``D`` of query and keys.
        hidden_units: widths of the hidden layers (the paper: ``(80, 40)``).
        activation: ``"sigmoid"``, ``"relu"``, ``"prelu"`` (per channel) or ``"dice"``.
        backend: see ``din_fast.backend``.

    Shape:
        query ``[B, D]`` or ``[B, 1, D]``, keys ``[B, T, D]`` -> scores ``[B, T]``. query and keys
        share one floating dtype (the triton backend: float32, bfloat16 or float16), the scores
        have it too; the triton and torch backends compute 16-bit inputs in float32 (the kernels'
        products on them in TF32). Dice's training statistics count every position (use
        ``AttentionPooling`` to exclude padding).
    """

    def __init__(self, embedding_dim: int, hidden_units: Sequence[int] = (80, 40), activation: str = "sigmoid",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        self.embedding_dim = embedding_dim
        self.hidden_units = V.check_hidden_units(hidden_units)
        self.activation = V.check_choice("activation", activation, V.ACTIVATIONS)
        self.backend = V.check_choice("backend", backend, BACKENDS)
        factory = dict(device=device, dtype=dtype)
        widths = (4 * embedding_dim,) + self.hidden_units + (1,)
        self.layers = nn.ModuleList(nn.Linear(a, b, **factory) for a, b in zip(widths[:-1], widths[1:]))
        if activation == "prelu":
            self.activations = nn.ModuleList(nn.PReLU(h, **factory) for h in self.hidden_units)
        elif activation == "dice":
            self.activations = nn.ModuleList(Dice(h, backend=backend, **factory) for h in self.hidden_units)
        else:
            self.activations = None

    def mlp_arguments(self) -> dict:
        """The keyword arguments describing this MLP for ``din_fast.functional``; with Dice, also
        its layers' ``training`` mode, ``momentum``, ``eps`` and ``process_group``, which they
        must share (the fused op takes one of each): a Dice layer set to ``eval()`` alone, as
        one freezes BatchNorm statistics, must not keep updating them."""
        if self.activation == "prelu":
            act_params = tuple((act.weight,) for act in self.activations)
        elif self.activation == "dice":
            act_params = tuple(act.parameters_for_mlp() for act in self.activations)
        else:
            act_params = None
        arguments = dict(weights=tuple(layer.weight for layer in self.layers),
                         biases=tuple(layer.bias for layer in self.layers), activation=self.activation,
                         act_params=act_params)
        if self.activation == "dice":
            settings = [dict(training=act.training, momentum=act.momentum, eps=act.eps,
                             process_group=act.process_group) for act in self.activations]
            for i, layer in enumerate(settings[1:], start=1):
                differing = sorted(name for name in layer if layer[name] is not settings[0][name]
                                   and layer[name] != settings[0][name])
                if differing:
                    raise ValueError(f"the Dice layers of one attention MLP must share training, momentum, eps and "
                                     f"process_group (the fused op takes one of each): activations[{i}] differs "
                                     f"from activations[0] in {differing}")
            arguments.update(settings[0])
        return arguments

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        return functional.local_activation_scores(query, keys, backend=self.backend,
                                                  **{"training": self.training, **self.mlp_arguments()})

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, hidden_units={self.hidden_units}, "
                f"activation={self.activation!r}, backend={self.backend!r}")


class AttentionPooling(nn.Module):
    """DIN's attention pooling (eq. 3): ``v_U(A) = sum_t w_t e_t`` with ``w_t`` from a
    ``LocalActivationUnit``.

    Args:
        embedding_dim, hidden_units, activation: of the activation unit.
        normalization: ``"none"`` (the paper: raw scores as weights) or ``"softmax"`` over the
            valid positions.
        softmax_scale: multiplies the scores before the softmax (1 in the peer libraries,
            ``1/sqrt(D)`` in the authors' released code).
        dice_stats: ``"valid"`` (Dice statistics over valid positions only) or ``"all"`` (over
            every position, padding included, as the peer libraries do).
        backend: see ``din_fast.backend``.

    Shape:
        query ``[B, D]`` or ``[B, 1, D]``; keys ``[B, T, D]``; lengths ``[B]`` or ``[B, 1]`` ints in
        ``[0, T]`` (any integer dtype), or mask ``[B, T]`` bool -> pooled ``[B, D]`` (and weights
        ``[B, T]`` with ``return_scores=True``). query and keys share one floating dtype (the
        triton backend: float32, bfloat16 or float16); the outputs have it too. The triton and
        torch backends compute 16-bit inputs in float32 (the kernels' products on them in TF32;
        the torch backend on a float32 copy of the keys).
    """

    def __init__(self, embedding_dim: int, hidden_units: Sequence[int] = (80, 40), activation: str = "sigmoid",
                 normalization: str = "none", softmax_scale: float = 1.0, dice_stats: str = "valid",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.unit = LocalActivationUnit(embedding_dim, hidden_units, activation, backend, device=device, dtype=dtype)
        self.normalization = V.check_choice("normalization", normalization, V.NORMALIZATIONS)
        self.softmax_scale = V.check_positive_float("softmax_scale", softmax_scale)
        self.dice_stats = V.check_choice("dice_stats", dice_stats, V.DICE_STATS)
        self.backend = backend

    def forward(self, query: Tensor, keys: Tensor, lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                return_scores: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        pooled, weights = functional.attention_pooling(
            query, keys, lengths=lengths, mask=mask, normalization=self.normalization,
            softmax_scale=self.softmax_scale, dice_stats=self.dice_stats, backend=self.backend,
            **{"training": self.training, **self.unit.mlp_arguments()})
        return (pooled, weights) if return_scores else pooled

    def score_candidates(self, history: Tensor, candidates: Tensor,
                         return_scores: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Serving: one user's ``history`` ``[T, D]`` (all valid) against ``candidates`` ``[C, D]``
        -> ``[C, D]`` (and weights ``[C, T]``), always with inference semantics."""
        arguments = self.unit.mlp_arguments()
        for inference_only in ("training", "momentum", "process_group"):
            arguments.pop(inference_only, None)
        pooled, weights = functional.score_candidates(history, candidates, normalization=self.normalization,
                                                      softmax_scale=self.softmax_scale, backend=self.backend,
                                                      **arguments)
        return (pooled, weights) if return_scores else pooled

    def extra_repr(self) -> str:
        return f"normalization={self.normalization!r}, softmax_scale={self.softmax_scale}, " \
               f"dice_stats={self.dice_stats!r}"


class MBARegularizer(nn.Module):
    """Mini-batch aware L2 regularization (eq. 4-7) of an embedding table.

    ``penalty(weight, ids)`` is ``lam / 2 * sum_{j in unique(ids)} ||w_j||^2 / n_j``: each row the
    batch touches counts once, scaled by ``1 / n_j``, its feature frequency over the training set.
    Its gradient, ``lam * w_j / n_j`` on those rows and 0 elsewhere, is exactly eq. 7's term.

    Args:
        counts: ``[K]`` feature frequencies ``n_j >= 1``, any integer or floating dtype (kept
            as a buffer that follows the module's device but keeps its dtype).
        lam: strength ``lambda >= 0``.
        backend: see ``din_fast.backend``.
    """

    def __init__(self, counts: Tensor, lam: float, backend: str = "auto"):
        super().__init__()
        V.check_tensor("counts", counts, ndim=(1,))
        functional.check_counts(counts, counts.shape[0], counts)
        self.lam = V.check_positive_float("lam", lam, allow_zero=True)
        self.backend = V.check_choice("backend", backend, BACKENDS)
        self.register_buffer("counts", counts.clone())

    def penalty(self, weight: Tensor, ids: Tensor) -> Tensor:
        """``weight`` ``[K, D]``, ``ids`` int (any shape) in ``[0, K)`` -> scalar."""
        return functional.mba_penalty(weight, ids, self.counts, self.lam, backend=self.backend)

    forward = penalty

    def _apply(self, fn, recurse=True):
        # Counts follow the module's device, never its dtype: ``model.half()`` would turn
        # n_j = 70000 into inf (no regularization) and bfloat16 n_j = 257 into 256.
        counts = self.counts
        super()._apply(fn, recurse)
        self.counts = counts.to(self.counts.device)
        return self

    def extra_repr(self) -> str:
        return f"num_rows={self.counts.shape[0]}, lam={self.lam}, backend={self.backend!r}"
