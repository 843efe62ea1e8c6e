"""fastopt's benchmark suite: one optimizer step, fused C against pure NumPy and torch.optim.

    python bench/run.py                         # quick: about two minutes on 2 cores
    python bench/run.py --full                  # adds 5e7 params and mlp-25M, more repetitions
    python bench/run.py --no-torch --sizes 1e3,1e5 --layouts none --threads 1
    python bench/run.py --optimizers none --no-extras --threads 1 --format-sizes 1e7,5e7
                                                # the state-formats section alone

What is timed.  For each optimizer of the OPTIMIZERS table below (sgd: SGD(lr=1e-3,
momentum=0.9, nesterov=True, weight_decay=1e-4); adam: Adam(lr=1e-3); ...; one row a class) and
each layout (one flat tensor of n params, or a model-shaped list of tensors: mlp-1M, many-10k,
mlp-25M), every implementation is built on the same float32 params and the same fixed random
gradients, and `opt.step()` is timed:
  fastopt          the C kernels, at each thread count (fastopt.set_num_threads)
  reference        fastopt.reference, pure NumPy, one thread
  torch fused / torch foreach / torch for-loop
                   torch.optim with fused=True / foreach=True / foreach=False, at each thread
                   count (torch.set_num_threads), where torch has the optimizer and the
                   implementation (its family's declaration says which)
  ceiling r4w3 / ceiling r3w2
                   fastopt._core.probe_r4w3 / probe_r3w2: a bare C pass that reads and writes
                   as many float32 streams as Adam (28 B/param) / SGD and RMSprop (20 B/param),
                   threaded like the kernels; model layouts are probed on one flat buffer of
                   their total size.  It is the bandwidth this machine gives such a pass.

How.  Each implementation takes a warm-up step (state is allocated on the first step), then
its batch size k is set so a batch takes about budget/reps seconds.  A repetition times one
batch of every implementation in turn (threads set before each batch, start rotated from one
repetition to the next); the table gives the median over repetitions of time per step, and
the spread (interquartile range / median).  Where single steps are slow (large sizes, torch on
many tensors) a case takes fewer repetitions, at least 3, and says so.  A case during which
other processes kept the cores busy is marked "! busy" with the cores they used, and a row is
dropped, saying why, when its first step takes over 10 budgets or, for torch at several
threads, when the cost of one parallel region times its tensors would.  GB/s counts
the minimal traffic of a step (params only, not the arena's alignment padding); "% ceil"
divides it by the ceiling's GB/s at the same size and thread count; speedups are against the
reference and against torch fused at the same thread count (torch foreach where torch has no
fused kernel).

"Fused extras" times, at 1e7 params with Adam, what the fused kernel saves over separate
passes: step(zero_grad=True) against step(); zero_grad(), and step(grad_multiplier=0.5)
against flat_grads *= 0.5; step().  Each batch starts from the same gradients, refilled
outside the timed region, and takes at most 64 steps, so the in-place halving never reaches
denormals.  At 1,000 params it times the per-call overhead of opt.step(), of the functional
kernel fastopt.functional.adam_ (which checks its arguments on every call) and of torch fused.

"State formats" times AdamW(lr=1e-3) on one tensor of 1e7 params (--full adds 5e7;
--format-sizes chooses), at the smallest of --threads (1 by default), with each state_dtype:
float32, bfloat16, bfloat16 with state_rounding="stochastic", int8 (blockwise, one float32
absmax per 256); beside them torch's fused AdamW (float32 state) and, when `import
bitsandbytes` works, bitsandbytes.optim.AdamW8bit (the same 8-bit blockwise format) on a CPU
tensor of the same size.  Every row steps the same params and gradients, all rows of a size
interleaved in one run, medians as above.  B/param is what a step must move: read g and p,
write p (12 B), and read and write the whole state once, counted from the state each
implementation holds after its first step (opt.state_nbytes for fastopt: fp32 28 B, bf16
20 B, int8 16.06 B with the absmax; int8 arenas round each tensor up to whole blocks, a few
bytes at these sizes).  GB/s is that traffic over the median time; "vs fp32" is fastopt
float32's median over this row's, from the same run.  The ceiling is probe_r4w3 over
round(n * B / 28) elements: a bare pass moving the same bytes as the format, but in Adam's
float32 mix (read 4 streams, write 3) rather than the format's (bf16 reads 12 B and writes 8,
int8 reads 10 and writes 6); at equal bytes probe_r3w2 took within a few percent of
probe_r4w3 here.  It says how fast the traffic alone could go, not what the conversions cost.

Output: the machine header and a table on stdout, progress on stderr, and under --out
(bench/results/) a JSON file with the machine, the command line, every row and its raw
samples, and a PNG plot when matplotlib is importable.
"""
import argparse
import gc
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np

import fastopt
import fastopt.reference as reference
from fastopt import _core
from fastopt.families import OPTIMIZERS as FAMILY_CLASSES

# name -> (class name, constructor kwargs, bytes of minimal traffic per param per step, probe):
# one row a class, each family at least once
OPTIMIZERS = {
    "sgd": ("SGD", dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4), 20, "r3w2"),
    "rmsprop": ("RMSprop", dict(lr=1e-3), 20, "r3w2"),
    "adam": ("Adam", dict(lr=1e-3), 28, "r4w3"),
    "adamw": ("AdamW", dict(lr=1e-3), 28, "r4w3"),
    "adamax": ("Adamax", dict(lr=1e-3), 28, "r4w3"),
    "adadelta": ("Adadelta", dict(lr=1.0), 28, "r4w3"),
    "nadam": ("NAdam", dict(lr=1e-3), 28, "r4w3"),
    "radam": ("RAdam", dict(lr=1e-3), 28, "r4w3"),
    "adagrad": ("Adagrad", dict(lr=1e-2), 20, "r3w2"),
    "lion": ("Lion", dict(lr=1e-4, weight_decay=0.1), 20, "r3w2"),
}


