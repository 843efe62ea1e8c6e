"""Peak resident memory of AdamW's state in each state_dtype, each in a fresh process.

    python bench/state_memory.py                # 1e8 params: 400 MB a float32 buffer
    python bench/state_memory.py --n 1e7 --json

Each format runs in a process of its own, which draws n float32 params, builds
AdamW([params], lr=1e-3, state_dtype=...) (the optimizer copies them into its arena), writes
n random gradients into opt.grads and takes two steps, then reports its peak resident set
(getrusage(RUSAGE_SELF).ru_maxrss, KiB on Linux).  A baseline process imports the same
modules and holds the same arrays but no optimizer: the drawn params, a copy of them (the
arena's params) and the gradients.  "above baseline" is the format's peak minus the
baseline's: the state plus anything a step allocates; opt.state_nbytes is the state the
optimizer holds, and the last column the difference (scratch, page rounding, noise).
Linux only (ru_maxrss is in bytes on macOS).
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np

import fastopt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import FORMATS, size_label  # noqa: E402  (one table of formats, the benchmark's)

BASELINE = "baseline"


def child(mode, n):
    """Runs in the subprocess: -> the dict the parent reads."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n, dtype=np.float32)
    if mode == BASELINE:
        held = [p0.copy(), np.empty(n, np.float32)]     # the arena's params and grads
        rng.standard_normal(dtype=np.float32, out=held[1])
        state = 0
    else:
        opt = fastopt.AdamW([p0], lr=1e-3, **FORMATS[mode])
        rng.standard_normal(dtype=np.float32, out=opt.grads[0])
        opt.step()
        opt.step()
        state = opt.state_nbytes
    return {"mode": mode, "n": n, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "state_nbytes": state}


def run_child(mode, n):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                          "--n", str(n)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e8, help="parameters (default 1e8)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = int(args.n)
    if args.child is not None:
        print(json.dumps(child(args.child, n)))
        return

    base = run_child(BASELINE, n)
    rows = []
    for mode in FORMATS:
        r = run_child(mode, n)
        r["above_baseline_bytes"] = (r["maxrss_kib"] - base["maxrss_kib"]) * 1024
        rows.append(r)
    if args.json:
        print(json.dumps({"baseline": base, "rows": rows}))
        return
    mb = 1e6
    print(f"AdamW, one tensor of {size_label(n)} params ({4 * n / mb:,.0f} MB a float32 buffer), "
          f"two steps, each format in a fresh process")
    print(f"baseline (params drawn, their copy, gradients; no optimizer): peak RSS "
          f"{base['maxrss_kib'] * 1024 / mb:,.0f} MB")
    print(f"  {'state_dtype':<20} {'peak RSS MB':>11} {'above baseline MB':>17} "
          f"{'state_nbytes MB':>15} {'B/param':>7} {'difference MB':>13}")
    for r in rows:
        print(f"  {r['mode']:<20} {r['maxrss_kib'] * 1024 / mb:>11,.0f} "
              f"{r['above_baseline_bytes'] / mb:>17,.1f} {r['state_nbytes'] / mb:>15,.1f} "
              f"{r['state_nbytes'] / n:>7.3f} "
              f"{(r['above_baseline_bytes'] - r['state_nbytes']) / mb:>13,.1f}")


if __name__ == "__main__":
    main()
