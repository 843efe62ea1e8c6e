"""fastopt.torch against torch.optim: one AdamW step, and a whole training step of a small model.

    python bench/torch_bridge.py                  # about 2 minutes on 2 idle cores
    python bench/torch_bridge.py --quick          # about 35 s: fewer repetitions, less time
    python bench/torch_bridge.py --layouts many-10k --threads 1 --no-train

Part 1, the optimizer step: AdamW(lr=1e-3) (torch's default weight_decay, 1e-2) on three
layouts: mlp-1M and many-10k, bench/run.py's LAYOUTS (imported from it), and flat-1e7, one
tensor of 1e7 params.  Every implementation starts from the same float32 params and the same
fixed random gradients, and `opt.step()` is timed:
  fastopt.torch         fastopt.torch.AdamW over torch parameters; the gradients are written
                        once into the .grad views it binds, never assigned again
  fastopt.torch, .grad replaced
                        the same optimizer, with every .grad replaced by another tensor (of the
                        same values) before each step, outside the timed region: what
                        model.zero_grad() then backward() leaves.  step() sees it, copies the
                        gradients into the arena and binds the views again; that is timed
  torch fused / torch foreach / torch for-loop
                        torch.optim.AdamW(fused=True) / (foreach=True) / (foreach=False,
                        fused=False): the last is what torch.optim.AdamW(params) runs on CPU by
                        default.  Gradients bound as .grad once
and, from the same run, where fastopt.torch's time goes (the "overhead" table):
  core.step()           opt.core.step(): the fastopt optimizer behind it, without the torch layer
  step() with a hook    fastopt.torch's step() on a second optimizer of the same shapes with a
                        step pre-hook that does nothing registered: it then goes through the
                        wrapper torch.optim.Optimizer puts around every subclass's step
                        (profile_hook_step: record_function, the step hooks), which step()
                        skips when no hook is registered and no profiler runs
  .grad check           what step() runs on every call to see whether any .grad was replaced
                        (fastopt.torch._bound: one identity test of p.grad a parameter)
  p.grad reads          the reads of p.grad alone, in the same C-level loop (what any check
                        that looks at every .grad from Python pays)
  torch's step wrapper  profile_hook_step around a function that does nothing (what a hook, or
                        every torch.optim optimizer's step, pays)
The ratios are against torch fused at the same thread count; the goals the issue set
(fastopt.torch >= 3x torch fused on mlp-1M, >= 50x on many-10k, >= 1x on flat-1e7) are checked
at the end of the table.

Part 2, a whole training step on a small CPU model, batch 64 of digits-sized input (8x8): "mlp"
is 64-256-256-10 with ReLU (bench/train_mlp.py's small configuration), "convnet" two 3x3
convolutions (16, 32 channels), a 2x2 max-pool and a 512-128-10 head.  Random inputs and labels
(a pool of 16 batches, cycled; the time does not depend on the values), cross-entropy loss.
One step is zero_grad, forward, backward, step; "optimizer" is the time inside the zero_grad
and step calls, the rest is "fwd+bwd".  Implementations: fastopt.torch.AdamW with opt.zero_grad()
(the recommended loop), the same with model.zero_grad() (backward makes new gradients, which
step() copies in), and torch's AdamW fused, foreach and for-loop (torch's CPU default), each
with opt.zero_grad() (torch's default set_to_none=True); and, to see what the torch layer costs
there, "fastopt.torch's core calls": fastopt.torch.AdamW's loop calling opt.core.zero_grad()
and opt.core.step() instead (the views stay bound, so this steps the same arena the same way).
Each implementation trains its own copy of the same initial model.

How (bench/run.py's method): both torch and fastopt get each row's thread count before each of
its batches (torch.set_num_threads, fastopt.set_num_threads).  Each row takes a warm-up step
(state is allocated on the first), then its batch size k is set so that a batch takes about
budget/reps seconds.  A repetition times one batch of every row in turn, the starting row
rotated from one repetition to the next; the tables give medians over repetitions of the time
per step, and the spread (interquartile range / median).  A row whose repetitions would take
more than --slow-budget seconds (torch on many-10k: 0.1-1 s a step, so one step a batch) takes
fewer: as many as fit in it, at least 3, spread evenly over the other rows' repetitions.
A row is dropped, saying why, when its first step takes over --max-step seconds, or (torch at
several threads) when one parallel region times its tensors would.  A case during which other
processes kept the cores busy is marked "! busy" with the cores they used; one whose steps
turned slow midway stops at 1.5 times its planned time, once every row has 3 repetitions
("! cut short").

Output: the machine and the command on stdout, then the tables; progress on stderr; under --out
(bench/results/) a JSON file with the machine, the command line, every row and its samples.
"""
import argparse
import collections
import copy
import gc
import importlib
import itertools
import json
import operator
import os
import shlex
import sys
import time
from datetime import datetime

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as suite  # noqa: E402  bench/run.py: its layouts, machine header, meters

