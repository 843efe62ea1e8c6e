# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The C core's Python face: range kernels, the arena Stepper, ISA and thread control.

This is the backend behind `fastopt.functional` and the optimizer classes; `fastopt.reference`
has the same interface in NumPy.  The callers validate hyperparameters and give friendly
messages; the checks here are the last guard before C: typed memoryviews enforce float32,
C-contiguity and writeability, and every range is checked against every buffer, and every pair
of buffers for overlap, so C never sees a bad pointer, a wrong length or aliasing buffers.
"""
import os

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc

from fastopt._cfastopt cimport (
    fo_isa, FO_ISA_BASELINE, FO_ISA_X86_64_V3, FO_ISA_X86_64_V4, fo_best_isa, fo_isa_supported,
    fo_isa_name, fo_have_openmp, fo_compiler, fo_compile_flags, fo_exec, fo_grad_opts, fo_sgd_group, fo_adam_group,
    fo_rmsprop_group, fo_sgd, fo_adam, fo_rmsprop, fo_probe_r4w3, fo_probe_r3w2,
    fo_norm_blocks, fo_grad_norm,
    fo_omp_max_threads,
)

# ---- run-time choices: ISA path and threads ------------------------------------------------

cdef dict _ISA_BY_NAME = {"baseline": FO_ISA_BASELINE, "x86-64-v3": FO_ISA_X86_64_V3,
                          "x86-64-v4": FO_ISA_X86_64_V4}
cdef fo_isa _isa = fo_best_isa()

# Below this many elements per thread a step stays on one thread.  On a quiet 2-core machine a
# second thread gains nothing at 16,000 elements and 1.5x at 32,000 (bench/run.py
# --min-per-thread 1, see README, Threads and SIMD); the threshold sits a step above that.
DEFAULT_MIN_PER_THREAD = 1 << 15
cdef size_t _min_per_thread = DEFAULT_MIN_PER_THREAD


def available_isas():
    """Names of the instruction-set paths that this build has and this CPU runs."""
    return [name for name, isa in _ISA_BY_NAME.items() if fo_isa_supported(isa)]


def get_isa():
    """The name of the path the kernels run: 'baseline', 'x86-64-v3' or 'x86-64-v4'."""
    return fo_isa_name(_isa).decode()


def set_isa(name):
    """Run the kernels on the named path (see available_isas); results are identical on each."""
    global _isa
    if name not in _ISA_BY_NAME:
        raise ValueError(f"isa must be one of {sorted(_ISA_BY_NAME)}, got {name!r}")
    if not fo_isa_supported(_ISA_BY_NAME[name]):
        raise ValueError(f"isa {name!r} is not supported by this build or CPU")
    _isa = _ISA_BY_NAME[name]


def have_openmp():
    return bool(fo_have_openmp())


def compiler():
    return fo_compiler().decode()


def compile_flags():
    return fo_compile_flags().decode()


def _threads_from_env():
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", "1").split(",")[0])
    except ValueError:
        return 1
    return max(n, 1)


# fastopt's own thread setting.  It defaults to one thread unless OMP_NUM_THREADS says
# otherwise: a training step sits between the model's own (often BLAS-threaded) work, and on
# a busy or shared machine a parallel region whose second thread is descheduled, or spins
# against BLAS's threads, waits for it (measured here: slower than one thread beside one busy
# process, and up to 7.7 ms for a 0.16 ms step beside several multithreaded jobs).  Threads
# are for those who ask: set_num_threads(n).
cdef int _num_threads = _threads_from_env()


def get_num_threads():
    """Threads a step may use: set_num_threads's value (default: OMP_NUM_THREADS, else 1),
    capped by OpenMP's own limit, so threadpoolctl's threadpool_limits applies to it; 1
    without OpenMP."""
    if not fo_have_openmp():
        return 1
    return min(_num_threads, fo_omp_max_threads())


def set_num_threads(n):
    """Let steps use up to n threads (OpenMP; capped by OpenMP's limit, see get_num_threads)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > 1 and not fo_have_openmp():
        raise ValueError("this build of fastopt has no OpenMP: it runs on one thread")
    _num_threads = n


def get_min_per_thread():
    return _min_per_thread


def set_min_per_thread(n):
    """Elements each thread must get before a step uses more than one (tuning and tests)."""
    global _min_per_thread
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _min_per_thread = n


cdef inline fo_exec _exec() noexcept:
    cdef fo_exec ex
    cdef int cap = fo_omp_max_threads()
    ex.isa = _isa
    ex.num_threads = _num_threads if _num_threads < cap else cap
    ex.min_per_thread = _min_per_thread
    return ex


_forced = os.environ.get("FASTOPT_ISA", "")
if _forced:
    set_isa(_forced)


# ---- checks ---------------------------------------------------------------------------------

def address(obj):
    """The address of a contiguous buffer's first byte (for overlap checks: fast, unlike
    ndarray.__array_interface__)."""
    cdef Py_buffer view
    PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
    cdef uintptr_t p = <uintptr_t>view.buf
    PyBuffer_Release(&view)
    return p


cdef inline void _check_range(str name, Py_ssize_t length, Py_ssize_t start, Py_ssize_t stop) except *:
    if start < 0 or stop < start or stop > length:
        raise ValueError(f"{name}: range [{start}, {stop}) outside a buffer of length {length}")


cdef void _check_disjoint(list names, list ptrs, list nbytes) except *:
    """Raise if any two of the [ptr, ptr + nbytes) ranges overlap (a handful at most)."""
    cdef Py_ssize_t i, j
    cdef uintptr_t a, b, na, nb
    for i in range(len(ptrs)):
        for j in range(i + 1, len(ptrs)):
            a, na = ptrs[i], nbytes[i]
            b, nb = ptrs[j], nbytes[j]
            if na and nb and a < b + nb and b < a + na:
                raise ValueError(f"{names[i]} and {names[j]} overlap in memory; "
                                 "every buffer must be a separate array")


cdef float *_grad_ptr(object grad, bint writable, Py_ssize_t *length, list keep) except? NULL:
    """Pointer to the gradient's data: writable when the step zeroes it, else read-only is fine."""
    cdef float[::1] w
    cdef const float[::1] r
    if writable:
        w = grad
        keep.append(w)
        length[0] = w.shape[0]
        return &w[0] if w.shape[0] else NULL
    r = grad
    keep.append(r)
    length[0] = r.shape[0]
    return <float *>&r[0] if r.shape[0] else NULL


cdef uintptr_t _addr(float[::1] v):
    return <uintptr_t>&v[0] if v.shape[0] else 0


cdef inline fo_grad_opts _grad_opts(double grad_multiplier, bint zero_grad) noexcept:
    cdef fo_grad_opts g
    g.grad_multiplier = grad_multiplier
    g.zero_grad = zero_grad
    return g


# ---- range kernels: one group [start, stop) of 1-D buffers (the functional API's backend) ---

def sgd(float[::1] param, grad, float[::1] momentum_buffer, Py_ssize_t start, Py_ssize_t stop,
        double lr, double momentum, double dampening, double weight_decay, bint nesterov,
        bint maximize, bint first_step, double grad_multiplier=1.0, bint zero_grad=False):
    cdef fo_sgd_group grp
    cdef Py_ssize_t n = stop - start, glen
    cdef list keep = []
    cdef float *g = _grad_ptr(grad, zero_grad, &glen, keep)
    cdef float *buf = NULL
    cdef fo_exec ex = _exec()
    _check_range("param", param.shape[0], start, stop)
    _check_range("grad", glen, start, stop)
    if momentum != 0.0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum != 0")
        _check_range("momentum_buffer", momentum_buffer.shape[0], start, stop)
    if n == 0:
        return
    names, ptrs = ["param", "grad"], [<uintptr_t>&param[start], <uintptr_t>(g + start)]
    if momentum != 0.0:
        buf = &momentum_buffer[0]
        names.append("momentum_buffer")
        ptrs.append(<uintptr_t>(buf + start))
    _check_disjoint(names, ptrs, [n * sizeof(float)] * len(ptrs))
    grp.start, grp.stop = start, stop
    grp.g = _grad_opts(grad_multiplier, zero_grad)
    grp.hp.lr, grp.hp.momentum, grp.hp.dampening = lr, momentum, dampening
    grp.hp.weight_decay, grp.hp.nesterov, grp.hp.maximize = weight_decay, nesterov, maximize
    grp.hp.first_step = first_step
    with nogil:
        fo_sgd(&ex, &param[0], g, buf, &grp, 1)


def adam(float[::1] param, grad, float[::1] exp_avg, float[::1] exp_avg_sq,
         float[::1] max_exp_avg_sq, Py_ssize_t start, Py_ssize_t stop, int64_t step,
         double lr, double beta1, double beta2, double eps, double weight_decay,
         bint decoupled, bint amsgrad, bint maximize, double grad_multiplier=1.0,
         bint zero_grad=False):
    cdef fo_adam_group grp
    cdef Py_ssize_t n = stop - start, glen
    cdef list keep = []
    cdef float *g = _grad_ptr(grad, zero_grad, &glen, keep)
    cdef float *vmax = NULL
    cdef fo_exec ex = _exec()
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    _check_range("param", param.shape[0], start, stop)
    _check_range("grad", glen, start, stop)
    _check_range("exp_avg", exp_avg.shape[0], start, stop)
    _check_range("exp_avg_sq", exp_avg_sq.shape[0], start, stop)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("max_exp_avg_sq is required when amsgrad=True")
        _check_range("max_exp_avg_sq", max_exp_avg_sq.shape[0], start, stop)
    if n == 0:
        return
    names = ["param", "grad", "exp_avg", "exp_avg_sq"]
    ptrs = [<uintptr_t>&param[start], <uintptr_t>(g + start), <uintptr_t>&exp_avg[start],
            <uintptr_t>&exp_avg_sq[start]]
    if amsgrad:
        vmax = &max_exp_avg_sq[0]
        names.append("max_exp_avg_sq")
        ptrs.append(<uintptr_t>(vmax + start))
    _check_disjoint(names, ptrs, [n * sizeof(float)] * len(ptrs))
    grp.start, grp.stop = start, stop
    grp.g = _grad_opts(grad_multiplier, zero_grad)
    grp.hp.lr, grp.hp.beta1, grp.hp.beta2, grp.hp.eps = lr, beta1, beta2, eps
    grp.hp.weight_decay, grp.hp.step, grp.hp.decoupled = weight_decay, step, decoupled
    grp.hp.amsgrad, grp.hp.maximize = amsgrad, maximize
    with nogil:
        fo_adam(&ex, &param[0], g, &exp_avg[0], &exp_avg_sq[0], vmax, &grp, 1)


def rmsprop(float[::1] param, grad, float[::1] square_avg, float[::1] momentum_buffer,
            float[::1] grad_avg, Py_ssize_t start, Py_ssize_t stop, double lr, double alpha,
            double eps, double weight_decay, double momentum, bint centered, bint maximize,
            double grad_multiplier=1.0, bint zero_grad=False):
    cdef fo_rmsprop_group grp
    cdef Py_ssize_t n = stop - start, glen
    cdef list keep = []
    cdef float *g = _grad_ptr(grad, zero_grad, &glen, keep)
    cdef float *buf = NULL
    cdef float *gavg = NULL
    cdef fo_exec ex = _exec()
    _check_range("param", param.shape[0], start, stop)
    _check_range("grad", glen, start, stop)
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
    ptrs = [<uintptr_t>&param[start], <uintptr_t>(g + start), <uintptr_t>&square_avg[start]]
    if momentum > 0.0:
        buf = &momentum_buffer[0]
        names.append("momentum_buffer")
        ptrs.append(<uintptr_t>(buf + start))
    if centered:
        gavg = &grad_avg[0]
        names.append("grad_avg")
        ptrs.append(<uintptr_t>(gavg + start))
    _check_disjoint(names, ptrs, [n * sizeof(float)] * len(ptrs))
    grp.start, grp.stop = start, stop
    grp.g = _grad_opts(grad_multiplier, zero_grad)
    grp.hp.lr, grp.hp.alpha, grp.hp.eps = lr, alpha, eps
    grp.hp.weight_decay, grp.hp.momentum = weight_decay, momentum
    grp.hp.centered, grp.hp.maximize = centered, maximize
    with nogil:
        fo_rmsprop(&ex, &param[0], g, &square_avg[0], buf, gavg, &grp, 1)


# ---- the arena stepper: every group of an optimizer in one C call --------------------------

cdef enum:
    SGD = 0
    ADAM = 1
    RMSPROP = 2

cdef dict _FAMILY = {"sgd": SGD, "adam": ADAM, "rmsprop": RMSPROP}
cdef dict _BUFFERS = {"sgd": ("momentum_buffer",),
                      "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                      "rmsprop": ("square_avg", "momentum_buffer", "grad_avg")}


cdef class Stepper:
    """Steps every group of one optimizer's arena with a single C call.

    Stepper(family, param, grad, ranges): `param` and `grad` are the arenas, `ranges` each
    group's (start, stop), in order and disjoint.  set_buffer(name, arena) adds a state arena;
    set_group(i, hp, step, first_step) sets a group's hyperparameters (a tuple in the order
    of fastopt._validate's checks) and counters; run(grad_multiplier, zero_grad) takes one step
    of every group and advances the counters.  Every pointer handed to C is checked here once:
    arenas of one length, disjoint; a buffer a group's options need is present.
    """
    cdef int family
    cdef str family_name
    cdef Py_ssize_t n, ngroups
    cdef float *param
    cdef float *grad
    cdef float *bufs[3]       # the family's state arenas, in _BUFFERS order; NULL until set
    cdef dict arrays          # keeps every arena alive while its pointer is held
    cdef void *groups
    cdef bint *ready          # per group: hyperparameters have been set

    def __cinit__(self, str family, float[::1] param not None, float[::1] grad not None,
                  list ranges):
        cdef Py_ssize_t i, start, stop, prev = 0
        cdef size_t size
        if family not in _FAMILY:
            raise ValueError(f"family must be one of {sorted(_FAMILY)}, got {family!r}")
        self.family = _FAMILY[family]
        self.family_name = family
        self.n = param.shape[0]
        if grad.shape[0] != self.n:
            raise ValueError("grad arena and param arena differ in length")
        _check_disjoint(["param", "grad"], [_addr(param), _addr(grad)],
                        [self.n * sizeof(float)] * 2)
        self.arrays = {"param": param.base, "grad": grad.base}
        self.param = &param[0] if self.n else NULL
        self.grad = &grad[0] if self.n else NULL
        self.bufs[0] = self.bufs[1] = self.bufs[2] = NULL
        self.ngroups = len(ranges)
        size = (sizeof(fo_sgd_group) if self.family == SGD else
                sizeof(fo_adam_group) if self.family == ADAM else sizeof(fo_rmsprop_group))
        self.groups = calloc(max(self.ngroups, 1), size)
        self.ready = <bint *>calloc(max(self.ngroups, 1), sizeof(bint))
        if self.groups == NULL or self.ready == NULL:
            raise MemoryError()
        for i in range(self.ngroups):
            start, stop = ranges[i]
            if start < prev or stop < start or stop > self.n:
                raise ValueError(f"group range {i} ({start}, {stop}) is out of order or "
                                 f"outside the arena of {self.n}")
            prev = stop
            self._set_range(i, start, stop)

    def __dealloc__(self):
        free(self.groups)
        free(self.ready)

    cdef void _set_range(self, Py_ssize_t i, size_t start, size_t stop) noexcept:
        if self.family == SGD:
            (<fo_sgd_group *>self.groups)[i].start = start
            (<fo_sgd_group *>self.groups)[i].stop = stop
        elif self.family == ADAM:
            (<fo_adam_group *>self.groups)[i].start = start
            (<fo_adam_group *>self.groups)[i].stop = stop
        else:
            (<fo_rmsprop_group *>self.groups)[i].start = start
            (<fo_rmsprop_group *>self.groups)[i].stop = stop

    def set_buffer(self, str name, float[::1] arena not None):
        """Add the state arena `name` (same length as the params, overlapping nothing)."""
        names = _BUFFERS[self.family_name]
        if name not in names:
            raise ValueError(f"{self.family_name} has no state buffer {name!r}")
        if arena.shape[0] != self.n:
            raise ValueError(f"{name} has length {arena.shape[0]}, the arena {self.n}")
        slot = names.index(name)
        others = [("param", <uintptr_t>self.param), ("grad", <uintptr_t>self.grad)]
        for k in range(len(names)):
            if k != slot and self.bufs[k] != NULL:
                others.append((names[k], <uintptr_t>self.bufs[k]))
        _check_disjoint([name] + [k for k, _ in others], [_addr(arena)] + [p for _, p in others],
                        [self.n * sizeof(float)] * (1 + len(others)))
        self.arrays[name] = arena.base
        self.bufs[slot] = &arena[0] if self.n else NULL

    def set_group(self, Py_ssize_t i, tuple hp, int64_t step=0, bint first_step=False):
        """Hyperparameters of group i (validated by the caller) and its step counter."""
        if i < 0 or i >= self.ngroups:
            raise IndexError(f"group {i} of {self.ngroups}")
        cdef fo_sgd_group *s
        cdef fo_adam_group *a
        cdef fo_rmsprop_group *r
        if self.family == SGD:
            s = &(<fo_sgd_group *>self.groups)[i]
            (s.hp.lr, s.hp.momentum, s.hp.dampening, s.hp.weight_decay, s.hp.nesterov,
             s.hp.maximize) = hp
            s.hp.first_step = first_step
        elif self.family == ADAM:
            a = &(<fo_adam_group *>self.groups)[i]
            (a.hp.lr, a.hp.beta1, a.hp.beta2, a.hp.eps, a.hp.weight_decay, a.hp.decoupled,
             a.hp.amsgrad, a.hp.maximize) = hp
            a.hp.step = step
        else:
            r = &(<fo_rmsprop_group *>self.groups)[i]
            (r.hp.lr, r.hp.alpha, r.hp.eps, r.hp.weight_decay, r.hp.momentum, r.hp.centered,
             r.hp.maximize) = hp
        self.ready[i] = True

    def get_step(self, Py_ssize_t i):
        """Adam's step count of group i (the last step taken)."""
        if i < 0 or i >= self.ngroups:
            raise IndexError(f"group {i} of {self.ngroups}")
        if self.family == ADAM:
            return (<fo_adam_group *>self.groups)[i].hp.step
        return 0

    def run(self, double grad_multiplier=1.0, bint zero_grad=False):
        """One step of every group: Adam's counters advance first, SGD's first step ends."""
        cdef Py_ssize_t i
        cdef fo_exec ex = _exec()
        cdef fo_grad_opts g = _grad_opts(grad_multiplier, zero_grad)
        cdef fo_sgd_group *s = <fo_sgd_group *>self.groups
        cdef fo_adam_group *a = <fo_adam_group *>self.groups
        cdef fo_rmsprop_group *r = <fo_rmsprop_group *>self.groups
        cdef float *b0 = self.bufs[0]
        cdef float *b1 = self.bufs[1]
        cdef float *b2 = self.bufs[2]
        if self.n == 0:
            return
        for i in range(self.ngroups):           # check everything before changing anything
            if not self.ready[i]:
                raise RuntimeError(f"group {i} has no hyperparameters set")
            if self.family == SGD:
                if s[i].hp.momentum != 0.0 and b0 == NULL:
                    raise ValueError("momentum_buffer is required when momentum != 0")
            elif self.family == ADAM:
                if b0 == NULL or b1 == NULL or (a[i].hp.amsgrad and b2 == NULL):
                    raise ValueError("exp_avg, exp_avg_sq (and max_exp_avg_sq with amsgrad) "
                                     "are required")
            else:
                if b0 == NULL or (r[i].hp.momentum > 0.0 and b1 == NULL) or \
                        (r[i].hp.centered and b2 == NULL):
                    raise ValueError("square_avg (and momentum_buffer with momentum, grad_avg "
                                     "when centered) are required")
        for i in range(self.ngroups):
            if self.family == SGD:
                s[i].g = g
            elif self.family == ADAM:
                a[i].g = g
                a[i].hp.step += 1
            else:
                r[i].g = g
        with nogil:
            if self.family == SGD:
                fo_sgd(&ex, self.param, self.grad, b0, s, self.ngroups)
                for i in range(self.ngroups):
                    s[i].hp.first_step = 0
            elif self.family == ADAM:
                fo_adam(&ex, self.param, self.grad, b0, b1, b2, a, self.ngroups)
            else:
                fo_rmsprop(&ex, self.param, self.grad, b0, b1, b2, r, self.ngroups)


# ---- gradient norm ----------------------------------------------------------------------------

def grad_norm(const float[::1] grad not None, double norm_type=2.0):
    """(norm, nonfinite): the norm_type-norm of grad, accumulated in double (deterministic for
    any thread count), and whether any element is NaN or infinite.  One pass."""
    cdef Py_ssize_t n = grad.shape[0]
    cdef int bad = 0
    cdef double total
    cdef fo_exec ex = _exec()
    cdef double *blocks
    if not norm_type > 0.0:
        raise ValueError(f"norm_type must be > 0, got {norm_type!r}")
    if n == 0:
        return 0.0, False
    blocks = <double *>malloc(fo_norm_blocks(n) * sizeof(double))
    if blocks == NULL:
        raise MemoryError()
    with nogil:
        total = fo_grad_norm(&ex, &grad[0], n, norm_type, blocks, &bad)
    free(blocks)
    return total, bool(bad)


# ---- bandwidth probes (for bench/run.py) ----------------------------------------------------

def probe_r4w3(float[::1] a not None, const float[::1] b not None, float[::1] c not None,
               float[::1] d not None):
    """a += b; c += b; d += b: Adam's memory traffic (read 4, write 3) at the kernels' threads."""
    cdef Py_ssize_t n = a.shape[0]
    cdef fo_exec ex = _exec()
    if b.shape[0] != n or c.shape[0] != n or d.shape[0] != n:
        raise ValueError("probe buffers must have one length")
    if n == 0:
        return
    _check_disjoint(["a", "b", "c", "d"], [<uintptr_t>&a[0], <uintptr_t>&b[0],
                                           <uintptr_t>&c[0], <uintptr_t>&d[0]],
                    [n * sizeof(float)] * 4)
    with nogil:
        fo_probe_r4w3(&ex, &a[0], &b[0], &c[0], &d[0], n)


def probe_r3w2(float[::1] a not None, const float[::1] b not None, float[::1] c not None):
    """a += b; c += b: SGD-with-momentum's and RMSprop's traffic (read 3, write 2)."""
    cdef Py_ssize_t n = a.shape[0]
    cdef fo_exec ex = _exec()
    if b.shape[0] != n or c.shape[0] != n:
        raise ValueError("probe buffers must have one length")
    if n == 0:
        return
    _check_disjoint(["a", "b", "c"], [<uintptr_t>&a[0], <uintptr_t>&b[0], <uintptr_t>&c[0]],
                    [n * sizeof(float)] * 3)
    with nogil:
        fo_probe_r3w2(&ex, &a[0], &b[0], &c[0], n)
