"""A real training job from NumPy: an MLP on scikit-learn's handwritten digits, every optimizer,
fastopt's fused classes against their pure-NumPy twins in fastopt.reference.

    python bench/train_mlp.py                           # quick: 64-256-256-10, about 10 s
    python bench/train_mlp.py --config wide             # 64-2048-2048-10, 4.35M params, 2 min
    python bench/train_mlp.py --optimizers adam,adamw --width 1024 --threads 1
    python bench/train_mlp.py --state-formats --seeds 0-4       # AdamW's state formats, 20 s

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

State formats.  --state-formats trains AdamW (its settings, schedule and clipping above) with
its state stored as each of fastopt's state_dtype formats (STATE_FORMATS): float32, bfloat16
rounded to nearest, bfloat16 rounded stochastically, int8 (blockwise, with min_8bit_size 256 so
that every tensor but the 10-element last bias really is int8; --min-8bit-size changes it).
All from the same seed, epochs interleaved, and for each seed of --seeds.  The table gives each
format's final test accuracy and its difference from float32's in percentage points (one test
image is 0.28 points), the final train and test losses, where the state was kept (read from
the trained optimizer's state arrays: uint8 codes are int8) and its bytes; the figure, the
loss curves of every format, their ratio to float32's, and each seed's accuracy.

Output: progress on stderr, a table on stdout (markdown), and under --out (bench/results/) a
JSON file with every per-epoch number and, when matplotlib is importable, a PNG
(mlp-<config>-<time>, or mlp-formats-<config>-<time> with --state-formats).

`train(name, module, config, epochs, seed, state=...)` runs one training without the command
line (the tests use it).
"""
import argparse
import inspect
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
# --state-formats: AdamW (its SETTINGS, schedule and clipping) with its state stored in each of
# fastopt's formats.  min_8bit_size is 256, one int8 block, rather than the default 4096
# (bitsandbytes'): with 4096 the small model's last weight matrix (256x10 = 2,560 elements)
# and its biases would keep float32 state, 96% of its elements int8; with 256 every tensor but
# the 10-element last bias is int8, all but 10 of 85,002.
MIN_8BIT_SIZE = 256
STATE_FORMATS = {
    "float32": dict(state_dtype="float32"),
    "bfloat16": dict(state_dtype="bfloat16", state_rounding="nearest"),
    "bfloat16-stochastic": dict(state_dtype="bfloat16", state_rounding="stochastic"),
    "int8": dict(state_dtype="int8", min_8bit_size=MIN_8BIT_SIZE),
}
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


def evaluate(p, x, y, n_layers):
    """-> (mean loss, accuracy) on (x, y)."""
    logits = forward(p, x, n_layers)[-1]
    return softmax_cross_entropy(logits, y)[0], float(np.mean(logits.argmax(axis=1) == y))


# ---- optimizers -----------------------------------------------------------------------------

