"""The benchmark's plot: throughput against size, one panel per optimizer and thread count.

Optional: without matplotlib, plot_throughput returns None and the run goes on.
"""

STYLE = {   # implementation -> (colour, marker)
    "fastopt": ("tab:blue", "o"),
    "reference": ("tab:gray", "s"),
    "torch fused": ("tab:red", "^"),
    "torch foreach": ("tab:orange", "v"),
    "torch for-loop": ("tab:brown", "x"),
}


def plot_throughput(results, path):
    """M params/s against params (flat layouts), log-log; the ceiling dashed. -> path or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")          # no display needed, and none is assumed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in results
            if not r.get("model_layout") and r["us_per_step"] is not None]
    if not rows:
        return None
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(len(threads), len(optimizers), squeeze=False, sharex=True,
                             sharey=True, figsize=(max(3.6 * len(optimizers), 8), 3.2 * len(threads)))
    for i, t in enumerate(threads):
        for j, opt in enumerate(optimizers):
            ax = axes[i][j]
            here = [r for r in rows if r["optimizer"] == opt and r["threads"] == t]
            for impl in dict.fromkeys(r["impl"] for r in here):
                pts = sorted((r["n"], r["mparams_per_s"]) for r in here if r["impl"] == impl)
                x, y = zip(*pts)
                if impl.startswith("ceiling"):      # r4w3 or r3w2: one legend entry
                    ax.plot(x, y, "k--", lw=1.2, label="ceiling (probe)")
                else:
                    colour, marker = STYLE.get(impl, (None, "."))
                    ax.plot(x, y, marker=marker, color=colour, ms=4, lw=1.2, label=impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{opt}, {t} thread{'s' if t > 1 else ''}", fontsize=10)
            if i == len(threads) - 1:
                ax.set_xlabel("params (one flat tensor)")
            if j == 0:
                ax.set_ylabel("M params / s")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles),
               fontsize=9, frameon=False)
    fig.suptitle("one optimizer step: throughput (median of interleaved repetitions)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
