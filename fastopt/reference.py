"""The pure-NumPy twin of fastopt: the same functions and classes, the same checks.

This is how a careful NumPy user writes these optimizers: whole-array operations in place on
float32, scratch buffers allocated once and reused, no Python loop over elements, and the
operations in torch.optim's for-loop order (so the results agree with torch's non-fused
optimizers to float32 rounding).  It is the baseline the benchmarks compare against, and a
drop-in replacement for `fastopt.*`:

    from fastopt import reference as fo      # instead of: import fastopt as fo

Unlike the C kernels it does not fuse multiply-adds, so it matches them to a few ulp per step,
not bitwise (the tests state the bound); Lion's twin, which emulates its one fma exactly, is
bitwise.  Each step makes 8-14 passes over memory where the C kernel makes one.

One check it does not make: the C stepper refuses hyperparameters whose per-step float32
scalars overflow (each within float32's range, like every hyperparameter, but lr / (1 -
beta1**t) or 1 - lr*weight_decay past it; fo_check in csrc/step.c), while here they give the
infinities NumPy computes.  Stating each family's scalars a second time, in Python, only for
that check would be a second copy of every prepare() to keep in step with C.
"""
import sys
import threading

import numpy as np

from fastopt import _formats
from fastopt import clip as _clip
from fastopt._functional import make as _make
from fastopt._optimizer import Optimizer, optimizer_class
from fastopt._validate import MAX_STEPS
from fastopt.families import FAMILIES, OPTIMIZERS

_local = threading.local()
_this = sys.modules[__name__]


