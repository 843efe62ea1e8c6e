"""fastopt: fused, in-place optimizer steps for NumPy, with torch.optim's semantics.

    import fastopt
    opt = fastopt.AdamW({"w": w0, "b": b0}, lr=1e-3)   # copies the params into one arena
    w, b = opt.params["w"], opt.params["b"]            # use these views in the model
    ...write the gradients into opt.grads["w"], opt.grads["b"]...
    opt.step()                                        # one fused C pass per param group

`fastopt.functional` has the kernels as functions on 1-D arrays; `fastopt.reference` is the
same API in pure NumPy.
"""
from fastopt import _core, functional, lr_scheduler
from fastopt._core import get_num_threads, set_num_threads
from fastopt.checkpoint import load, save
from fastopt.clip import clip_grad_norm_, clip_grad_value_
from fastopt.functional import adam_, rmsprop_, sgd_
from fastopt.optim import SGD, Adam, AdamW, Optimizer, RMSprop

__version__ = "0.1.0"


def build_info():
    """What was built and what runs: compiler and flags, ISA paths, OpenMP and threads."""
    return {
        "version": __version__,
        "compiler": _core.compiler(),
        "flags": _core.compile_flags(),
        "isa": _core.get_isa(),
        "available_isas": _core.available_isas(),
        "openmp": _core.have_openmp(),
        "num_threads": _core.get_num_threads(),
        "min_per_thread": _core.get_min_per_thread(),
    }


__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Optimizer", "functional", "lr_scheduler", "sgd_",
           "adam_",
           "rmsprop_", "build_info", "get_num_threads", "set_num_threads", "clip_grad_norm_",
           "clip_grad_value_", "save", "load"]
