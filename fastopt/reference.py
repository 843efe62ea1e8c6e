"""The pure-NumPy twin of fastopt: the same functions and classes, the same checks.

This is how a careful NumPy user writes these optimizers: whole-array operations in place on
float32, scratch buffers allocated once and reused, no Python loop over elements, and the
operations in torch.optim's for-loop order (so the results agree with torch's non-fused
optimizers to float32 rounding).  It is the baseline the benchmarks compare against, and a
drop-in replacement for `fastopt.*`:

    from fastopt import reference as fo      # instead of: import fastopt as fo

Unlike the C kernels it does not fuse multiply-adds, so it matches them to a few ulp per step,
not bitwise (the tests state the bound).  Each step makes 8-14 passes over memory where the
C kernel makes one.
"""
import sys
import threading

import numpy as np

from fastopt import clip as _clip
from fastopt import optim as _optim
from fastopt._functional import make as _make

_local = threading.local()
_this = sys.modules[__name__]


def _scratch(n):
    """Two float32 work buffers of n elements, reused across calls (one set per thread)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].size < n:
        bufs = _local.bufs = (np.empty(n, np.float32), np.empty(n, np.float32))
    return bufs[0][:n], bufs[1][:n]


def _lerp_(start, end, weight, tmp):
    """start += weight * (end - start), in place (torch's lerp_, to rounding)."""
    np.subtract(end, start, out=tmp)
    tmp *= weight
    start += tmp


def _effective_grad(p, grad, weight_decay, maximize, multiplier, out):
    """grad * multiplier, negated if maximize, plus weight_decay * p: into `out`, or grad
    itself when nothing changes it."""
    factor = -multiplier if maximize else multiplier
    if weight_decay != 0.0:
        np.multiply(p, weight_decay, out=out)
        if factor == 1.0:
            out += grad
        else:
            out += grad * np.float32(factor)
        return out
    if factor != 1.0:
        return np.multiply(grad, np.float32(factor), out=out)
    return grad


# ---- range kernels: the backend interface shared with fastopt._core ----------------------

def sgd(param, grad, momentum_buffer, start, stop, lr, momentum, dampening, weight_decay,
        nesterov, maximize, first_step, grad_multiplier=1.0, zero_grad=False):
    p, grad = param[start:stop], grad[start:stop]
    t1, t2 = _scratch(stop - start)
    g = _effective_grad(p, grad, weight_decay, maximize, grad_multiplier, t1)
    if momentum != 0.0:
        buf = momentum_buffer[start:stop]
        if first_step:
            np.copyto(buf, g)
        else:
            buf *= momentum
            np.multiply(g, 1.0 - dampening, out=t2)
            buf += t2
        if nesterov:
            np.multiply(buf, momentum, out=t2)
            if g is not t1:
                np.copyto(t1, g)
                g = t1
            g += t2
        else:
            g = buf
    np.multiply(g, -lr, out=t2)
    p += t2
    if zero_grad:
        grad.fill(0.0)


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, start, stop, step, lr, beta1, beta2,
         eps, weight_decay, decoupled, amsgrad, maximize, grad_multiplier=1.0, zero_grad=False):
    p, grad = param[start:stop], grad[start:stop]
    m, v = exp_avg[start:stop], exp_avg_sq[start:stop]
    t1, t2 = _scratch(stop - start)
    if decoupled:
        g = _effective_grad(p, grad, 0.0, maximize, grad_multiplier, t1)
        if weight_decay != 0.0:
            p *= 1.0 - lr * weight_decay
    else:
        g = _effective_grad(p, grad, weight_decay, maximize, grad_multiplier, t1)
    _lerp_(m, g, 1.0 - beta1, t2)
    v *= beta2
    np.multiply(g, g, out=t2)
    t2 *= 1.0 - beta2
    v += t2
    if zero_grad:
        grad.fill(0.0)
    if amsgrad:
        vmax = max_exp_avg_sq[start:stop]
        np.maximum(vmax, v, out=vmax)
        v = vmax
    step_size = lr / (1.0 - beta1 ** step)
    bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
    denom = np.sqrt(v, out=t2)
    denom /= bias_correction2_sqrt
    denom += eps
    np.divide(m, denom, out=t2)
    t2 *= -step_size
    p += t2


