"""DeepCTR-Torch integration: run a DeepCTR-Torch model's DIN attention and Dice on din_fast.

``patch(model)`` replaces, anywhere inside ``model``, every

* ``deepctr_torch.layers.sequence.AttentionSequencePoolingLayer`` (DIN's and DIEN's attention
  pooling) by ``FastAttentionSequencePoolingLayer``,
* ``deepctr_torch.layers.core.LocalActivationUnit`` by ``FastLocalActivationUnit``,
* ``deepctr_torch.layers.activation.Dice`` by ``FastDice``,

and returns the model. The replacements hold the originals' submodules and ``Parameter``
objects themselves (the ``nn.Linear`` layers, each Dice's ``BatchNorm1d`` ``bn`` and ``alpha``),
so ``model.parameters()`` are the very same tensors (an optimizer built before ``patch`` keeps
working) and the ``state_dict`` keeps its keys and values (a DeepCTR-Torch checkpoint loads into a
patched model and back). Only ``forward`` changes, and it computes what DeepCTR-Torch computes:

* the activation unit is an MLP on ``[q, k, q - k, q * k]`` whose hidden layers use sigmoid, ReLU,
  PReLU or Dice; Dice is DeepCTR's ``BatchNorm1d`` gate (its affine weight and bias, ``eps``,
  ``momentum`` or, with ``momentum=None``, the cumulative average, ``num_batches_tracked``,
  ``track_running_stats``), with batch statistics over every position, padding included;
* padded positions (``arange(T) < keys_length``, or ``mask`` with ``supports_masking``) get
  weight 0; with ``weight_normalization`` the weights are a softmax over the valid positions,
  and a row with no valid position gets DeepCTR's uniform weights ``1 / T`` over all ``T`` keys.

Configurations that din_fast cannot reproduce exactly raise a ``ValueError`` naming the layer's
path and the setting: ``use_bn=True`` in the activation unit's MLP, dropout in training, an
activation other than the four, different Dice settings across the layers of one MLP, a Dice
gate that is not a ``BatchNorm1d``, a ``SyncBatchNorm`` that would synchronize over several
ranks, a subclass of the three layers with its own ``forward`` (it would be lost), and hooks on a
replaced layer or on the submodules it reuses (the fast path reads their weights without calling
them, so a hook such as ``torch.nn.utils.prune``'s would never run).

DeepCTR-Torch is imported when ``patch`` runs, never when din_fast is imported.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import functional
from .._validation import check_choice
from ..backend import BACKENDS

Tensor = torch.Tensor

__all__ = ["patch", "FastAttentionSequencePoolingLayer", "FastLocalActivationUnit", "FastDice"]


def _deepctr_layer_classes() -> Tuple[type, type, type]:
    """``(AttentionSequencePoolingLayer, LocalActivationUnit, Dice)`` from DeepCTR-Torch."""
    try:
        from deepctr_torch.layers.activation import Dice
        from deepctr_torch.layers.core import LocalActivationUnit
        from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer
    except ImportError as err:
        missing = f" (missing module: {err.name})" if err.name else ""
        raise ImportError(
            "din_fast.integrations.deepctr_torch.patch needs DeepCTR-Torch: pip install deepctr-torch "
            f"(it also imports requests without declaring it: pip install requests){missing}") from err
    return AttentionSequencePoolingLayer, LocalActivationUnit, Dice


def _check_batch_norm(bn: nn.Module, where: str) -> None:
    if not isinstance(bn, (nn.BatchNorm1d, nn.SyncBatchNorm)):
        raise ValueError(f"{where}.bn: {type(bn).__name__} is not supported; Dice's gate must be a BatchNorm1d")


def _synchronizes(bn: nn.Module) -> bool:
    """Whether ``bn`` is a ``SyncBatchNorm`` that would reduce its statistics over several ranks."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training) or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size(bn.process_group or torch.distributed.group.WORLD) > 1


def _batch_norm_step(bn: nn.BatchNorm1d, where: str) -> Tuple[bool, Optional[Tensor], Optional[Tensor], float]:
    """What ``bn.forward`` does before normalizing, including its side effect.

    Returns ``(batch_statistics, running_mean, running_var, momentum)``: whether the batch's
    statistics normalize, the running buffers to update (with batch statistics) or to use
    (without), or None, and the factor of the running update. In training with tracked
    statistics it counts the batch in ``num_batches_tracked``, as BatchNorm does.
    """
    _check_batch_norm(bn, where)
    if _synchronizes(bn):
        raise ValueError(f"{where}.bn: SyncBatchNorm synchronizing its statistics over several ranks is not "
                         f"supported by the DeepCTR-Torch patch")
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            # BatchNorm's cumulative moving average; it reads the counter on the host too.
            momentum = 1.0 / float(bn.num_batches_tracked)
    batch_statistics = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if keep_running else None
    running_var = bn.running_var if keep_running else None
    return batch_statistics, running_mean, running_var, momentum


