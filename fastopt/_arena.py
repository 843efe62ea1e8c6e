"""The arena's layout: where each parameter lives in the flat buffers, fixed once.

Each parameter sits at a 64-byte-aligned offset, each param group is one contiguous range,
and the params, the gradients and every state buffer are parallel buffers with the same
offsets.  The layout is computed before any view is handed out and the buffers are never
reallocated, so views stay valid for the optimizer's life.
"""
import math
from collections.abc import Mapping

import numpy as np

from fastopt import _validate as V
from fastopt._family import check_group_keys
from fastopt import _formats as _f
from fastopt._formats import ABSMAX_SUFFIX, FMT_F32, FMT_INT8, KIND, KIND_DTYPE, QBLOCK

ALIGN_BYTES = 64
ALIGN = ALIGN_BYTES // 4  # in float32 elements


def aligned_zeros(n, dtype=np.float32):
    """A zeroed buffer of n elements (float32 unless told) whose first element is 64-byte
    aligned."""
    dtype = np.dtype(dtype)
    raw = np.zeros(n + ALIGN_BYTES // dtype.itemsize, dtype=dtype)
    skip = (-raw.ctypes.data % ALIGN_BYTES) // dtype.itemsize
    return raw[skip:skip + n]


def round_up(n):
    return -(-n // ALIGN) * ALIGN


class Arena:
    """The layout of an optimizer's parameters, and its param and gradient buffers.

    Arena(groups, names): `groups` lists each group's arrays (checked float32 ndarrays),
    `names` the parameter names (or None).  The arrays are copied in.
      flat_params, flat_grads   the whole buffers, 1-D
      params, grads             views in the given shapes, in order
      shapes, offsets, names    per parameter
      ranges                    per group: (start, stop) in the buffers
      counts                    per group: how many parameters it has
    """

    def __init__(self, groups, names=None, blocks=None):
        # blocks[k]: param k's state is int8, in blocks of QBLOCK elements: it starts on a
        # multiple of QBLOCK and takes whole blocks, so that no block straddles two params, a
        # thread split (csrc/isa.c) or a ZeRO shard (cut on whole blocks)
        offsets, ranges, total, k = [], [], 0, 0
        for arrays in groups:
            start = None
            for a in arrays:
                blocked = blocks is not None and blocks[k]
                if blocked:
                    total = -(-total // QBLOCK) * QBLOCK   # the gap: the previous param's, or
                if start is None:                          # between groups
                    start = total
                offsets.append(total)
                total += -(-a.size // QBLOCK) * QBLOCK if blocked else round_up(a.size)
                k += 1
            ranges.append((total if start is None else start, total))
        self.total = total
        self.offsets = offsets
        self.ranges = ranges
        self.counts = [len(arrays) for arrays in groups]
        self.names = names
        self.flat_params = aligned_zeros(total)
        self.flat_grads = aligned_zeros(total)
        self.shapes, self.params, self.grads = [], [], []
        for k, a in enumerate(a for arrays in groups for a in arrays):
            self.shapes.append(a.shape)
            p = self.view(self.flat_params, k)
            p[...] = a
            self.params.append(p)
            self.grads.append(self.view(self.flat_grads, k))

    def view(self, flat, k):
        """Parameter k's part of an arena-long buffer, in its shape."""
        off, shape = self.offsets[k], self.shapes[k]
        return flat[off:off + math.prod(shape)].reshape(shape)

    def param_indices(self, i):
        """The parameter indices of group i."""
        k0 = sum(self.counts[:i])
        return range(k0, k0 + self.counts[i])

    def local_ranges(self, lo, hi):
        """Each group's range clipped to the shard [lo, hi), relative to lo."""
        return [(min(max(s, lo), hi) - lo, min(max(e, lo), hi) - lo) for s, e in self.ranges]

    def shard(self, size, granule=ALIGN):
        """ZeRO's cut: `size` contiguous pieces of whole granules (64-byte lines, or larger: a
        multiple of ALIGN), as even as whole granules allow (counts differ by one at most; a
        piece is empty when there are fewer granules than pieces); -> all bounds."""
        units = -(-self.total // granule)
        bounds = [min(r * units // size * granule, self.total) for r in range(size + 1)]
        bounds[-1] = self.total
        return bounds


class StateLayout:
    """Where each param's state lives, per format (fastopt._formats).

    StateLayout(arena, formats, lo=0, hi=None): `formats[k]` is param k's format code.  A
    group's range is cut into segments, runs of params of one format (a param's padding, and
    the gap before a block-aligned param, go with the segment before); the state of each
    storage kind (float32; bfloat16; int8 codes, with one absmax per QBLOCK) is one arena
    holding its segments one after another, in arena order.  So a range [lo, hi) of the arena
    (a ZeRO shard) holds a contiguous piece of each kind's state: its own arenas are that
    piece.  With every param float32 (the default) the float32 state arenas are parallel to
    the params, at the same offsets, as they always were.
      segments   [(group, start, stop, format, state_start)] within [lo, hi), relative to lo
      lengths    per kind: the elements of state this range holds
      bases      per kind: where this range's state starts in the whole arena's
      formats    per param: its format
    """

    def __init__(self, arena, formats, lo=0, hi=None):
        hi = arena.total if hi is None else hi
        self.formats = list(formats)
        self.arena = arena
        full, at = [], [0, 0, 0]
        for i, (gs, ge) in enumerate(arena.ranges):
            ks = list(arena.param_indices(i))
            for j, k in enumerate(ks):
                s = gs if j == 0 else arena.offsets[k]
                e = arena.offsets[ks[j + 1]] if j + 1 < len(ks) else ge
                fmt = self.formats[k]
                if full and full[-1][0] == i and full[-1][3] == fmt and full[-1][2] == s:
                    g, s0, _, f, st = full[-1]
                    full[-1] = (g, s0, e, f, st)
                else:
                    full.append((i, s, e, fmt, at[KIND[fmt]]))
                at[KIND[fmt]] += e - s
        self.full_segments = full
        self.full_lengths = tuple(at)
        # param k's first element, in its kind's whole state (one sweep: params and
        # segments are both in arena order)
        self._param_state, j = [], 0
        for k, off in enumerate(arena.offsets):
            while j < len(full) and full[j][2] <= off and not full[j][1] == full[j][2] == off:
                j += 1
            kind = KIND[self.formats[k]]
            if j < len(full) and KIND[full[j][3]] == kind and full[j][1] <= off:
                self._param_state.append(full[j][4] + off - full[j][1])
            else:                           # an empty param at a boundary: nothing to index
                self._param_state.append(self.state_index(kind, off))
        # the part within [lo, hi)
        bases = []
        for kind in range(3):
            bases.append(self.state_index(kind, lo))
        self.bases = tuple(bases)
        self.lengths = tuple(self.state_index(kind, hi) - bases[kind] for kind in range(3))
        segs = []
        for g, s, e, fmt, st in full:
            a, b = max(s, lo), min(e, hi)
            if a < b:
                segs.append((g, a - lo, b - lo, fmt, st + (a - s) - bases[KIND[fmt]]))
        self.segments = segs
        self.lo, self.hi = lo, hi
        self.has_int8 = FMT_INT8 in self.formats
        self.has_bf16 = any(KIND[f] == 1 for f in self.formats)
        self.all_f32 = all(f == FMT_F32 for f in self.formats)

    def state_index(self, kind, x):
        """The index in `kind`'s whole state of arena element x (or of the next state element
        of that kind after it)."""
        for g, s, e, fmt, st in self.full_segments:
            if KIND[fmt] != kind:
                continue
            if x < e:
                return st + max(x - s, 0)
        return self.full_lengths[kind]

    def members(self, k, key):
        """[(member key, dtype, shape)] of param k's state buffer `key` as state dicts and
        checkpoints hold it: float32 or bfloat16 (uint16 bits) in the param's shape; int8 as
        codes (blocks, QBLOCK) uint8 and key + '_absmax' (blocks,) float32."""
        fmt = self.formats[k]
        shape = self.arena.shapes[k]
        if fmt == FMT_INT8:
            nb = -(-math.prod(shape) // QBLOCK)
            return [(key, KIND_DTYPE[2], (nb, QBLOCK)),
                    (key + ABSMAX_SUFFIX, np.dtype(np.float32), (nb,))]
        return [(key, KIND_DTYPE[KIND[fmt]], shape)]

    def member_span(self, k, member):
        """(kind's storage: 'data' or 'absmax', first index in the whole state's storage,
        count, arena element of the first, elements per storage item) of one member."""
        fmt = self.formats[k]
        size = math.prod(self.arena.shapes[k])
        st = self._param_state[k]
        off = self.arena.offsets[k]
        if fmt == FMT_INT8:
            nb = -(-size // QBLOCK)
            if member.endswith(ABSMAX_SUFFIX):
                return "absmax", st // QBLOCK, nb, off, QBLOCK
            return "data", st, nb * QBLOCK, off, 1
        return "data", st, size, off, 1


class StateBuffer:
    """One state buffer's storage for a StateLayout's range: `data[kind]` (float32, uint16
    bfloat16 bits, uint8 int8 codes; None where the range has none of that kind) and `absmax`
    (float32, one per QBLOCK codes).  Indexes are the layout's, less its `bases`."""

    def __init__(self, layout):
        l0, l1, l2 = layout.lengths
        self.data = [aligned_zeros(l0) if l0 or layout.all_f32 else None,
                     aligned_zeros(l1, np.uint16) if l1 else None,
                     aligned_zeros(l2, np.uint8) if l2 else None]
        self.absmax = aligned_zeros(l2 // QBLOCK) if l2 else None

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.arrays())

    def arrays(self):
        return [a for a in self.data + [self.absmax] if a is not None]

    def fill_group(self, layout, i, value, signed):
        """Every state element of group i (its padding too) starts at `value`, stored in its
        segment's format (rounded to nearest; int8 as a block of `value`)."""
        for g, s, e, fmt, st in layout.segments:
            if g != i:
                continue
            kind = KIND[fmt]
            out = self.data[kind][st:st + e - s]
            if kind == 0:
                out[...] = value
            elif kind == 1:
                out[...] = _f.f32_to_bf16(np.float32(value))
            else:
                codes, absmax = _f.quantize_int8(np.full(QBLOCK, value, np.float32), signed)
                out[...] = codes[0]
                self.absmax[st // QBLOCK:(st + e - s) // QBLOCK] = absmax[0]

    def storage(self, layout, k, member):
        """(array, first index in it, count) of param k's `member`: its part in this range
        (count 0 when the range holds none of it; a ZeRO shard holds a part)."""
        where, first, count, _, _ = layout.member_span(k, member)
        kind = KIND[layout.formats[k]]
        if where == "absmax":
            arr, base, length = self.absmax, layout.bases[2] // QBLOCK, \
                layout.lengths[2] // QBLOCK
        else:
            arr, base, length = self.data[kind], layout.bases[kind], layout.lengths[kind]
        lo, hi = max(first, base), min(first + count, base + length)
        return arr, lo - base, max(hi - lo, 0), lo - first

    def member(self, layout, k, member, dtype, shape):
        """A live view of param k's `member` (the whole of it: this buffer's layout must hold
        every element of it), in `shape`."""
        arr, at, count, _ = self.storage(layout, k, member)
        if arr is None:                 # an empty param, of a kind this range has none of
            return np.zeros(shape, dtype)
        return arr[at:at + count].reshape(shape)

    def members(self, layout, k, key):
        """{member: live view} of param k's buffer `key` (bfloat16 shown as such when
        ml-dtypes is installed)."""
        out = {}
        for member, dtype, shape in layout.members(k, key):
            view = self.member(layout, k, member, dtype, shape)
            out[member] = _f.bf16_view(view) if dtype == np.uint16 else view
        return out


def _split_named(items, where):
    """A list of arrays, or of (name, array) pairs, or a mapping -> (arrays, names or None)."""
    if isinstance(items, np.ndarray):
        return [items], None
    if isinstance(items, Mapping):
        names = list(items.keys())
        for k in names:
            if not isinstance(k, str):
                raise TypeError(f"{where}: parameter names must be str, got {type(k).__name__}")
        return [items[k] for k in names], names
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{where} must be an iterable of float32 ndarrays, a mapping "
                        f"name -> ndarray, or an iterable of dicts, got {type(items).__name__}")
    items = list(items)
    if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                     for x in items):
        return [x[1] for x in items], [x[0] for x in items]
    return items, None


def parse_params(params, known_keys):
    """torch's `params` argument -> ([(arrays, extra group keys)], names or None), every array
    checked and no two overlapping."""
    if isinstance(params, np.ndarray):
        raise TypeError("params must be an iterable of float32 ndarrays (or a mapping "
                        "name -> ndarray, or an iterable of dicts), got a single ndarray; "
                        "wrap it in a list")
    if not isinstance(params, Mapping):
        if isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
            raise TypeError("params must be an iterable of float32 ndarrays, a mapping "
                            "name -> ndarray, or an iterable of dicts, got "
                            f"{type(params).__name__}")
        params = list(params)
    if not isinstance(params, Mapping) and params and all(isinstance(g, Mapping) for g in params):
        raw_groups = []
        for i, g in enumerate(params):
            if "params" not in g:
                raise ValueError(f"param_groups[{i}] has no 'params' entry")
            check_group_keys(g, known_keys, f"param_groups[{i}]")
            raw_groups.append((g["params"], {k: v for k, v in g.items() if k != "params"},
                               f"param_groups[{i}].params"))
    else:
        if not isinstance(params, Mapping) and any(isinstance(g, Mapping) for g in params):
            raise TypeError("params mixes dicts (param groups) with other items")
        raw_groups = [(params, {}, "params")]

    groups, all_names, named = [], [], []
    for items, extra, where in raw_groups:
        arrays, names = _split_named(items, where)
        if not arrays:
            raise ValueError(f"{where} is an empty parameter list")
        for j, a in enumerate(arrays):
            label = f"{where}[{names[j]!r}]" if names else f"{where}[{j}]"
            V.float32_array(label, a)
        groups.append((arrays, extra))
        named.append(names is not None)
        all_names.extend(names or [])
    if all(named):
        if len(set(all_names)) != len(all_names):
            dup = next(n for n in all_names if all_names.count(n) > 1)
            raise ValueError(f"params: the name {dup!r} is used for two parameters")
        names = all_names
    else:
        names = None

    spans, k = [], 0
    for arrays, _ in groups:
        for a in arrays:
            if a.size:
                lo, hi = V.memory_span(a)
                spans.append((lo, hi, f"parameter {names[k]!r}" if names else f"parameter {k}"))
            k += 1
    try:
        V.disjoint(spans)
    except ValueError as e:
        raise ValueError(f"params: {e}") from None
    return groups, names
