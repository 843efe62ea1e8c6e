"""Peak memory of a checkpoint's save and load, in buffers above a trained AdamW's steady state.

    python bench/checkpoint_memory.py               # 5e7 params: 200 MB a buffer
    python bench/checkpoint_memory.py --n 1e7 --json

One buffer is the parameter arena's bytes; a trained AdamW holds four (params, grads,
exp_avg, exp_avg_sq).  The model is four tensors (n/2, n/4, n/4 - 1000 and 1000 params),
trained one step.  Each measurement resets the kernel's peak-RSS counter (VmHWM, through
/proc/self/clear_refs), runs `opt.save(path)` or `opt.load(path)` (the trained optimizer
loads its own checkpoint), and reports (VmHWM - VmRSS before) / buffer.  Linux only.
"""
import argparse
import gc
import json
import os
import tempfile

import numpy as np

import fastopt


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")       # resets VmHWM to the current RSS (Linux >= 4.0)


def peak_of(fn):
    """Bytes of resident memory `fn()` needed above what was resident before it."""
    gc.collect()
    reset_peak()
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) * 1024


def measure(n):
    sizes = [n // 2, n // 4, n - n // 2 - n // 4 - 1000, 1000]
    opt = fastopt.AdamW([np.full(s, 0.5, np.float32) for s in sizes], lr=1e-3)
    gc.collect()
    opt.flat_grads.fill(1.0)
    opt.step()
    buffer = opt.flat_params.nbytes
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ck.npz")
        save = peak_of(lambda: opt.save(path))
        load = peak_of(lambda: opt.load(path))
    return {"n_params": n, "buffer_mb": buffer / 2 ** 20,
            "save_extra_buffers": save / buffer, "load_extra_buffers": load / buffer}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=5e7, help="parameters (default 5e7)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    r = measure(int(args.n))
    if args.json:
        print(json.dumps(r))
        return
    print(f"AdamW, {r['n_params']:.3g} params, one buffer {r['buffer_mb']:.0f} MB; "
          f"peak above the trained steady state (4 buffers):")
    print(f"  save: {r['save_extra_buffers']:.2f} buffers")
    print(f"  load: {r['load_extra_buffers']:.2f} buffers")


if __name__ == "__main__":
    main()