import fastopt  # noqa: E402

KW = dict(lr=1e-3)                  # AdamW; weight_decay is torch's default, 1e-2
LAYOUTS = {
    "mlp-1M": suite.LAYOUTS["mlp-1M"],
    "many-10k": suite.LAYOUTS["many-10k"],
    "flat-1e7": ("one tensor of 10,000,000", [(10**7,)]),
}
GOALS = {"mlp-1M": 3.0, "many-10k": 50.0, "flat-1e7": 1.0}   # x torch fused, from the issue
MODELS = ["mlp", "convnet"]
BATCH = 64
POOL = 16                           # training batches, cycled

# (budget s per row per case, repetitions, slow budget s per slow row, max first step s)
FULL_TIMING = (1.0, 15, 2.5, 10.0)
QUICK_TIMING = (0.15, 5, 0.4, 5.0)
MIN_REPS = suite.MIN_REPS
BUSY = suite.BUSY

STEP_ROWS = ["fastopt.torch", "fastopt.torch, .grad replaced", "torch fused", "torch foreach",
             "torch for-loop"]
OVERHEAD_ROWS = ["core.step()", "step() with a hook", ".grad check", "p.grad reads",
                 "torch's step wrapper"]
PER_TENSOR = {".grad check", "p.grad reads"}
TRAIN_ROWS = ["fastopt.torch", "fastopt.torch, model.zero_grad()", "torch fused",
              "torch foreach", "torch for-loop", "fastopt.torch's core calls"]
TORCH_IMPLS = (("torch fused", dict(fused=True)), ("torch foreach", dict(foreach=True)),
               ("torch for-loop", dict(foreach=False, fused=False)))


class Row:
    """One row of a table: `run(k)` takes k steps and returns the seconds of each timed part
    (a tuple: the step; or the whole training step and its optimizer calls)."""

    def __init__(self, section, impl, threads, run, tensors=0):
        self.section, self.impl, self.threads, self.run = section, impl, threads, run
        self.tensors = tensors          # torch rows: a step may run a parallel region for each
        self.k = self.cap = 0
        self.samples, self.dropped, self.per_step = [], None, None


def loop(fn):
    def run(k):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0,)
    return run


def replaced_run(opt, params, fresh):
    """Steps after every .grad was replaced by another tensor; only step() is timed."""
    step = opt.step

    def run(k):
        total = 0.0
        for _ in range(k):
            for p, g in zip(params, fresh):
                p.grad = g
            t0 = time.perf_counter()
            step()
            total += time.perf_counter() - t0
        return (total,)
    return run


# ---- part 1: the optimizer step --------------------------------------------------------------