QUICK_SIZES = [10**3, 10**4, 10**5, 10**6, 10**7]
FULL_SIZES = QUICK_SIZES + [5 * 10**7]


def mlp_shapes(h, blocks=50):
    """Transformer-MLP-shaped: per block W1 (h, 4h), b1 (4h,), W2 (4h, h), b2 (h,)."""
    return [(h, 4 * h), (4 * h,), (4 * h, h), (h,)] * blocks


# name -> (description, shapes); 50 blocks of 4 tensors is 200 tensors
LAYOUTS = {
    "mlp-1M": ("200 tensors: 50 x [W1 (50,200), b1 (200), W2 (200,50), b2 (50)]", mlp_shapes(50)),
    "many-10k": ("10,000 tensors of (100,)", [(100,)] * 10_000),
    "mlp-25M": ("200 tensors: 50 x [W1 (250,1000), b1 (1000), W2 (1000,250), b2 (250)]",
                mlp_shapes(250)),
}
QUICK_LAYOUTS = ["mlp-1M", "many-10k"]
FULL_LAYOUTS = QUICK_LAYOUTS + ["mlp-25M"]

# (budget seconds per implementation per case, repetitions)
QUICK_TIMING = (0.15, 7)
FULL_TIMING = (0.6, 11)
MIN_REPS = 3
STEP_LIMIT = 10           # budgets: a row whose first step takes longer is dropped
BUSY = 0.2                # cores used by other processes above which a case is marked
EXTRAS_N = 10**7
OVERHEAD_N = 1000
# Batches of the extras refill the gradients before they start; 64 halvings keep every
# N(0,1) gradient a normal float (2**-64 * 1e-7 >> 1e-38), so no denormal slows a batch.
EXTRAS_MAX_K = 64
HAVE_OPENMP = fastopt.build_info()["openmp"]


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


# ---- what is timed ---------------------------------------------------------------------------

class Timed:
    """One row of the table: a step function run at a thread count."""

    def __init__(self, impl, threads, step, before_batch=None, max_k=None, tensors=0):
        self.impl, self.threads, self.step = impl, threads, step
        self.before_batch, self.max_k = before_batch, max_k
        self.tensors = tensors          # torch rows: a step may run a parallel region for each
        self.k, self.samples, self.dropped = 0, [], None


def aligned_zeros(n):
    """float32 zeros starting on a 64-byte boundary, as fastopt allocates its arenas.

    np.zeros puts large arrays 16 bytes past a page boundary, so AVX loads split across cache
    lines: that made the probe up to 40% slower than fastopt's kernels on cache-resident sizes.
    """
    raw = np.zeros(n + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + n]


def make_case(opt_name, shapes, threads, torch, skip):
    """-> [Timed]: every implementation on the same initial params and gradients."""
    cls_name, kw, _, probe = OPTIMIZERS[opt_name]
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    g0 = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    timed = []

    # the ceiling: a probe over as many float32 streams as the optimizer's minimal traffic,
    # on one flat buffer of the layout's total size
    n = sum(a.size for a in p0)
    bufs = [aligned_zeros(n) for _ in range(4 if probe == "r4w3" else 3)]
    bufs[1][:] = rng.standard_normal(n, dtype=np.float32)
    probe_fn = _core.probe_r4w3 if probe == "r4w3" else _core.probe_r3w2
    for t in threads:
        if "ceiling" not in skip[t]:
            timed.append(Timed(f"ceiling {probe}", t, lambda: probe_fn(*bufs)))

    # one optimizer object per implementation, stepped at every thread count: its state keeps
    # evolving the same way whichever row steps it
    fo = getattr(fastopt, cls_name)(p0, **kw)
    for view, g in zip(fo.grads, g0):
        view[...] = g
    for t in threads:
        if "fastopt" not in skip[t]:
            timed.append(Timed("fastopt", t, fo.step))
    ref = getattr(reference, cls_name)(p0, **kw)
    for view, g in zip(ref.grads, g0):
        view[...] = g
    timed.append(Timed("reference", min(threads), ref.step))

    if torch is not None:
        for impl, extra in (("torch fused", dict(fused=True)),
                            ("torch foreach", dict(foreach=True)),
                            ("torch for-loop", dict(foreach=False))):
            rows = [t for t in threads if impl not in skip[t]]
            if not rows:
                continue
            tensors = []
            for a, g in zip(p0, g0):
                tp = torch.from_numpy(a.copy()).requires_grad_()
                tp.grad = torch.from_numpy(g.copy())
                tensors.append(tp)
            topt = getattr(torch.optim, cls_name)(tensors, **kw, **extra)
            for t in rows:
                timed.append(Timed(impl, t, topt.step, tensors=len(tensors)))
    return timed


def torch_peer(opt_name):
    """How torch has this optimizer (its family's declaration): 'fused', 'single' or None."""
    return FAMILY_CLASSES[OPTIMIZERS[opt_name][0]].family.torch


def baseline_of(opt_name):
    """The torch implementation the speedups are against: fused where torch has it."""
    return {"fused": "torch fused", "single": "torch foreach", None: None}[torch_peer(opt_name)]


def skipped_impls(opt_name, layout, threads, torch, full):
    """-> {threads: {impl: reason}}: the rows left out of this case, and why."""
    skip = {t: {} for t in threads}
    for t in threads:
        if t > 1 and not HAVE_OPENMP:
            skip[t]["fastopt"] = skip[t]["ceiling"] = "fastopt was built without OpenMP"
        if torch is None:
            continue
        how = torch_peer(opt_name)
        if how is None:
            for impl in ("torch fused", "torch foreach", "torch for-loop"):
                skip[t][impl] = f"torch has no {OPTIMIZERS[opt_name][0]}"
        elif how == "single":
            skip[t]["torch fused"] = f"torch has no fused {OPTIMIZERS[opt_name][0]}"
        if not full and layout == "many-10k":
            for impl in ("torch foreach", "torch for-loop"):
                skip[t][impl] = "0.3-1 s per step on 10,000 tensors; --full runs them"
    return skip


