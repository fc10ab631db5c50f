"""Floating-point operations and minimum memory traffic of each benchmarked op, and the lower-bound
time they imply on a GPU.

Counts follow the computation as the fast paths do it, with the first layer folded, not the
literal concat form:

* attention pooling, per sample: the folded first layer's ``M_b = (Wk - Wd)^T + diag(q) Wp^T``
  (``D * H1`` multiply-adds) and ``u_b = q (Wq + Wd)^T + b1`` (``D * H1``); per behaviour:
  ``k M_b`` (``D * H1``), the bias and activation of each hidden layer, the later layers
  (``H_{i-1} * H_i``), the score layer and the weighted sum of the keys (``D``). A multiply-add
  counts 2 FLOPs, an activation counts ``ACTIVATION_FLOPS`` per element.
* backward: twice the forward (each product has an input gradient and a weight gradient of the
  same size), so forward + backward is 3x forward; recomputation is not counted (it is the
  implementation's choice, not work the op requires).
* bytes: every input read once and every output written once per pass, in the benchmark's dtype
  (parameter gradients in fp32). A forward + backward is two passes, so the keys are read twice.
* MBA step: the sparse minimum (the batch's ids and gradient rows, the unique rows of the table
  read and written), whatever the provider does; a dense provider's fraction shows how far off it is.

The lower bound on a device is ``max(flops / peak_flops, bytes / bandwidth)``; the achieved
fraction of a measured time ``t`` is ``lower_bound / t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch

ACTIVATION_FLOPS = {"sigmoid": 4, "relu": 1, "prelu": 2, "dice": 8}
# Dice per element: statistics (~3) and the gate and blend (~12) forward; about 20 backward.
_DICE_FWD_FLOPS = 15
_DICE_BWD_FLOPS = 20


@dataclass(frozen=True)
class DeviceCeiling:
    """Datasheet ceilings: bandwidth in bytes/s, dense FLOP/s per math mode."""

    name: str
    bandwidth: float
    fp32_flops: float
    tf32_flops: float
    bf16_flops: float

    def peak_flops(self, dtype: torch.dtype) -> float:
        """The fastest rate at which the chip computes in ``dtype``'s precision, so that the bound
        stays a lower bound: for float32 the faster of plain fp32 and 3xTF32 on the tensor cores
        (a third of the TF32 rate; our kernels' fp32 products run as 3xTF32), for bfloat16 /
        float16 the 16-bit tensor-core rate (above the TF32 rate of our kernels' products on
        16-bit inputs), for float64 half the plain fp32 rate."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16_flops
        if dtype == torch.float64:
            return self.fp32_flops / 2
        return max(self.fp32_flops, self.tf32_flops / 3)


H200 = DeviceCeiling("NVIDIA H200", bandwidth=4.8e12, fp32_flops=67e12, tf32_flops=495e12, bf16_flops=989e12)
H100 = DeviceCeiling("NVIDIA H100", bandwidth=3.35e12, fp32_flops=67e12, tf32_flops=495e12, bf16_flops=989e12)
A100 = DeviceCeiling("NVIDIA A100", bandwidth=2.0e12, fp32_flops=19.5e12, tf32_flops=156e12, bf16_flops=312e12)
KNOWN_DEVICES = (H200, H100, A100)


def ceiling_for(device_name: str) -> DeviceCeiling:
    """The ceilings of a GPU by (part of) its name; H200 when unknown."""
    for device in KNOWN_DEVICES:
        if device.name.split()[-1] in device_name:
            return device
    return H200


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _mlp_param_count(dim: int, hidden: Sequence[int]) -> int:
    sizes = [4 * dim] + list(hidden) + [1]
    return sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))