def step_case(shapes, threads, torch):
    """-> [Row]: every implementation on the same initial params and gradients."""
    import fastopt.torch as fot
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    g0 = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    n = len(shapes)
    rows = []

    params = [torch.from_numpy(a.copy()).requires_grad_() for a in p0]
    opt = fot.AdamW(params, **KW)
    opt.zero_grad()                                 # binds the arena's views as the .grad
    with torch.no_grad():
        for p, g in zip(params, g0):
            p.grad.copy_(torch.from_numpy(g))       # into the bound view, once
    views = [p.grad for p in params]
    fresh = [torch.from_numpy(g.copy()) for g in g0]
    for t in threads:
        rows.append(Row("step", "fastopt.torch", t, loop(opt.step)))
        rows.append(Row("step", "fastopt.torch, .grad replaced", t,
                        replaced_run(opt, params, fresh)))

    for impl, extra in TORCH_IMPLS:
        tensors = []
        for a, g in zip(p0, g0):
            tp = torch.from_numpy(a.copy()).requires_grad_()
            tp.grad = torch.from_numpy(g.copy())
            tensors.append(tp)
        topt = torch.optim.AdamW(tensors, **KW, **extra)
        for t in threads:
            rows.append(Row("step", impl, t, loop(topt.step), tensors=n))

    # where fastopt.torch's time goes: the same optimizer, its parts
    hooked_params = [torch.from_numpy(a.copy()).requires_grad_() for a in p0]
    hooked = fot.AdamW(hooked_params, **KW)
    hooked.zero_grad()
    hooked.register_step_pre_hook(lambda *args: None)
    grad_of = operator.attrgetter("grad")
    hooked_noop = torch.optim.Optimizer.profile_hook_step(lambda self: None)
    for t in threads:
        rows.append(Row("overhead", "core.step()", t, loop(opt.core.step)))
        rows.append(Row("overhead", "step() with a hook", t, loop(hooked.step)))
    t = min(threads)        # pure Python: the thread count changes nothing
    rows.append(Row("overhead", ".grad check", t, loop(lambda: fot._bound(params, views))))
    rows.append(Row("overhead", "p.grad reads", t,
                    loop(lambda: collections.deque(map(grad_of, params), maxlen=0))))
    rows.append(Row("overhead", "torch's step wrapper", t, loop(lambda: hooked_noop(opt))))
    return rows


# ---- part 2: a training step -----------------------------------------------------------------

def build_model(name, torch):
    nn = torch.nn
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 10))
        shape = (BATCH, 64)
    elif name == "convnet":
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
                              nn.Linear(128, 10))
        shape = (BATCH, 1, 8, 8)
    else:
        raise ValueError(name)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
               for _ in range(POOL)]
    return model, batches


def describe_model(name, torch):
    model, _ = build_model(name, torch)
    ps = list(model.parameters())
    what = {"mlp": "MLP 64-256-256-10",
            "convnet": "conv 3x3 1-16, 16-32, max-pool 2, 512-128-10"}[name]
    return f"{what}: {sum(p.numel() for p in ps):,} params in {len(ps)} tensors"


def train_run(model, zero, step, batches, torch):
    loss_fn = torch.nn.functional.cross_entropy
    data = itertools.cycle(batches)

    def run(k):
        total = in_zero = in_step = 0.0
        for _ in range(k):
            x, y = next(data)
            t0 = time.perf_counter()
            zero()
            t1 = time.perf_counter()
            loss_fn(model(x), y).backward()
            t2 = time.perf_counter()
            step()
            t3 = time.perf_counter()
            total += t3 - t0
            in_zero += t1 - t0
            in_step += t3 - t2
        return (total, in_zero, in_step)
    return run


def train_case(name, threads, torch):
    import fastopt.torch as fot
    model0, batches = build_model(name, torch)
    rows = []
    def fastopt_torch(m):
        opt = fot.AdamW(m.named_parameters(), **KW)
        opt.zero_grad()     # binds the .grad views (the core-calls row never calls it again)
        return opt

    # (row, optimizer, its zero_grad and step calls)
    impls = [("fastopt.torch", fastopt_torch, lambda m, o: (o.zero_grad, o.step)),
             ("fastopt.torch, model.zero_grad()", fastopt_torch,
              lambda m, o: (m.zero_grad, o.step)),
             ("fastopt.torch's core calls", fastopt_torch,
              lambda m, o: (o.core.zero_grad, o.core.step))]
    impls += [(impl, lambda m, extra=extra: torch.optim.AdamW(m.parameters(), **KW, **extra),
               lambda m, o: (o.zero_grad, o.step)) for impl, extra in TORCH_IMPLS]
    for impl, make, calls in impls:
        model = copy.deepcopy(model0)
        opt = make(model)
        fn = train_run(model, *calls(model, opt), batches, torch)
        for t in threads:
            rows.append(Row("train", impl, t, fn))
    return rows