def make_optimizer(name, module, params, total_steps, warmup_steps, state=None):
    """-> (optimizer, scheduler or None, keyword arguments of each opt.step call).

    state: the state-storage keywords (state_dtype, state_rounding, min_8bit_size, ...), as in
    STATE_FORMATS; None keeps the class's defaults (float32)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    cls = next(c for c in FAMILY_CLASSES if c.lower() == name)
    opt = getattr(module, cls)(params, **SETTINGS.get(name, {}), **(state or {}))
    if name == "adamw":     # the standard recipe: warm-up, cosine decay, clipping
        sched = warmup_cosine(opt, warmup_steps=warmup_steps, total_steps=total_steps,
                              min_lr=1e-5)
        return opt, sched, {"max_grad_norm": 1.0}
    return opt, None, {}


class Trainer:
    """One model and its optimizer, trained an epoch at a time (so that two can interleave).

    Built from the same seed, two Trainers start from the same weights and see the same
    minibatches in the same order, whatever module (fastopt or fastopt.reference) and state
    format they use.
    """

    def __init__(self, name, module, data, width, epochs, batch_size, seed, state=None):
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
        self.param_sizes = {k: a.size for k, a in init.items()}
        self.n_params = sum(self.param_sizes.values())
        self.opt, self.sched, self.step_kwargs = make_optimizer(
            name, module, init, total_steps=epochs * self.steps_per_epoch,
            warmup_steps=self.steps_per_epoch, state=state)
        self.p, self.g = self.opt.params, self.opt.grads     # arena views: the model uses these
        self.order_rng = np.random.default_rng([seed, 1])    # minibatch order, its own stream
        self.history = {"train_loss": [], "test_loss": [], "test_accuracy": [], "opt_time": [],
                        "total_time": []}

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
        # the test loss resolves what the accuracy cannot (one test image is 0.28 points)
        test_loss, acc = evaluate(p, self.x_test, self.y_test, L)
        h = self.history
        h["train_loss"].append(loss)
        h["test_loss"].append(test_loss)
        h["test_accuracy"].append(acc)
        h["opt_time"].append(opt_time)
        h["total_time"].append(total_time)
        return loss, acc

    def state_storage(self):
        """-> {param name: how its state is stored}, read from the optimizer's state arrays (the
        first buffer's dtype: uint8 codes are int8, 2-byte bit patterns bfloat16); {} before the
        first step, when there is no state yet."""
        kinds = {1: "int8", 2: "bfloat16", 4: "float32"}
        names, buffers = self.opt.layout.names, self.opt.family.buffer_names
        out = {}
        for k, entry in self.opt.state.items():
            key = next(b for b in buffers if b in entry)
            out[names[k]] = kinds[entry[key].dtype.itemsize]
        return out

    def result(self, name, implementation, config, seed):
        h = self.history
        return {
            "optimizer": name, "implementation": implementation, "config": config,
            "layers": self.sizes, "params": self.n_params, "param_sizes": self.param_sizes,
            "seed": seed,
            "epochs": len(h["train_loss"]), "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "hyperparameters": dict(self.opt.defaults),
            "state_storage": self.state_storage(), "state_nbytes": self.opt.state_nbytes,
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
          batch_size=None, data=None, state=None):
    """Train one model with one optimizer; -> the result dict (per-epoch 'train_loss',
    'test_loss', 'test_accuracy', 'opt_time', 'total_time' in seconds; 'state_storage',
    {param name: 'float32' | 'bfloat16' | 'int8'}, read from the trained optimizer's state
    arrays; and the settings).

    module is fastopt or fastopt.reference; config 'small' or 'wide' gives the width, epochs and
    batch size that are not given.  data: load_digits_split()'s tuple, to load it once.
    state: a key of STATE_FORMATS, or a dict of state-storage keywords; None: float32.
    """
    width, epochs, batch_size = resolve(config, width, epochs, batch_size)
    data = load_digits_split() if data is None else data
    if isinstance(state, str):
        state = STATE_FORMATS[state]
    t = Trainer(name, module, data, width, epochs, batch_size, seed, state)
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
    print_markdown(head, lines)


def print_markdown(head, lines):
    """A markdown table, the first column left-aligned, the others right-aligned."""
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


# ---- state formats (--state-formats) ----------------------------------------------------------

STATE_KEYS = ("state_dtype", "state_rounding", "min_8bit_size", "state_seed")
TARGET_PP = 0.5     # the aim: test accuracy within half a percentage point of float32 state


def seed_text(seeds):
    """'0-19' for a run of consecutive seeds, '0,3,7' otherwise."""
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def run_formats(formats, data, width, epochs, batch_size, seed, config, progress):
    """AdamW from the same seed with its state in each format ({label: state keywords}),
    epochs interleaved (the order rotated by one each epoch, so that a slow patch of the
    machine does not always hit the same format); -> {label: result}."""
    trainers = {f: Trainer("adamw", fastopt, data, width, epochs, batch_size, seed, state)
                for f, state in formats.items()}
    order = list(trainers)
    for e in range(epochs):
        losses = {}
        k = e % len(order)
        for f in order[k:] + order[:k]:
            losses[f] = trainers[f].run_epoch()[0]
        progress.update(f"adamw, seed {seed}", e + 1, epochs, {f: losses[f] for f in order})
    return {f: dict(t.result("adamw", "fused", config, seed), state_format=f)
            for f, t in trainers.items()}


def storage_summary(result):
    """-> {'int8': (tensors, elements), 'float32': ...}: where the trained optimizer kept its
    state, read from its state arrays (result['state_storage'])."""
    out = {}
    for name, kind in result["state_storage"].items():
        n, el = out.get(kind, (0, 0))
        out[kind] = (n + 1, el + result["param_sizes"][name])
    return out


def geomean(ratios, axis=None):
    """Loss ratios are averaged geometrically, so that a loss spike in one seed (ratios of 0.3
    and 1.4 in the wide configuration) does not outweigh the others."""
    return np.exp(np.mean(np.log(ratios), axis=axis))


def format_rows(runs):
    """runs: {seed: {format: result}}, float32 among the formats; -> one row per format: per
    seed, the final test accuracy, its difference from float32's in percentage points, the
    final train and test losses and the train loss's ratio to float32's; the
    state's storage and bytes; the median optimizer time per epoch."""
    seeds = list(runs)
    rows = []
    for f in runs[seeds[0]]:
        rs = [runs[s][f] for s in seeds]
        base = [runs[s]["float32"] for s in seeds]
        acc = np.array([r["final_test_accuracy"] for r in rs])
        loss = np.array([r["train_loss"][-1] for r in rs])
        rows.append({
            "format": f, "state": {k: rs[0]["hyperparameters"][k] for k in STATE_KEYS},
            "seeds": seeds,
            "test_accuracy": acc.tolist(),
            "accuracy_diff_pp": (100 * (acc - [b["final_test_accuracy"] for b in base])).tolist(),
            "train_loss": loss.tolist(),
            "train_loss_ratio": (loss / [b["train_loss"][-1] for b in base]).tolist(),
            "test_loss": [r["test_loss"][-1] for r in rs],
            "storage": storage_summary(rs[0]),
            "state_nbytes": rs[0]["state_nbytes"],
            "opt_ms": float(np.median([r["median_opt_time"] for r in rs])) * 1e3,
        })
    return rows


