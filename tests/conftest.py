import os
import sys

# The tables in cases.py import torch (when present) with its CPU path pinned; make sure that
# happens before anything else imports torch.
sys.path.insert(0, os.path.dirname(__file__))
import cases  # noqa: E402,F401