# ---- timing ----------------------------------------------------------------------------------

def time_rows(rows, budget, reps, slow, max_step, torch, progress):
    """Fill each row's k, cap and samples (seconds per step of each part): warm-up, then
    interleaved batches.  -> whether the repetitions were cut short."""
    target = budget / reps
    for i, row in enumerate(rows):
        progress(f"warm-up {i + 1}/{len(rows)}")
        if row.tensors and row.threads > 1:
            # as bench/run.py: look before stepping; with a core taken by another process a
            # torch parallel region waits for a time slice, and torch fused runs one a tensor
            lat = suite.region_latency(torch, row.threads)
            if row.tensors * lat > max_step:
                row.dropped = (f"the cores are busy: a {row.threads}-thread torch parallel "
                               f"region took {lat * 1e3:.2g} ms, x {row.tensors:,} tensors")
                continue
        suite.set_threads(row.threads, torch)
        dt = row.run(1)[0]                  # allocates the state, touches the pages
        if dt > max_step:
            row.dropped = f"its first step took {dt:.3g} s (limit {max_step:g} s)"
            continue
        k = 1
        while True:                         # a step's time, from a long-enough batch
            dt = row.run(k)[0]
            if dt >= target / 4:
                break
            k *= 4
        row.per_step = max(dt, 1e-9) / k
        row.k = max(1, round(target / row.per_step))
        row.cap = reps
        if row.per_step * reps > slow:      # slow steps: fewer repetitions
            row.cap = min(reps, max(MIN_REPS, int(slow / row.per_step)))
    live = [row for row in rows if row.dropped is None]
    if not live:
        return False
    gc.collect()
    # As bench/run.py: when steps turn slow midway (other processes taking the cores: a
    # 2-thread training step then waits in every parallel region), stop at 1.5 times the
    # planned time, once every row has MIN_REPS repetitions (or its cap, if lower).
    planned = sum(row.cap * row.k * row.per_step for row in live)
    cut = False
    gc.disable()              # one row's garbage must not be collected in another row's batch
    try:
        t0 = time.perf_counter()
        for r in range(reps):
            progress(f"rep {r + 1}/{reps}" + (" (cut short: finishing)" if cut else ""))
            for i in range(len(live)):
                row = live[(i + r) % len(live)]          # rotate who goes first
                if cut:
                    due = len(row.samples) < min(MIN_REPS, row.cap)
                else:
                    # a capped row's repetitions are spread evenly over the rounds
                    due = (r + 1) * row.cap // reps > r * row.cap // reps
                if not due:
                    continue
                suite.set_threads(row.threads, torch)
                parts = row.run(row.k)
                row.samples.append(tuple(x / row.k for x in parts))
            if not cut and time.perf_counter() - t0 > 1.5 * planned:
                cut = True
            if cut and all(len(row.samples) >= min(MIN_REPS, row.cap) for row in live):
                break
    finally:
        gc.enable()
    return cut


def stats(row, part=0):
    if not row.samples:
        return None, None
    x = np.array([s[part] for s in row.samples])
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return float(med), float((q3 - q1) / med)


# ---- tables ----------------------------------------------------------------------------------

def fmt(x):
    return suite.fmt(x)


def ratio(x):
    return suite.ratio(x)


def note_of(case):
    notes = []
    if case["cut_short"]:
        notes.append("! cut short")
    if case["others_cores"] is not None and case["others_cores"] > BUSY:
        notes.append(f"! busy {case['others_cores']:.1f}")
    return notes


