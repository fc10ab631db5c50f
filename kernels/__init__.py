"""Triton kernels and their host launchers, installed as ``din_fast.kernels``.

One module per op family. Nothing here knows about autograd or ``nn.Module``: each module holds
private ``@triton.jit`` kernels and plain launchers that allocate outputs, pick the grid and
launch. Importing this package imports Triton.
"""
