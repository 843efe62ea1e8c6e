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
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset
from libc.stdlib cimport calloc, free, malloc

from fastopt._cfastopt cimport (
    fo_isa, FO_ISA_BASELINE, FO_ISA_X86_64_V3, FO_ISA_X86_64_V4, fo_best_isa, fo_isa_supported,
    fo_isa_name, fo_have_openmp, fo_compiler, fo_compile_flags, fo_exec, fo_grad_opts,
    fo_group, fo_state, fo_family, fo_field, FO_F64, FO_MAX_BUFFERS, FO_QBLOCK, FO_CELL_BASE,
    FO_NCELLS, FO_FMT_F32, FO_FMT_BF16, FO_FMT_BF16_SR, FO_FMT_INT8, fo_family_count, fo_family_at,
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


cdef inline fo_group _f32_group(size_t start, size_t stop, int64_t step,
                               const void *hparams) noexcept:
    cdef fo_group g
    memset(&g, 0, sizeof(fo_group))
    g.start, g.stop, g.step, g.hparams = start, stop, step, hparams
    g.state_start = start
    g.format = FO_FMT_F32
    return g


# The int8 format's maps and code lookups (fastopt._formats builds them from the map's
# formula); the C stepper reads them through fo_state.
from fastopt import _formats
_MAPS, _CELLS = _formats.tables()
if _formats.QBLOCK != FO_QBLOCK or _formats.CELL_BASE != FO_CELL_BASE or \
        _formats.NCELLS != FO_NCELLS or _MAPS.shape != (2, 256) or \
        _CELLS.shape != (2, FO_NCELLS) or _MAPS.dtype != np.float32 or \
        _CELLS.dtype != np.uint32:
    raise ImportError("fastopt._formats and csrc/fastopt.h disagree on the int8 tables")
cdef const float[:, ::1] _maps_view = _MAPS
cdef const uint32_t[:, ::1] _cells_view = _CELLS
QBLOCK = FO_QBLOCK


cdef void _no_state(fo_state *st) noexcept:
    memset(st, 0, sizeof(fo_state))
    st.maps = &_maps_view[0, 0]
    st.cells = &_cells_view[0, 0]


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
    grp = _f32_group(start, stop, step, raw)
    opts = _grad_opts(grad_multiplier, zero_grad)
    if fo_check(f, &opts, &grp, 1):
        raise ValueError(_overflow_message(family, fields, step, grad_multiplier))
    cdef fo_state st
    _no_state(&st)
    for k in range(<size_t>FO_MAX_BUFFERS):
        st.f32[k] = bufs[k]
    with nogil:
        fo_step(f, &ex, &param[0], g, &st, &opts, &grp, 1)


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
        grp = _f32_group(0, 0, step, raw)
        if fo_check(f, &opts, &grp, 1):
            raise ValueError(f"param_groups[{i}]: " + _overflow_message(
                family, fields, step, grad_multiplier))


def _overflow_message(family, fields, step, grad_multiplier):
    shown = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return (f"{family} at step {step} with {shown} and grad_multiplier={grad_multiplier!r}: "
            "a per-step scalar of the kernel (a step size, decay factor or bias correction, "
            "computed in double and rounded to float32) overflows float32; nothing was changed")


cdef inline int _kind(int fmt) noexcept:
    """The storage a format uses: 0 float32, 1 bfloat16 (both roundings), 2 int8."""
    return 0 if fmt == FO_FMT_F32 else (2 if fmt == FO_FMT_INT8 else 1)


cdef class Stepper:
    """Steps every group of one optimizer's arena with a single C call.

    Stepper(family, param, grad, ranges, records, segments=None, signed_mask=0, index_base=0):
    `param` and `grad` are the arenas, `ranges` each group's (start, stop), in order and
    disjoint, `records` an array of the family's hyperparameter dtype with one element a group
    (checked against the C struct here; the stepper keeps it and hands C a pointer into it).
    `segments` says how each group's state is stored: (group, start, stop, format,
    state_start) tuples (fastopt._formats' FMT_* codes) that cut each group's range in order;
    by default one float32 segment a group whose state sits at the same offsets as the params.
    The state arenas of one storage (float32; bfloat16; int8 codes with their absmax) hold
    their segments' ranges [state_start, state_start + stop - start).  `signed_mask` bit k:
    the family's buffer k takes both signs (int8's signed map); `index_base`: the arena index
    of param[0] (a ZeRO shard's start; stochastic rounding's element index).

    set_buffer(name, arena, format=FMT_F32, absmax=None) adds a state arena of a format's
    storage; set_fields(i, fields) writes group i's hyperparameters by name; set_seed(i, seed)
    its stochastic rounding's seed; run(steps, grad_multiplier, zero_grad) takes one step of
    every group, group i's step being steps[i] + 1 (the caller owns the counts: nothing here
    changes them).  Every pointer handed to C is checked here once: arenas of the lengths
    their segments need, disjoint; a buffer that a group's hyperparameters make the C kernel
    use (its own `needs`) is present in the storage of each of its segments.
    """
    cdef const fo_family *fam
    cdef Py_ssize_t n, ngroups, nsegs
    cdef float *param
    cdef float *grad
    cdef fo_state st                   # the state arenas (NULL until set), maps, index base
    cdef dict arrays                   # keeps every arena alive while its pointer is held
    cdef object records
    cdef tuple field_names
    cdef dict layout                    # field -> (offset, is double), from C's table
    cdef fo_group *groups               # per group: its record and step (fo_check)
    cdef fo_group *segs                 # per segment: what fo_step is handed
    cdef Py_ssize_t *seg_group          # per segment: its group
    cdef unsigned *needs                # per group: the buffers its hyperparameters use
    cdef bint *ready                    # per group: every field has been set
    cdef Py_ssize_t need_len[3]         # per storage: the state elements its segments span
    # a run is in progress (its kernel runs without the GIL): no other run, and no arena or
    # field may change under it.  Read and written with the GIL held, so the test is atomic.
    cdef bint running

    def __cinit__(self, str family, float[::1] param not None, float[::1] grad not None,
                  list ranges, records not None, segments=None, unsigned signed_mask=0,
                  uint64_t index_base=0):
        cdef Py_ssize_t i, j, start, stop, prev = 0, gi, st0, fmt
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
        _no_state(&self.st)
        self.st.signed_mask = signed_mask
        self.st.index_base = index_base
        if segments is None:
            segments = [(i, r[0], r[1], FO_FMT_F32, r[0]) for i, r in enumerate(ranges)]
        segments = list(segments)
        self.nsegs = len(segments)
        self.groups = <fo_group *>calloc(max(self.ngroups, 1), sizeof(fo_group))
        self.segs = <fo_group *>calloc(max(self.nsegs, 1), sizeof(fo_group))
        self.seg_group = <Py_ssize_t *>calloc(max(self.nsegs, 1), sizeof(Py_ssize_t))
        self.needs = <unsigned *>calloc(max(self.ngroups, 1), sizeof(unsigned))
        self.ready = <bint *>calloc(max(self.ngroups, 1), sizeof(bint))
        if self.groups == NULL or self.segs == NULL or self.seg_group == NULL or \
                self.needs == NULL or self.ready == NULL:
            raise MemoryError()
        raw = records.view("u1").reshape(-1) if self.ngroups else None
        for i in range(self.ngroups):
            start, stop = ranges[i]
            if start < prev or stop < start or stop > self.n:
                raise ValueError(f"group range {i} ({start}, {stop}) is out of order or "
                                 f"outside the arena of {self.n}")
            prev = stop
            self.groups[i] = _f32_group(start, stop, 0, &raw[i * self.fam.hparams_size])
        # the segments cut each group's range in order, and the state ranges of one storage
        # are disjoint
        pos = [self.groups[i].start for i in range(self.ngroups)]
        cdef Py_ssize_t last = 0
        spans = {0: [], 1: [], 2: []}
        for j in range(self.nsegs):
            gi, start, stop, fmt, st0 = segments[j]
            if not last <= gi < self.ngroups:
                raise ValueError(f"segment {j}: group {gi} is out of order or not a group")
            last = gi
            if fmt not in (FO_FMT_F32, FO_FMT_BF16, FO_FMT_BF16_SR, FO_FMT_INT8):
                raise ValueError(f"segment {j}: unknown state format {fmt}")
            if start != pos[gi] or stop < start or stop > self.groups[gi].stop or st0 < 0:
                raise ValueError(f"segment {j} ({gi}, {start}, {stop}) does not continue "
                                 f"group {gi}'s range in order")
            if fmt == FO_FMT_INT8 and ((stop - start) % FO_QBLOCK or st0 % FO_QBLOCK):
                raise ValueError(f"segment {j}: an int8 segment spans whole blocks of "
                                 f"{FO_QBLOCK} and its state starts on one")
            pos[gi] = stop
            self.segs[j] = self.groups[gi]
            self.segs[j].start, self.segs[j].stop = start, stop
            self.segs[j].state_start = st0
            self.segs[j].format = fmt
            self.seg_group[j] = gi
            if stop > start:
                spans[_kind(fmt)].append((st0, st0 + stop - start))
        for i in range(self.ngroups):
            if pos[i] != self.groups[i].stop:
                raise ValueError(f"the segments do not cover group {i}'s range")
        for kind in range(3):
            top = 0
            for a0, a1 in sorted(spans[kind]):
                if a0 < top:
                    raise ValueError("two segments share state elements")
                top = a1
            self.need_len[kind] = top

    def __dealloc__(self):
        free(self.groups)
        free(self.segs)
        free(self.seg_group)
        free(self.needs)
        free(self.ready)

    def state_lengths(self):
        """The elements each storage's arenas must have: (float32, bfloat16, int8)."""
        return tuple(self.need_len[k] for k in range(3))

    def set_buffer(self, str name, arena not None, int format=FO_FMT_F32, absmax=None):
        """Add the state arena `name` in `format`'s storage (float32 elements; uint16 for
        bfloat16; uint8 codes and `absmax`, float32 one per block, for int8), of the length
        its segments need, overlapping nothing."""
        cdef size_t k, slot = self.fam.nbuffers
        cdef int kind = _kind(format)
        cdef float[::1] f
        cdef uint16_t[::1] h
        cdef uint8_t[::1] c
        cdef float[::1] am
        cdef Py_ssize_t length, want = self.need_len[kind]
        cdef uintptr_t p = 0, pa = 0
        self._idle("set_buffer")
        for k in range(self.fam.nbuffers):
            if self.fam.buffers[k].decode() == name:
                slot = k
        if slot == self.fam.nbuffers:
            raise ValueError(f"{self.fam.name.decode()} has no state buffer {name!r}")
        if format not in (FO_FMT_F32, FO_FMT_BF16, FO_FMT_BF16_SR, FO_FMT_INT8):
            raise ValueError(f"unknown state format {format}")
        if kind == 0:
            f = arena
            length, p = f.shape[0], (<uintptr_t>&f[0] if f.shape[0] else 0)
        elif kind == 1:
            h = arena
            length, p = h.shape[0], (<uintptr_t>&h[0] if h.shape[0] else 0)
        else:
            c = arena
            if absmax is None:
                raise ValueError(f"{name}: an int8 arena needs its absmax")
            am = absmax
            length, p = c.shape[0], (<uintptr_t>&c[0] if c.shape[0] else 0)
            if am.shape[0] * FO_QBLOCK != length:
                raise ValueError(f"{name}: {am.shape[0]} absmax for {length} codes")
            pa = <uintptr_t>&am[0] if am.shape[0] else 0
        if length != want:
            raise ValueError(f"{name} has length {length}, its segments need {want}")
        itemsize = (4, 2, 1)[kind]
        names = [name, name + ".absmax", "param", "grad"]
        ptrs = [p, pa, <uintptr_t>self.param, <uintptr_t>self.grad]
        sizes = [want * itemsize, (want // FO_QBLOCK) * sizeof(float),
                 self.n * sizeof(float), self.n * sizeof(float)]
        for k in range(self.fam.nbuffers):
            other = self.fam.buffers[k].decode()
            for kk, ptr, size in ((0, <uintptr_t>self.st.f32[k], self.need_len[0] * 4),
                                  (1, <uintptr_t>self.st.bf16[k], self.need_len[1] * 2),
                                  (2, <uintptr_t>self.st.codes[k], self.need_len[2]),
                                  (3, <uintptr_t>self.st.absmax[k],
                                   (self.need_len[2] // FO_QBLOCK) * 4)):
                if ptr and not (k == slot and (kk == kind or (kind == 2 and kk == 3))):
                    names.append(other)
                    ptrs.append(ptr)
                    sizes.append(size)
        _check_disjoint(names, ptrs, sizes)
        self.arrays[(name, kind)] = (arena, absmax)
        if kind == 0:
            self.st.f32[slot] = <float *>p
        elif kind == 1:
            self.st.bf16[slot] = <uint16_t *>p
        else:
            self.st.codes[slot] = <uint8_t *>p
            self.st.absmax[slot] = <float *>pa

    def set_seed(self, Py_ssize_t i, uint64_t seed):
        """Group i's seed for stochastic rounding."""
        cdef Py_ssize_t j
        self._idle("set_seed")
        if i < 0 or i >= self.ngroups:
            raise IndexError(f"group {i} of {self.ngroups}")
        self.groups[i].seed = seed
        for j in range(self.nsegs):
            if self.seg_group[j] == i:
                self.segs[j].seed = seed

    def set_rounding(self, Py_ssize_t i, bint stochastic):
        """Group i's bfloat16 segments round stochastically (True) or to nearest (False)."""
        cdef Py_ssize_t j
        self._idle("set_rounding")
        if i < 0 or i >= self.ngroups:
            raise IndexError(f"group {i} of {self.ngroups}")
        for j in range(self.nsegs):
            if self.seg_group[j] == i and _kind(self.segs[j].format) == 1:
                self.segs[j].format = FO_FMT_BF16_SR if stochastic else FO_FMT_BF16

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
        pipelined step: the groups' step counts advance once, after the last range).  A range
        may not cut an int8 segment's blocks."""
        cdef Py_ssize_t i, j, gi
        cdef size_t k
        cdef fo_exec ex = _exec()
        cdef fo_grad_opts opts = _grad_opts(grad_multiplier, zero_grad)
        cdef int64_t taken
        cdef size_t bad
        cdef unsigned present[3]
        cdef unsigned miss
        self._idle("run")
        if len(steps) != self.ngroups:
            raise ValueError(f"{len(steps)} step counts for {self.ngroups} groups")
        for j in range(3):
            present[j] = 0
        for k in range(self.fam.nbuffers):
            if self.st.f32[k] != NULL or self.need_len[0] == 0:
                present[0] |= 1u << k
            if self.st.bf16[k] != NULL or self.need_len[1] == 0:
                present[1] |= 1u << k
            if self.st.codes[k] != NULL or self.need_len[2] == 0:
                present[2] |= 1u << k
        for i in range(self.ngroups):           # check everything before changing anything
            if not self.ready[i]:
                raise RuntimeError(f"group {i} has no hyperparameters set")
            taken = steps[i]
            if taken < 0 or taken >= MAX_STEP:
                raise ValueError(f"group {i} has taken {taken} steps: the count must stay "
                                 f"below 2**63 - 1")
            self.groups[i].step = taken + 1
        for j in range(self.nsegs):
            gi = self.seg_group[j]
            if self.segs[j].stop == self.segs[j].start:
                continue
            miss = self.needs[gi] & ~present[_kind(self.segs[j].format)]
            if miss:
                missing = [self.fam.buffers[k].decode() for k in range(self.fam.nbuffers)
                           if miss >> k & 1]
                raise ValueError(f"{missing} required by group {gi}'s hyperparameters")
        bad = fo_check(self.fam, &opts, self.groups, self.ngroups)
        if bad:
            j = int(bad) - 1
            fields = dict(zip(self.field_names, self.records[j].item()))
            raise ValueError(f"param_groups[{j}]: " + _overflow_message(
                self.fam.name.decode(), fields, steps[j] + 1, grad_multiplier))
        cdef Py_ssize_t top = self.n if hi is None else hi
        if lo < 0 or top < lo or top > self.n:
            raise ValueError(f"range [{lo}, {top}) outside the arena of {self.n}")
        cdef Py_ssize_t s0, s1, c0, c1
        for j in range(self.nsegs):
            s0, s1 = self.segs[j].start, self.segs[j].stop
            c0, c1 = min(max(s0, lo), top), min(max(s1, lo), top)
            if self.segs[j].format == FO_FMT_INT8 and c0 < c1 and \
                    ((c0 - s0) % FO_QBLOCK or (c1 - s0) % FO_QBLOCK):
                raise ValueError(f"range [{lo}, {top}) cuts an int8 block of group "
                                 f"{self.seg_group[j]} (blocks of {FO_QBLOCK} elements from "
                                 f"{s0})")
        if self.n == 0 or lo == top:
            return
        cdef fo_group *segs = <fo_group *>malloc(max(self.nsegs, 1) * sizeof(fo_group))
        if segs == NULL:
            raise MemoryError()
        for j in range(self.nsegs):
            segs[j] = self.segs[j]
            segs[j].step = self.groups[self.seg_group[j]].step
            s0 = segs[j].start
            segs[j].start = min(max(<Py_ssize_t>segs[j].start, lo), top)
            segs[j].stop = min(max(<Py_ssize_t>segs[j].stop, lo), top)
            segs[j].state_start += segs[j].start - s0
        self.running = True
        try:
            with nogil:
                fo_step(self.fam, &ex, self.param, self.grad, &self.st, &opts, segs,
                        self.nsegs)
        finally:
            self.running = False
            free(segs)

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