def print_format_tables(rows):
    """The summary over seeds, then (with more than one seed) each seed's accuracies."""
    n = len(rows[0]["seeds"])
    head = ["state format", "storage: tensors (elements)", "state KiB", "test acc",
            "Δ acc pp" + (": mean [min, max]" if n > 1 else ""), f"|Δ| <= {TARGET_PP} pp",
            "train loss (vs float32" + (", geo. mean" if n > 1 else "") + ")", "test loss",
            "opt ms/epoch"]
    lines = []
    f32_bytes = rows[0]["state_nbytes"]
    for r in rows:
        d = np.array(r["accuracy_diff_pp"])
        storage = ", ".join(f"{k} {t} ({el:,})" for k, (t, el) in r["storage"].items())
        within = int(np.sum(np.abs(d) <= TARGET_PP + 1e-9))
        lines.append([
            r["format"], storage,
            f"{r['state_nbytes'] / 1024:,.0f} ({r['state_nbytes'] / f32_bytes:.0%})",
            f"{np.mean(r['test_accuracy']):.2%}",
            f"{np.mean(d):+.2f}" + (f" [{d.min():+.2f}, {d.max():+.2f}]" if n > 1 else ""),
            f"{within}/{n}",
            f"{np.mean(r['train_loss']):.3g} ({geomean(r['train_loss_ratio']) - 1:+.1%})",
            f"{np.mean(r['test_loss']):.3g}", f"{r['opt_ms']:,.1f}"])
    print_markdown(head, lines)
    if n > 1:
        print("\nper seed: final test accuracy (Δ vs float32, pp)\n")
        lines = [[str(s)] + [f"{r['test_accuracy'][i]:.2%} ({r['accuracy_diff_pp'][i]:+.2f})"
                             for r in rows]
                 for i, s in enumerate(rows[0]["seeds"])]
        print_markdown(["seed"] + [r["format"] for r in rows], lines)


