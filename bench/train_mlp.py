"""A real training job from NumPy: an MLP on scikit-learn's handwritten digits, every optimizer,
fastopt's fused classes against their pure-NumPy twins in fastopt.reference.

    python bench/train_mlp.py                           # quick: 64-256-256-10, about 10 s
    python bench/train_mlp.py --config wide             # 64-2048-2048-10, 4.35M params, 2 min
    python bench/train_mlp.py --optimizers adam,adamw --width 1024 --threads 1

The model is what a NumPy user writes: float32 arrays, ReLU hidden layers, softmax
cross-entropy, the backward pass written straight into the optimizer's gradient views with
`np.matmul(..., out=...)` and `np.sum(..., out=...)` (so no zero_grad is needed: every gradient
is overwritten each step).  The data is `sklearn.datasets.load_digits` (1797 8x8 images, shipped
inside scikit-learn, no download), split 80/20 into train and test with a fixed seed and
standardized with the training set's statistics.

For each optimizer the same model (same initial weights, same minibatch order) is trained twice,
with `fastopt.<Class>` and with `fastopt.reference.<Class>`, epochs interleaved (fused first on
even epochs, reference first on odd ones) so that a slow patch of the machine hits both.
Optimizers: every class fastopt declares, under its lowercase name, with the settings in
SETTINGS (torch's defaults otherwise); adamw is AdamW(lr=1e-3, weight_decay=0.05) with
warmup_cosine over all steps (one epoch of warm-up, down to lr/100), clipped with
opt.step(max_grad_norm=1.0).
What is timed, with perf_counter: "opt" is the time inside the opt.step(...) calls only (for
adamw that includes the clipping's norm pass); "total" is the whole training loop of the epoch
(shuffle, forward, backward, step, scheduler), not the test-set evaluation.  The table gives
the median over epochs of each; the loss is the mean minibatch loss of the epoch.

Threads.  --threads N gives N threads to fastopt's kernels and to BLAS (the matmuls), through
fastopt.set_num_threads and threadpoolctl; the default is 1, which is also what the reference's
element-wise NumPy gets.  With 2 and 2 on a 2-core machine, fastopt's OpenMP threads and
OpenBLAS's threads each spin-wait for work between calls and take the cores from each other:
on this machine the small configuration's fused steps became ~100x slower than on one thread,
and the wide one's were no faster.  OMP_WAIT_POLICY=passive removes most of that.

The two implementations agree to a few ulp per step (the C kernels fuse multiply-adds, NumPy does
not); training amplifies that, and the table gives the largest difference of the per-epoch
losses, absolute and relative.  One amplifier is ReLU: when a unit's input lies within rounding
of zero, it fires in one run and not in the other, and the gradients jump apart by far more
than an ulp (tests/test_train_mlp.py has the measured sizes).

Output: progress on stderr, a table on stdout (markdown), and under --out (bench/results/) a
JSON file with every per-epoch number and, when matplotlib is importable, a PNG.

`train(name, module, config, epochs, seed)` runs one training without the command line (the
tests use it).
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
from fastopt.families import OPTIMIZERS as FAMILY_CLASSES
from fastopt.lr_scheduler import warmup_cosine

CONFIGS = {
    # name -> hidden width (two hidden layers), default epochs, default batch size
    "small": {"width": 256, "epochs": 20, "batch_size": 64},
    # 64-2048-2048-10: 4.33M params.  The matmuls of a 64-sample batch cost about as much as a
    # few passes over 4M floats, so here the optimizer step is a visible share of the step time.
    "wide": {"width": 2048, "epochs": 10, "batch_size": 64},
}
# Every optimizer class fastopt declares (fastopt.families) trains here, under its lowercase
# name, with the settings below where this model needs other than torch's defaults.
SETTINGS = {
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    # torch's default lr=1e-2 sends this model's first-epoch loss to ~9 (small) and ~600
    # (wide) before it recovers; 5e-4 learns smoothly at both widths
    "rmsprop": dict(lr=5e-4),
    # Adam's lr is half torch's default 1e-3 (and AdamW's peak 1e-3, not 2e-3): the wide
    # model's loss spiked with the larger ones.
    "adam": dict(lr=5e-4),
    "adamw": dict(lr=1e-3, weight_decay=0.05),     # with warmup_cosine and clipping, below
    # RAdam's default lr=1e-3 runs the first steps unrectified (plain momentum SGD at 1e-3):
    # the small model's loss fell only 3x in 4 epochs (0.32 of the first), 10x at 3e-3
    "radam": dict(lr=3e-3),
    # Lion's default lr=1e-4 (the paper: 3-10x below AdamW's) moved the small model's loss
    # only 4x in 4 epochs; 3e-4, a third of AdamW's 1e-3 here, 15x, with the paper's larger
    # weight decay
    "lion": dict(lr=3e-4, weight_decay=0.1),
}
OPTIMIZERS = tuple(name.lower() for name in FAMILY_CLASSES)
IMPLEMENTATIONS = {"fused": fastopt, "reference": reference}
SPLIT_SEED = 0      # the train/test split is the same whatever --seed is


# ---- data -----------------------------------------------------------------------------------

def load_digits_split(test_size=0.2):
    """-> (x_train, y_train, x_test, y_test): float32 features standardized with the training
    set's mean and std, int64 labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("bench/train_mlp.py needs scikit-learn for its data set (digits, "
                          "shipped inside the package): pip install scikit-learn, or "
                          "pip install 'fastopt[bench]'") from None
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y,
                                              random_state=SPLIT_SEED)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0          # a few border pixels are always 0 in the training set
    def scale(a):
        return ((a - mean) / std).astype(np.float32)
    return scale(x_tr), y_tr.astype(np.int64), scale(x_te), y_te.astype(np.int64)


