"""Helpers for comparing an implementation with the float64 reference (used by the tests and by
``benchmarks/gpu_check.py``).

One tolerance table serves every op: the expected value is always the reference run in float64,
so the tolerance only has to cover the rounding of the dtype under test.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch

# atol, rtol per input dtype, against the float64 reference.
TOLERANCES: Dict[torch.dtype, Dict[str, float]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=5e-6, rtol=5e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# The relative tolerance on the size of a sum's cancelling terms (``assert_close``'s ``terms``),
# per input dtype: float32's table value; for 16-bit inputs four times TF32's unit roundoff
# (2**-11), the precision the kernels' products take for them. The 16-bit table rtol (five times
# the dtype's unit roundoff) would put the bound above the size of a dropped gradient.
TERMS_RTOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 5e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-3,
}

# Where the kernel tests put their tensors: the GPU when there is one, else the CPU, where the
# kernels run in Triton's interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "",
                 scale: float = 1.0, terms: float = 0.0) -> None:
    """Asserts ``actual`` (any dtype) equals the float64 ``expected`` within ``TOLERANCES[dtype]``.

    The error bound is normwise: ``|actual - expected| <= atol + rtol * max|expected|`` element
    by element. A gradient entry is a sum of many rounded terms of either sign, so its rounding
    error scales with the size of the terms (of the order of the tensor's largest entries), not
    with the entry itself, which cancellation can make arbitrarily small. Where the terms can be
    larger than every entry (a sum that cancels), ``terms`` gives their size (``score_terms``),
    and ``TERMS_RTOL[dtype] * terms`` is added to the bound. ``scale`` widens the whole bound
    (document why at the call site). Any NaN fails: a comparison of NaN with NaN
    would pass whatever the kernel did.
    """
    expected = expected.detach().to(torch.float64).cpu()
    torch.testing.assert_close(actual.detach().to(torch.float64).cpu(), expected,
                               atol=normwise_bound(expected, dtype, scale, terms), rtol=0, equal_nan=False,
                               msg=lambda m: f"{name}: {m}")


def normwise_bound(expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, terms: float = 0.0) -> float:
    """``assert_close``'s bound on every entry's absolute error: ``(atol + rtol * max|expected| +
    TERMS_RTOL[dtype] * terms) * scale`` with ``TOLERANCES[dtype]``, the maximum over the finite
    entries."""
    tol = TOLERANCES[dtype]
    finite = expected[torch.isfinite(expected)]
    magnitude = finite.abs().max().item() if finite.numel() else 0.0
    return (tol["atol"] + tol["rtol"] * magnitude + TERMS_RTOL[dtype] * terms) * scale


def score_terms(valid: torch.Tensor, grad_pooled: torch.Tensor, keys: torch.Tensor,
                grad_weights: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                normalization: str = "none", softmax_scale: float = 1.0) -> float:
    """``assert_close``'s ``terms`` for the score layer's gradients (bias ``[1]``, weight
    ``[1, H_n]``): sums over every valid position of the scores' gradients ``e_bt`` (times the
    last hidden activation, for the weight), which cancel (under softmax the bias gradient is
    exactly 0), so their entries give no measure of their rounding. This is the root sum of
    squares of the terms' sizes, the scale of a sum of independently rounded terms:
    ``|u_bt|`` under ``normalization="none"``, with ``u_bt = g_b . k_bt + dL/dw_bt``, and
    ``softmax_scale * w_bt * (|u_bt| + |delta_b|)`` under softmax, ``delta_b = sum_t w_bt u_bt``.

    Args: valid bool ``[B, T]`` (the counted positions); grad_pooled ``[B, D]``; keys ``[B, T, D]``;
    grad_weights ``[B, T]`` or None; weights ``[B, T]``, the reference's (softmax only).
    A missing or extra position's term, or a gradient off by a fraction of itself, is far above
    the bound this gives in float32; in 16-bit, where the table's atol dominates, a dropped or
    halved gradient larger than about twice that atol fails."""
    upstream = torch.einsum("bd,btd->bt", grad_pooled.detach().double().cpu(), keys.detach().double().cpu())
    if grad_weights is not None:
        upstream = upstream + grad_weights.detach().double().cpu()
    valid = valid.detach().cpu()
    upstream = torch.where(valid, upstream, torch.zeros((), dtype=upstream.dtype))
    if normalization == "softmax":
        w = torch.where(valid, weights.detach().double().cpu(), torch.zeros((), dtype=upstream.dtype))
        delta = (w * upstream).sum(dim=1, keepdim=True)
        sizes = softmax_scale * w * (upstream.abs() + delta.abs())
    else:
        sizes = upstream.abs()
    return sizes.pow(2).sum().sqrt().item()


def nan_filled(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer pre-filled with NaN, so elements a kernel forgets to write show up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@contextlib.contextmanager
def nan_filled_allocations() -> Iterator[None]:
    """Within the block the uninitialized allocators (``torch.empty``, ``empty_like``,
    ``empty_strided`` and ``Tensor.new_empty``, ``new_empty_strided``) return floating tensors
    filled with NaN and signed integer ones filled with -1 (bool and unsigned ones as they come):
    what an implementation allocates through them and then fails to write, forward or backward,
    shows up in its results."""
    originals = {(torch, name): getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}
    originals.update({(torch.Tensor, name): getattr(torch.Tensor, name) for name in ("new_empty", "new_empty_strided")})

    def poisoned(allocate):
        def allocate_poisoned(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
            elif tensor.is_signed() and not tensor.is_complex():
                tensor.fill_(-1)
            return tensor
        return allocate_poisoned

    for (owner, name), allocate in originals.items():
        setattr(owner, name, poisoned(allocate))
    try:
        yield
    finally:
        for (owner, name), allocate in originals.items():
            setattr(owner, name, allocate)


def assert_padding_is_zero(valid: torch.Tensor, pooled: torch.Tensor, attn: torch.Tensor,
                           grad_query: Optional[torch.Tensor] = None, grad_keys: Optional[torch.Tensor] = None) -> None:
    """Exactly zero, not merely close: the weights ``[B, T]`` and the keys' gradient ``[B, T, D]``
    at every padding position, and the pooled output ``[B, D]`` and the query's gradient
    ``[B, D]`` of every row with no valid position (``valid``: bool ``[B, T]``). Pass no
    gradients where padding reaches them legitimately (Dice statistics over all positions)."""
    padding, empty_rows = ~valid.cpu(), ~valid.cpu().any(dim=1)
    checks = [("weights", attn, padding), ("pooled", pooled, empty_rows)]
    if grad_keys is not None:
        checks.append(("grad keys", grad_keys, padding))
    if grad_query is not None:
        checks.append(("grad query", grad_query, empty_rows))
    for name, tensor, where in checks:
        values = tensor.detach().cpu()[where]
        assert torch.equal(values, torch.zeros_like(values)), f"{name}: nonzero at padding: {values}"


def random_attention_mlp(dim: int, hidden, activation: str, dtype: torch.dtype = torch.float32, device="cpu",
                         dice_affine: bool = False):
    """Random parameters of an activation-unit MLP in ``din_fast.reference``'s layout.

    Returns ``(weights, biases, act_params)``: ``weights[i]`` ``[out, in]`` with fan-in scaling,
    nonzero biases, PReLU slopes around 0.25, Dice alphas in (0, 1) with running statistics away
    from the defaults (and, with ``dice_affine``, gate weights around 1 with some negative and
    nonzero gate biases), so that no term of the math is trivially zero.
    """
    factory = dict(dtype=dtype, device=device)
    widths = (4 * dim,) + tuple(hidden) + (1,)
    weights = [torch.randn(b, a, **factory) / a ** 0.5 for a, b in zip(widths[:-1], widths[1:])]
    biases = [0.1 * torch.randn(b, **factory) for b in widths[1:]]
    if activation == "prelu":
        act_params = [(0.25 + 0.1 * torch.rand(h, **factory),) for h in hidden]
    elif activation == "dice":
        act_params = [(torch.rand(h, **factory), 0.1 * torch.randn(h, **factory), 0.5 + torch.rand(h, **factory))
                      for h in hidden]
        if dice_affine:
            act_params = [layer + (1 + 0.8 * torch.randn(h, **factory), 0.3 * torch.randn(h, **factory))
                          for layer, h in zip(act_params, hidden)]
    else:
        act_params = [() for _ in hidden]
    return weights, biases, act_params


def float64_copies(tensors):
    """Detached float64 copies (leaves requiring grad where the originals do) of a nested list."""
    if isinstance(tensors, torch.Tensor):
        copy = tensors.detach().to(torch.float64) if tensors.is_floating_point() else tensors.detach().clone()
        return copy.requires_grad_(tensors.requires_grad)
    return type(tensors)(float64_copies(t) for t in tensors)
