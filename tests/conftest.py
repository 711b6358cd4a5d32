"""Test set-up shared by the whole suite.

Without a CUDA device the Triton kernels run under Triton's interpreter: TRITON_INTERPRET must
be set before triton.jit decorates anything, so it is set here, before any test module imports
the kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none found)")


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh seed per test, derived from its name: inputs differ across cases but a failure
    # reproduces when the one test is rerun.
    import zlib
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def exact_fp32():
    """fp32 convs without TF32 (torch's cuDNN switch, which the Triton kernels follow too), so
    that fp32 checks state the 1e-5 bound of exact fp32 math; restored after the test."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved
