"""fastopt: fused, in-place optimizer steps for NumPy, with torch.optim's semantics.

    import fastopt
    opt = fastopt.AdamW({"w": w0, "b": b0}, lr=1e-3)   # copies the params into one arena
    w, b = opt.params["w"], opt.params["b"]            # use these views in the model
    ...write the gradients into opt.grads["w"], opt.grads["b"]...
    opt.step()                                        # one fused C pass per param group

`fastopt.functional` has the kernels as functions on 1-D arrays; `fastopt.reference` is the
same API in pure NumPy, and works where the compiled core is not built.
"""
from __future__ import annotations

import platform
from importlib import metadata as _metadata
from typing import Any

import numpy as np

from fastopt.families import FAMILIES, OPTIMIZERS

try:    # pyproject.toml's version, as the installed distribution records it: one source of truth
    __version__ = _metadata.version("fastopt")
except _metadata.PackageNotFoundError:    # run from a source tree that was never installed
    __version__ = "0+unknown"

_core_error: ImportError | None = None
try:
    from fastopt import _core
except ImportError as _e:  # the NumPy twin (fastopt.reference) still works
    _core_error = _e

    def __getattr__(name):
        if name not in __all__ or name == "lr_scheduler":   # submodules: let imports find them
            raise AttributeError(f"module 'fastopt' has no attribute {name!r}")
        raise ImportError(f"fastopt.{name} needs fastopt's compiled core, which does not import "
                          f"({_core_error}); fastopt.reference is the same API in NumPy")
else:
    from fastopt import functional, lr_scheduler
    from fastopt._core import get_num_threads, set_num_threads
    from fastopt.checkpoint import load, save
    from fastopt.clip import clip_grad_norm_, clip_grad_value_
    from fastopt.optim import Optimizer

    globals().update({name: getattr(functional, name) for name in functional.__all__})
    from fastopt import optim as _optim
    globals().update({name: getattr(_optim, name) for name in OPTIMIZERS})
    del _optim


def _openmp_libraries() -> list[str] | None:
    """The OpenMP runtimes mapped into this process (Linux: from /proc/self/maps; None
    elsewhere).  More than one (torch's vendored libgomp beside the system's, say) is worth
    knowing in a bug report: each runs its own threads."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f
                           if "/" in line and "omp" in line.rsplit("/", 1)[-1]})
    except OSError:
        return None


def build_info() -> dict[str, Any]:
    """What was built and what runs: the version, compiler and flags, ISA paths, OpenMP (and,
    on Linux, the OpenMP runtime libraries loaded) and threads; also Python, NumPy and the
    platform.  `python -m fastopt` prints it, for bug reports."""
    if _core_error is not None:
        raise ImportError(f"fastopt's compiled core does not import ({_core_error})")
    info = {
        "version": __version__,
        "compiler": _core.compiler(),
        "flags": _core.compile_flags(),
        "isa": _core.get_isa(),
        "available_isas": _core.available_isas(),
        "openmp": _core.have_openmp(),
        "num_threads": _core.get_num_threads(),
        "min_per_thread": _core.get_min_per_thread(),
        "families": _core.family_names(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    libs = _openmp_libraries()
    if libs is not None and info["openmp"]:
        info["openmp_libraries"] = libs
    return info


__all__ = [*OPTIMIZERS, "Optimizer", "functional", "lr_scheduler",
           *(name + "_" for name in FAMILIES), "build_info", "get_num_threads",
           "set_num_threads", "clip_grad_norm_", "clip_grad_value_", "save", "load"]