def plot_formats(runs, rows, path, title):
    """One figure: the train loss of every state format per epoch (mean over seeds, float32
    the thick grey line, the others dashed on top of it), each one's ratio to float32's (what
    the log scale hides), and the final test accuracy of each seed with the ±TARGET_PP band
    around float32's mean.  -> path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")          # no display needed, and none is assumed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    seeds = list(runs)
    names = [r["format"] for r in rows]
    colors = dict(zip(names, ["tab:gray", "tab:blue", "tab:green", "tab:red", "tab:purple",
                              "tab:orange"]))
    styles = {n: dict(ls="-", lw=4, alpha=0.45) if n == "float32" else
              dict(ls="--", lw=1.6, marker="o", ms=3) for n in names}
    fig, (ax_loss, ax_ratio, ax_acc) = plt.subplots(
        1, 3, figsize=(15, 4.8), layout="constrained", gridspec_kw={"width_ratios": [1, 1, 0.8]})
    base = np.array([runs[s]["float32"]["train_loss"] for s in seeds])
    for n in names:
        loss = np.array([runs[s][n]["train_loss"] for s in seeds])
        epochs = np.arange(1, loss.shape[1] + 1)
        ax_loss.plot(epochs, loss.mean(axis=0), color=colors[n], label=n, **styles[n])
        if len(seeds) > 1:
            ax_loss.fill_between(epochs, loss.min(axis=0), loss.max(axis=0), color=colors[n],
                                 alpha=0.12, lw=0)
        ax_ratio.plot(epochs, geomean(loss / base, axis=0), color=colors[n], **styles[n])
    over = f"mean of {len(seeds)} seeds" + (" (band: min to max)" if len(seeds) > 1 else "")
    ax_loss.set_yscale("log")
    ax_loss.set_title(f"train loss per epoch, {over}", fontsize=9)
    ax_loss.set_ylabel("train loss (log)")
    ax_ratio.set_title(f"train loss / float32's, same seed; geometric mean of {len(seeds)} "
                       "seeds", fontsize=9)
    ax_ratio.set_ylabel("ratio")
    for ax in (ax_loss, ax_ratio):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3, which="both")
    ax_loss.legend(fontsize=8)
    f32 = np.mean(rows[0]["test_accuracy"]) * 100
    ax_acc.axhspan(f32 - TARGET_PP, f32 + TARGET_PP, color="tab:gray", alpha=0.15,
                   label=f"float32 ± {TARGET_PP} pp")
    jitter = np.linspace(-0.15, 0.15, len(seeds)) if len(seeds) > 1 else np.zeros(1)
    for i, r in enumerate(rows):
        acc = np.array(r["test_accuracy"]) * 100
        ax_acc.scatter(i + jitter, acc, s=14, color=colors[r["format"]], alpha=0.7)
        ax_acc.plot([i - 0.25, i + 0.25], [acc.mean()] * 2, color="k", lw=1.5)
        if i:
            ax_acc.annotate(f"{np.mean(r['accuracy_diff_pp']):+.2f} pp", (i, acc.max()),
                            xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    ax_acc.set_xticks(range(len(names)), [n.replace("-", "-\n") for n in names], fontsize=8)
    ax_acc.set_ylabel("final test accuracy (%)")
    ax_acc.set_title("final test accuracy, a dot per seed\n(bar: mean; text: mean Δ vs float32)",
                     fontsize=9)
    ax_acc.grid(alpha=0.3, axis="y")
    ax_acc.margins(y=0.2)
    ax_acc.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_list(text, flag, ap, allowed=None, kind=str):
    """A comma list from the command line; ap.error on an unknown or malformed item."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        items = [kind(t) for t in items]
    except ValueError:
        ap.error(f"{flag}: expected a comma list of {kind.__name__}, got {text!r}")
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad or not items:
        ap.error(f"{flag}: unknown {bad}" + (f"; choose from {','.join(allowed)}"
                                              if allowed is not None else ""))
    return items


