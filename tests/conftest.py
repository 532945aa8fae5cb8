import os
import tempfile

import pytest
import torch

# Tests never touch the user's cache: dsserve-tiny is built into a per-session folder.
os.environ.setdefault("DSSERVE_CACHE_DIR", tempfile.mkdtemp(prefix="dsserve-test-cache-"))

# Without a GPU, Triton kernels run in its interpreter; triton reads this when first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a busy
    2-core machine intra-op threads only add contention (tens of ms per matmul)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
