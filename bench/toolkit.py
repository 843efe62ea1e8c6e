"""Clip-then-step at scale: gradient clipping by norm plus an AdamW step, three ways.

    python bench/toolkit.py                 # 1e7 parameters, 1 thread
    python bench/toolkit.py --n 1e6 --threads 2

Rows, timed side by side (repetitions interleaved, medians):
  fastopt fused       opt.step(max_grad_norm=1.0): one norm pass, one fused step pass
  fastopt             fastopt.clip_grad_norm_(opt, 1.0); opt.step(): norm, scale, step
  reference           the same two calls from fastopt.reference (pure NumPy, norm in float64)
  numpy per-tensor    what a NumPy user writes without fastopt: a float32 norm per tensor,
                      then every tensor scaled, then the reference AdamW step
The model is 20 tensors of n/20 parameters.  Gradients are refilled outside the timed region
so that clipping always scales (the gradient norm is far above max_norm).
"""
import argparse
import time

import numpy as np

import fastopt
import fastopt.reference as reference


def build(module, params):
    opt = module.AdamW([p.copy() for p in params], lr=1e-3)
    opt.step()      # allocate the state before timing
    return opt


def numpy_clip(grads, max_norm):
    total = float(np.sqrt(sum(float(np.dot(g.reshape(-1), g.reshape(-1))) for g in grads)))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= np.float32(coef)
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=float, default=1e7, help="parameters in all (default 1e7)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)

    n, tensors = int(args.n), 20
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(n // tensors).astype(np.float32) for _ in range(tensors)]
    grad_values = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    fastopt.set_num_threads(args.threads)

    fused, fast, ref, plain = (build(fastopt, params), build(fastopt, params),
                               build(reference, params), build(reference, params))

    def refill(opt):
        for g, v in zip(opt.grads, grad_values):
            g[...] = v

    cases = {
        "fastopt fused": (fused, lambda: fused.step(max_grad_norm=1.0)),
        "fastopt": (fast, lambda: (fastopt.clip_grad_norm_(fast, 1.0), fast.step())),
        "reference": (ref, lambda: (reference.clip_grad_norm_(ref, 1.0), ref.step())),
        "numpy per-tensor": (plain, lambda: (numpy_clip(plain.grads, 1.0), plain.step())),
    }
    samples = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, (opt, run) in cases.items():
            refill(opt)
            t0 = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t0)

    info = fastopt.build_info()
    print(f"clip_grad_norm_(max_norm=1) + AdamW step, {n:.0e} params in {tensors} tensors, "
          f"{args.threads} thread(s), {info['isa']}, median of {args.reps}")
    base = np.median(samples["reference"])
    for name, s in samples.items():
        m = float(np.median(s))
        print(f"  {name:18} {m * 1e3:9.2f} ms   {base / m:5.1f}x vs reference")


if __name__ == "__main__":
    main()
