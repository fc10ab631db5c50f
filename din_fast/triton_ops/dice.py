"""Dice on the Triton kernels of ``din_fast.kernels.dice``, as torch.library custom ops.

``din_fast::dice_forward`` (functional: it returns the updated running statistics, which ``dice``
copies into the buffers) and ``din_fast::dice_backward`` carry fake (meta) implementations and an
autograd formula, so ``torch.compile`` traces ``dice`` as one opaque node per direction, without
graph breaks. The forward saves only ``x``, the mask, ``alpha``, the optional affine ``weight`` and
``bias``, the per-channel fp32 mean and variance and the valid count; the backward recomputes the
gate.
"""

# No `from __future__ import annotations`: torch.library reads the custom ops' schemas from the
# annotations at runtime.
import math
from typing import Optional, Tuple

import torch

from din_fast.kernels import dice as _k
from din_fast.kernels._jit import is_aligned

Tensor = torch.Tensor

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: Tensor) -> Tensor:
    """``t`` (contiguous), copied where its data does not start on a 16-byte boundary (a view
    at an offset): the kernels take only aligned pointers."""
    return t if is_aligned(t) else t.clone()


def _flat_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """bool ``[...]`` -> contiguous, aligned uint8 ``[M]`` (the kernels' mask layout), or None."""
    if mask is None:
        return None
    return _aligned(mask.reshape(-1).contiguous().view(torch.uint8))


def _as_2d(x: Tensor) -> Tensor:
    """``[..., C]`` -> contiguous, aligned ``[M, C]`` (explicit M: ``reshape(-1, 0)`` is ambiguous)."""
    return _aligned(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous())


def _fp32(vector: Optional[Tensor]) -> Optional[Tensor]:
    return None if vector is None else _aligned(vector.to(torch.float32).contiguous())


@torch.library.custom_op("din_fast::dice_forward", mutates_args=())
def _dice_forward(x: Tensor, alpha: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  mask: Optional[Tensor], training: bool, momentum: float, eps: float, weight: Optional[Tensor],
                  bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y [..., C] x.dtype, mean [C], var [C], count [1] int32, new_running_mean [C],
    new_running_var [C])``, all statistics fp32: the ones the output used (batch or running), the
    number of valid positions, and the updated running statistics (unchanged copies in inference
    or for an empty selection; scratch when untracked). Functional, so that autograd can be
    registered: ``dice`` copies the new running statistics into the buffers."""
    channels = x.shape[-1]
    x2d = _as_2d(x)
    alpha32 = _fp32(alpha)
    affine = dict(weight=_fp32(weight), bias=_fp32(bias))
    if running_mean is None:
        new_mean = torch.zeros(channels, dtype=torch.float32, device=x.device)
        new_var = torch.zeros(channels, dtype=torch.float32, device=x.device)
    else:
        new_mean = running_mean.to(torch.float32, copy=True).contiguous()
        new_var = running_var.to(torch.float32, copy=True).contiguous()
    if not training:
        mean, var = new_mean.clone(), new_var.clone()
        y = _k.dice_forward_inference(x2d, alpha32, mean, var, eps, **affine)
        return y.view(x.shape), mean, var, torch.zeros(1, dtype=torch.int32, device=x.device), new_mean, new_var
    y, mean, var, count = _k.dice_forward_training(x2d, alpha32, _flat_mask(mask), new_mean, new_var, momentum, eps,
                                                   **affine)
    return y.view(x.shape), mean, var, count, new_mean, new_var


@_dice_forward.register_fake
def _dice_forward_fake(x, alpha, running_mean, running_var, mask, training, momentum, eps, weight, bias):
    channels = x.shape[-1]
    stats = [x.new_empty(channels, dtype=torch.float32) for _ in range(4)]
    # Contiguous like the real op's output, whatever x's strides.
    return x.new_empty(x.shape), stats[0], stats[1], x.new_empty(1, dtype=torch.int32), stats[2], stats[3]


@torch.library.custom_op("din_fast::dice_backward", mutates_args=())
def _dice_backward(grad: Tensor, x: Tensor, alpha: Tensor, mask: Optional[Tensor], mean: Tensor, var: Tensor,
                   count: Tensor, training: bool, eps: float, weight: Optional[Tensor], bias: Optional[Tensor]
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx [..., C] x.dtype, dalpha [C] alpha.dtype, dweight [C] weight.dtype, dbias [C]
    bias.dtype)``; without the affine gate dweight and dbias are empty (a custom op cannot return
    None)."""
    x2d = _as_2d(x)
    grad2d = _as_2d(grad.to(x.dtype))
    dx, dalpha, dweight, dbias = _k.dice_backward(x2d, grad2d, _fp32(alpha), _flat_mask(mask), _aligned(mean),
                                                  _aligned(var), _aligned(count), training, eps, weight=_fp32(weight),
                                                  bias=_fp32(bias))
    if weight is None:
        return dx.view(x.shape), dalpha.to(alpha.dtype), x.new_empty(0), x.new_empty(0)
    return dx.view(x.shape), dalpha.to(alpha.dtype), dweight.to(weight.dtype), dbias.to(bias.dtype)


@_dice_backward.register_fake
def _dice_backward_fake(grad, x, alpha, mask, mean, var, count, training, eps, weight, bias):
    if weight is None:
        return x.new_empty(x.shape), alpha.new_empty(alpha.shape), x.new_empty(0), x.new_empty(0)
    return x.new_empty(x.shape), alpha.new_empty(alpha.shape), weight.new_empty(weight.shape), \
        bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, alpha, _, _, mask, training, _, eps, weight, bias = inputs
    _, mean, var, count, _, _ = output
    ctx.save_for_backward(x, alpha, mask, mean, var, count, weight, bias)
    ctx.training = training
    ctx.eps = eps


def _backward(ctx, grad_y, *_statistics_grads):
    x, alpha, mask, mean, var, count, weight, bias = ctx.saved_tensors
    dx, dalpha, dweight, dbias = _dice_backward(grad_y, x, alpha, mask, mean, var, count, ctx.training, ctx.eps,
                                                weight, bias)
    if weight is None:
        dweight = dbias = None
    return dx, dalpha, None, None, None, None, None, None, dweight, dbias


torch.library.register_autograd("din_fast::dice_forward", _backward, setup_context=_setup_context)


def dice(x: Tensor, alpha: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
         mask: Optional[Tensor] = None, *, training: bool, momentum: float = 0.1, eps: float = 1e-8,
         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """Dice with the fused kernels; same signature and semantics as ``din_fast.reference.dice``.

    Args:
        x: ``[..., C]`` float32, bfloat16 or float16 (statistics are fp32 whatever the dtype).
        alpha: ``[C]``.
        running_mean, running_var: ``[C]``, updated in place when ``training`` (unless the mask
            selects nothing); may be None in training, required in inference.
        mask: optional bool ``x.shape[:-1]``: the positions that count in the batch statistics.
        weight, bias: optional ``[C]``, given together: the affine gate
            ``p = sigmoid(weight * (x - mean) / sqrt(var + eps) + bias)``.

    Returns:
        ``[..., C]`` in x's dtype.
    """
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16 for the triton backend, got {x.dtype} "
                        "(use backend='torch' or 'reference')")
    y, _, _, _, new_mean, new_var = _dice_forward(x, alpha, running_mean, running_var, mask, bool(training),
                                                  float(momentum), float(eps), weight, bias)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y