def attention_forward_flops(batch: int, seq_len: int, dim: int, hidden: Sequence[int], activation: str) -> int:
    """Forward FLOPs of attention pooling with the folded first layer, every position valid."""
    act = ACTIVATION_FLOPS[activation]
    per_sample = 2 * dim * hidden[0] + 2 * dim * hidden[0]  # M_b build, u_b
    per_key = 2 * dim * hidden[0] + hidden[0] * (1 + act)  # k M_b, + u_b, activation
    for prev, width in zip(hidden[:-1], hidden[1:]):
        per_key += 2 * prev * width + width * (1 + act)
    per_key += 2 * hidden[-1] + 1  # score layer
    per_key += 2 * dim  # weighted sum of the keys
    return batch * (per_sample + seq_len * per_key)


def attention_cost(batch: int, seq_len: int, dim: int, hidden: Sequence[int], activation: str,
                   dtype: torch.dtype, mode: str) -> Tuple[int, int]:
    """``(flops, bytes)`` of attention pooling ``[B, T, D]`` in ``mode`` (``forward`` or
    ``forward+backward``)."""
    s = _itemsize(dtype)
    params = _mlp_param_count(dim, hidden)
    flops = attention_forward_flops(batch, seq_len, dim, hidden, activation)
    keys = batch * seq_len * dim * s
    query = batch * dim * s
    fwd_bytes = keys + query + batch * 8 + params * s + batch * dim * s + batch * seq_len * s
    if mode == "forward":
        return flops, fwd_bytes
    bwd_bytes = keys + query + batch * dim * s + keys + query + params * (s + 4)
    return 3 * flops, fwd_bytes + bwd_bytes


def serving_cost(candidates: int, seq_len: int, dim: int, hidden: Sequence[int], activation: str,
                 dtype: torch.dtype) -> Tuple[int, int]:
    """``(flops, bytes)`` of scoring ``candidates`` against one history ``[T, D]`` (forward)."""
    s = _itemsize(dtype)
    flops = attention_forward_flops(candidates, seq_len, dim, hidden, activation)
    nbytes = (seq_len * dim + candidates * dim + _mlp_param_count(dim, hidden)
              + candidates * dim + candidates * seq_len) * s
    return flops, nbytes


def dice_cost(rows: int, channels: int, dtype: torch.dtype, mode: str) -> Tuple[int, int]:
    """``(flops, bytes)`` of training-mode Dice on ``[N, C]``."""
    s = _itemsize(dtype)
    n = rows * channels
    if mode == "forward":
        return _DICE_FWD_FLOPS * n, 2 * n * s
    return (_DICE_FWD_FLOPS + _DICE_BWD_FLOPS) * n, 5 * n * s


def mba_cost(num_ids: int, unique_ids: int, dim: int, dtype: torch.dtype) -> Tuple[int, int]:
    """``(flops, bytes)`` of one eq. 7 step from the lookup's gradient rows ``[num_ids, D]``
    touching ``unique_ids`` rows."""
    s = _itemsize(dtype)
    flops = num_ids * dim + 5 * unique_ids * dim
    nbytes = num_ids * 8 + num_ids * dim * s + 2 * unique_ids * dim * s + unique_ids * 8
    return flops, nbytes


def lower_bound_seconds(flops: float, nbytes: float, device: DeviceCeiling, dtype: torch.dtype) -> float:
    return max(flops / device.peak_flops(dtype), nbytes / device.bandwidth)


def bound_kind(flops: float, nbytes: float, device: DeviceCeiling, dtype: torch.dtype) -> str:
    """``"memory"`` or ``"compute"``: which ceiling sets the lower bound."""
    return "compute" if flops / device.peak_flops(dtype) > nbytes / device.bandwidth else "memory"


def roofline_fields(flops: float, nbytes: float, seconds: float, device: DeviceCeiling,
                    dtype: torch.dtype) -> Dict[str, float]:
    """The achieved rates and the fraction of the lower bound for a measured time."""
    bound = lower_bound_seconds(flops, nbytes, device, dtype)
    return dict(lower_bound_ms=bound * 1e3, roofline_fraction=bound / seconds,
                achieved_tflops=flops / seconds / 1e12, achieved_gbps=nbytes / seconds / 1e9,
                bound=bound_kind(flops, nbytes, device, dtype))
