"""BatchNorm's running-statistics update, shared by every backend's Dice."""

from __future__ import annotations

from typing import Optional

import torch

from ._numerics import compute_dtype


def update_running_stats(running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, momentum: float) -> None:
    """In place: ``r <- (1 - momentum) r + momentum * stat``, with the unbiased variance
    ``var * n / (n - 1)`` (``var`` is the biased one over ``n = count`` positions). A batch with
    no valid position (``count == 0``) leaves both untouched; decided on device, no host sync.
    """
    if running_mean is None:
        return
    with torch.no_grad():
        # At least float32: a count over 65504 is inf in float16.
        var = var.to(compute_dtype(var.dtype))
        count = count.to(var.dtype)
        unbiased = var * count / (count - 1).clamp(min=1)
        seen = count > 0
        new_mean = (1 - momentum) * running_mean + momentum * mean.to(running_mean.dtype)
        new_var = (1 - momentum) * running_var + momentum * unbiased.to(running_var.dtype)
        running_mean.copy_(torch.where(seen, new_mean, running_mean))
        running_var.copy_(torch.where(seen, new_var, running_var))