def rmsprop(param, grad, square_avg, momentum_buffer, grad_avg, start, stop, lr, alpha, eps,
            weight_decay, momentum, centered, maximize, grad_multiplier=1.0, zero_grad=False):
    p, grad, sa = param[start:stop], grad[start:stop], square_avg[start:stop]
    t1, t2 = _scratch(stop - start)
    g = _effective_grad(p, grad, weight_decay, maximize, grad_multiplier, t1)
    if zero_grad and g is grad:
        g = np.copyto(t1, grad) or t1
    if zero_grad:
        grad.fill(0.0)
    sa *= alpha
    np.multiply(g, g, out=t2)
    t2 *= 1.0 - alpha
    sa += t2
    if centered:
        ga = grad_avg[start:stop]
        _lerp_(ga, g, 1.0 - alpha, t2)
        np.multiply(ga, ga, out=t2)
        np.subtract(sa, t2, out=t2)
        avg = np.sqrt(t2, out=t2)
    else:
        avg = np.sqrt(sa, out=t2)
    avg += eps
    if momentum > 0.0:
        buf = momentum_buffer[start:stop]
        buf *= momentum
        np.divide(g, avg, out=t2)
        buf += t2
        np.multiply(buf, -lr, out=t2)
        p += t2
    else:
        np.divide(g, avg, out=t2)
        t2 *= -lr
        p += t2


def grad_norm(grad, norm_type=2.0):
    """(norm, nonfinite) of a 1-D float32 buffer, accumulated in float64 block by block (so no
    float64 copy of the whole buffer is made)."""
    block = 1 << 16
    nonfinite = False
    total = 0.0
    for lo in range(0, grad.size, block):
        x = np.abs(grad[lo:lo + block], dtype=np.float64)
        nonfinite = nonfinite or not np.isfinite(x).all()
        if norm_type == 2.0:
            total += float(np.dot(x, x))
        elif norm_type == 1.0:
            total += float(x.sum())
        elif norm_type == np.inf:
            m = float(x.max())
            total = m if (m > total or m != m) else total
        else:
            total += float(np.sum(x ** norm_type))
    if norm_type == 2.0:
        return float(np.sqrt(total)), nonfinite
    if norm_type in (1.0, np.inf):
        return total, nonfinite
    return total ** (1.0 / norm_type), nonfinite


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    return _clip.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite,
                                 _backend=_this)


clip_grad_norm_.__doc__ = _clip.clip_grad_norm_.__doc__
clip_grad_value_ = _clip.clip_grad_value_


_KERNELS = {"sgd": sgd, "adam": adam, "rmsprop": rmsprop}
_BUFFERS = {"sgd": ("momentum_buffer",),
            "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
            "rmsprop": ("square_avg", "momentum_buffer", "grad_avg")}


class Stepper:
    """fastopt._core.Stepper's interface in Python: one range-kernel call per group."""

    def __init__(self, family, param, grad, ranges):
        self._family, self._param, self._grad = family, param, grad
        self._ranges = list(ranges)
        self._buffers = dict.fromkeys(_BUFFERS[family])
        self._groups = [None] * len(self._ranges)      # [hp, step, first_step] per group

    def set_buffer(self, name, arena):
        self._buffers[name] = arena

    def set_group(self, i, hp, step=0, first_step=False):
        self._groups[i] = [hp, step, first_step]

    def get_step(self, i):
        return self._groups[i][1] if self._family == "adam" else 0

    def run(self, grad_multiplier=1.0, zero_grad=False):
        kernel, bufs = _KERNELS[self._family], list(self._buffers.values())
        for (start, stop), grp in zip(self._ranges, self._groups):
            hp, step, first = grp
            if self._family == "sgd":
                kernel(self._param, self._grad, *bufs, start, stop, *hp, first,
                       grad_multiplier, zero_grad)
                grp[2] = False
            elif self._family == "adam":
                grp[1] = step + 1
                kernel(self._param, self._grad, *bufs, start, stop, step + 1, *hp,
                       grad_multiplier, zero_grad)
            else:
                kernel(self._param, self._grad, *bufs, start, stop, *hp, grad_multiplier,
                       zero_grad)


# ---- the public API, the same as fastopt's -----------------------------------------------

sgd_, adam_, rmsprop_ = _make(_this)
for _f in (sgd_, adam_, rmsprop_):
    _f.__module__ = __name__


class SGD(_optim.SGD):
    __doc__ = _optim.SGD.__doc__
    _backend = _this


class Adam(_optim.Adam):
    __doc__ = _optim.Adam.__doc__
    _backend = _this


class AdamW(_optim.AdamW):
    __doc__ = _optim.AdamW.__doc__
    _backend = _this


class RMSprop(_optim.RMSprop):
    __doc__ = _optim.RMSprop.__doc__
    _backend = _this


__all__ = ["sgd_", "adam_", "rmsprop_", "SGD", "Adam", "AdamW", "RMSprop", "clip_grad_norm_",
           "clip_grad_value_"]