# ---- timing ----------------------------------------------------------------------------------

def set_threads(n, torch):
    # Both libraries get the row's count: they may share one OpenMP runtime, whose setting
    # the other's call would otherwise change.
    fastopt.set_num_threads(n if HAVE_OPENMP else 1)
    if torch is not None:
        torch.set_num_threads(n)


def batch(row, k, torch):
    set_threads(row.threads, torch)
    if row.before_batch is not None:
        row.before_batch()
    step = row.step
    t0 = time.perf_counter()
    for _ in range(k):
        step()
    return time.perf_counter() - t0


def region_latency(torch, threads):
    """Seconds one torch parallel region takes at `threads` threads, start to join."""
    torch.set_num_threads(threads)
    x = torch.ones(1 << 17)          # above torch's grain (32,768): add_ runs in parallel
    x.add_(1.0)
    t0 = time.perf_counter()
    for _ in range(50):
        x.add_(1.0)
    return (time.perf_counter() - t0) / 50


def time_rows(rows, budget, reps, torch, progress):
    """Fill each row's k and samples (seconds per step): warm-up, then interleaved batches.

    -> the repetitions taken: `reps`, or fewer (not below MIN_REPS) where single steps are so
    slow (large sizes, torch on many tensors) that the case would take over twice its budget,
    or where they turn slow midway (other processes taking the cores).  A row whose first step
    takes over STEP_LIMIT budgets is dropped (row.dropped says why): on a busy machine a
    2-thread torch step over 10,000 tensors can take seconds, and the run hours.
    """
    target = budget / reps
    for i, row in enumerate(rows):
        progress(f"warm-up {i + 1}/{len(rows)}")
        if row.tensors and row.threads > 1:
            # Look before stepping: when another process holds a core, each parallel region
            # waits for a time slice, and one torch step over 10,000 tensors took 78 s here.
            lat = region_latency(torch, row.threads)
            if row.tensors * lat > STEP_LIMIT * budget:
                row.dropped = (f"the cores are busy: a {row.threads}-thread torch parallel "
                               f"region took {lat * 1e3:.2g} ms, x {row.tensors:,} tensors")
                continue
        dt = batch(row, 1, torch)            # allocates lazily created state, touches pages
        if dt > STEP_LIMIT * budget:
            row.dropped = f"its first step took {dt:.3g} s (limit {STEP_LIMIT * budget:g} s)"
            continue
        k = 1
        while True:                          # estimate a step's time from a long-enough batch
            dt = batch(row, k, torch)
            if dt >= target / 4 or (row.max_k and k >= row.max_k):
                break
            k = min(k * 4, row.max_k or k * 4)
        per_step = max(dt, 1e-9) / k
        row.k = max(1, min(round(target / per_step), row.max_k or sys.maxsize))
        row.samples, row.estimate = [], row.k * per_step
    rows = [row for row in rows if row.dropped is None]
    if not rows:
        return 0
    one_rep = sum(row.estimate for row in rows)
    limit = 2 * budget * len(rows)
    reps = max(min(reps, MIN_REPS), min(reps, int(limit / one_rep)))
    gc.collect()
    gc.disable()              # one row's garbage must not be collected in another row's batch
    try:
        t0 = time.perf_counter()
        for r in range(reps):
            progress(f"rep {r + 1}/{reps}")
            for i in range(len(rows)):
                row = rows[(i + r) % len(rows)]      # rotate who goes first
                row.samples.append(batch(row, row.k, torch) / row.k)
            if r + 1 >= MIN_REPS and time.perf_counter() - t0 > 1.5 * limit:
                break
    finally:
        gc.enable()
    return len(rows[0].samples)


# ---- results ---------------------------------------------------------------------------------

def summarize(rows, opt_name, layout, n, ntensors, baseline_impl):
    """-> dicts for the table and the JSON, with the ratios filled in."""
    nbytes = OPTIMIZERS[opt_name][2] * n
    med = {(r.impl, r.threads): float(np.median(r.samples)) for r in rows if r.samples}
    ceiling = {t: s for (impl, t), s in med.items() if impl.startswith("ceiling")}
    ref = next((s for (impl, _), s in med.items() if impl == "reference"), None)
    out = []
    for r in rows:
        if not r.samples:
            out.append(dict(optimizer=opt_name, layout=layout, n=n, tensors=ntensors,
                            impl=r.impl, threads=r.threads, us_per_step=None,
                            dropped=r.dropped, torch_baseline=baseline_impl))
            continue
        s = med[(r.impl, r.threads)]
        q1, q3 = np.percentile(r.samples, [25, 75])
        base = med.get((baseline_impl, r.threads))
        gbps = nbytes / s / 1e9
        ceil_s = ceiling.get(r.threads)
        out.append(dict(
            optimizer=opt_name, layout=layout, n=n, tensors=ntensors, impl=r.impl,
            threads=r.threads, us_per_step=s * 1e6, spread=(q3 - q1) / s,
            mparams_per_s=n / s / 1e6, gb_per_s=gbps,
            pct_of_ceiling=None if ceil_s is None else 100 * ceil_s / s,
            speedup_vs_reference=None if ref is None else ref / s,
            speedup_vs_torch=None if base is None else base / s, torch_baseline=baseline_impl,
            steps_per_batch=r.k, samples_s=list(r.samples)))
    return out


def fmt(x):
    """About three significant figures, thousands separated; '-' when there is no value."""
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def ratio(x):
    return "-" if x is None else (f"{x:.2f}x" if x < 10 else f"{x:.1f}x")


def pct(x):
    return "-" if x is None else f"{x:.0f}%"


IMPL_ORDER = ["ceiling r4w3", "ceiling r3w2", "fastopt", "reference", "torch fused",
              "torch foreach", "torch for-loop"]


