# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Range kernels: the C core applied to [start, stop) of parallel float32 buffers.

This is the backend behind `fastopt.functional` and the optimizer classes; `fastopt.reference`
has the same three functions in NumPy.  The callers validate hyperparameters and give friendly
messages; the checks here are the last guard before C: the typed memoryviews enforce float32,
C-contiguity and writeability, and every call checks the range against each buffer and that no
two buffers overlap, so C never sees a bad pointer, a wrong length or aliasing buffers.
"""
import os

from libc.stdint cimport int64_t, uintptr_t

from fastopt._cfastopt cimport (
    fo_isa, FO_ISA_BASELINE, FO_ISA_X86_64_V3, fo_best_isa, fo_isa_supported, fo_isa_name,
    fo_sgd_hparams, fo_adam_hparams, fo_rmsprop_hparams, fo_sgd, fo_adam, fo_rmsprop,
)

cdef dict _ISA_BY_NAME = {"baseline": FO_ISA_BASELINE, "x86-64-v3": FO_ISA_X86_64_V3}
cdef fo_isa _isa = fo_best_isa()


def available_isas():
    """Names of the instruction-set paths that this build has and this CPU runs."""
    return [name for name, isa in _ISA_BY_NAME.items() if fo_isa_supported(isa)]


def get_isa():
    """The name of the path the kernels run: 'baseline' or 'x86-64-v3'."""
    for name, isa in _ISA_BY_NAME.items():
        if isa == _isa:
            return name


def isa_description():
    return fo_isa_name(_isa).decode()


def set_isa(name):
    """Run the kernels on the named path (see available_isas); results are identical on each."""
    global _isa
    if name not in _ISA_BY_NAME:
        raise ValueError(f"isa must be one of {sorted(_ISA_BY_NAME)}, got {name!r}")
    if not fo_isa_supported(_ISA_BY_NAME[name]):
        raise ValueError(f"isa {name!r} is not supported by this build or CPU")
    _isa = _ISA_BY_NAME[name]


_forced = os.environ.get("FASTOPT_ISA", "")
if _forced:
    set_isa(_forced)


cdef inline void _check_range(str name, Py_ssize_t length, Py_ssize_t start, Py_ssize_t stop) except *:
    if start < 0 or stop < start or stop > length:
        raise ValueError(f"{name}: range [{start}, {stop}) outside a buffer of length {length}")


cdef inline void _check_disjoint(list names, list ptrs, Py_ssize_t nbytes) except *:
    """Raise if any two of the [ptr, ptr + nbytes) ranges overlap (n is at most 5)."""
    cdef Py_ssize_t i, j
    cdef uintptr_t a, b
    if nbytes == 0:
        return
    for i in range(len(ptrs)):
        for j in range(i + 1, len(ptrs)):
            a = ptrs[i]
            b = ptrs[j]
            if a < b + <uintptr_t>nbytes and b < a + <uintptr_t>nbytes:
                raise ValueError(f"{names[i]} and {names[j]} overlap in memory; "
                                 "every buffer must be a separate array")


def sgd(float[::1] param, const float[::1] grad, float[::1] momentum_buffer,
        Py_ssize_t start, Py_ssize_t stop, double lr, double momentum, double dampening,
        double weight_decay, bint nesterov, bint maximize, bint first_step):
    cdef fo_sgd_hparams hp
    cdef Py_ssize_t n = stop - start
    cdef float *buf = NULL
    _check_range("param", param.shape[0], start, stop)
    _check_range("grad", grad.shape[0], start, stop)
    if momentum != 0.0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum != 0")
        _check_range("momentum_buffer", momentum_buffer.shape[0], start, stop)
    if n == 0:
        return
    names = ["param", "grad"]
    ptrs = [<uintptr_t>&param[start], <uintptr_t>&grad[start]]
    if momentum != 0.0:
        buf = &momentum_buffer[start]
        names.append("momentum_buffer")
        ptrs.append(<uintptr_t>buf)
    _check_disjoint(names, ptrs, n * sizeof(float))
    hp.lr = lr
    hp.momentum = momentum
    hp.dampening = dampening
    hp.weight_decay = weight_decay
    hp.nesterov = nesterov
    hp.maximize = maximize
    hp.first_step = first_step
    with nogil:
        fo_sgd(_isa, &param[start], &grad[start], buf, <size_t>n, &hp)


def adam(float[::1] param, const float[::1] grad, float[::1] exp_avg, float[::1] exp_avg_sq,
         float[::1] max_exp_avg_sq, Py_ssize_t start, Py_ssize_t stop, int64_t step,
         double lr, double beta1, double beta2, double eps, double weight_decay,
         bint decoupled, bint amsgrad, bint maximize):
    cdef fo_adam_hparams hp
    cdef Py_ssize_t n = stop - start
    cdef float *vmax = NULL
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    _check_range("param", param.shape[0], start, stop)
    _check_range("grad", grad.shape[0], start, stop)
    _check_range("exp_avg", exp_avg.shape[0], start, stop)
    _check_range("exp_avg_sq", exp_avg_sq.shape[0], start, stop)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("max_exp_avg_sq is required when amsgrad=True")
        _check_range("max_exp_avg_sq", max_exp_avg_sq.shape[0], start, stop)
    if n == 0:
        return
    names = ["param", "grad", "exp_avg", "exp_avg_sq"]
    ptrs = [<uintptr_t>&param[start], <uintptr_t>&grad[start], <uintptr_t>&exp_avg[start],
            <uintptr_t>&exp_avg_sq[start]]
    if amsgrad:
        vmax = &max_exp_avg_sq[start]
        names.append("max_exp_avg_sq")
        ptrs.append(<uintptr_t>vmax)
    _check_disjoint(names, ptrs, n * sizeof(float))
    hp.lr = lr
    hp.beta1 = beta1
    hp.beta2 = beta2
    hp.eps = eps
    hp.weight_decay = weight_decay
    hp.step = step
    hp.decoupled = decoupled
    hp.amsgrad = amsgrad
    hp.maximize = maximize
    with nogil:
        fo_adam(_isa, &param[start], &grad[start], &exp_avg[start], &exp_avg_sq[start], vmax,
                <size_t>n, &hp)


def rmsprop(float[::1] param, const float[::1] grad, float[::1] square_avg,
            float[::1] momentum_buffer, float[::1] grad_avg, Py_ssize_t start, Py_ssize_t stop,
            double lr, double alpha, double eps, double weight_decay, double momentum,
            bint centered, bint maximize):
    cdef fo_rmsprop_hparams hp
    cdef Py_ssize_t n = stop - start
    cdef float *buf = NULL
    cdef float *gavg = NULL
    _check_range("param", param.shape[0], start, stop)
    _check_range("grad", grad.shape[0], start, stop)
    _check_range("square_avg", square_avg.shape[0], start, stop)
    if momentum > 0.0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum > 0")
        _check_range("momentum_buffer", momentum_buffer.shape[0], start, stop)
    if centered:
        if grad_avg is None:
            raise ValueError("grad_avg is required when centered=True")
        _check_range("grad_avg", grad_avg.shape[0], start, stop)
    if n == 0:
        return
    names = ["param", "grad", "square_avg"]
    ptrs = [<uintptr_t>&param[start], <uintptr_t>&grad[start], <uintptr_t>&square_avg[start]]
    if momentum > 0.0:
        buf = &momentum_buffer[start]
        names.append("momentum_buffer")
        ptrs.append(<uintptr_t>buf)
    if centered:
        gavg = &grad_avg[start]
        names.append("grad_avg")
        ptrs.append(<uintptr_t>gavg)
    _check_disjoint(names, ptrs, n * sizeof(float))
    hp.lr = lr
    hp.alpha = alpha
    hp.eps = eps
    hp.weight_decay = weight_decay
    hp.momentum = momentum
    hp.centered = centered
    hp.maximize = maximize
    with nogil:
        fo_rmsprop(_isa, &param[start], &grad[start], &square_avg[start], buf, gavg,
                   <size_t>n, &hp)
