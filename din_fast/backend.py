"""Backend selection.

Three backends implement every op with one signature (the one in ``din_fast.reference``):

* ``"triton"``: the fused Triton kernels (``din_fast.triton_ops``), for CUDA tensors, or
  for CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``);
* ``"torch"``: the fast pure-PyTorch path (``din_fast.torch_ops``), any device;
* ``"reference"``: the literal paper math (``din_fast.reference``).

``"auto"`` picks ``triton`` for CUDA tensors of a kernel dtype (float32, float16, bfloat16) when
Triton imports and the op has a kernel, else ``torch``; the environment variable ``DIN_FAST_BACKEND`` replaces ``"auto"`` with a fixed
choice. An explicit request that cannot be honoured raises; it never falls back silently.
Backends never import each other, and Triton is imported only when the triton backend is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from functools import lru_cache
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "DIN_FAST_BACKEND"
# The module of din_fast.triton_ops that holds each op's kernel-backed implementation.
_TRITON_MODULES = {"dice": "dice", "attention_pooling": "attention", "score_candidates": "attention",
                   "mba_penalty": "mba"}


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``import triton`` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def _import(name: str) -> bool:
    """Imports module ``name``; whether it exists. Dynamo cannot trace an import: under
    ``torch.compile`` it runs this eagerly and takes the result as a constant."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        return False
    return True


@lru_cache(maxsize=None)
def _triton_module(op: str):
    name = f"din_fast.triton_ops.{_TRITON_MODULES[op]}"
    return sys.modules[name] if _import(name) else None


def has_triton_kernel(op: str) -> bool:
    return triton_available() and _triton_module(op) is not None


# Input dtypes the kernels take; "auto" sends any other (float64) to the torch backend.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(backend: str, device: torch.device, op: str, dtype: torch.dtype = torch.float32,
                    triton_unsupported: Optional[str] = None) -> str:
    """Returns the concrete backend (``"triton"``, ``"torch"`` or ``"reference"``) for ``op`` on
    ``device`` with floating inputs of ``dtype``; ``triton_unsupported`` names a feature of this
    call that the kernels lack (``"auto"`` then picks ``torch``).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"triton"`` requested where it cannot run (no Triton, or a CPU tensor
            outside the interpreter).
        NotImplementedError: ``"triton"`` requested for an op that has no kernel yet.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and dtype in KERNEL_DTYPES and has_triton_kernel(op) and not triton_unsupported:
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but Triton is not installed (pip install triton)")
        if _triton_module(op) is None:
            raise NotImplementedError(f"the triton backend has no kernel for {op!r} yet; use backend='torch'")
        if triton_unsupported:
            raise NotImplementedError(f"the triton backend does not support {triton_unsupported}; use backend='torch'")
        if device.type != "cuda" and not triton_interpreter():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got tensors on {device}); set TRITON_INTERPRET=1 "
                "to run the kernels in Triton's interpreter on the CPU")
    return backend


def get_op(backend: str, op: str) -> Callable:
    """The implementation of ``op`` in a concrete backend."""
    if backend == "triton":
        return getattr(_triton_module(op), op)
    if backend == "torch":
        from . import torch_ops
        return getattr(torch_ops, op)
    from . import reference
    return getattr(reference, op)