def print_table(results, reps):
    cols = (f"  {'layout':<10} {'implementation':<15} {'thr':>3} {'us/step':>9} "
            f"{'spread':>6} {'Mparam/s':>9} {'GB/s':>6} {'% ceil':>6} {'vs ref':>7} "
            f"{'vs torch':>8}")
    for opt_name in dict.fromkeys(r["optimizer"] for r in results):
        rows = [r for r in results if r["optimizer"] == opt_name]
        cls_name, kw, nbytes, _ = OPTIMIZERS[opt_name]
        args = ", ".join(f"{k}={v}" for k, v in kw.items())
        base = rows[0]["torch_baseline"]
        print(f"\n{opt_name}: {cls_name}({args}), {nbytes} B/param/step; "
              + (f"'vs torch' is against {base} at the same threads" if base
                 else f"torch has no {cls_name}"))
        print(cols)
        for layout in dict.fromkeys(r["layout"] for r in rows):
            group = sorted((r for r in rows if r["layout"] == layout),
                           key=lambda r: (r["threads"], IMPL_ORDER.index(r["impl"])))
            print()
            first = group[0]
            notes = [layout]
            if first["reps"] < reps:
                notes.append(f"{first['reps']} reps")
            if first["others_cores"] is not None and first["others_cores"] > BUSY:
                notes.append(f"! busy {first['others_cores']:.1f}")
            for j, r in enumerate(group):
                note = notes[j] if j < len(notes) else ""
                if r["us_per_step"] is None:
                    print(f"  {note:<10} {r['impl']:<15} {r['threads']:>3}   dropped: "
                          f"{r['dropped']}")
                    continue
                print(f"  {note:<10} {r['impl']:<15} {r['threads']:>3} "
                      f"{fmt(r['us_per_step']):>9} {r['spread'] * 100:>5.0f}% "
                      f"{fmt(r['mparams_per_s']):>9} {fmt(r['gb_per_s']):>6} "
                      f"{pct(r['pct_of_ceiling']):>6} {ratio(r['speedup_vs_reference']):>7} "
                      f"{ratio(r['speedup_vs_torch']):>8}")
    models = [name for name in dict.fromkeys(r["layout"] for r in results) if name in LAYOUTS]
    if models:
        print("\nmodel layouts (their ceiling is the probe on one flat buffer of the same size; "
              "GB/s counts params, not the arena's padding):")
        for name in models:
            n = sum(int(np.prod(s)) for s in LAYOUTS[name][1])
            print(f"  {name}: {n:,} params in {LAYOUTS[name][0]}")


# ---- fused extras ----------------------------------------------------------------------------

def extras_fusion(threads, torch, budget, reps, progress):
    """(a) zero_grad=True and (b) grad_multiplier= against separate passes, Adam at 1e7."""
    rng = np.random.default_rng(1)
    g0 = rng.standard_normal(EXTRAS_N, dtype=np.float32)
    opt = fastopt.Adam([rng.standard_normal(EXTRAS_N, dtype=np.float32)], lr=1e-3)
    grad, flat = opt.grads[0], opt.flat_grads

    # Every batch starts from the same gradients, refilled outside the timed region: after
    # zeroing, the rest of a batch steps on zeros in both variants alike, and in-place halving
    # cannot reach denormals within EXTRAS_MAX_K steps.
    def refill():
        grad[...] = g0

    def separate_zero():
        opt.step()
        opt.zero_grad()

    def separate_scale():
        np.multiply(flat, 0.5, out=flat)
        opt.step()

    variants = [("a", "step(zero_grad=True)", lambda: opt.step(zero_grad=True)),
                ("a", "step(); zero_grad()", separate_zero),
                ("b", "step(grad_multiplier=0.5)", lambda: opt.step(grad_multiplier=0.5)),
                ("b", "flat_grads *= 0.5; step()", separate_scale)]
    part = {label: p for p, label, _ in variants}
    rows = [Timed(label, t, fn, before_batch=refill, max_k=EXTRAS_MAX_K)
            for t in threads for _, label, fn in variants]
    reps = time_rows(rows, budget, reps, torch, progress)
    return [extra_row(part[r.impl], EXTRAS_N, r, reps) for r in rows]


