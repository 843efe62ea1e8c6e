import os
import sys

# The tables in cases.py import torch (when present) with its CPU path pinned; make sure that
# happens before anything else imports torch.
sys.path.insert(0, os.path.dirname(__file__))
import cases  # noqa: E402,F401

# tests/sanitize.sh preloads AddressSanitizer: its allocator keeps freed memory in quarantine
# and adds shadow memory, so resident-memory bounds measure ASan there, not fastopt.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