# ---- the model ------------------------------------------------------------------------------

def layer_sizes(width, n_in=64, n_out=10, hidden_layers=2):
    return [n_in] + [width] * hidden_layers + [n_out]


def init_params(sizes, rng):
    """He-normal weights (suited to ReLU), zero biases: {'w0', 'b0', 'w1', ...}, float32."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)
        params[f"w{i}"] = w.astype(np.float32)
        params[f"b{i}"] = np.zeros(n_out, np.float32)
    return params


def forward(p, x, n_layers):
    """-> the input of every layer plus the logits: [x, relu(x@w0+b0), ..., logits]."""
    acts = [x]
    for i in range(n_layers):
        z = acts[-1] @ p[f"w{i}"]
        z += p[f"b{i}"]
        if i < n_layers - 1:
            np.maximum(z, 0.0, out=z)
        acts.append(z)
    return acts


def softmax_cross_entropy(logits, y):
    """-> (mean loss as a float, d loss / d logits), from a max-shifted log-softmax so that no
    exp overflows."""
    n = len(y)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(n)
    loss = -float(log_p[rows, y].mean(dtype=np.float64))
    dlogits = np.exp(log_p)
    dlogits[rows, y] -= 1.0
    dlogits *= np.float32(1.0 / n)
    return loss, dlogits


def backward(p, g, acts, dlogits, n_layers):
    """Write every gradient into the optimizer's views g (overwriting what was there)."""
    d = dlogits
    for i in reversed(range(n_layers)):
        np.matmul(acts[i].T, d, out=g[f"w{i}"])
        np.sum(d, axis=0, out=g[f"b{i}"])
        if i > 0:
            d = d @ p[f"w{i}"].T
            d *= acts[i] > 0          # ReLU's derivative, read from its output
    return g


def accuracy(p, x, y, n_layers):
    return float(np.mean(forward(p, x, n_layers)[-1].argmax(axis=1) == y))


# ---- optimizers -----------------------------------------------------------------------------