def extras_overhead(threads, torch, budget, reps, progress):
    """(c) per-call cost at 1,000 params: opt.step(), the bare kernel, torch fused."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(OVERHEAD_N, dtype=np.float32)
    g0 = rng.standard_normal(OVERHEAD_N, dtype=np.float32)
    opt = fastopt.Adam([p0], lr=1e-3)
    opt.grads[0][...] = g0
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    count = itertools.count(1)

    def bare():
        fastopt.functional.adam_(p, g0, m, v, step=next(count), lr=1e-3)

    fns = [("fastopt Adam.step()", opt.step), ("functional.adam_()", bare)]
    if torch is not None:
        tp = torch.from_numpy(p0.copy()).requires_grad_()
        tp.grad = torch.from_numpy(g0.copy())
        fns.append(("torch fused step()", torch.optim.Adam([tp], lr=1e-3, fused=True).step))
    rows = [Timed(label, t, fn) for t in threads for label, fn in fns]
    reps = time_rows(rows, budget, reps, torch, progress)
    return [extra_row("c", OVERHEAD_N, r, reps) for r in rows]


def extra_row(part, n, r, reps):
    if not r.samples:
        return dict(part=part, n=n, impl=r.impl, threads=r.threads, us_per_step=None,
                    dropped=r.dropped)
    q1, q3 = np.percentile(r.samples, [25, 75])
    s = float(np.median(r.samples))
    return dict(part=part, n=n, impl=r.impl, threads=r.threads, us_per_step=s * 1e6,
                spread=(q3 - q1) / s, reps=reps, steps_per_batch=r.k,
                samples_s=list(r.samples))


def print_extras(rows):
    titles = {"a": f"(a) zero the gradients: Adam, {EXTRAS_N:,} params",
              "b": f"(b) scale the gradients by 0.5: Adam, {EXTRAS_N:,} params",
              "c": f"(c) per-call overhead: Adam, one tensor of {OVERHEAD_N:,} params"}
    print("\nfused extras ((a), (b): every batch starts from the same gradients, refilled "
          "outside the timed region)")
    for part, title in titles.items():
        group = [r for r in rows if r["part"] == part]
        if not group:
            continue
        busy = group[0]["others_cores"]
        print(f"\n  {title}" + (f"   ! busy {busy:.1f}" if busy is not None and busy > BUSY
                                else ""))
        for t in dict.fromkeys(r["threads"] for r in group):
            sub = [r for r in group if r["threads"] == t]
            for r in sub:
                if r["us_per_step"] is None:
                    print(f"    {r['impl']:<26} {t:>2} thr   dropped: {r['dropped']}")
                    continue
                first = sub[0]["us_per_step"]
                rel = ("" if r is sub[0] or first is None else
                       f"   {r['us_per_step'] / first:.2f}x the first")
                print(f"    {r['impl']:<26} {t:>2} thr {fmt(r['us_per_step']):>9} us "
                      f"{r['spread'] * 100:>4.0f}%{rel}")


# ---- state formats ---------------------------------------------------------------------------

FORMATS_OPT = "adamw"
# label -> the optimizer's state keywords; the float32 row is what "vs fp32" is against
FORMATS = {
    "float32": dict(state_dtype="float32"),
    "bfloat16": dict(state_dtype="bfloat16"),
    "bfloat16 stochastic": dict(state_dtype="bfloat16", state_rounding="stochastic"),
    "int8": dict(state_dtype="int8"),
}
QUICK_FORMAT_SIZES = [10**7]
FULL_FORMAT_SIZES = QUICK_FORMAT_SIZES + [5 * 10**7]
BNB_ABSENT = "bitsandbytes absent (pip install bitsandbytes --no-deps beside torch 2.13.0)"
BNB_IMPL = "bitsandbytes AdamW8bit"


def bitsandbytes_or_reason(torch):
    """-> (the bitsandbytes module, None), or (None, why its row is missing)."""
    if torch is None:
        return None, "bitsandbytes not timed: it needs torch"
    try:
        import bitsandbytes
    except ImportError:
        return None, BNB_ABSENT
    except Exception as e:      # a broken install fails otherwise (a missing native library)
        return None, f"bitsandbytes failed to import: {type(e).__name__}: {e}"
    return bitsandbytes, None


def step_traffic(state_bytes, n):
    """Bytes per param a step must move: read g and p, write p, read and write the state."""
    return 12 + 2 * state_bytes / n


def make_formats(n, t, torch, bnb):
    """-> ([Timed], {impl: (implementation, state, B/param)}, [notes]): AdamW at n params.

    Each optimizer takes one step here: fastopt and torch allocate their state on the first
    step, and the traffic is counted from the state they then hold.
    """
    cls_name, kw, _, _ = OPTIMIZERS[FORMATS_OPT]
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(n, dtype=np.float32)
    g0 = rng.standard_normal(n, dtype=np.float32)
    timed, meta, notes = [], {}, []

    for label, state_kw in FORMATS.items():
        opt = getattr(fastopt, cls_name)([p0], **kw, **state_kw)
        opt.grads[0][...] = g0
        set_threads(t, torch)
        opt.step()
        impl = f"fastopt {label}"
        timed.append(Timed(impl, t, opt.step))
        meta[impl] = ("fastopt", label, step_traffic(opt.state_nbytes, n))

    if torch is not None:
        def torch_param():
            tp = torch.from_numpy(p0.copy()).requires_grad_()
            tp.grad = torch.from_numpy(g0.copy())
            return tp

        def torch_state_bytes(topt):
            return sum(v.nbytes for st in topt.state.values() for k, v in st.items()
                       if k != "step" and torch.is_tensor(v))

        topt = getattr(torch.optim, cls_name)([torch_param()], **kw, fused=True)
        set_threads(t, torch)
        topt.step()                                       # allocates the state, to count it
        timed.append(Timed("torch fused", t, topt.step))
        meta["torch fused"] = ("torch fused", "float32",
                               step_traffic(torch_state_bytes(topt), n))
        if bnb is not None:
            bopt = bnb.optim.AdamW8bit([torch_param()], **kw)   # min_8bit_size 4096, blocks of 256
            try:
                bopt.step()
            except Exception as e:      # a build without CPU kernels: say so, time the rest
                notes.append(f"{BNB_IMPL} failed on a CPU tensor: {type(e).__name__}: {e}")
            else:
                timed.append(Timed(BNB_IMPL, t, bopt.step))
                meta[BNB_IMPL] = (BNB_IMPL, "int8", step_traffic(torch_state_bytes(bopt), n))

    # one ceiling per traffic (to 0.01 B/param), on slices of one set of aligned buffers
    traffic = sorted({round(b, 2) for _, _, b in meta.values()}, reverse=True)
    sizes = {b: max(1, round(n * b / 28)) for b in traffic}
    bufs = [aligned_zeros(max(sizes.values())) for _ in range(4)]
    bufs[1][:] = 1.0
    for b in traffic:
        views = [a[:sizes[b]] for a in bufs]
        impl = f"ceiling {b:.2f} B"
        timed.append(Timed(impl, t, lambda views=views: _core.probe_r4w3(*views)))
        meta[impl] = (impl, None, b)
    return timed, meta, notes


def summarize_formats(rows, meta, n, reps):
    """-> dicts for the table and the JSON: each row beside its ceiling and fastopt float32."""
    med = {r.impl: float(np.median(r.samples)) for r in rows if r.samples}
    fp32 = med.get("fastopt float32")
    out = []
    for r in rows:
        implementation, state, bpp = meta[r.impl]
        row = dict(optimizer=FORMATS_OPT, n=n, impl=r.impl, implementation=implementation,
                   state=state, threads=r.threads, bytes_per_param=bpp, reps=reps)
        if not r.samples:
            out.append(dict(row, us_per_step=None, dropped=r.dropped))
            continue
        s = med[r.impl]
        q1, q3 = np.percentile(r.samples, [25, 75])
        ceil_s = med.get(f"ceiling {round(bpp, 2):.2f} B")
        out.append(dict(
            row, us_per_step=s * 1e6, spread=(q3 - q1) / s, ns_per_param=s / n * 1e9,
            gb_per_s=bpp * n / s / 1e9, ceiling_us=None if ceil_s is None else ceil_s * 1e6,
            pct_of_ceiling=None if ceil_s is None else 100 * ceil_s / s,
            speedup_vs_fp32=None if fp32 is None else fp32 / s,
            steps_per_batch=r.k, samples_s=list(r.samples)))
    return out


def print_formats(rows, notes, reps):
    cls_name, kw, _, _ = OPTIMIZERS[FORMATS_OPT]
    args = ", ".join(f"{k}={v}" for k, v in kw.items())
    t = rows[0]["threads"]
    print(f"\nstate formats: {cls_name}({args}) on one tensor, {t} thread{'s' * (t > 1)}; "
          "B/param: read g, p and the state, write p and the state;\n  'ceiling' is "
          "probe_r4w3 moving the same bytes; 'vs fp32' is fastopt float32's time over the "
          "row's, same run")
    print(f"  {'size':<10} {'implementation':<22} {'state':<19} {'B/param':>7} {'ms/step':>8} "
          f"{'spread':>6} {'ns/param':>8} {'GB/s':>6} {'ceil ms':>7} {'% ceil':>6} "
          f"{'vs fp32':>7}")
    for n in dict.fromkeys(r["n"] for r in rows):
        group = [r for r in rows if r["n"] == n and r["state"] is not None]
        first = group[0]
        notes_here = [size_label(n)]
        if first["reps"] < reps:
            notes_here.append(f"{first['reps']} reps")
        if first["others_cores"] is not None and first["others_cores"] > BUSY:
            notes_here.append(f"! busy {first['others_cores']:.1f}")
        print()
        for j, r in enumerate(group):
            note = notes_here[j] if j < len(notes_here) else ""
            head = (f"  {note:<10} {r['implementation']:<22} {r['state']:<19} "
                    f"{r['bytes_per_param']:>7.2f}")
            if r["us_per_step"] is None:
                print(f"{head}   dropped: {r['dropped']}")
                continue
            ceil_ms = None if r["ceiling_us"] is None else r["ceiling_us"] / 1e3
            print(f"{head} {fmt(r['us_per_step'] / 1e3):>8} {r['spread'] * 100:>5.0f}% "
                  f"{fmt(r['ns_per_param']):>8} {fmt(r['gb_per_s']):>6} {fmt(ceil_ms):>7} "
                  f"{pct(r['pct_of_ceiling']):>6} {ratio(r['speedup_vs_fp32']):>7}")
    for note in notes:
        print(f"  {note}")


# ---- machine header --------------------------------------------------------------------------

def timing_env():
    """Environment variables that change how the kernels or torch run."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "FASTOPT_"))}


