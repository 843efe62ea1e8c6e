"""bench/train_mlp.py end to end: an MLP on scikit-learn's digits learns with every optimizer,
fastopt's fused classes and fastopt.reference give the same loss curves, and AdamW reaches 95%."""
import importlib.util
import os

import numpy as np
import pytest

# scikit-learn is in the test extra: without it this file fails at import, saying so, rather
# than skipping quietly (the benchmark's data set, load_digits, comes from it).
import sklearn  # noqa: F401

import fastopt
import fastopt.reference as reference
from cases import TOLERANCES

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "train_mlp.py")
_spec = importlib.util.spec_from_file_location("train_mlp", _PATH)   # bench/ is no package
train_mlp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_mlp)

EPOCHS = 4      # of the small configuration (22 steps each): enough for the loss to fall 10x

# Per-epoch train losses, fused against reference, may differ by this much (relative).
# Each step's kernels agree to a few ulp, which alone keeps the losses within ~1e-7.  Training
# amplifies that; one amplifier is ReLU: a unit whose input lies within rounding of zero fires
# in one run and not in the other, and the gradients jump apart (seen in a step-by-step
# comparison: params 6e-8 apart, the next step's gradients 1.8e-3 apart).  Measured with this
# file's settings (4 epochs, small config) over seeds 0-15, with BLAS on 1 and on 2 threads,
# the largest relative difference of any epoch was: SGD 5.2e-5, RMSprop 2.3e-4, Adam 3.0e-7,
# AdamW 8.2e-8 (seed 0, used here: 1.7e-5 at most).  2e-3 leaves ~10x room over that for
# other CPUs and BLAS builds, and stays below what a real discrepancy does: with seed 0, a 1%
# error in lr moves some epoch's loss by 1.3e-2 (Adam) to 6.5e-2 (SGD), beta2 0.99 for 0.999
# by 3.7e-2, momentum 0.89 for 0.9 by 0.6, AdamW without its weight decay by 6.7e-3.
LOSS_RTOL = 2e-3


@pytest.fixture(scope="module")
def data():
    return train_mlp.load_digits_split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # fastopt gives the same bits on any thread count; one thread for it and for BLAS keeps
    # this file fast on a small shared machine, where both runtimes' spinning threads would
    # otherwise compete for the cores (see bench/train_mlp.py's docstring).
    from threadpoolctl import threadpool_limits
    before = fastopt.get_num_threads()
    fastopt.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    fastopt.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(data):
    """{optimizer: {'fused': result, 'reference': result}}, same seed, EPOCHS epochs."""
    return {name: {impl: train_mlp.train(name, module, "small", EPOCHS, seed=0, data=data)
                   for impl, module in train_mlp.IMPLEMENTATIONS.items()}
            for name in train_mlp.OPTIMIZERS}


def test_every_optimizer_is_run():
    assert set(train_mlp.OPTIMIZERS) == {name.lower() for name in fastopt.families.OPTIMIZERS}
    assert train_mlp.IMPLEMENTATIONS == {"fused": fastopt, "reference": reference}


def test_data_split(data):
    x_tr, y_tr, x_te, y_te = data
    assert x_tr.dtype == x_te.dtype == np.float32
    assert x_tr.shape[1] == x_te.shape[1] == 64
    assert len(x_tr) + len(x_te) == 1797 and len(x_te) == 360
    assert sorted(set(y_te)) == list(range(10))
    # standardized with the training set's statistics (constant pixels stay 0)
    np.testing.assert_allclose(x_tr.mean(axis=0), 0, atol=1e-5)
    assert np.all((np.abs(x_tr.std(axis=0) - 1) < 1e-4) | (x_tr.std(axis=0) == 0))


@pytest.mark.parametrize("name", train_mlp.OPTIMIZERS)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_loss_falls(runs, name, impl):
    r = runs[name][impl]
    loss = np.array(r["train_loss"])
    assert len(loss) == EPOCHS and np.all(np.isfinite(loss))
    # the first epoch's mean already includes much learning (about 2.3 at the start); by the
    # fourth it is about 10x lower with every optimizer (measured 0.04-0.11 of the first,
    # seeds 0-15)
    assert loss[-1] < 0.25 * loss[0], loss
    assert r["final_test_accuracy"] > 0.9
    assert len(r["opt_time"]) == len(r["total_time"]) == EPOCHS
    assert all(0 < o < t for o, t in zip(r["opt_time"], r["total_time"]))


@pytest.mark.parametrize("name", train_mlp.OPTIMIZERS)
def test_fused_and_reference_agree(runs, name):
    f, r = runs[name]["fused"], runs[name]["reference"]
    assert f["params"] == r["params"] == 85_002
    np.testing.assert_allclose(f["train_loss"], r["train_loss"], rtol=LOSS_RTOL, atol=0)
    # they are not the same computation (the C kernels fuse multiply-adds): were they
    # bitwise equal, the reference would not be what was run; except where the twin is
    # bitwise by design (its tolerance against the kernel is 0: Lion)
    family = fastopt.families.OPTIMIZERS[
        next(c for c in fastopt.families.OPTIMIZERS if c.lower() == name)].family.name
    if TOLERANCES[(family, "reference")][0] > 0:
        assert f["train_loss"] != r["train_loss"]


def test_same_seed_same_run(data):
    # what makes the comparison fair: same initial weights, same minibatches, so one module
    # run twice gives the same bits
    a = train_mlp.train("adam", fastopt, "small", 2, seed=3, data=data)
    b = train_mlp.train("adam", fastopt, "small", 2, seed=3, data=data)
    assert a["train_loss"] == b["train_loss"]
    assert a["test_accuracy"] == b["test_accuracy"]


def test_adamw_quick_default_reaches_95_percent(data):
    # the quick default: `python bench/train_mlp.py`'s configuration, epochs and seed
    r = train_mlp.train("adamw", fastopt, "small", seed=0, data=data)
    assert r["epochs"] == train_mlp.CONFIGS["small"]["epochs"]
    assert r["final_test_accuracy"] >= 0.95, r["test_accuracy"]


def test_unknown_optimizer(data):
    with pytest.raises(ValueError, match="unknown optimizer 'adagradz'"):
        train_mlp.train("adagradz", fastopt, "small", 1, data=data)