def make_optimizer(name, module, params, total_steps, warmup_steps):
    """-> (optimizer, scheduler or None, keyword arguments of each opt.step call)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    cls = next(c for c in FAMILY_CLASSES if c.lower() == name)
    opt = getattr(module, cls)(params, **SETTINGS.get(name, {}))
    if name == "adamw":     # the standard recipe: warm-up, cosine decay, clipping
        sched = warmup_cosine(opt, warmup_steps=warmup_steps, total_steps=total_steps,
                              min_lr=1e-5)
        return opt, sched, {"max_grad_norm": 1.0}
    return opt, None, {}


class Trainer:
    """One model and its optimizer, trained an epoch at a time (so that two can interleave).

    Built from the same seed, two Trainers start from the same weights and see the same
    minibatches in the same order, whatever module (fastopt or fastopt.reference) they use.
    """

    def __init__(self, name, module, data, width, epochs, batch_size, seed):
        self.x_train, self.y_train, self.x_test, self.y_test = data
        self.sizes = layer_sizes(width, self.x_train.shape[1], int(self.y_train.max()) + 1)
        self.n_layers = len(self.sizes) - 1
        self.batch_size = batch_size
        # drop the last partial batch: every step then has the same cost and the same scale
        self.steps_per_epoch = len(self.x_train) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} is larger than the training set "
                             f"({len(self.x_train)} samples)")
        init = init_params(self.sizes, np.random.default_rng(seed))
        self.n_params = sum(a.size for a in init.values())
        self.opt, self.sched, self.step_kwargs = make_optimizer(
            name, module, init, total_steps=epochs * self.steps_per_epoch,
            warmup_steps=self.steps_per_epoch)
        self.p, self.g = self.opt.params, self.opt.grads     # arena views: the model uses these
        self.order_rng = np.random.default_rng([seed, 1])    # minibatch order, its own stream
        self.history = {"train_loss": [], "test_accuracy": [], "opt_time": [], "total_time": []}

    def run_epoch(self):
        """Train one epoch; -> (mean minibatch loss, test accuracy)."""
        p, g, L = self.p, self.g, self.n_layers
        opt, sched, kw = self.opt, self.sched, self.step_kwargs
        perf = time.perf_counter
        loss_sum = opt_time = 0.0
        t_start = perf()
        order = self.order_rng.permutation(len(self.x_train))
        for s in range(self.steps_per_epoch):
            idx = order[s * self.batch_size:(s + 1) * self.batch_size]
            x, y = self.x_train[idx], self.y_train[idx]
            acts = forward(p, x, L)
            loss, dlogits = softmax_cross_entropy(acts[-1], y)
            backward(p, g, acts, dlogits, L)
            t0 = perf()
            opt.step(**kw)
            opt_time += perf() - t0
            if sched is not None:
                sched.step()
            loss_sum += loss
        total_time = perf() - t_start
        loss = loss_sum / self.steps_per_epoch
        acc = accuracy(p, self.x_test, self.y_test, L)
        h = self.history
        h["train_loss"].append(loss)
        h["test_accuracy"].append(acc)
        h["opt_time"].append(opt_time)
        h["total_time"].append(total_time)
        return loss, acc

    def result(self, name, implementation, config, seed):
        h = self.history
        return {
            "optimizer": name, "implementation": implementation, "config": config,
            "layers": self.sizes, "params": self.n_params, "seed": seed,
            "epochs": len(h["train_loss"]), "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "hyperparameters": dict(self.opt.defaults),
            "step_kwargs": self.step_kwargs,
            "schedule": type(self.sched).__name__ if self.sched else None,
            **{k: list(v) for k, v in h.items()},
            "final_test_accuracy": h["test_accuracy"][-1],
            "median_opt_time": float(np.median(h["opt_time"])),
            "median_total_time": float(np.median(h["total_time"])),
        }


def resolve(config, width=None, epochs=None, batch_size=None):
    c = CONFIGS[config]
    return (c["width"] if width is None else width, c["epochs"] if epochs is None else epochs,
            c["batch_size"] if batch_size is None else batch_size)


def train(name, module=fastopt, config="small", epochs=None, seed=0, *, width=None,
          batch_size=None, data=None):
    """Train one model with one optimizer; -> the result dict (per-epoch 'train_loss',
    'test_accuracy', 'opt_time', 'total_time' in seconds, and the settings).

    module is fastopt or fastopt.reference; config 'small' or 'wide' gives the width, epochs and
    batch size that are not given.  data: load_digits_split()'s tuple, to load it once.
    """
    width, epochs, batch_size = resolve(config, width, epochs, batch_size)
    data = load_digits_split() if data is None else data
    t = Trainer(name, module, data, width, epochs, batch_size, seed)
    for _ in range(epochs):
        t.run_epoch()
    impl = "fused" if module is fastopt else "reference" if module is reference else module.__name__
    return t.result(name, impl, config, seed)


# ---- the command line -----------------------------------------------------------------------

class Progress:
    """One plain-text line per optimizer on stderr, redrawn in place on a terminal (one line
    per epoch otherwise, so logs stay readable)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()

    def update(self, label, epoch, epochs, losses, width=20):
        done = width * epoch // epochs
        bar = "#" * done + "-" * (width - done)
        text = "  ".join(f"{k} {v:.4f}" for k, v in losses.items())
        line = f"[{label}] epoch {epoch}/{epochs} {bar} loss {text}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if epoch == epochs else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def run_pair(name, data, width, epochs, batch_size, seed, config, progress):
    """Fused and reference from the same seed, epochs interleaved; -> {impl: result}."""
    trainers = {impl: Trainer(name, module, data, width, epochs, batch_size, seed)
                for impl, module in IMPLEMENTATIONS.items()}
    order = list(trainers)
    for e in range(epochs):
        losses = {}
        for impl in (order if e % 2 == 0 else order[::-1]):
            losses[impl] = trainers[impl].run_epoch()[0]
        progress.update(name, e + 1, epochs, {k: losses[k] for k in order})
    return {impl: t.result(name, impl, config, seed) for impl, t in trainers.items()}


