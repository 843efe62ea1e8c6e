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

ALIGN_BYTES = 64
ALIGN = ALIGN_BYTES // 4  # in float32 elements


def aligned_zeros(n):
    """A zeroed float32 buffer of n elements whose first element is 64-byte aligned."""
    raw = np.zeros(n + ALIGN, dtype=np.float32)
    skip = (-raw.ctypes.data % ALIGN_BYTES) // 4
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

    def __init__(self, groups, names=None):
        offsets, ranges, total = [], [], 0
        for arrays in groups:
            start = total
            for a in arrays:
                offsets.append(total)
                total += round_up(a.size)
            ranges.append((start, total))
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
