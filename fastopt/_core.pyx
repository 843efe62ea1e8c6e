# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The C core's Python face: the families' kernel, the arena Stepper, ISA and thread control.

This is the backend behind `fastopt.functional` and the optimizer classes; `fastopt.reference`
has the same interface in NumPy.  The callers validate hyperparameters and give friendly
messages; the checks here are the last guard before C: typed memoryviews enforce float32,
C-contiguity and writeability, and every range is checked against every buffer, and every pair
of buffers for overlap, so C never sees a bad pointer, a wrong length or aliasing buffers.
"""
import os

import numpy as np

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int32_t, int64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc

from fastopt._cfastopt cimport (
    fo_isa, FO_ISA_BASELINE, FO_ISA_X86_64_V3, FO_ISA_X86_64_V4, fo_best_isa, fo_isa_supported,
    fo_isa_name, fo_have_openmp, fo_compiler, fo_compile_flags, fo_exec, fo_grad_opts,
    fo_group, fo_family, fo_field, FO_F64, FO_MAX_BUFFERS, fo_family_count, fo_family_at,
    fo_family_find, fo_step, fo_check, fo_probe_r4w3, fo_probe_r3w2, fo_norm_blocks, fo_grad_norm,
    FO_NORM_BLOCK, fo_norm_block_sums, fo_norm_combine,
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


# More threads than any machine has; a larger count is a mistake, not a request.
cdef enum:
    MAX_THREADS_C = 65536
MAX_THREADS = MAX_THREADS_C


def _threads_from_env():
    """OMP_NUM_THREADS's first entry, or 1.  A value that cannot be honoured is a warning and
    the default, never a failed import."""
    raw = os.environ.get("OMP_NUM_THREADS")
    if raw is None or not raw.strip():
        return 1
    try:
        n = int(raw.split(",")[0])
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        import warnings
        warnings.warn(f"fastopt: OMP_NUM_THREADS={raw!r} is not a thread count from 1 to "
                      f"{MAX_THREADS}; fastopt uses 1 thread (set_num_threads changes it)",
                      RuntimeWarning, stacklevel=2)
        return 1
    return n


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
    return min(_num_threads, _omp_cap())


def set_num_threads(n):
    """Let steps use up to n threads (OpenMP; capped by OpenMP's limit, see get_num_threads)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n must be from 1 to {MAX_THREADS}, got {n}")
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


cdef inline int _omp_cap() noexcept:
    """OpenMP's own thread limit; an OMP_NUM_THREADS past int's range leaves it negative in
    libgomp, which is then no limit (fastopt's own count is bounded and warned about)."""
    cdef int cap = fo_omp_max_threads()
    return cap if cap >= 1 else MAX_THREADS_C


cdef inline fo_exec _exec() noexcept:
    cdef fo_exec ex
    cdef int cap = _omp_cap()
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


# ---- the families: one generic kernel call and the arena stepper ---------------------------

# a group's step count must leave room for the step being taken in C's int64_t
cdef int64_t MAX_STEP = 0x7FFFFFFFFFFFFFFF


cdef const fo_family *_family(str name) except NULL:
    cdef const fo_family *f = fo_family_find(name.encode())
    if f == NULL:
        raise ValueError(f"no optimizer family {name!r} in this build")
    return f


def family_layout(str name):
    """(sizeof the C hyperparameter struct, [(field, offset, 'f8' or 'i4')], [buffers]) of a
    family, as csrc/ declares it: the Python declaration's dtype must agree."""
    cdef const fo_family *f = _family(name)
    cdef size_t k
    fields = [(f.fields[k].name.decode(), f.fields[k].offset,
               "f8" if f.fields[k].type == FO_F64 else "i4") for k in range(f.nfields)]
    buffers = [f.buffers[k].decode() for k in range(f.nbuffers)]
    return f.hparams_size, fields, buffers


def family_names():
    """The families this build has."""
    cdef size_t i
    return [fo_family_at(i).name.decode() for i in range(fo_family_count())]


def family_needs(str name, record):
    """The state buffers (names) a one-element record of the family's dtype makes the C kernel
    use: the C side of fastopt.families' `needs`, for the tests."""
    cdef const fo_family *f = _family(name)
    cdef const unsigned char[::1] raw = _record_bytes(f, record)
    cdef unsigned used = f.needs(&raw[0])
    return [f.buffers[k].decode() for k in range(f.nbuffers) if used >> k & 1]


cdef object _record_bytes(const fo_family *f, record):
    raw = record.view("u1").reshape(-1)
    if raw.shape[0] != f.hparams_size:
        raise ValueError(f"hyperparameter record of {raw.shape[0]} bytes, {f.name.decode()}'s "
                         f"struct has {f.hparams_size}")
    return raw


cdef void _check_layout(const fo_family *f, object dtype) except *:
    """The record dtype must be the C struct: same size, same fields at the same offsets."""
    cdef size_t k
    if dtype.itemsize != f.hparams_size or len(dtype.names) != <Py_ssize_t>f.nfields:
        raise ValueError(f"{f.name.decode()}: the hyperparameter dtype ({dtype.itemsize} bytes, "
                         f"{len(dtype.names)} fields) is not the C struct ({f.hparams_size} "
                         f"bytes, {f.nfields} fields)")
    for k in range(f.nfields):
        name = f.fields[k].name.decode()
        want = "f8" if f.fields[k].type == FO_F64 else "i4"
        if dtype.names[k] != name or dtype.fields[name][1] != f.fields[k].offset or \
                dtype.fields[name][0].str[1:] != want:
            raise ValueError(f"{f.name.decode()}: field {k} of the hyperparameter dtype is "
                             f"{dtype.names[k]!r}, C has {name!r} ({want}) at offset "
                             f"{f.fields[k].offset}")


cdef dict _FIELDS = {}   # family -> ((name, offset, is_double), ...) from C's table, decoded once


cdef int _pack(const fo_family *f, str family, dict fields, unsigned char *out) except -1:
    """Write the fields into a C struct of the family's, by name, at C's own offsets."""
    cdef size_t k
    cdef Py_ssize_t off
    table = _FIELDS.get(family)
    if table is None:
        table = _FIELDS[family] = tuple(
            (f.fields[k].name.decode(), f.fields[k].offset, f.fields[k].type == FO_F64)
            for k in range(f.nfields))
    for name, off, is_double in table:
        try:
            value = fields[name]
        except KeyError:
            raise ValueError(f"{family}: hyperparameter {name!r} is not given") from None
        if is_double:
            (<double *>(out + off))[0] = value
        else:
            (<int32_t *>(out + off))[0] = value
    return 0


def kernel(str family, float[::1] param, grad, list state, Py_ssize_t start, Py_ssize_t stop,
           int64_t step, dict fields, double grad_multiplier=1.0, bint zero_grad=False):
    """One group [start, stop) of 1-D buffers: the functional API's backend.

    state: the family's buffers in its order (None where unused); fields: the kernel's
    hyperparameters by name (validated by the caller); step: the 1-based count of the step
    being taken."""
    cdef const fo_family *f = _family(family)
    cdef double storage[64]                 # the struct, 8-byte aligned (checked below)
    cdef unsigned char *raw = <unsigned char *>storage
    cdef fo_group grp
    cdef fo_grad_opts opts
    cdef float *bufs[FO_MAX_BUFFERS]
    cdef float[::1] b
    cdef Py_ssize_t n = stop - start, glen = 0
    cdef size_t k
    cdef list keep = []
    cdef float *g = _grad_ptr(grad, zero_grad, &glen, keep)
    cdef unsigned used
    cdef fo_exec ex = _exec()
    if f.hparams_size > sizeof(storage):
        raise ValueError(f"{family}: hyperparameter struct of {f.hparams_size} bytes")
    _pack(f, family, fields, raw)
    used = f.needs(raw)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if len(state) != <Py_ssize_t>f.nbuffers:
        raise ValueError(f"{family} takes {f.nbuffers} state buffers, got {len(state)}")
    _check_range("param", param.shape[0], start, stop)
    _check_range("grad", glen, start, stop)
    for k in range(<size_t>FO_MAX_BUFFERS):
        bufs[k] = NULL
    for k in range(f.nbuffers):
        if not used >> k & 1:
            continue
        if state[k] is None:
            raise ValueError(f"{f.buffers[k].decode()} is required by the options given")
        b = state[k]
        keep.append(b)
        _check_range(f.buffers[k].decode(), b.shape[0], start, stop)
        if b.shape[0]:
            bufs[k] = &b[0]
    if n == 0:
        return
    # C never sees two overlapping buffers
    cdef uintptr_t spans[2 + FO_MAX_BUFFERS]
    cdef size_t count = 2, i, j
    cdef uintptr_t nbytes = n * sizeof(float)
    spans[0], spans[1] = <uintptr_t>&param[start], <uintptr_t>(g + start)
    for k in range(f.nbuffers):
        if bufs[k] != NULL:
            spans[count] = <uintptr_t>(bufs[k] + start)
            count += 1
    for i in range(count):
        for j in range(i + 1, count):
            if spans[i] < spans[j] + nbytes and spans[j] < spans[i] + nbytes:
                names = ["param", "grad"] + [f.buffers[k].decode() for k in range(f.nbuffers)
                                             if bufs[k] != NULL]
                raise ValueError(f"{names[i]} and {names[j]} overlap in memory; every buffer "
                                 "must be a separate array")
    grp.start, grp.stop, grp.step, grp.hparams = start, stop, step, raw
    opts = _grad_opts(grad_multiplier, zero_grad)
    if fo_check(f, &opts, &grp, 1):
        raise ValueError(_overflow_message(family, fields, step, grad_multiplier))
    with nogil:
        fo_step(f, &ex, &param[0], g, bufs, &opts, &grp, 1)


def check_scalars(str family, list groups, double grad_multiplier=1.0):
    """groups: (index, fields, step being taken).  Raise the ValueError Stepper.run would for
    the first group whose per-step float32 scalars overflow (fo_check), without stepping."""
    cdef const fo_family *f = _family(family)
    cdef double storage[64]
    cdef unsigned char *raw = <unsigned char *>storage
    cdef fo_group grp
    cdef fo_grad_opts opts = _grad_opts(grad_multiplier, False)
    if f.hparams_size > sizeof(storage):
        raise ValueError(f"{family}: hyperparameter struct of {f.hparams_size} bytes")
    for i, fields, step in groups:
        _pack(f, family, fields, raw)
        grp.start, grp.stop, grp.step, grp.hparams = 0, 0, step, raw
        if fo_check(f, &opts, &grp, 1):
            raise ValueError(f"param_groups[{i}]: " + _overflow_message(
                family, fields, step, grad_multiplier))


def _overflow_message(family, fields, step, grad_multiplier):
    shown = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return (f"{family} at step {step} with {shown} and grad_multiplier={grad_multiplier!r}: "
            "a per-step scalar of the kernel (a step size, decay factor or bias correction, "
            "computed in double and rounded to float32) overflows float32; nothing was changed")


cdef class Stepper:
    """Steps every group of one optimizer's arena with a single C call.

    Stepper(family, param, grad, ranges, records): `param` and `grad` are the arenas, `ranges`
    each group's (start, stop), in order and disjoint, `records` an array of the family's
    hyperparameter dtype with one element a group (checked against the C struct here; the
    stepper keeps it and hands C a pointer into it).  set_buffer(name, arena) adds a state
    arena; set_fields(i, fields) writes group i's hyperparameters by name; run(steps,
    grad_multiplier, zero_grad) takes one step of every group, group i's step being
    steps[i] + 1 (the caller owns the counts: nothing here changes them).  Every pointer
    handed to C is checked here once: arenas of one length, disjoint; a buffer that a group's
    hyperparameters make the C kernel use (its own `needs`) is present.
    """
    cdef const fo_family *fam
    cdef Py_ssize_t n, ngroups
    cdef float *param
    cdef float *grad
    cdef float *bufs[FO_MAX_BUFFERS]   # the family's state arenas, in its order; NULL until set
    cdef dict arrays                   # keeps every arena alive while its pointer is held
    cdef object records
    cdef tuple field_names
    cdef dict layout                    # field -> (offset, is double), from C's table
    cdef fo_group *groups
    cdef unsigned *needs                # per group: the buffers its hyperparameters use
    cdef bint *ready                    # per group: every field has been set
    # a run is in progress (its kernel runs without the GIL): no other run, and no arena or
    # field may change under it.  Read and written with the GIL held, so the test is atomic.
    cdef bint running

    def __cinit__(self, str family, float[::1] param not None, float[::1] grad not None,
                  list ranges, records not None):
        cdef Py_ssize_t i, start, stop, prev = 0
        cdef unsigned char[::1] raw
        self.fam = _family(family)
        _check_layout(self.fam, records.dtype)
        self.n = param.shape[0]
        if grad.shape[0] != self.n:
            raise ValueError("grad arena and param arena differ in length")
        _check_disjoint(["param", "grad"], [_addr(param), _addr(grad)],
                        [self.n * sizeof(float)] * 2)
        self.ngroups = len(ranges)
        if records.ndim != 1 or records.shape[0] != self.ngroups or \
                not records.flags.c_contiguous or not records.flags.writeable:
            raise ValueError("records must be a writeable contiguous array of one record a group")
        self.records = records
        self.field_names = tuple(records.dtype.names)
        self.layout = {}
        for i in range(<Py_ssize_t>self.fam.nfields):
            self.layout[self.fam.fields[i].name.decode()] = (self.fam.fields[i].offset,
                                                             self.fam.fields[i].type == FO_F64)
        self.arrays = {"param": param.base, "grad": grad.base}
        self.param = &param[0] if self.n else NULL
        self.grad = &grad[0] if self.n else NULL
        for i in range(FO_MAX_BUFFERS):
            self.bufs[i] = NULL
        self.groups = <fo_group *>calloc(max(self.ngroups, 1), sizeof(fo_group))
        self.needs = <unsigned *>calloc(max(self.ngroups, 1), sizeof(unsigned))
        self.ready = <bint *>calloc(max(self.ngroups, 1), sizeof(bint))
        if self.groups == NULL or self.needs == NULL or self.ready == NULL:
            raise MemoryError()
        raw = records.view("u1").reshape(-1) if self.ngroups else None
        for i in range(self.ngroups):
            start, stop = ranges[i]
            if start < prev or stop < start or stop > self.n:
                raise ValueError(f"group range {i} ({start}, {stop}) is out of order or "
                                 f"outside the arena of {self.n}")
            prev = stop
            self.groups[i].start = start
            self.groups[i].stop = stop
            self.groups[i].hparams = &raw[i * self.fam.hparams_size]

    def __dealloc__(self):
        free(self.groups)
        free(self.needs)
        free(self.ready)

    def set_buffer(self, str name, float[::1] arena not None):
        """Add the state arena `name` (same length as the params, overlapping nothing)."""
        cdef size_t k, slot = self.fam.nbuffers
        self._idle("set_buffer")
        for k in range(self.fam.nbuffers):
            if self.fam.buffers[k].decode() == name:
                slot = k
        if slot == self.fam.nbuffers:
            raise ValueError(f"{self.fam.name.decode()} has no state buffer {name!r}")
        if arena.shape[0] != self.n:
            raise ValueError(f"{name} has length {arena.shape[0]}, the arena {self.n}")
        others = [("param", <uintptr_t>self.param), ("grad", <uintptr_t>self.grad)]
        for k in range(self.fam.nbuffers):
            if k != slot and self.bufs[k] != NULL:
                others.append((self.fam.buffers[k].decode(), <uintptr_t>self.bufs[k]))
        _check_disjoint([name] + [o for o, _ in others], [_addr(arena)] + [p for _, p in others],
                        [self.n * sizeof(float)] * (1 + len(others)))
        self.arrays[name] = arena.base
        self.bufs[slot] = &arena[0] if self.n else NULL

    def set_fields(self, Py_ssize_t i, fields):
        """Write group i's hyperparameters by name (validated by the caller); the first call
        for a group must give every field."""
        self._idle("set_fields")
        if i < 0 or i >= self.ngroups:
            raise IndexError(f"group {i} of {self.ngroups}")
        if not self.ready[i]:
            missing = [k for k in self.field_names if k not in fields]
            if missing:
                raise ValueError(f"group {i}: fields {missing} are not set")
        cdef unsigned char *rec = <unsigned char *>self.groups[i].hparams
        cdef Py_ssize_t off
        table = self.layout
        for key, value in fields.items():
            try:
                off, is_double = table[key]
            except KeyError:
                raise ValueError(f"{self.fam.name.decode()} has no hyperparameter {key!r}") from None
            # at the C struct's own offsets, in the record array the stepper keeps
            if is_double:
                (<double *>(rec + off))[0] = value
            else:
                (<int32_t *>(rec + off))[0] = value
        self.needs[i] = self.fam.needs(self.groups[i].hparams)
        self.ready[i] = True

    def run(self, list steps, double grad_multiplier=1.0, bint zero_grad=False,
            Py_ssize_t lo=0, hi=None):
        """One step of every group; group i takes step steps[i] + 1.  With lo, hi: only the
        elements [lo, hi) of the arena (each group's range clipped to it; a bucket of a
        pipelined step: the groups' step counts advance once, after the last range)."""
        cdef Py_ssize_t i
        cdef size_t k
        cdef fo_exec ex = _exec()
        cdef fo_grad_opts opts = _grad_opts(grad_multiplier, zero_grad)
        cdef int64_t taken
        cdef size_t bad
        cdef unsigned present = 0
        self._idle("run")
        if len(steps) != self.ngroups:
            raise ValueError(f"{len(steps)} step counts for {self.ngroups} groups")
        for k in range(self.fam.nbuffers):
            if self.bufs[k] != NULL or self.n == 0:
                present |= 1u << k
        for i in range(self.ngroups):           # check everything before changing anything
            if not self.ready[i]:
                raise RuntimeError(f"group {i} has no hyperparameters set")
            if self.needs[i] & ~present:
                missing = [self.fam.buffers[k].decode() for k in range(self.fam.nbuffers)
                           if self.needs[i] & ~present >> k & 1]
                raise ValueError(f"{missing} required by group {i}'s hyperparameters")
            taken = steps[i]
            if taken < 0 or taken >= MAX_STEP:
                raise ValueError(f"group {i} has taken {taken} steps: the count must stay "
                                 f"below 2**63 - 1")
            self.groups[i].step = taken + 1
        bad = fo_check(self.fam, &opts, self.groups, self.ngroups)
        if bad:
            j = int(bad) - 1
            fields = dict(zip(self.field_names, self.records[j].item()))
            raise ValueError(f"param_groups[{j}]: " + _overflow_message(
                self.fam.name.decode(), fields, steps[j] + 1, grad_multiplier))
        cdef Py_ssize_t top = self.n if hi is None else hi
        if lo < 0 or top < lo or top > self.n:
            raise ValueError(f"range [{lo}, {top}) outside the arena of {self.n}")
        if self.n == 0 or lo == top:
            return
        cdef fo_group *groups = self.groups
        if lo != 0 or top != self.n:
            groups = <fo_group *>malloc(self.ngroups * sizeof(fo_group))
            if groups == NULL:
                raise MemoryError()
            for i in range(self.ngroups):
                groups[i] = self.groups[i]
                groups[i].start = min(max(<Py_ssize_t>groups[i].start, lo), top)
                groups[i].stop = min(max(<Py_ssize_t>groups[i].stop, lo), top)
        self.running = True
        try:
            with nogil:
                fo_step(self.fam, &ex, self.param, self.grad, self.bufs, &opts, groups,
                        self.ngroups)
        finally:
            self.running = False
            if groups != self.groups:
                free(groups)

    cdef _idle(self, str what):
        if self.running:
            raise RuntimeError(f"Stepper.{what}: a step of this stepper is running in another "
                               "thread")


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


# The norm's fixed blocks: a shard that starts on a multiple of this many elements has the
# same block sums as the whole buffer there (ZeRO's global norm, fastopt.distributed).
NORM_BLOCK = FO_NORM_BLOCK


def grad_norm_blocks(const float[::1] grad not None, double norm_type=2.0):
    """(block sums, nonfinite): grad_norm's first half, the float64 sum (or max) of each
    NORM_BLOCK-element block of grad, in order; norm_from_blocks finishes it, bit for bit as
    grad_norm over the whole buffer, also when the blocks come from several shards."""
    cdef Py_ssize_t n = grad.shape[0]
    cdef int bad = 0
    cdef fo_exec ex = _exec()
    if not norm_type > 0.0:
        raise ValueError(f"norm_type must be > 0, got {norm_type!r}")
    blocks = np.empty(fo_norm_blocks(n), np.float64)
    cdef double[::1] out = blocks
    if n:
        with nogil:
            fo_norm_block_sums(&ex, &grad[0], n, norm_type, &out[0], &bad)
    return blocks, bool(bad)


def norm_from_blocks(const double[::1] blocks not None, double norm_type=2.0):
    """The norm from every block's sum (grad_norm_blocks), in order."""
    if not norm_type > 0.0:
        raise ValueError(f"norm_type must be > 0, got {norm_type!r}")
    if blocks.shape[0] == 0:
        return 0.0
    return fo_norm_combine(&blocks[0], blocks.shape[0], norm_type)


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