def machine(threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    import sklearn
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__,
        "scikit-learn": sklearn.__version__, "fastopt": fastopt.build_info(),
        "threads": threads,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def blas_threads(n):
    """Limit BLAS (the matmuls) to n threads with threadpoolctl, which scikit-learn brings;
    -> the limiter to keep alive, or None when threadpoolctl is missing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=n, user_api="blas")


def summary_rows(results):
    rows = []
    for name, pair in results.items():
        f, r = pair["fused"], pair["reference"]
        lf, lr = np.array(f["train_loss"]), np.array(r["train_loss"])
        rows.append({
            "optimizer": name,
            "max_loss_diff": float(np.max(np.abs(lf - lr))),
            "max_rel_loss_diff": float(np.max(np.abs(lf - lr) / np.abs(lr))),
            "final_loss": (f["train_loss"][-1], r["train_loss"][-1]),
            "accuracy": (f["final_test_accuracy"], r["final_test_accuracy"]),
            "opt_ms": (f["median_opt_time"] * 1e3, r["median_opt_time"] * 1e3),
            "total_ms": (f["median_total_time"] * 1e3, r["median_total_time"] * 1e3),
        })
    return rows


def print_table(rows):
    """A markdown table: one row per optimizer, fused beside reference."""
    head = ["optimizer", "final loss", "max Δloss abs (rel)", "test acc fused / ref",
            "opt ms/epoch fused", "opt ms/epoch ref", "opt speedup",
            "total ms/epoch fused", "total ms/epoch ref", "total speedup",
            "opt share fused / ref"]
    lines = []
    for r in rows:
        of, orf = r["opt_ms"]
        tf, tr = r["total_ms"]
        lines.append([r["optimizer"], f"{r['final_loss'][0]:.3g}",
                      f"{r['max_loss_diff']:.1e} ({r['max_rel_loss_diff']:.0e})",
                      f"{r['accuracy'][0]:.1%} / {r['accuracy'][1]:.1%}",
                      f"{of:,.1f}", f"{orf:,.1f}", f"{orf / of:.1f}x",
                      f"{tf:,.1f}", f"{tr:,.1f}", f"{tr / tf:.2f}x",
                      f"{of / tf:.0%} / {orf / tr:.0%}"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(fmt(head))
    print("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
    for line in lines:
        print(fmt(line))


def plot(results, path, title):
    """Loss curves per optimizer (reference a thick grey line, fused dashed on top of it), and
    bars of the optimizer time and total time per epoch.  -> path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")          # no display needed, and none is assumed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(results)
    fig = plt.figure(figsize=(max(3.4 * len(names), 7), 7.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.05])
    loss_axes = top.subplots(1, len(names), squeeze=False)[0]
    time_axes = bottom.subplots(1, 2)
    colors = {"fused": "tab:blue", "reference": "tab:gray"}
    for j, name in enumerate(names):
        ax = loss_axes[j]
        for impl, style in (("reference", dict(ls="-", lw=4, alpha=0.45)),
                            ("fused", dict(ls="--", lw=1.6, marker="o", ms=3))):
            r = results[name][impl]
            epochs = np.arange(1, len(r["train_loss"]) + 1)
            ax.plot(epochs, r["train_loss"], color=colors[impl], label=impl, **style)
        f, r = results[name]["fused"], results[name]["reference"]
        diff = np.max(np.abs(np.subtract(f["train_loss"], r["train_loss"])))
        ax.set_yscale("log")
        ax.set_title(f"{name}: test acc {f['final_test_accuracy']:.1%} / "
                     f"{r['final_test_accuracy']:.1%}\nmax |Δloss| {diff:.1e}", fontsize=9)
        ax.set_xlabel("epoch")
        if j == 0:
            ax.set_ylabel("train loss (log)")
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    for k, (key, label) in enumerate((("median_opt_time", "optimizer time per epoch (ms)"),
                                      ("median_total_time", "total time per epoch (ms)"))):
        ax = time_axes[k]
        x = np.arange(len(names))
        for i, impl in enumerate(("fused", "reference")):
            vals = [results[n][impl][key] * 1e3 for n in names]
            bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, color=colors[impl], label=impl)
            ax.bar_label(bars, fmt="%.0f" if max(vals) >= 100 else "%.1f", fontsize=8)
        for xi, n in zip(x, names):
            speed = results[n]["reference"][key] / results[n]["fused"][key]
            ax.annotate(f"{speed:.1f}x" if k == 0 else f"{speed:.2f}x", (xi, 0),
                        xytext=(0, -26), textcoords="offset points", ha="center", fontsize=8,
                        color="tab:blue")
        ax.set_xticks(x, names)
        ax.set_ylabel(label)
        ax.set_title(label.replace(" (ms)", "") + ", median; speedup under each pair", fontsize=9)
        ax.margins(y=0.15)
        if k == 0:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small",
                    help="small: hidden width 256, 20 epochs; wide: width 2048, 10 epochs")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help=f"comma list from {','.join(OPTIMIZERS)} (default: all)")
    ap.add_argument("--epochs", type=int, help="default: the config's")
    ap.add_argument("--width", type=int, help="hidden width of both hidden layers "
                    "(default: the config's)")
    ap.add_argument("--batch-size", type=int, help="default: the config's (64)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for fastopt's kernels and for BLAS's matmuls (default 1; "
                    "see the note at the top)")
    ap.add_argument("--seed", type=int, default=0, help="initial weights and minibatch order")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"), help="output folder")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        ap.error(f"--optimizers: unknown {bad}; choose from {','.join(OPTIMIZERS)}")
    width, epochs, batch_size = resolve(args.config, args.width, args.epochs, args.batch_size)
    for flag, v in (("--epochs", epochs), ("--width", width), ("--batch-size", batch_size)):
        if v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    fastopt.set_num_threads(args.threads)
    limiter = blas_threads(args.threads)      # kept alive (in scope) for the whole run

    try:
        data = load_digits_split()
    except ImportError as e:
        sys.exit(f"error: {e}")
    info = machine(fastopt.get_num_threads())
    sizes = layer_sizes(width)
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    steps = len(data[0]) // batch_size
    b = info["fastopt"]
    print(f"fastopt {b['version']} MLP training benchmark, {info['date']}")
    print(f"  machine   {info['cpu']}, {info['cores']} cores; {info['platform']}")
    print(f"  versions  Python {info['python']}, NumPy {info['numpy']}, "
          f"scikit-learn {info['scikit-learn']}; fastopt isa {b['isa']}, openmp {b['openmp']}")
    blas = args.threads if limiter is not None else "its default (no threadpoolctl)"
    print(f"  threads   fastopt {info['threads']}, BLAS {blas}; fastopt.reference's "
          "element-wise NumPy: 1")
    if args.threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive":
        print("            (fastopt's OpenMP threads and BLAS's threads each spin-wait between "
              "calls on the same cores;\n             if the times look odd, compare with "
              "OMP_WAIT_POLICY=passive)")
    la = info["load_average_at_start"]
    if la is not None:
        print(f"  load      {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} (1, 5, 15 min)"
              + ("   <- other work on the cores: expect noisy times" if la[0] > 0.5 else ""))
    print(f"  data      digits: {len(data[0])} train / {len(data[2])} test, 64 features, "
          f"standardized with train statistics")
    print(f"  model     {'-'.join(map(str, sizes))} ({n_params:,} params), ReLU, softmax "
          f"cross-entropy; {args.config} config" + (" (--width)" if args.width else ""))
    print(f"  training  {epochs} epochs x {steps} steps of {batch_size}, seed {args.seed}; "
          f"fused and reference interleaved epoch by epoch")
    sys.stdout.flush()

    progress = Progress()
    results = {}
    t0 = time.perf_counter()
    for name in names:
        results[name] = run_pair(name, data, width, epochs, batch_size, args.seed, args.config,
                                 progress)
    wall = time.perf_counter() - t0

    rows = summary_rows(results)
    print(f"\nmedian over {epochs} epochs; opt = inside opt.step (adamw: clipping + step), "
          f"total = the epoch's training loop; speedup = reference / fused\n")
    print_table(rows)
    print(f"\ntrained in {wall:.1f} s")

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"mlp-{args.config}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "argv": sys.argv[1:] if argv is None else list(argv),
                   "config": args.config, "width": width, "epochs": epochs,
                   "batch_size": batch_size, "seed": args.seed, "wall_time": wall,
                   "summary": rows, "results": results}, f, indent=1)
    print(f"results   {base}.json")
    title = (f"MLP {'-'.join(map(str, sizes))} ({n_params / 1e6:.2f}M params) on digits, "
             f"{epochs} epochs x {steps} steps of {batch_size}; {info['cpu']}, "
             f"{args.threads} thread(s) for fastopt and BLAS; {info['date'][:10]}")
    png = plot(results, base + ".png", title)
    print(f"figure    {png}" if png else "figure    skipped: matplotlib is not installed")
    return results


if __name__ == "__main__":
    main()