def machine(torch, threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        # fastopt and torch share one OpenMP runtime when both link libgomp.so.1; two runtimes
        # spinning for their own threads on the same cores would slow each other down
        with open("/proc/self/maps") as f:
            omp = sorted({line.split()[-1] for line in f
                          if "omp" in line.rsplit("/", 1)[-1] and "/" in line})
    except OSError:
        omp = []
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__,
        "torch": torch.__version__ if torch else None,
        "fastopt": fastopt.build_info(), "threads": threads, "openmp_libraries": omp,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": timing_env(),
    }


def git_revision():
    """The checkout's commit, '-dirty' when it has uncommitted changes; None outside git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def size_label(n):
    """1000 -> '1e3', 50000000 -> '5e7'; other sizes as they are."""
    mantissa, exp = f"{n:.0e}".split("e")
    return f"{mantissa}e{int(exp)}" if float(f"{n:.0e}") == n else str(n)


def command_lines(args, sizes, layouts, names, threads, budget, reps, format_sizes):
    """-> (the command as typed, the same run with every setting spelled out)."""
    env = [f"{k}={shlex.quote(v)}" for k, v in timing_env().items()]
    typed = " ".join(env + [shlex.join(["python", "bench/run.py"] + sys.argv[1:])])
    explicit = ["python", "bench/run.py"] + (["--full"] if args.full else []) + [
        "--optimizers", ",".join(names) or "none",
        "--sizes", ",".join(map(size_label, sizes)) or "none",
        "--layouts", ",".join(layouts) or "none",
        "--threads", ",".join(map(str, threads)), "--reps", str(reps), "--budget", f"{budget:g}"]
    explicit += ["--no-torch"] if args.no_torch else []
    explicit += ["--no-extras"] if args.no_extras else []
    explicit += (["--format-sizes", ",".join(map(size_label, format_sizes))] if format_sizes
                 else ["--no-formats"])
    return typed, " ".join(env + [shlex.join(explicit)])


def describe_skips(skips, names, layouts, threads):
    """[(impl, optimizer, layout, threads, reason)] -> lines saying what was left out, and why."""
    groups = {}
    for impl, opt_name, layout, t, reason in skips:
        opts, lays, ts = groups.setdefault((impl, reason), (set(), set(), set()))
        opts.add(opt_name)
        lays.add(layout)
        ts.add(t)
    lines = []
    for (impl, reason), (opts, lays, ts) in groups.items():
        where = [o for o in names if o in opts] if opts != set(names) else []
        where += [la for la in layouts if la in lays] if lays != set(layouts) else []
        where += [f"{t} threads" for t in threads if t in ts] if ts != set(threads) else []
        lines.append(f"{impl}{' (' + ', '.join(where) + ')' if where else ''}: {reason}")
    return lines


def print_header(info, cmd, explicit, skipped, budget, reps):
    b = info["fastopt"]
    nt = max(info["threads"])
    print(f"fastopt {b['version']} benchmark, {info['date']}"
          + (f", checkout {info['git']}" if info["git"] else ""))
    print(f"  machine   {info['cpu']}, {info['cores']} cores; {info['platform']}")
    print(f"  versions  Python {info['python']}, NumPy {info['numpy']}, "
          f"torch {info['torch'] or 'not used'}"
          + (f", bitsandbytes {info['bitsandbytes']}" if info.get("bitsandbytes") else ""))
    print(f"  fastopt   isa {b['isa']} (available: {', '.join(b['available_isas'])}), "
          f"openmp {b['openmp']}; {b['compiler']} {b['flags']}")
    print(f"  threads   {', '.join(map(str, info['threads']))}", end="")
    if nt > 1:
        print(f"; fastopt (and its ceiling) adds a thread only for each {b['min_per_thread']:,}"
              f" params,\n            so its {nt}-thread rows run on 1 thread below "
              f"{2 * b['min_per_thread']:,} params", end="")
    print(f"\n  openmp    {', '.join(info['openmp_libraries']) or 'none loaded'}")
    la, now = info["load_average_at_start"], info["others_cores_at_start"]
    if la is not None:
        print(f"  load      {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} (1, 5, 15 min)", end="")
    if now is not None:
        print(f"; other processes keep {now:.1f} cores busy now"
              + ("   <- expect noise" if now > BUSY else ""), end="")
    print()
    print(f"  timing    median of {reps} interleaved repetitions (at least {min(reps, MIN_REPS)}"
          f" where single steps are slow), about {budget:g} s per row per case")
    print(f"  command   {cmd}")
    if explicit != cmd:
        print(f"  explicit  {explicit}")
    for j, line in enumerate(skipped):
        print(f"  {'skipped' if j == 0 else '':<9} {line}")
    sys.stdout.flush()


class CpuMeter:
    """How many cores other processes kept busy while a case ran (Linux; else None).

    Two threads need both cores of a 2-core machine: anything else running there shows in
    the medians, above all of the 2-thread rows, and this says when that happened.
    """

    def __init__(self):
        self.t0 = self.busy0 = self.ours0 = None

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: steal is the hypervisor's, not ours
        busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def start(self):
        self.t0, self.busy0, self.ours0 = self._read() or (None, None, None)

    def others(self):
        now = self._read()
        if now is None or self.t0 is None:
            return None
        t, busy, ours = now
        return max(0.0, ((busy - self.busy0) - (ours - self.ours0)) / (t - self.t0))


class Progress:
    """A status line on stderr, rewritten in place on a terminal; else a line per case."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.prefix = ""
        self.t0 = time.perf_counter()

    def case(self, prefix):
        self.prefix = prefix
        if not self.tty:
            print(prefix, file=sys.stderr, flush=True)

    def __call__(self, msg):
        if self.tty:
            line = f"{self.prefix} {msg}  ({time.perf_counter() - self.t0:.0f} s)"
            print(f"\r{line[:99]:<99}", end="", file=sys.stderr, flush=True)

    def done(self):
        if self.tty:
            print("\r" + " " * 99 + "\r", end="", file=sys.stderr, flush=True)


