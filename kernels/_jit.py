"""``@triton.jit`` for launched kernels: one compiled variant per launch configuration."""

from __future__ import annotations

import inspect

import triton


def _runtime_args(fn):
    """The names of ``fn``'s arguments that are not ``tl.constexpr``."""
    return [name for name, param in inspect.signature(fn).parameters.items()
            if param.annotation not in ("tl.constexpr", triton.language.constexpr)]


def jit_unspecialized(fn):
    """``@triton.jit`` with no argument specialized on its value: no scalar on being 1 or a
    multiple of 16, no pointer on 16-byte alignment.

    Triton's default compiles such variants at run time (``T == 1`` folded to a constant, aligned
    pointers with vector loads), and their register allocation differs: an fp32 Dice training
    pass that fits in 255 registers as gated spills in its aligned variant. With none of them,
    each set of constexprs and launch options compiles to the one kernel the compile gate
    (``benchmarks/compile_gate.py``) compiles ahead of time, so the gate's verdict is the run's.
    """
    runtime_args = _runtime_args(fn)
    return triton.jit(fn, do_not_specialize=runtime_args, do_not_specialize_on_alignment=runtime_args)


# The alignment, in bytes, that ``jit_aligned_pointers`` kernels take their pointers at.
POINTER_ALIGNMENT = 16


def is_aligned(tensor) -> bool:
    """Whether ``tensor``'s data start at a ``POINTER_ALIGNMENT`` boundary."""
    return tensor.data_ptr() % POINTER_ALIGNMENT == 0


def jit_aligned_pointers(fn):
    """``@triton.jit`` that specializes the pointers (the arguments named ``*_ptr``) on 16-byte
    alignment and no scalar on its value.

    The launchers of such a kernel pass only 16-byte-aligned pointers, so each set of constexprs
    and launch options still compiles to one kernel: the one the compile gate compiles with every
    pointer marked aligned. That alignment, with a row width the kernel knows to be a multiple of
    its vector width, lets its loads and stores move 16 bytes per instruction.
    """
    scalars = [name for name in _runtime_args(fn) if not name.endswith("_ptr")]
    return triton.jit(fn, do_not_specialize=scalars, do_not_specialize_on_alignment=scalars)
