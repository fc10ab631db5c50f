"""Argument checks shared by the functional API and the modules.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
range, device or option) with a message that names the argument and what was expected, so that
bad input never reaches a kernel.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence, Tuple

import torch

ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
NORMALIZATIONS = ("none", "softmax")
DICE_STATS = ("valid", "all")


# Set to "0" to skip the range checks that read tensor values: each waits for the GPU (a host
# sync), which keeps the host from queueing work ahead of it.
VALUE_CHECKS_ENV_VAR = "DIN_FAST_VALUE_CHECKS"


def values_checkable() -> bool:
    """Whether range checks may read tensor values: not when ``DIN_FAST_VALUE_CHECKS=0``, nor
    while ``torch.compile`` traces (a data-dependent check would break the graph), nor while a
    CUDA graph is captured (no host sync)."""
    if os.environ.get(VALUE_CHECKS_ENV_VAR, "1") == "0" or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def value_range(values: torch.Tensor) -> Tuple[int, int]:
    """``(min, max)`` of a non-empty integer tensor as Python ints, read in one host sync."""
    return tuple(torch.stack(torch.aminmax(values)).tolist())


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_tensor(name: str, value, *, ndim: Optional[Iterable[int]] = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = tuple(ndim)
        if value.dim() not in allowed:
            shapes = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name} must be {shapes}, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_same_dtype(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {v.dtype for v in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k} is {v.dtype}" for k, v in present.items())
        raise TypeError(f"floating-point inputs must share one dtype, got {listing}")


def check_positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if value != value or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    # A comparison, not math.isfinite: torch.compile traces it on a symbolic float.
    if value == math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_momentum(momentum) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return float(momentum)


def check_hidden_units(hidden_units) -> tuple:
    if isinstance(hidden_units, int) or not isinstance(hidden_units, Sequence) or len(hidden_units) == 0:
        raise ValueError(f"hidden_units must be a non-empty sequence of positive ints, got {hidden_units!r}")
    for h in hidden_units:
        if isinstance(h, bool) or not isinstance(h, int) or h <= 0:
            raise ValueError(f"hidden_units must be a non-empty sequence of positive ints, got {hidden_units!r}")
    return tuple(hidden_units)


def check_index_tensor(name: str, ids, num_rows: int) -> torch.Tensor:
    """ids: integer tensor of any shape with every value in [0, num_rows)."""
    check_tensor(name, ids)
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {ids.dtype}")
    if ids.numel() and values_checkable():
        lo, hi = value_range(ids)
        if lo < 0 or hi >= num_rows:
            raise ValueError(f"{name} must lie in [0, {num_rows}), got values in [{lo}, {hi}]")
    return ids


def valid_mask(batch: int, seq_len: int, lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor],
               device: torch.device) -> torch.Tensor:
    """Boolean [B, T] mask of valid positions from checked ``lengths`` [B] or ``mask`` [B, T]."""
    if mask is not None:
        return mask
    if lengths is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    return torch.arange(seq_len, device=device)[None, :] < lengths[:, None]


def check_lengths_or_mask(lengths, mask, batch: int, seq_len: int, device: torch.device):
    """Checks ``lengths`` ([B] or [B, 1], integer, in [0, T]) or ``mask`` ([B, T], bool).

    Returns ``(lengths [B] int64 or None, mask [B, T] bool or None)``.
    """
    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both")
    if lengths is not None:
        check_tensor("lengths", lengths, ndim=(1, 2))
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.dim() == 2:
            if lengths.shape[1] != 1:
                raise ValueError(f"lengths must have shape [B] or [B, 1], got {tuple(lengths.shape)}")
            lengths = lengths[:, 0]
        if lengths.shape[0] != batch:
            raise ValueError(f"lengths must have shape [{batch}] to match keys' batch size, got {tuple(lengths.shape)}")
        if lengths.device != device:
            raise ValueError(f"lengths must be on {device} like keys, got {lengths.device}")
        if lengths.numel() and values_checkable():
            lo, hi = value_range(lengths)
            if lo < 0 or hi > seq_len:
                raise ValueError(f"lengths must lie in [0, {seq_len}] (T = keys.shape[1]), got values in [{lo}, {hi}]")
        return lengths.long(), None
    if mask is not None:
        check_tensor("mask", mask, ndim=(2,))
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != (batch, seq_len):
            raise ValueError(f"mask must have shape [{batch}, {seq_len}] like keys' [B, T], got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask must be on {device} like keys, got {mask.device}")
        return None, mask
    return None, None