# ---- main ------------------------------------------------------------------------------------

def parse_list(text, parse, what):
    if text.strip().lower() == "none":
        return []
    try:
        return [parse(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"bad {what}: {text!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="add 5e7 params and mlp-25M, more repetitions and time, and torch's "
                         "foreach and for-loop on many-10k (about 10 minutes)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help="comma-separated subset of " + ",".join(OPTIMIZERS))
    ap.add_argument("--sizes", default=None,
                    help="flat sizes, comma-separated (1e3,1e6), or none; default "
                         f"{','.join(map(size_label, QUICK_SIZES))}, --full adds 5e7")
    ap.add_argument("--layouts", default=None,
                    help=f"model layouts, comma-separated subset of {','.join(LAYOUTS)}, or "
                         f"none; default {','.join(QUICK_LAYOUTS)}, --full adds mlp-25M")
    ap.add_argument("--threads", default=None,
                    help="thread counts, comma-separated; default 1 and os.cpu_count()")
    ap.add_argument("--no-torch", action="store_true", help="leave torch out even if installed")
    ap.add_argument("--no-extras", action="store_true", help="skip the fused-extras section")
    ap.add_argument("--no-formats", action="store_true", help="skip the state-formats section")
    ap.add_argument("--format-sizes", default=None,
                    help="sizes of the state-formats section, comma-separated, or none; default "
                         f"{','.join(map(size_label, QUICK_FORMAT_SIZES))}, --full adds 5e7")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"repetitions per case (default {QUICK_TIMING[1]}, "
                         f"--full {FULL_TIMING[1]})")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds per row per case (default {QUICK_TIMING[0]:g}, "
                         f"--full {FULL_TIMING[0]:g})")
    ap.add_argument("--min-per-thread", type=int, default=None,
                    help="elements each fastopt thread must get before a step uses another "
                         f"(default {_core.get_min_per_thread():,}; 1 splits every size, to "
                         "measure where threads start to pay)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"),
                    help="directory for the JSON and PNG (default bench/results)")
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()
    if args.min_per_thread is not None:
        if args.min_per_thread < 1:
            ap.error("--min-per-thread must be >= 1")
        _core.set_min_per_thread(args.min_per_thread)

    names = parse_list(args.optimizers, str, "--optimizers")
    for name in names:
        if name not in OPTIMIZERS:
            ap.error(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    sizes = (parse_list(args.sizes, lambda s: int(float(s)), "--sizes") if args.sizes
             else FULL_SIZES if args.full else QUICK_SIZES)
    layouts = (parse_list(args.layouts, str, "--layouts") if args.layouts
               else FULL_LAYOUTS if args.full else QUICK_LAYOUTS)
    for name in layouts:
        if name not in LAYOUTS:
            ap.error(f"unknown layout {name!r}; choose from {', '.join(LAYOUTS)}, or none")
    if any(n < 1 for n in sizes):
        ap.error("--sizes must be >= 1")
    format_sizes = ([] if args.no_formats else
                    parse_list(args.format_sizes, lambda s: int(float(s)), "--format-sizes")
                    if args.format_sizes else
                    FULL_FORMAT_SIZES if args.full else QUICK_FORMAT_SIZES)
    if any(n < 1 for n in format_sizes):
        ap.error("--format-sizes must be >= 1")
    threads = (sorted(set(parse_list(args.threads, int, "--threads"))) if args.threads
               else sorted({1, os.cpu_count() or 1}))
    if not threads or threads[0] < 1:
        ap.error("--threads needs counts >= 1")
    budget, reps = FULL_TIMING if args.full else QUICK_TIMING
    budget = args.budget if args.budget is not None else budget
    reps = args.reps if args.reps is not None else reps
    if reps < 1 or budget <= 0:
        ap.error("--reps must be >= 1 and --budget > 0")

    torch = None if args.no_torch else torch_or_none()
    # imported before the header, which lists the OpenMP runtimes loaded
    bnb, bnb_note = bitsandbytes_or_reason(torch) if format_sizes else (None, None)
    info = machine(torch, threads)
    info["bitsandbytes"] = bnb.__version__ if bnb is not None else None
    cpu = CpuMeter()
    cpu.start()
    time.sleep(0.5)
    info["others_cores_at_start"] = cpu.others()
    cmd, explicit = command_lines(args, sizes, layouts, names, threads, budget, reps,
                                  format_sizes)

    cases = [(name, size_label(n), [(n,)]) for name in names for n in sizes]
    cases += [(name, lay, LAYOUTS[lay][1]) for name in names for lay in layouts]
    cases.sort(key=lambda c: names.index(c[0]))
    skips = [(impl, name, lay, t, reason) for name, lay, _ in cases
             for t, impls in skipped_impls(name, lay, threads, torch, args.full).items()
             for impl, reason in impls.items()]
    skipped = describe_skips(skips, names, [size_label(n) for n in sizes] + layouts, threads)
    if torch is None:
        skipped.insert(0, "torch: " + ("--no-torch" if args.no_torch else
                                       "import torch failed"))
    print_header(info, cmd, explicit, skipped, budget, reps)

    progress = Progress()
    results = []
    for i, (name, lay, shapes) in enumerate(cases, 1):
        n = sum(int(np.prod(s)) for s in shapes)
        progress.case(f"[{i}/{len(cases)}] {name} {lay}")
        progress("building")
        case0 = time.perf_counter()
        rows = make_case(name, shapes, threads, torch,
                         skipped_impls(name, lay, threads, torch, args.full))
        cpu.start()
        case_reps = time_rows(rows, budget, reps, torch, progress)
        others = cpu.others()
        baseline = baseline_of(name)
        for r in summarize(rows, name, lay, n, len(shapes), baseline):
            r.update(model_layout=lay in LAYOUTS, reps=case_reps, others_cores=others,
                     case_wall_s=time.perf_counter() - case0)
            results.append(r)
        del rows
        gc.collect()

    extra_rows = []
    if not args.no_extras:
        for title, fn in (("zero_grad, grad_multiplier", extras_fusion),
                          ("per-call overhead", extras_overhead)):
            progress.case(f"[extras] {title}")
            cpu.start()
            rows = fn(threads, torch, budget, reps, progress)
            others = cpu.others()
            for r in rows:
                r["others_cores"] = others
            extra_rows += rows
            gc.collect()

    format_rows, format_notes = [], [bnb_note] if bnb_note else []
    for n in format_sizes:
        t = min(threads)
        progress.case(f"[formats] {FORMATS_OPT} {size_label(n)}")
        progress("building")
        case0 = time.perf_counter()
        rows, meta, notes = make_formats(n, t, torch, bnb)
        format_notes += notes
        cpu.start()
        case_reps = time_rows(rows, budget, reps, torch, progress)
        others = cpu.others()
        for r in summarize_formats(rows, meta, n, case_reps):
            r.update(others_cores=others, case_wall_s=time.perf_counter() - case0)
            format_rows.append(r)
        del rows
        gc.collect()
    wall = time.perf_counter() - wall0
    progress.done()

    print_table(results, reps)
    if extra_rows:
        print_extras(extra_rows)
    if format_rows:
        print_formats(format_rows, format_notes, reps)
    busy = [r["others_cores"] for r in results + extra_rows + format_rows
            if r["others_cores"] is not None]
    if busy and max(busy) > BUSY:
        print(f"\nother processes kept up to {max(busy):.1f} cores busy during some cases "
              f"(marked '!'): rerun on a quiet machine before trusting those rows")

    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"run-{datetime.now():%Y%m%d-%H%M%S}")
    with open(stem + ".json", "w") as f:
        json.dump({"command": cmd, "explicit_command": explicit, "argv": sys.argv,
                   "machine": info, "skipped": skipped, "budget_s": budget, "reps": reps,
                   "wall_s": wall, "layouts": {k: v[0] for k, v in LAYOUTS.items()},
                   "rows": results, "extras": extra_rows, "formats": format_rows,
                   "formats_notes": format_notes}, f, indent=1)
    png = plot(results, stem + ".png")
    why_not = ("no flat sizes to plot" if all(r["model_layout"] for r in results)
               else "matplotlib is not installed")
    print(f"\nwall time {wall:.0f} s; wrote {stem}.json"
          + (f" and {png}" if png else f" (no plot: {why_not})"))


def plot(results, path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _plot import plot_throughput
    return plot_throughput(results, path)


if __name__ == "__main__":
    main()
