"""Gradient clipping over the flat gradient arena (torch.nn.utils.clip_grad_norm_ / _value_).

On an arena, clipping by norm is one reduction pass (C, accumulated in double) and one scaling
pass, instead of one norm and one scale per tensor.  Folding the scale into the step saves the
second pass: `opt.step(max_grad_norm=...)` does exactly what `clip_grad_norm_(opt, ...)`
followed by `opt.step()` does, bit for bit, in two passes instead of three.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np

from fastopt import _validate as V
from fastopt._typing import F32, Gradients

# torch adds this to the norm before dividing (clip_coef = max_norm / (total_norm + 1e-6))
_EPS = np.float32(1e-6)


def norm_type_arg(norm_type: Any, name: str = "norm_type") -> float:
    """A norm order: a number > 0, inf, or 'inf' (torch accepts the string)."""
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        return math.inf
    if isinstance(norm_type, (bool, np.bool_)) or not isinstance(norm_type, (int, float,
                                                                              np.floating,
                                                                              np.integer)):
        raise TypeError(f"{name} must be a number or 'inf', got {norm_type!r}")
    try:
        p = float(norm_type)
    except OverflowError:
        raise ValueError(f"{name} must be a number > 0 within float's range, or inf; got an "
                         f"int of {int(norm_type).bit_length()} bits") from None
    if not p > 0.0:                     # also refuses NaN
        raise ValueError(f"{name} must be > 0 (or inf), got {norm_type!r}")
    return p


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """torch's factor, in torch's float32 arithmetic: min(max_norm * 1/(norm + 1e-6), 1).

    torch computes `max_norm / (total_norm + 1e-6)` on a float32 tensor, which it evaluates as
    reciprocal(total_norm + 1e-6) * max_norm, then clamps to 1; NaN stays NaN.
    """
    with np.errstate(all="ignore"):
        denom = np.float32(total_norm) + _EPS
        coef = (np.float32(1.0) / denom) * np.float32(max_norm)
    return float(coef) if not coef > 1.0 else 1.0


def flat_grads_of(grads: Any, name: str = "parameters") -> F32:
    """The 1-D float32 gradient buffer of an optimizer (its arena) or a flat array."""
    flat = getattr(grads, "flat_grads", grads)
    V.buffers([(name, flat, True)], {})
    return flat


def clip_grad_norm_(parameters: Gradients, max_norm: float, norm_type: Union[float, str] = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                    _backend: Any = None) -> float:
    """Scale the gradients in place so that their total norm is at most max_norm.

    parameters: a fastopt optimizer (its whole gradient arena) or a 1-D float32 array.
    Returns the total norm before clipping, as a float (torch returns a 0-d tensor).  The norm
    is accumulated in double; the factor and the scaling are torch's, in float32.  With
    error_if_nonfinite=True a NaN or infinite norm raises RuntimeError (as torch) and leaves
    the gradients untouched; otherwise, as in torch, they are scaled by a NaN or zero factor.
    `foreach` is accepted and ignored.
    """
    from fastopt import _core
    backend = _backend or _core
    max_norm = V.real("max_norm", max_norm, lo=0.0, hi=V.FLOAT32_MAX)  # float32 arithmetic
    p = norm_type_arg(norm_type)
    error_if_nonfinite = V.flag("error_if_nonfinite", error_if_nonfinite)
    flat = flat_grads_of(parameters)
    total, nonfinite = backend.grad_norm(flat, p)
    if nonfinite and error_if_nonfinite:
        raise RuntimeError(f"The total norm of order {p} for gradients is non-finite, so it "
                           "cannot be clipped. To disable this error and scale the gradients "
                           "by the non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = clip_coefficient(total, max_norm)
    if coef != 1.0:
        with np.errstate(all="ignore"):
            flat *= np.float32(coef)
    return total


def clip_grad_value_(parameters: Gradients, clip_value: float,
                     foreach: Optional[bool] = None) -> None:
    """Clamp every gradient to [-clip_value, clip_value] in place (one pass; NaN stays NaN)."""
    clip_value = V.real("clip_value", clip_value, lo=0.0)
    flat = flat_grads_of(parameters)
    c = np.float32(clip_value)
    np.clip(flat, -c, c, out=flat)