def print_steps(cases, threads):
    print("\nPart 1: one AdamW step (lr=1e-3, weight_decay=1e-2), us per step, median; "
          "'vs fused' is torch fused's median / the row's, same threads")
    print(f"  {'layout':<10} {'implementation':<30} {'thr':>3} {'us/step':>9} {'spread':>6} "
          f"{'reps':>4} {'vs fused':>8}")
    for case in cases:
        rows = [r for r in case["rows"] if r["section"] == "step"]
        notes = [case["layout"]] + note_of(case)
        j = 0
        for t in threads:
            print()
            for impl in STEP_ROWS:
                r = next((r for r in rows if r["impl"] == impl and r["threads"] == t), None)
                if r is None:
                    continue
                note = notes[j] if j < len(notes) else ""
                j += 1
                if r["us_per_step"] is None:
                    print(f"  {note:<10} {impl:<30} {t:>3}   dropped: {r['dropped']}")
                    continue
                print(f"  {note:<10} {impl:<30} {t:>3} {fmt(r['us_per_step']):>9} "
                      f"{r['spread'] * 100:>5.0f}% {r['reps']:>4} "
                      f"{ratio(r['vs_torch_fused']):>8}")
    print("\n  layouts: " + "; ".join(f"{c['layout']}: {c['n']:,} params in "
                                      f"{LAYOUTS[c['layout']][0]}" for c in cases))


def print_overhead(cases, threads):
    print("\nWhere fastopt.torch's step goes (same runs): us per call, median; ns per tensor for "
          "the per-tensor parts")
    print(f"  {'layout':<10} {'part':<24} {'thr':>3} {'us':>9} {'spread':>6} {'ns/tensor':>9}")
    for case in cases:
        rows = {(r["impl"], r["threads"]): r for r in case["rows"]}
        print()
        first = True
        for t in threads:
            for impl in ["fastopt.torch"] + OVERHEAD_ROWS:
                r = rows.get((impl, t))
                if r is None or r["us_per_step"] is None:
                    continue
                note = case["layout"] if first else ""
                first = False
                per = (f"{r['us_per_step'] * 1e3 / case['tensors']:>9.0f}" if impl in PER_TENSOR
                       else "")
                print(f"  {note:<10} {impl:<24} {t:>3} {fmt(r['us_per_step']):>9} "
                      f"{r['spread'] * 100:>5.0f}% {per}")
            bridge, core = rows.get(("fastopt.torch", t)), rows.get(("core.step()", t))
            if bridge and core and bridge["us_per_step"] and core["us_per_step"]:
                extra = bridge["us_per_step"] - core["us_per_step"]
                print(f"  {'':<10} {'fastopt.torch - core':<24} {t:>3} {extra:>9.1f} "
                      f"{'':>6} {extra * 1e3 / case['tensors']:>9.0f}")


def print_goals(cases, threads):
    print("\nGoals (fastopt.torch against torch fused, same threads):")
    for case in cases:
        goal = GOALS.get(case["layout"])
        if goal is None:
            continue
        parts = []
        for t in threads:
            r = next((r for r in case["rows"] if r["impl"] == "fastopt.torch"
                      and r["threads"] == t), None)
            x = None if r is None else r.get("vs_torch_fused")
            parts.append(f"{t} thr " + ("-" if x is None else
                                        f"{ratio(x)} {'met' if x >= goal else 'MISSED'}"))
        print(f"  {case['layout']:<10} >= {goal:g}x: " + ", ".join(parts))


def print_train(cases, threads):
    print(f"\nPart 2: one training step (zero_grad, forward, backward, step), batch {BATCH}, "
          "us per step, medians; 'optim.' is the time in the zero_grad and step calls, 'share' "
          "its median / the total's; 'vs fused' is torch fused's median / the row's")
    print(f"  {'model':<8} {'implementation':<33} {'thr':>3} {'total':>7} {'spread':>6} "
          f"{'fwd+bwd':>7} {'zero':>5} {'step':>6} {'optim.':>6} {'share':>5} "
          f"{'vs fused: total':>15} {'optim.':>6}")
    for case in cases:
        notes = [case["model"]] + note_of(case)
        j = 0
        for t in threads:
            print()
            for impl in TRAIN_ROWS:
                r = next((r for r in case["rows"] if r["impl"] == impl and r["threads"] == t),
                         None)
                if r is None:
                    continue
                note = notes[j] if j < len(notes) else ""
                j += 1
                if r["us_per_step"] is None:
                    print(f"  {note:<8} {impl:<33} {t:>3}   dropped: {r['dropped']}")
                    continue
                print(f"  {note:<8} {impl:<33} {t:>3} {fmt(r['us_per_step']):>7} "
                      f"{r['spread'] * 100:>5.0f}% {fmt(r['us_fwd_bwd']):>7} "
                      f"{fmt(r['us_zero_grad']):>5} {fmt(r['us_step']):>6} "
                      f"{fmt(r['us_optimizer']):>6} {r['optimizer_share'] * 100:>4.0f}% "
                      f"{ratio(r['vs_torch_fused']):>15} {ratio(r['optimizer_vs_torch_fused']):>6}")
    print("\n  models: " + "; ".join(f"{c['model']}: {c['what']}" for c in cases))
    print("  fastopt.torch's core calls: the same loop with opt.core.zero_grad() and "
          "opt.core.step(), i.e. without the torch layer (diagnostic)")


