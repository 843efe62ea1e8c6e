import os
import sys

# The tables in cases.py import torch (when present) with its CPU path pinned; make sure that
# happens before anything else imports torch.
sys.path.insert(0, os.path.dirname(__file__))
import cases  # noqa: E402,F401

# tests/sanitize.sh preloads AddressSanitizer: its allocator keeps freed memory in quarantine
# and adds shadow memory, so resident-memory bounds measure ASan there, not fastopt.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")

import pytest  # noqa: E402

import fastopt  # noqa: E402
from fastopt import _core  # noqa: E402


@pytest.fixture
def threads():
    """Set thread count and threshold for one test, restoring both after it."""
    before = (_core.get_num_threads(), _core.get_min_per_thread())

    def set_(n, min_per_thread=1):
        fastopt.set_num_threads(n)
        _core.set_min_per_thread(min_per_thread)
    yield set_
    fastopt.set_num_threads(before[0])
    _core.set_min_per_thread(before[1])