def _scratch(n):
    """Two float32 work buffers of n elements, reused across calls (one set per thread)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].size < n:
        bufs = _local.bufs = (np.empty(n, np.float32), np.empty(n, np.float32))
    return bufs[0][:n], bufs[1][:n]


def _scratch64(n):
    """A float64 work buffer of n elements, reused across calls (one a thread)."""
    buf = getattr(_local, "buf64", None)
    if buf is None or buf.size < n:
        buf = _local.buf64 = np.empty(n, np.float64)
    return buf[:n]


def _fma(a, b, c, out):
    """out = a*b + c rounded once to float32 (a C fmaf): a, c float32 arrays, b a float32.

    a*b is exact in float64 (24 x 24 bits), so the float64 sum is the exact one rounded once,
    and rounding it to float32 gives the correctly rounded result, except where that sum fell
    exactly on a float32 rounding boundary (a midpoint: rare) while the exact sum did not: a
    second rounding then breaks a tie the exact value never had.  Those elements (and tiny
    ones, whose float32 spacing is not the midpoint mask's) move one float64 ulp towards the
    exact sum, found from the sum's exact error (TwoSum), and round correctly.
    """
    s = _scratch64(a.size)
    # dtype: NumPy 1.x's value-based casting would multiply a float32 array by a float64
    # scalar in float32, rounding the product (NumPy 2 promotes; this says it for both)
    np.multiply(a, np.float64(b), out=s, dtype=np.float64)
    np.add(s, c, out=s)
    suspect = (s.view(np.int64) & 0x1FFFFFFF) == 0x10000000
    suspect |= np.abs(s) < 2.0 ** -125
    idx = np.flatnonzero(suspect)
    if idx.size:
        prod = a[idx].astype(np.float64) * np.float64(b)
        add = c[idx].astype(np.float64)
        si = s[idx]
        bb = si - prod
        err = (prod - (si - bb)) + (add - bb)
        s[idx] = np.where(err > 0, np.nextafter(si, np.inf),
                          np.where(err < 0, np.nextafter(si, -np.inf), si))
    np.copyto(out, s, casting="same_kind")
    return out


def _lerp_(start, end, weight, tmp):
    """start += weight * (end - start), in place (torch's lerp_, to rounding)."""
    np.subtract(end, start, out=tmp)
    tmp *= weight
    start += tmp


def _adam_moments(p, grad, m, v, lr, beta1, beta2, weight_decay, decoupled, maximize,
                  grad_multiplier, t1, t2):
    """The Adam family's first half (Adam, AdamW, NAdam, RAdam), in torch's order: the
    gradient with L2 decay, or p's decoupled decay; then m = lerp(m, g, 1-beta1) and
    v = beta2*v + (1-beta2)*g*g.  -> g (in t1, or grad itself); t2 is scratch."""
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
    return g


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


# ---- the twins of the C kernels: one per family, on whole 1-D arrays ---------------------
# Each takes the family's buffers in order (None where unused) and its kernel fields by name,
# as fastopt.families declares them.

def sgd(p, grad, momentum_buffer, *, step, lr, momentum, dampening, weight_decay, nesterov,
        maximize, first_step, grad_multiplier=1.0, zero_grad=False):
    t1, t2 = _scratch(p.size)
    g = _effective_grad(p, grad, weight_decay, maximize, grad_multiplier, t1)
    if momentum != 0.0:
        buf = momentum_buffer
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


def adam(p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, lr, beta1, beta2, eps,
         weight_decay, decoupled, amsgrad, maximize, grad_multiplier=1.0, zero_grad=False):
    m, v = exp_avg, exp_avg_sq
    t1, t2 = _scratch(p.size)
    _adam_moments(p, grad, m, v, lr, beta1, beta2, weight_decay, decoupled, maximize,
                  grad_multiplier, t1, t2)
    if zero_grad:
        grad.fill(0.0)
    if amsgrad:
        np.maximum(max_exp_avg_sq, v, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    step_size = lr / (1.0 - beta1 ** step)
    bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
    denom = np.sqrt(v, out=t2)
    denom /= bias_correction2_sqrt
    denom += eps
    np.divide(m, denom, out=t2)
    t2 *= -step_size
    p += t2


def rmsprop(p, grad, square_avg, momentum_buffer, grad_avg, *, step, lr, alpha, eps,
            weight_decay, momentum, centered, maximize, grad_multiplier=1.0, zero_grad=False):
    sa = square_avg
    t1, t2 = _scratch(p.size)
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
        ga = grad_avg
        _lerp_(ga, g, 1.0 - alpha, t2)
        np.multiply(ga, ga, out=t2)
        np.subtract(sa, t2, out=t2)
        avg = np.sqrt(t2, out=t2)
    else:
        avg = np.sqrt(sa, out=t2)
    avg += eps
    if momentum > 0.0:
        buf = momentum_buffer
        buf *= momentum
        np.divide(g, avg, out=t2)
        buf += t2
        np.multiply(buf, -lr, out=t2)
        p += t2
    else:
        np.divide(g, avg, out=t2)
        t2 *= -lr
        p += t2


def adamax(p, grad, exp_avg, exp_inf, *, step, lr, beta1, beta2, eps, weight_decay, maximize,
           grad_multiplier=1.0, zero_grad=False):
    m, u = exp_avg, exp_inf
    t1, t2 = _scratch(p.size)
    g = _effective_grad(p, grad, weight_decay, maximize, grad_multiplier, t1)
    _lerp_(m, g, 1.0 - beta1, t2)
    u *= beta2
    np.abs(g, out=t2)
    t2 += eps
    np.maximum(u, t2, out=u)          # NaN in either propagates, as torch.maximum
    if zero_grad:
        grad.fill(0.0)
    clr = lr / (1.0 - beta1 ** step)
    np.multiply(m, -clr, out=t2)
    t2 /= u
    p += t2


def adadelta(p, grad, square_avg, acc_delta, *, step, lr, rho, eps, weight_decay, maximize,
             grad_multiplier=1.0, zero_grad=False):
    sa, ad = square_avg, acc_delta
    n = p.size
    a, b = _scratch(2 * n)            # three work buffers of n: g, std, sqrt(ad + eps)
    t1, t2, t3 = a[:n], a[n:], b[:n]
    g = _effective_grad(p, grad, weight_decay, maximize, grad_multiplier, t1)
    sa *= rho
    np.multiply(g, 1.0 - rho, out=t2)
    t2 *= g
    sa += t2
    std = np.add(sa, eps, out=t2)
    np.sqrt(std, out=std)
    delta = np.add(ad, eps, out=t3)
    np.sqrt(delta, out=delta)
    delta /= std
    delta *= g
    if zero_grad:
        grad.fill(0.0)
    ad *= rho
    np.multiply(delta, 1.0 - rho, out=t2)
    t2 *= delta
    ad += t2
    np.multiply(delta, -lr, out=t2)
    p += t2


def nadam(p, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay,
          momentum_decay, decoupled, maximize, mu_product, grad_multiplier=1.0,
          zero_grad=False):
    # mu_product: the group's value after this step (fastopt.families computes it)
    m, v = exp_avg, exp_avg_sq
    t1, t2 = _scratch(p.size)
    g = _adam_moments(p, grad, m, v, lr, beta1, beta2, weight_decay, decoupled, maximize,
                      grad_multiplier, t1, t2)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    denom = np.divide(v, 1.0 - beta2 ** step, out=t2)
    np.sqrt(denom, out=denom)
    denom += eps
    np.multiply(g, -lr * (1.0 - mu) / (1.0 - mu_product), out=t1)   # g is done with after this
    t1 /= denom
    p += t1
    np.multiply(m, (-lr * mu_next) / (1.0 - mu_product * mu_next), out=t1)
    t1 /= denom
    p += t1
    if zero_grad:
        grad.fill(0.0)


def radam(p, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay,
          decoupled, maximize, grad_multiplier=1.0, zero_grad=False):
    m, v = exp_avg, exp_avg_sq
    t1, t2 = _scratch(p.size)
    _adam_moments(p, grad, m, v, lr, beta1, beta2, weight_decay, decoupled, maximize,
                  grad_multiplier, t1, t2)
    if zero_grad:
        grad.fill(0.0)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * (beta2 ** step) / bias_correction2
    upd = np.divide(m, bias_correction1, out=t1)     # g is done with
    upd *= lr
    if rho_t > 5.0:
        rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)) ** 0.5
        denom = np.sqrt(v, out=t2)
        denom += eps
        np.divide(bias_correction2 ** 0.5, denom, out=denom)
        upd *= denom
        upd *= rect
    p -= upd


def adagrad(p, grad, sum, *, step, lr, lr_decay, weight_decay, eps, maximize,
            grad_multiplier=1.0, zero_grad=False):
    t1, t2 = _scratch(p.size)
    g = _effective_grad(p, grad, weight_decay, maximize, grad_multiplier, t1)
    clr = lr / (1.0 + (step - 1) * lr_decay)
    np.multiply(g, g, out=t2)
    sum += t2
    std = np.sqrt(sum, out=t2)
    std += eps
    upd = np.multiply(g, -clr, out=t1)
    upd /= std
    p += upd
    if zero_grad:
        grad.fill(0.0)


def lion(p, grad, exp_avg, *, step, lr, beta1, beta2, weight_decay, maximize,
         grad_multiplier=1.0, zero_grad=False):
    # Bitwise the C kernel's (csrc/families/lion.c): float32 operations in its order, and _fma
    # for its one fma (torch's add_ with alpha)
    m = exp_avg
    t1, t2 = _scratch(p.size)
    g = _effective_grad(p, grad, 0.0, maximize, grad_multiplier, t1)
    p *= np.float32(1.0 - lr * weight_decay)
    c = np.multiply(m, np.float32(beta1), out=t2)
    m *= np.float32(beta2)
    _fma(g, np.float32(1.0 - beta2), m, out=m)
    c += np.multiply(g, np.float32(1.0 - beta1), out=t1)
    update = np.sign(c, out=t1)             # (not in place: NumPy's in-place sign is 10x slower)
    update += np.float32(0.0)               # sign(-0.0) is +0.0, as torch.sign
    update *= np.float32(-lr)               # exact: update is +-1, 0 or NaN
    p += update
    if zero_grad:
        grad.fill(0.0)


# ---- the backend interface shared with fastopt._core ---------------------------------------

def kernel(family, param, grad, state, start, stop, step, fields, grad_multiplier=1.0,
           zero_grad=False):
    """One group [start, stop) of 1-D buffers: the family's twin on those slices."""
    if stop <= start:
        return
    twin = getattr(_this, family)
    twin(param[start:stop], grad[start:stop],
         *[None if s is None else s[start:stop] for s in state], step=step, **fields,
         grad_multiplier=grad_multiplier, zero_grad=zero_grad)


NORM_BLOCK = 1 << 16     # the blocks grad_norm sums one at a time (C's are smaller)


def grad_norm_blocks(grad, norm_type=2.0):
    """(block sums, nonfinite): the float64 sum of |g|**p (or the max |g|) of each NORM_BLOCK
    elements of a 1-D float32 buffer, in order, and whether any element is NaN or infinite."""
    blocks = np.empty(-(-grad.size // NORM_BLOCK), np.float64)
    nonfinite = False
    for b, lo in enumerate(range(0, grad.size, NORM_BLOCK)):
        x = np.abs(grad[lo:lo + NORM_BLOCK], dtype=np.float64)
        nonfinite = nonfinite or not np.isfinite(x).all()
        if norm_type == 2.0:
            blocks[b] = float(np.dot(x, x))
        elif norm_type == 1.0:
            blocks[b] = float(x.sum())
        elif norm_type == np.inf:
            blocks[b] = float(x.max())
        else:
            blocks[b] = float(np.sum(x ** norm_type))
    return blocks, nonfinite


def norm_from_blocks(blocks, norm_type=2.0):
    """The norm from every block's sum (grad_norm_blocks), in order."""
    total = 0.0
    for s in blocks.tolist():
        if norm_type == np.inf:
            total = s if (s > total or s != s) else total
        else:
            total += s
    if norm_type == 2.0:
        return float(np.sqrt(total))
    if norm_type in (1.0, np.inf):
        return total
    return total ** (1.0 / norm_type)


def grad_norm(grad, norm_type=2.0):
    """(norm, nonfinite) of a 1-D float32 buffer, accumulated in float64 block by block (so no
    float64 copy of the whole buffer is made)."""
    blocks, nonfinite = grad_norm_blocks(grad, norm_type)
    return norm_from_blocks(blocks, norm_type), nonfinite


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    return _clip.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite,
                                 _backend=_this)


clip_grad_norm_.__doc__ = _clip.clip_grad_norm_.__doc__
clip_grad_value_ = _clip.clip_grad_value_


class Stepper:
    """fastopt._core.Stepper's interface in Python: one twin call per segment.  A segment
    whose state is compressed is widened to float32 (fastopt._formats' twins of the C
    codecs), stepped by the family's twin and rounded back: the formats round element by
    element, or (int8) block by block, so a whole segment at once gives C's bits."""

    def __init__(self, family, param, grad, ranges, records, segments=None, signed_mask=0,
                 index_base=0):
        self._family, self._param, self._grad = family, param, grad
        self._ranges = list(ranges)
        if segments is None:
            segments = [(i, r[0], r[1], _formats.FMT_F32, r[0])
                        for i, r in enumerate(self._ranges)]
        self._segments = [list(sg) for sg in segments]
        self._signed = signed_mask
        self._index_base = index_base
        self._seeds = [0] * len(self._ranges)
        names = FAMILIES[family].buffer_names
        self._buffers = {kind: dict.fromkeys(names) for kind in range(3)}
        self._absmax = dict.fromkeys(names)
        self._fields = [{} for _ in self._ranges]

    def set_buffer(self, name, arena, format=_formats.FMT_F32, absmax=None):
        kind = _formats.KIND[format]
        self._buffers[kind][name] = arena
        if kind == 2:
            self._absmax[name] = absmax

    def set_seed(self, i, seed):
        self._seeds[i] = seed

    def set_rounding(self, i, stochastic):
        for sg in self._segments:
            if sg[0] == i and _formats.KIND[sg[3]] == 1:
                sg[3] = _formats.FMT_BF16_SR if stochastic else _formats.FMT_BF16

    def set_fields(self, i, fields):
        self._fields[i].update(fields)

    def run(self, steps, grad_multiplier=1.0, zero_grad=False, lo=0, hi=None):
        fam = FAMILIES[self._family]
        for i, taken in enumerate(steps):       # as the C stepper: checked before any change
            if not 0 <= taken < MAX_STEPS:
                raise ValueError(f"group {i} has taken {taken} steps: the count must stay "
                                 "below 2**63 - 1")
        top = self._param.size if hi is None else hi
        if not 0 <= lo <= top <= self._param.size:
            raise ValueError(f"range [{lo}, {top}) outside the arena of {self._param.size}")
        for i, start, stop, fmt, state_start in self._segments:
            a, b = min(max(start, lo), top), min(max(stop, lo), top)
            if fmt == _formats.FMT_INT8 and a < b and ((a - start) % _formats.QBLOCK or
                                                       (b - start) % _formats.QBLOCK):
                raise ValueError(f"range [{lo}, {top}) cuts an int8 block of group {i}")
        for i, start, stop, fmt, state_start in self._segments:
            a, b = min(max(start, lo), top), min(max(stop, lo), top)
            if a >= b:
                continue
            fields, step = self._fields[i], steps[i] + 1
            used = fam.required(fields)
            kind = _formats.KIND[fmt]
            s0 = state_start + (a - start)
            state, stored = [], []
            for k, name in enumerate(fam.buffer_names):
                if name not in used:
                    state.append(None)
                    continue
                data = self._buffers[kind][name][s0:s0 + b - a]
                am = None
                if kind == 2:
                    am = self._absmax[name][s0 // _formats.QBLOCK:
                                            (s0 + b - a) // _formats.QBLOCK]
                signed = bool(self._signed >> k & 1)
                if kind == 0:
                    state.append(data)
                else:
                    state.append(_formats.widen(fmt, data, am, signed))
                    stored.append((k, data, am, signed))
            values = state
            # the twin on this range's slices (compressed state: float32 copies of it)
            kernel(self._family, self._param[a:b], self._grad[a:b], values, 0, b - a, step,
                   fields, grad_multiplier, zero_grad)
            for k, data, am, signed in stored:
                _formats.narrow(fmt, values[k], data, am, signed, seed=self._seeds[i],
                                step=step, buffer=k, index0=self._index_base + a)


def check_scalars(family, groups, grad_multiplier=1.0):
    """The C stepper's check of its per-step float32 scalars, which this twin does not make
    (see the module docstring): nothing to refuse here."""


# ---- the public API, the same as fastopt's -----------------------------------------------

for _fam in FAMILIES.values():
    _f = _make(_this, _fam)
    _f.__module__ = __name__
    setattr(_this, _f.__name__, _f)
for _name, _spec in OPTIMIZERS.items():
    setattr(_this, _name, optimizer_class(_spec, _this, __name__))
del _fam, _f, _name, _spec

__all__ = ([f + "_" for f in FAMILIES] + list(OPTIMIZERS)
           + ["Optimizer", "clip_grad_norm_", "clip_grad_value_"])
