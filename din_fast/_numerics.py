"""Numeric rules that the dispatch, the backends and the kernels share, Triton-free so that the
dispatch can apply them without importing Triton."""

from __future__ import annotations

import functools

import torch

# Past the kernels' int32 indexing. Dice: positions (row indices are int32, with room for the last
# chunk's overhang). Attention: strides, and a position's offset within a sample (t * stride; only
# the sample's offset is widened to int64), so also the elements of one sample's keys, T * D.
DICE_KERNEL_MAX_POSITIONS = 2 ** 30
ATTENTION_KERNEL_INDEX_LIMIT = 2 ** 31


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute sums and statistics of ``dtype`` values in: at least float32
    (float16 squares overflow, a count over 256 rounds in bfloat16); float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def autocast_disabled(op):
    """``op`` with autocast off for the device of its first tensor argument (positional ones
    first).

    The backends allocate their buffers and sums in their inputs' dtype (16-bit inputs in
    float32), and autocast would run the products that fill them, and the host-side ones
    around the kernels, in 16 bits. With it off, an op computes under autocast exactly what it
    computes outside it and returns its inputs' dtype.
    """

    @functools.wraps(op)
    def run(*args, **kwargs):
        device_type = next(arg for arg in (*args, *kwargs.values()) if isinstance(arg, torch.Tensor)).device.type
        if not torch.amp.is_autocast_available(device_type):
            return op(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)

    return run
