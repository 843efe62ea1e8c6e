"""The family declarations against the C core, and fastopt.reference without the C core."""
import inspect
import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt
from fastopt import _core
from fastopt._formats import STATE_DEFAULTS
from fastopt.families import FAMILIES, OPTIMIZERS
from cases import CONFIGS, full_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_record_dtype_is_the_c_struct(family):
    """Hyperparameters travel by name into a NumPy record laid out as the C struct: same size,
    same fields in the same order, at the same offsets, of the same types."""
    size, fields, buffers = _core.family_layout(family)
    dtype = FAMILIES[family].dtype
    assert dtype.itemsize == size
    assert [(name, dtype.fields[name][1], dtype.fields[name][0].str[1:])
            for name in dtype.names] == fields
    assert tuple(buffers) == FAMILIES[family].buffer_names


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_python_and_c_agree_on_which_buffers_a_configuration_uses(family):
    fam = FAMILIES[family]
    flags = [f.name for f in fam.fields if f.ctype == "i4"]
    reals = [f.name for f in fam.fields if f.ctype == "f8"]
    # every config of the test table, and every combination of the flags with reals at 0 and
    # at a typical value (momentum, weight decay, ... switch buffers on)
    rows = [full_fields(family, cfg) for cfg in CONFIGS[family]]
    for bits in itertools.product([False, True], repeat=len(flags)):
        for zero in itertools.product([0.0, 0.5], repeat=min(len(reals), 6)):
            row = {f.name: f.default for f in fam.fields}
            row.update(zip(flags, bits))
            row.update(zip(reals, zero))
            rows.append(row)
    for row in rows:
        record = np.zeros(1, fam.dtype)
        for name in fam.dtype.names:
            record[name] = row.get(name, 0)
        assert _core.family_needs(family, record) == list(fam.required(row)), row


def test_a_record_of_the_wrong_layout_is_refused():
    fam = FAMILIES["adam"]
    bad = np.dtype({"names": list(fam.dtype.names)[::-1],
                    "formats": [fam.dtype.fields[n][0] for n in fam.dtype.names][::-1]},
                   align=True)
    p = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="hyperparameter dtype"):
        _core.Stepper("adam", p, p.copy(), [(0, 8)], np.zeros(1, bad))
    with pytest.raises(ValueError, match="no optimizer family"):
        _core.Stepper("adamz", p, p.copy(), [(0, 8)], np.zeros(1, fam.dtype))


def test_every_class_has_torchs_signature_and_a_docstring():
    for name, spec in OPTIMIZERS.items():
        cls = getattr(fastopt, name)
        sig = inspect.signature(cls)
        names = [p for p in sig.parameters
                 if p not in ("params", "skip_nonfinite", *STATE_DEFAULTS)]
        assert names == [k for k in spec.signature if k != "*"]
        for k in names:
            assert sig.parameters[k].default == spec.defaults[k]
        # fastopt's own keywords close the signature, keyword-only, with their defaults
        tail = list(sig.parameters)[-1 - len(STATE_DEFAULTS):]
        assert tail == ["skip_nonfinite", *STATE_DEFAULTS]
        for k, v in STATE_DEFAULTS.items():
            assert sig.parameters[k].kind is inspect.Parameter.KEYWORD_ONLY
            assert sig.parameters[k].default == v
        assert cls.__doc__ and "torch" in cls.__doc__ and "state_dtype" in cls.__doc__


def test_the_step_count_is_the_optimizers_alone():
    """C is handed the step being taken and changes no counter: a failed call changes
    nothing, and state_dict's step is the count of steps taken."""
    opt = fastopt.Adam([np.ones(8, np.float32)])
    opt.grads[0][...] = 1.0
    for _ in range(3):
        opt.step()
    assert opt.step_counts == [3] and opt.state[0]["step"] == 3
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError):
        opt.step()
    assert opt.step_counts == [3]


def test_reference_runs_without_the_compiled_core(tmp_path):
    """fastopt.reference imports and steps with NumPy alone (the C module made unimportable),
    and the rest of fastopt says clearly what it needs."""
    script = textwrap.dedent("""
        import sys
        sys.modules["fastopt._core"] = None          # importing it now raises ImportError
        import numpy as np
        import fastopt.reference as R
        opt = R.AdamW({"w": np.ones(5, np.float32)}, lr=0.1)
        opt.grads["w"][...] = 1.0
        opt.step(max_grad_norm=1.0)
        p = np.ones(3, np.float32); m = np.zeros(3, np.float32); v = np.zeros(3, np.float32)
        R.adam_(p, np.ones(3, np.float32), m, v, step=1, lr=0.1)
        assert (p < 1).all() and (opt.params["w"] < 1).all()
        import fastopt
        try:
            fastopt.AdamW
        except ImportError as e:
            assert "fastopt.reference" in str(e)
        else:
            raise AssertionError("fastopt.AdamW imported without the C core")
        print("OK", sorted(R.__all__))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
