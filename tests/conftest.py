import os
import random
import zlib

# Kernels run in Triton's interpreter unless a GPU is present; both must be set before Triton
# is imported anywhere.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

# Fresh random inputs every run; the seed is printed so that a failure can be replayed with
# DIN_FAST_TEST_SEED=<seed>.
SEED = int(os.environ.get("DIN_FAST_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"din_fast test seed: {SEED} (replay with DIN_FAST_TEST_SEED={SEED})"


@pytest.fixture
def on_kernel_device():
    """Tensors made without a device go to ``KERNEL_DEVICE``, where the kernels run."""
    from din_fast.testing import KERNEL_DEVICE
    with torch.device(KERNEL_DEVICE):
        yield


@pytest.fixture(autouse=True)
def _seeded(request):
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))
    yield
