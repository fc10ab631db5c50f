"""Autograd Functions over the Triton kernels, one module per op family; imported lazily by
``din_fast.backend`` only when the triton backend is chosen."""
