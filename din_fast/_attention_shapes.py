"""The shapes the attention kernels take: the compile-gated set and the envelope around it.

Triton compiles one kernel variant per (D, hidden) and the launch options follow from the padded
sizes (``tl.dot`` pads every dimension to a power of two, at least 16). The compile gate
(``benchmarks.compile_gate``) proves, for sm_80 and sm_90, that every launch of ``GATED_SHAPES``
compiles without spills and within shared memory. Wider shapes are not merely untested: with
hidden (200, 80, 40) the 16-bit forward needs up to 401 KiB of shared memory, over the 227 KiB
of sm_90. So the kernels take a shape only when its padded sizes are each at most those of a
gated shape with as many hidden layers; ``"auto"`` sends any other to the torch backend.
Triton-free, so that the dispatch checks shapes without importing Triton.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

# (D, hidden widths): small shapes, one for each padded D below 64 (16, 32; D padded and not);
# every D of the benchmarks with each hidden shape; and D = 256, the largest, at the edge of
# each number of hidden layers.
GATED_SHAPES: Tuple[Tuple[int, Tuple[int, ...]], ...] = (
    ((8, (12, 8)), (16, (32,)), (24, (40, 12, 6)), (32, (32, 16)))
    + tuple((dim, hidden) for dim in (36, 64, 128) for hidden in ((80, 40), (64, 16), (80, 40, 20), (200,)))
    + ((256, (80, 40)), (256, (200,)), (256, (80, 40, 20)))
)


def padded_size(n: int) -> int:
    """The size ``tl.dot`` works on for a dimension of ``n >= 1``: the next power of two, at least 16."""
    return max(16, 1 << (n - 1).bit_length())


def _padded_shape(dim: int, hidden: Sequence[int]) -> Tuple[int, ...]:
    return (padded_size(dim), *map(padded_size, hidden))


def _maximal(shapes):
    """The shapes that no other one of ``shapes`` contains (at least as large in every size)."""
    return sorted(s for s in shapes if not any(o != s and all(a <= b for a, b in zip(s, o)) for o in shapes))


# Number of hidden layers -> the maximal padded shapes (DP, H1P, ...) of the gated set.
KERNEL_ENVELOPE: Dict[int, Tuple[Tuple[int, ...], ...]] = {
    layers: tuple(_maximal({_padded_shape(d, h) for d, h in GATED_SHAPES if len(h) == layers}))
    for layers in sorted({len(h) for _, h in GATED_SHAPES})
}


def kernel_unsupported(dim: int, hidden: Sequence[int]) -> Optional[str]:
    """What of an MLP on D = ``dim`` with hidden widths ``hidden`` the attention kernels do not
    take (a phrase for an error message), or None."""
    hidden = tuple(int(h) for h in hidden)
    bounds = KERNEL_ENVELOPE.get(len(hidden))
    if bounds is None:
        return (f"{len(hidden)} hidden layers (the attention kernels take {min(KERNEL_ENVELOPE)} to "
                f"{max(KERNEL_ENVELOPE)})")
    shape = _padded_shape(dim, hidden)
    if any(all(a <= b for a, b in zip(shape, bound)) for bound in bounds):
        return None
    limits = " or ".join(f"D <= {bound[0]} with widths up to {', '.join(map(str, bound[1:]))}"
                         for bound in bounds)
    return (f"D={dim} with hidden widths {hidden} (with {len(hidden)} hidden layer{'s' * (len(hidden) > 1)} "
            f"the attention kernels take {limits})")
