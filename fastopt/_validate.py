"""Argument checks shared by every public entry point (both backends, functions and classes).

Each check raises TypeError (wrong kind of object) or ValueError (right kind, bad value) with a
message that starts with the argument's name, and returns the value normalized (a Python float,
int or bool), so the callers can hand it straight to a kernel.  Nothing here mutates anything:
callers run every check before they touch params or state.
"""
import math
import numbers

import numpy as np

# The largest float32: every real that reaches a kernel is rounded to float32 there (or used
# to compute float32 scalars), so a larger one would be an infinity in the arithmetic.
FLOAT32_MAX = float(np.finfo(np.float32).max)

# The largest step count: C keeps it in an int64.  A count may reach it; no step is taken past it.
MAX_STEPS = 2 ** 63 - 1

try:  # NumPy >= 2
    # (the ignores: each line is unknown to mypy under one of the two NumPys)
    from numpy.lib.array_utils import byte_bounds as _byte_bounds  # type: ignore[import-not-found,unused-ignore]  # noqa: E501
except ImportError:  # pragma: no cover - NumPy 1.x
    _byte_bounds = np.byte_bounds  # type: ignore[attr-defined,unused-ignore]


def real(name, x, *, lo=None, lo_open=False, hi=None, hi_open=False):
    """A finite real number inside the given bounds, as a float."""
    t = type(x)
    if t is not float and t is not int:   # the common cases first: the ABC check is slow
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    try:
        x = float(x)
    except OverflowError:                   # an int past float's range, 10**400 say
        raise ValueError(f"{name} must be finite, got an int of {x.bit_length()} bits") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {x!r}")
    if hi is not None and (x >= hi if hi_open else x > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {x!r}")
    return x


def flag(name, x):
    """A bool (Python or NumPy); 0/1 and other truthy objects are refused as likely mistakes."""
    if x is True or x is False:
        return x
    if not isinstance(x, np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")
    return bool(x)


def step(x, name="step"):
    """The 1-based count of the step being taken."""
    if type(x) is not int:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
        x = int(x)
    if x < 1:
        raise ValueError(f"{name} must be >= 1 (the 1-based count of the step being taken), got {x}")
    if x > MAX_STEPS:
        raise ValueError(f"{name} must be <= 2**63 - 1, got {x}")
    return x


def pair(x, name):
    """Two values, (a, b) or [a, b] (checked by the caller)."""
    if not isinstance(x, (tuple, list)):      # a dict or set would unpack its keys, unordered
        raise TypeError(f"{name} must be a pair (a tuple or list of two), got "
                        f"{type(x).__name__} {x!r}")
    try:
        a, b = x
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair, got {x!r}") from None
    return a, b


def grad_multiplier(x):
    """The factor every gradient is multiplied by, in float32 inside the kernel."""
    return real("grad_multiplier", x, lo=0.0, hi=FLOAT32_MAX)


def grad_options(grad_multiplier_, zero_grad):
    return grad_multiplier(grad_multiplier_), flag("zero_grad", zero_grad)


# ---- arrays ----

def float32_array(name, a):
    """An ndarray of native float32 (any shape or layout): the element type every kernel uses."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {a.dtype}")
    return a


def buffers(named, required):
    """Check the arrays of a functional kernel call; return their common length.

    `named` lists (name, array or None, written) with the param first; `required` maps the
    buffers that must be given to the options that need them (None: always needed).  Arrays must be 1-D, C-contiguous, aligned float32
    of the param's length, writeable when the kernel writes them, and no two may overlap.
    """
    n = None
    spans = []
    for name, a, written in named:
        if a is None:
            if name in required:
                why = required[name]
                raise ValueError(f"{name} is required by the options given ({why})" if why
                                 else f"{name} is required")
            continue
        float32_array(name, a)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
        flags = a.flags
        if not flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if not flags.aligned:
            raise ValueError(f"{name} must be aligned to 4 bytes")
        if written and not flags.writeable:
            raise ValueError(f"{name} is read-only; the kernel updates it in place")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise ValueError(f"{name} has length {a.shape[0]}, but param has length {n}")
        if n:
            lo = _address(a)                            # 1-D and contiguous: [lo, lo + nbytes)
            spans.append((lo, lo + a.nbytes, name))
    disjoint(spans)
    return n


def _address(a):
    """The address of a 1-D contiguous array's first byte: the C module's fast reader when it
    is built (ndarray.__array_interface__ costs microseconds), else NumPy's."""
    global _address
    try:
        from fastopt._core import address
    except ImportError:
        def address(obj: object) -> int:
            return obj.__array_interface__["data"][0]  # type: ignore[attr-defined,no-any-return]
    _address = address
    return address(a)


def disjoint(spans):
    """spans: (low, high, label) byte ranges; raise ValueError naming two that overlap."""
    spans = sorted(spans)
    for (lo_a, hi_a, a), (lo_b, hi_b, b) in zip(spans, spans[1:]):
        if lo_b < hi_a:
            raise ValueError(f"{a} and {b} overlap in memory (the same array passed twice, or "
                             "views of one array); every buffer must be a separate array")


def memory_span(a):
    """(low, high) byte bounds of an ndarray's memory."""
    return _byte_bounds(a)