# ---- results ---------------------------------------------------------------------------------

def summarize(rows, reps):
    out = []
    for row in rows:
        d = dict(section=row.section, impl=row.impl, threads=row.threads, k=row.k,
                 reps=len(row.samples), dropped=row.dropped,
                 samples_s=[list(s) for s in row.samples])
        med, spread = stats(row)
        d.update(us_per_step=None if med is None else med * 1e6, spread=spread)
        if row.section == "train" and med is not None:
            s = np.array(row.samples)
            opt_med = float(np.median(s[:, 1] + s[:, 2]))
            d.update(us_zero_grad=float(np.median(s[:, 1])) * 1e6,
                     us_step=float(np.median(s[:, 2])) * 1e6, us_optimizer=opt_med * 1e6,
                     us_fwd_bwd=float(np.median(s[:, 0] - s[:, 1] - s[:, 2])) * 1e6,
                     optimizer_share=opt_med / med)
        out.append(d)
    base = {r["threads"]: r for r in out
            if r["impl"] == "torch fused" and r["us_per_step"] is not None}
    for r in out:
        b = base.get(r["threads"])
        if r["section"] in ("step", "train") and r["us_per_step"] is not None and b:
            r["vs_torch_fused"] = b["us_per_step"] / r["us_per_step"]
            if r["section"] == "train":
                r["optimizer_vs_torch_fused"] = b["us_optimizer"] / r["us_optimizer"]
    return out


def command_lines(args, layouts, models, threads, timing):
    """-> (the command as typed, the same run with every setting spelled out)."""
    env = [f"{k}={shlex.quote(v)}" for k, v in suite.timing_env().items()]
    typed = " ".join(env + [shlex.join(["python", "bench/torch_bridge.py"] + sys.argv[1:])])
    budget, reps, slow, max_step = timing
    explicit = ["python", "bench/torch_bridge.py"] + (["--quick"] if args.quick else []) + [
        "--layouts", ",".join(layouts) or "none", "--models", ",".join(models) or "none",
        "--threads", ",".join(map(str, threads)), "--reps", str(reps),
        "--budget", f"{budget:g}", "--slow-budget", f"{slow:g}", "--max-step", f"{max_step:g}"]
    return typed, " ".join(env + [shlex.join(explicit)])