def parse_seeds(text, ap):
    """--seeds: '0,1,5' or '0-4' or both ('0-4,10'); -> the seeds in order, once each."""
    seeds = []
    for item in parse_list(text, "--seeds", ap):
        lo, sep, hi = item.partition("-")
        try:
            seeds += range(int(lo), int(hi) + 1) if sep else [int(item)]
        except ValueError:
            ap.error(f"--seeds: expected a comma list of seeds or ranges (0,3 or 0-4), "
                     f"got {text!r}")
    if not seeds:
        ap.error(f"--seeds: no seed in {text!r}")
    return list(dict.fromkeys(seeds))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small",
                    help="small: hidden width 256, 20 epochs; wide: width 2048, 10 epochs")
    ap.add_argument("--optimizers",
                    help=f"comma list from {','.join(OPTIMIZERS)} (default: all)")
    ap.add_argument("--state-formats", nargs="?", const=",".join(STATE_FORMATS), metavar="LIST",
                    help="instead of fused against reference: AdamW with its state in each "
                    f"format of the comma list from {','.join(STATE_FORMATS)} (default: all; "
                    "float32, the baseline, is always trained)")
    default_8bit = inspect.signature(fastopt.AdamW).parameters["min_8bit_size"].default
    ap.add_argument("--min-8bit-size", type=int,
                    help=f"--state-formats: the int8 format's min_8bit_size (default "
                    f"{MIN_8BIT_SIZE}; fastopt's own default is {default_8bit})")
    ap.add_argument("--seeds", help="--state-formats: a comma list of seeds or ranges (0,3 or "
                    "0-4), each trained with every format (default: --seed)")
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

    formats = None
    if args.state_formats is not None:
        if args.optimizers is not None:
            ap.error("--state-formats trains adamw only; drop --optimizers")
        chosen = parse_list(args.state_formats, "--state-formats", ap, tuple(STATE_FORMATS))
        formats = {f: dict(STATE_FORMATS[f]) for f in STATE_FORMATS
                   if f == "float32" or f in chosen}
        if "int8" in formats and args.min_8bit_size is not None:
            if args.min_8bit_size < 0:
                ap.error(f"--min-8bit-size must be >= 0, got {args.min_8bit_size}")
            formats["int8"]["min_8bit_size"] = args.min_8bit_size
        seeds = [args.seed] if args.seeds is None else parse_seeds(args.seeds, ap)
    else:
        for flag, v in (("--seeds", args.seeds), ("--min-8bit-size", args.min_8bit_size)):
            if v is not None:
                ap.error(f"{flag} goes with --state-formats")
        names = parse_list(args.optimizers or ",".join(OPTIMIZERS), "--optimizers", ap,
                           OPTIMIZERS)
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
    print(f"fastopt {b['version']} MLP training benchmark"
          + (", state formats" if formats else "") + f", {info['date']}")
    print(f"  machine   {info['cpu']}, {info['cores']} cores; {info['platform']}")
    print(f"  versions  Python {info['python']}, NumPy {info['numpy']}, "
          f"scikit-learn {info['scikit-learn']}; fastopt isa {b['isa']}, openmp {b['openmp']}")
    blas = args.threads if limiter is not None else "its default (no threadpoolctl)"
    print(f"  threads   fastopt {info['threads']}, BLAS {blas}"
          + ("" if formats else "; fastopt.reference's element-wise NumPy: 1"))
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
    if formats:
        print(f"  training  {epochs} epochs x {steps} steps of {batch_size}, seeds "
              f"{seed_text(seeds)}; adamw {SETTINGS['adamw']}, warmup_cosine, "
              f"max_grad_norm 1.0; the formats interleaved epoch by epoch")
        for f, state in formats.items():
            print(f"  state     {f}: {state}")
    else:
        print(f"  training  {epochs} epochs x {steps} steps of {batch_size}, seed {args.seed}; "
              f"fused and reference interleaved epoch by epoch")
    sys.stdout.flush()

    progress = Progress()
    t0 = time.perf_counter()
    if formats:
        results = {s: run_formats(formats, data, width, epochs, batch_size, s, args.config,
                                  progress) for s in seeds}
    else:
        results = {name: run_pair(name, data, width, epochs, batch_size, args.seed,
                                  args.config, progress) for name in names}
    wall = time.perf_counter() - t0

    if formats:
        rows = format_rows(results)
        print(f"\nadamw after {epochs} epochs, each state format against float32 state from "
              f"the same seed; train loss = the last epoch's mean minibatch loss; opt = median "
              f"over epochs and seeds of the time inside opt.step (clipping + step)")
        if len(seeds) > 1:
            print(f"accuracy and losses: means over seeds {seed_text(seeds)}; "
                  f"Δ acc pp: each seed's difference from float32's, in percentage points; "
                  f"|Δ| <= {TARGET_PP} pp: seeds within")
        print()
        print_format_tables(rows)
        for r in rows:
            if r["state"]["state_dtype"] == "int8" and "int8" not in r["storage"]:
                print(f"\nwarning: {r['format']} kept no state in int8: every tensor is smaller "
                      f"than min_8bit_size {r['state']['min_8bit_size']}")
    else:
        rows = summary_rows(results)
        print(f"\nmedian over {epochs} epochs; opt = inside opt.step (adamw: clipping + step), "
              f"total = the epoch's training loop; speedup = reference / fused\n")
        print_table(rows)
    print(f"\ntrained in {wall:.1f} s")

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    kind = "mlp-formats" if formats else "mlp"
    base = os.path.join(args.out, f"{kind}-{args.config}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "argv": sys.argv[1:] if argv is None else list(argv),
                   "config": args.config, "width": width, "epochs": epochs,
                   "batch_size": batch_size,
                   **({"seeds": seeds, "state_formats": formats} if formats else
                      {"seed": args.seed}),
                   "wall_time": wall, "summary": rows,
                   # JSON keys are strings: the seeds become "0", "1", ...
                   "results": results}, f, indent=1)
    print(f"results   {base}.json")
    model = (f"MLP {'-'.join(map(str, sizes))} ({n_params / 1e6:.2f}M params) on digits, "
             f"{epochs} epochs x {steps} steps of {batch_size}")
    where = (f"{info['cpu']}, {args.threads} thread(s) for fastopt and BLAS; "
             f"{info['date'][:10]}")
    if formats:
        title = (f"AdamW with its state in each format: {model}, seeds "
                 f"{seed_text(seeds)}\n{where}")
        png = plot_formats(results, rows, base + ".png", title)
    else:
        png = plot(results, base + ".png", f"{model}; {where}")
    print(f"figure    {png}" if png else "figure    skipped: matplotlib is not installed")
    return results


if __name__ == "__main__":
    main()
