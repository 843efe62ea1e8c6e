"""fastopt's main benchmark: one optimizer step, fused C against pure NumPy (and torch).

    python bench/run.py            # quick: about a minute
    python bench/run.py --full     # every size, more repetitions

For each optimizer and size, every implementation is built on the same parameters and
gradients and timed side by side: repetitions interleave the implementations, each repetition
times a batch of steps, and the table gives the median time per step.  GB/s counts the minimal
memory traffic of one step (Adam and AdamW read param, grad, exp_avg and exp_avg_sq and write
three of them back: 28 bytes per parameter; SGD with momentum and RMSprop 20).
"""
import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np

import fastopt
import fastopt.reference as reference

# name -> (class name, constructor kwargs, bytes moved per parameter per step)
OPTIMIZERS = {
    "sgd": ("SGD", dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4), 20),
    "rmsprop": ("RMSprop", dict(lr=1e-3), 20),
    "adam": ("Adam", dict(lr=1e-3), 28),
    "adamw": ("AdamW", dict(lr=1e-3), 28),
}
QUICK_SIZES = [10**3, 10**4, 10**5, 10**6, 10**7]
FULL_SIZES = QUICK_SIZES + [5 * 10**7]


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def make_impls(name, n, torch):
    """-> {impl name: step function}, all on the same initial params and gradients."""
    cls_name, kw, _ = OPTIMIZERS[name]
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    g0 = rng.standard_normal(n).astype(np.float32)
    impls = {}
    for label, module in (("fastopt", fastopt), ("reference", reference)):
        opt = getattr(module, cls_name)([p0], **kw)
        opt.grads[0][...] = g0
        impls[label] = opt.step
    if torch is not None:
        for label, extra in (("torch fused", dict(fused=True)),
                             ("torch foreach", dict(foreach=True)),
                             ("torch for-loop", dict(foreach=False))):
            if cls_name == "RMSprop" and "fused" in extra:
                continue          # torch has no fused RMSprop
            tp = torch.tensor(p0, requires_grad=True)
            tp.grad = torch.from_numpy(g0.copy())
            topt = getattr(torch.optim, cls_name)([tp], **kw, **extra)
            impls[label] = topt.step
    return impls


def time_case(impls, budget_s, reps):
    """Median seconds per step of each implementation, repetitions interleaved."""
    # warm up (allocates lazily created state) and size a batch to ~budget/reps per impl
    batch = {}
    for label, step in impls.items():
        step()
        t0 = time.perf_counter()
        step()
        dt = max(time.perf_counter() - t0, 1e-7)
        batch[label] = max(1, int(budget_s / reps / len(impls) / dt))
    samples = {label: [] for label in impls}
    for _ in range(reps):
        for label, step in impls.items():
            k = batch[label]
            t0 = time.perf_counter()
            for _ in range(k):
                step()
            samples[label].append((time.perf_counter() - t0) / k)
    return {label: float(np.median(s)) for label, s in samples.items()}


def header(torch):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__, "torch": torch.__version__ if torch else None,
        "fastopt": fastopt.build_info(),
    }
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="every size, more repetitions")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help="comma-separated subset of " + ",".join(OPTIMIZERS))
    ap.add_argument("--sizes", default=None, help="comma-separated sizes (overrides the mode)")
    ap.add_argument("--no-torch", action="store_true", help="leave torch out even if installed")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)

    torch = None if args.no_torch else torch_or_none()
    if torch is not None:
        torch.set_num_threads(1)    # like for like: fastopt's kernels run on one thread here
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else (
        FULL_SIZES if args.full else QUICK_SIZES)
    names = [s for s in args.optimizers.split(",") if s]
    budget, reps = (1.0, 15) if args.full else (0.3, 7)

    info = header(torch)
    print(f"fastopt {info['fastopt']['version']} ({info['fastopt']['isa']}) | "
          f"{info['cpu']}, {info['cores']} cores | Python {info['python']}, "
          f"NumPy {info['numpy']}, torch {info['torch'] or 'not installed'} (1 thread)")
    rows = []
    cases = [(name, n) for name in names for n in sizes]
    for i, (name, n) in enumerate(cases, 1):
        print(f"\r[{i}/{len(cases)}] {name} n={n:.0e} ...", end="", file=sys.stderr, flush=True)
        impls = make_impls(name, n, torch)
        med = time_case(impls, budget, reps)
        del impls
        nbytes = OPTIMIZERS[name][2] * n
        for label, s in med.items():
            rows.append(dict(optimizer=name, n=n, impl=label, us_per_step=s * 1e6,
                             params_per_s=n / s, gb_per_s=nbytes / s / 1e9,
                             speedup_vs_reference=med["reference"] / s,
                             speedup_vs_torch_fused=(med["torch fused"] / s
                                                     if "torch fused" in med else None)))
    print("\r" + " " * 60 + "\r", end="", file=sys.stderr)

    print(f"\n{'optimizer':9} {'params':>8} {'implementation':15} {'us/step':>11} "
          f"{'Mparam/s':>9} {'GB/s':>6} {'vs ref':>7} {'vs torch fused':>14}")
    for r in rows:
        tf = r["speedup_vs_torch_fused"]
        print(f"{r['optimizer']:9} {r['n']:>8.0e} {r['impl']:15} {r['us_per_step']:>11.1f} "
              f"{r['params_per_s'] / 1e6:>9.0f} {r['gb_per_s']:>6.1f} "
              f"{r['speedup_vs_reference']:>6.1f}x {'' if tf is None else f'{tf:.2f}x':>14}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"run-{datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