def parse_list(text, parse, what, choices=None):
    out = suite.parse_list(text, parse, what)
    for x in out:
        if choices is not None and x not in choices:
            raise SystemExit(f"unknown {what} {x!r}; choose from {', '.join(choices)}, or none")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a short run: less time per row and fewer repetitions")
    ap.add_argument("--layouts", default=",".join(LAYOUTS),
                    help=f"comma-separated subset of {','.join(LAYOUTS)}, or none")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"training-step models, comma-separated subset of {','.join(MODELS)}, "
                         "or none")
    ap.add_argument("--no-train", action="store_true", help="the same as --models none")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated (1,2)")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"repetitions (default {FULL_TIMING[1]}, --quick {QUICK_TIMING[1]})")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds per row per case (default {FULL_TIMING[0]:g}, --quick "
                         f"{QUICK_TIMING[0]:g})")
    ap.add_argument("--slow-budget", type=float, default=None,
                    help="a row whose --reps repetitions would take longer gets as many as "
                         f"fit in this many seconds (default {FULL_TIMING[2]:g}, --quick "
                         f"{QUICK_TIMING[2]:g}; at least {MIN_REPS} whatever it says)")
    ap.add_argument("--max-step", type=float, default=None,
                    help="a row whose first step takes longer is dropped (default "
                         f"{FULL_TIMING[3]:g} s, --quick {QUICK_TIMING[3]:g})")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="directory for the JSON (default bench/results)")
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()

    layouts = parse_list(args.layouts, str, "layout", LAYOUTS)
    models = [] if args.no_train else parse_list(args.models, str, "model", MODELS)
    threads = sorted(set(parse_list(args.threads, int, "--threads")))
    if not threads or threads[0] < 1:
        ap.error("--threads needs counts >= 1")
    timing = list(QUICK_TIMING if args.quick else FULL_TIMING)
    for i, v in enumerate((args.budget, args.reps, args.slow_budget, args.max_step)):
        if v is not None:
            timing[i] = v
    budget, reps, slow, max_step = timing
    if reps < 1 or min(budget, slow, max_step) <= 0:
        ap.error("--reps must be >= 1, and the times > 0")

    torch = suite.torch_or_none()
    if torch is None:
        raise SystemExit("bench/torch_bridge.py needs torch: pip install 'fastopt[torch]'")
    importlib.import_module("fastopt.torch")    # the bridge imports, or says what is missing

    info = suite.machine(torch, threads)
    cpu = suite.CpuMeter()
    cpu.start()
    time.sleep(0.5)
    info["others_cores_at_start"] = cpu.others()
    info["fastopt_version"] = fastopt.__version__
    cmd, explicit = command_lines(args, layouts, models, threads, timing)
    suite.print_header(info, cmd, explicit, [], budget, reps)
    print(f"  slow rows fewer repetitions where {reps} would take over {slow:g} s "
          f"(at least {MIN_REPS}); the 'reps' column says how many")
    sys.stdout.flush()

    progress = suite.Progress()
    cases = []
    todo = [("step", lay) for lay in layouts] + [("train", m) for m in models]
    for i, (kind, name) in enumerate(todo, 1):
        progress.case(f"[{i}/{len(todo)}] {kind} {name}")
        progress("building")
        case0 = time.perf_counter()
        if kind == "step":
            shapes = LAYOUTS[name][1]
            rows = step_case(shapes, threads, torch)
            case = dict(kind=kind, layout=name, tensors=len(shapes),
                        n=sum(int(np.prod(s)) for s in shapes))
        else:
            rows = train_case(name, threads, torch)
            case = dict(kind=kind, model=name, what=describe_model(name, torch))
        cpu.start()
        case["cut_short"] = time_rows(rows, budget, reps, slow, max_step, torch, progress)
        case["others_cores"] = cpu.others()
        case["rows"] = summarize(rows, reps)
        case["wall_s"] = time.perf_counter() - case0
        cases.append(case)
        del rows
        gc.collect()
    wall = time.perf_counter() - wall0
    progress.done()

    steps = [c for c in cases if c["kind"] == "step"]
    trains = [c for c in cases if c["kind"] == "train"]
    if steps:
        print_steps(steps, threads)
        print_goals(steps, threads)
        print_overhead(steps, threads)
    if trains:
        print_train(trains, threads)
    busy = [c["others_cores"] for c in cases if c["others_cores"] is not None]
    if any(c["cut_short"] for c in cases):
        print("\nsteps turned slow midway in some cases (marked '! cut short'): their "
              "repetitions stopped at 1.5 times the planned time")
    if busy and max(busy) > BUSY:
        print(f"\nother processes kept up to {max(busy):.1f} cores busy during some cases "
              "(marked '!'): rerun on a quiet machine before trusting those rows")

    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"torch_bridge-{datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump({"command": cmd, "explicit_command": explicit, "argv": sys.argv,
                   "machine": info, "timing": dict(budget_s=budget, reps=reps, slow_budget_s=slow,
                                                   max_step_s=max_step),
                   "wall_s": wall, "cases": cases}, f, indent=1)
    print(f"\nwall time {wall:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