def _check_values_per_channel(batch_statistics: bool, positions: int, where: str) -> None:
    # BatchNorm refuses to normalize a single value by its own statistics.
    if batch_statistics and positions == 1:
        raise ValueError(f"{where}: Expected more than 1 value per channel when training (BatchNorm1d), "
                         f"got {positions}")


def _dice_act_params(dice: "FastDice", running_mean: Optional[Tensor],
                     running_var: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """One Dice's entry of din_fast's ``act_params``; the affine gate when ``bn`` has one."""
    own = (dice.alpha.view(-1), running_mean, running_var)
    return own + (dice.bn.weight, dice.bn.bias) if dice.bn.affine else own


class FastDice(nn.Module):
    """DeepCTR-Torch's ``Dice`` computed by ``din_fast.functional.dice``.

    Keeps the original's ``alpha`` (``[C]`` for ``dim=2``, ``[C, 1]`` for ``dim=3``) and ``bn``
    (``BatchNorm1d``: the gate ``sigmoid(bn(x))``, its statistics and running buffers).

    Shape:
        ``dim=2``: ``[B, C]``; ``dim=3``: ``[B, T, C]`` (statistics over ``B * T`` per channel).
        Output like the input.
    """

    def __init__(self, original: nn.Module, path: str, backend: str = "auto"):
        super().__init__()
        self.alpha = original.alpha
        self.bn = original.bn
        self.dim = original.dim
        self.path = path
        self.backend = backend
        _check_batch_norm(self.bn, path)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.dim:
            raise ValueError(f"{self.path}: Dice(dim={self.dim}) takes {self.dim}-D input, got shape {tuple(x.shape)}")
        batch_statistics, running_mean, running_var, momentum = _batch_norm_step(self.bn, self.path)
        _check_values_per_channel(batch_statistics, x.numel() // max(x.shape[-1], 1), self.path)
        alpha, running_mean, running_var, *affine = _dice_act_params(self, running_mean, running_var)
        weight, bias = affine or (None, None)
        return functional.dice(x, alpha, running_mean, running_var, training=batch_statistics, momentum=momentum,
                               eps=self.bn.eps, weight=weight, bias=bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend!r}"


_POINTWISE_ACTIVATIONS = ((nn.Sigmoid, "sigmoid"), (nn.ReLU, "relu"), (nn.PReLU, "prelu"))


def _activation_kind(layer: nn.Module, where: str) -> str:
    if isinstance(layer, FastDice):
        if layer.dim != 3:
            raise ValueError(f"{where}: Dice(dim={layer.dim}) inside the activation unit, whose hidden layers are "
                             f"[B, T, H]; only dice_dim=3 runs there (DeepCTR-Torch fails on it too)")
        return "dice"
    for cls, kind in _POINTWISE_ACTIVATIONS:
        if type(layer) is cls:
            return kind
    raise ValueError(f"{where}: activation {type(layer).__name__} is not supported; din_fast reproduces "
                     f"'sigmoid', 'relu', 'prelu' and 'dice' in the activation unit")


def _bias(linear: nn.Linear) -> Tensor:
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)


class FastLocalActivationUnit(nn.Module):
    """DeepCTR-Torch's ``LocalActivationUnit`` computed by din_fast's folded activation unit.

    Keeps the original's ``dnn`` (its ``linears`` and ``activation_layers``, Dice replaced by
    ``FastDice``) and ``dense`` (the score layer).

    Shape:
        query ``[B, 1, E]``, user_behavior ``[B, T, E]`` -> scores ``[B, T, 1]``.
    """

    def __init__(self, original: nn.Module, path: str, backend: str = "auto"):
        super().__init__()
        self.dnn = original.dnn
        self.dense = original.dense
        self.path = path
        self.backend = backend
        self.activation_kind()

    def activation_kind(self) -> str:
        """The hidden layers' activation (one of din_fast's); raises ``ValueError`` on any MLP that
        din_fast cannot reproduce."""
        dnn = self.dnn
        if getattr(dnn, "use_bn", False):
            raise ValueError(f"{self.path}.dnn: use_bn=True (BatchNorm1d before each activation) is not supported "
                             f"in the activation unit; build it with use_bn=False")
        if len(dnn.linears) != len(dnn.activation_layers):
            raise ValueError(f"{self.path}.dnn: {len(dnn.linears)} linears but {len(dnn.activation_layers)} "
                             f"activation_layers")
        kinds = [_activation_kind(layer, f"{self.path}.dnn.activation_layers.{i}")
                 for i, layer in enumerate(dnn.activation_layers)]
        if len(set(kinds)) != 1:
            raise ValueError(f"{self.path}.dnn.activation_layers: one activation for every hidden layer is "
                             f"supported, got {kinds}")
        if kinds[0] == "dice":
            settings = {(layer.bn.eps, layer.bn.affine) for layer in dnn.activation_layers}
            if len(settings) != 1:
                raise ValueError(f"{self.path}.dnn.activation_layers: every Dice of one activation unit must share "
                                 f"bn.eps and bn.affine, got (eps, affine) {sorted(settings)}")
        return kinds[0]

    def mlp_arguments(self, positions: int) -> dict:
        """Keyword arguments of ``din_fast.functional.attention_pooling`` describing this MLP for
        one forward pass over ``positions`` (``B * T``) rows. With Dice in training this counts
        the batch in each ``bn.num_batches_tracked``, as BatchNorm's forward does."""
        activation = self.activation_kind()
        dropout = getattr(self.dnn, "dropout", None)
        if dropout is not None and dropout.training and dropout.p > 0:
            raise ValueError(f"{self.path}.dnn: dropout_rate={dropout.p} in training is not supported in the "
                             f"activation unit; use dropout_rate=0 (or evaluation mode)")
        linears = list(self.dnn.linears) + [self.dense]
        arguments = dict(weights=tuple(linear.weight for linear in linears),
                         biases=tuple(_bias(linear) for linear in linears), activation=activation)
        layers = self.dnn.activation_layers
        if activation == "prelu":
            arguments["act_params"] = tuple((layer.weight,) for layer in layers)
        if activation != "dice":
            return arguments
        steps = [_batch_norm_step(layer.bn, layer.path) for layer in layers]
        modes = {(batch_statistics, momentum) for batch_statistics, _, _, momentum in steps}
        if len(modes) != 1:
            raise ValueError(f"{self.path}.dnn.activation_layers: every Dice of one activation unit must be in the "
                             f"same mode with the same momentum this step, got (training, momentum) {sorted(modes)}")
        ((batch_statistics, momentum),) = modes
        _check_values_per_channel(batch_statistics, positions, f"{self.path}.dnn.activation_layers")
        arguments.update(act_params=tuple(_dice_act_params(layer, *step[1:3]) for layer, step in zip(layers, steps)),
                         training=batch_statistics, momentum=momentum, eps=layers[0].bn.eps)
        return arguments

    def forward(self, query: Tensor, user_behavior: Tensor) -> Tensor:
        if query.dim() != 3 or query.shape[1] != 1:
            raise ValueError(f"{self.path}: query must have shape [B, 1, E] (one candidate per sample), "
                             f"got {tuple(query.shape)}")
        arguments = self.mlp_arguments(user_behavior.shape[0] * user_behavior.shape[1])
        scores = functional.local_activation_scores(query, user_behavior, backend=self.backend, **arguments)
        return scores.unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FastAttentionSequencePoolingLayer(nn.Module):
    """DeepCTR-Torch's ``AttentionSequencePoolingLayer`` computed by
    ``din_fast.functional.attention_pooling``.

    Keeps the original's ``local_att`` (a ``FastLocalActivationUnit``), ``weight_normalization``,
    ``return_score`` and ``supports_masking``.

    Shape:
        query ``[B, 1, E]``, keys ``[B, T, E]``, keys_length ``[B]`` or ``[B, 1]`` (any real dtype:
        position ``t`` is valid when ``t < keys_length``), or with ``supports_masking`` a bool
        ``mask`` ``[B, T]`` -> ``[B, 1, E]``, or the weights ``[B, 1, T]`` with ``return_score``.
    """

    def __init__(self, original: nn.Module, path: str, backend: str = "auto"):
        super().__init__()
        if not isinstance(original.local_att, FastLocalActivationUnit):
            raise ValueError(f"{path}.local_att: {type(original.local_att).__name__} is not DeepCTR-Torch's "
                             f"LocalActivationUnit")
        self.local_att = original.local_att
        self.weight_normalization = original.weight_normalization
        self.return_score = original.return_score
        self.supports_masking = original.supports_masking
        self.path = path
        self.backend = backend

    def forward(self, query: Tensor, keys: Tensor, keys_length: Optional[Tensor], mask: Optional[Tensor] = None
                ) -> Tensor:
        batch, max_length, _ = keys.shape
        if self.supports_masking:
            if mask is None:
                raise ValueError("When supports_masking=True,input must support masking")
            valid = mask
        else:
            positions = torch.arange(max_length, device=keys_length.device, dtype=keys_length.dtype)
            valid = (positions[None, :] < keys_length.view(-1, 1)).expand(batch, max_length)
        if query.dim() != 3 or query.shape[1] != 1:
            raise ValueError(f"{self.path}: query must have shape [B, 1, E] (one candidate per sample), "
                             f"got {tuple(query.shape)}")
        arguments = self.local_att.mlp_arguments(batch * max_length)
        pooled, weights = functional.attention_pooling(
            query, keys, mask=valid, normalization="softmax" if self.weight_normalization else "none",
            dice_stats="all", backend=self.backend, **arguments)
        if self.weight_normalization:
            # DeepCTR's softmax over a row whose every score is the padding value -2**32 + 1 is
            # uniform over all T keys, padding included; din_fast's gives such a row no weight.
            empty = ~valid.any(dim=1, keepdim=True)
            weights = torch.where(empty, weights.new_full((), 1.0 / max_length), weights)
            if not self.return_score:
                pooled = torch.where(empty, keys.mean(dim=1), pooled)
        return weights.unsqueeze(1) if self.return_score else pooled.unsqueeze(1)

    def extra_repr(self) -> str:
        return (f"weight_normalization={self.weight_normalization}, return_score={self.return_score}, "
                f"supports_masking={self.supports_masking}")


def patch(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replaces DeepCTR-Torch's ``AttentionSequencePoolingLayer``, ``LocalActivationUnit`` and
    ``Dice`` anywhere inside ``model`` (``model`` itself included) by din_fast-backed modules with
    the same parameters, buffers and semantics (see the module docstring).

    Args:
        model: any ``nn.Module``; changed in place.
        backend: din_fast backend of the replacements (``"auto"``, ``"triton"``, ``"torch"`` or
            ``"reference"``; see ``din_fast.backend``).

    Returns:
        ``model``, or its replacement when ``model`` itself is one of those layers.

    Raises:
        ImportError: DeepCTR-Torch is not installed.
        ValueError: a layer's configuration cannot be reproduced exactly (the message names its
            path and the setting); ``model`` is then left as it was.
    """
    check_choice("backend", backend, BACKENDS)
    classes = _deepctr_layer_classes()
    undo: List[Tuple[nn.Module, str, nn.Module]] = []
    try:
        return _patched(model, "", classes, backend, {}, undo)
    except Exception:
        for parent, name, child in reversed(undo):
            setattr(parent, name, child)
        raise


def _patched(module: nn.Module, path: str, classes: Tuple[type, type, type], backend: str,
             done: Dict[int, nn.Module], undo: List[Tuple[nn.Module, str, nn.Module]]) -> nn.Module:
    """``module`` with its descendants patched first (a Dice before the activation unit holding
    it), or its replacement. ``done`` maps already handled modules (by id) to their result, so a
    module shared by several parents gets one replacement."""
    if id(module) in done:
        return done[id(module)]
    # Every name, not named_children(): it yields a module registered twice under one parent once.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        replacement = _patched(child, f"{path}.{name}" if path else name, classes, backend, done, undo)
        if replacement is not child:
            setattr(module, name, replacement)
            undo.append((module, name, child))
    where = path or type(module).__name__
    result = module
    for cls, fast in zip(classes, (FastAttentionSequencePoolingLayer, FastLocalActivationUnit, FastDice)):
        if isinstance(module, cls):
            if type(module).forward is not cls.forward:
                raise ValueError(f"{where}: {type(module).__name__} overrides the forward of DeepCTR-Torch's "
                                 f"{cls.__name__}, which the din_fast replacement would lose")
            _refuse_hooks(module, where)
            result = fast(module, where, backend)
    done[id(module)] = result
    return result


def _refuse_hooks(layer: nn.Module, where: str) -> None:
    """The fast path calls neither ``layer`` nor the submodules it reuses, so their hooks
    (pruning's, weight normalization's) would silently stop running: refuse them."""
    for name, module in layer.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
                or module._backward_pre_hooks:
            raise ValueError(f"{where}{'.' + name if name else ''}: has forward or backward hooks, which the "
                             "din_fast replacement would not run")
