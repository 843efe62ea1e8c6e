"""Type information: the compiled module's stub agrees with it (stubtest), the generated stubs
are the declarations' (fastopt._stubs), and mypy --strict accepts the README's examples."""
import ast
import importlib
import inspect
import os
import subprocess
import sys

import pytest

from fastopt.families import FAMILIES, OPTIMIZERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import mypy  # noqa: F401
    HAVE_MYPY = True
except ImportError:
    HAVE_MYPY = False
needs_mypy = pytest.mark.skipif(not HAVE_MYPY, reason="mypy is not installed (it is in the "
                                "test extra: pip install -e '.[test]')")


def run_mypy(args, cwd=ROOT):
    """mypy as a subprocess, finding fastopt in this checkout (not an installed copy)."""
    env = dict(os.environ, MYPYPATH=ROOT, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd, env=env)


@needs_mypy
def test_stubtest_agrees_with_the_modules(tmp_path):
    """Every module with a stub, the compiled one's (by hand) and the generated ones, against
    the imported module: names, signatures, defaults.  (fastopt/__init__.pyi only re-exports:
    its names are checked below.)"""
    out = run_mypy(["mypy.stubtest", "fastopt._core", "fastopt.optim", "fastopt.functional",
                    "fastopt.reference", "--allowlist",
                    os.path.join(ROOT, "tests", "stubtest_allowlist.txt")], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_mypy
def test_mypy_accepts_the_package(tmp_path):
    """The annotations agree with the code they annotate, and the stubs with each other."""
    out = run_mypy(["mypy", "--no-incremental", "-p", "fastopt"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_typing_marker_and_stubs_are_package_data():
    """py.typed and the .pyi files go into the wheel and the sdist."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    line = next(ln for ln in text.splitlines() if ln.startswith("fastopt = ["))
    assert '"py.typed"' in line and '"*.pyi"' in line
    assert os.path.exists(os.path.join(ROOT, "fastopt", "py.typed"))


# ---- the generated stubs -----------------------------------------------------------------

STUBBED = {"fastopt": "__init__.pyi", "fastopt.optim": "optim.pyi",
           "fastopt.functional": "functional.pyi", "fastopt.reference": "reference.pyi"}


def read_stub(name):
    with open(os.path.join(ROOT, "fastopt", name)) as f:
        return f.read()


def test_the_committed_stubs_are_the_generated_ones():
    """A family or class added to fastopt.families without `python -m fastopt._stubs` fails
    here: the stubs are written from the declarations, never by hand."""
    from fastopt import _stubs
    generated = _stubs.stubs()
    assert sorted(generated) == sorted(STUBBED.values())
    for name, text in generated.items():
        assert read_stub(name) == text, f"fastopt/{name} is stale: run python -m fastopt._stubs"


def test_the_generator_writes_a_new_family_and_class(monkeypatch):
    """The check above bites: a declaration the stubs lack changes what the generator writes."""
    import dataclasses

    from fastopt import _stubs
    monkeypatch.setitem(OPTIMIZERS, "AdamX", dataclasses.replace(OPTIMIZERS["AdamW"],
                                                                 name="AdamX"))
    monkeypatch.setitem(FAMILIES, "lion2", dataclasses.replace(FAMILIES["lion"], name="lion2"))
    generated = _stubs.stubs()
    for name in STUBBED.values():
        assert generated[name] != read_stub(name), name
    assert "class AdamX(Optimizer[Views]):" in generated["optim.pyi"]
    assert "def lion2_(param: F32, grad: F32, exp_avg: F32, *, step: int" in \
        generated["functional.pyi"]


def stub_signatures(name):
    """{name: [signature, ...]} of the stub's module-level functions and class constructors
    (one per overload), each [(parameter, kind, default)], `self` left out."""
    tree = ast.parse(read_stub(name))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out.setdefault(node.name, []).append(_params(node))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    out.setdefault(node.name, []).append(_params(item)[1:])
    return out


def _params(fn):
    P = inspect.Parameter
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [P.empty] * (len(positional) - len(a.defaults)) + a.defaults
    out = [(p.arg, P.POSITIONAL_ONLY if p in a.posonlyargs else P.POSITIONAL_OR_KEYWORD, d)
           for p, d in zip(positional, defaults)]
    if a.vararg:
        out.append((a.vararg.arg, P.VAR_POSITIONAL, P.empty))
    out += [(p.arg, P.KEYWORD_ONLY, P.empty if d is None else d)
            for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append((a.kwarg.arg, P.VAR_KEYWORD, P.empty))
    return [(n, k, d if d is P.empty else ast.literal_eval(d)) for n, k, d in out]


def runtime_signature(obj):
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


@pytest.mark.parametrize("module", ["fastopt.optim", "fastopt.functional", "fastopt.reference"])
def test_every_stub_signature_is_the_runtimes(module):
    """Each class's constructor (every overload: they differ only in the type of `params`) and
    each function: the runtime's parameter names, kinds and defaults, in order; and the
    stub's __all__ is the module's."""
    mod = importlib.import_module(module)
    stubs = stub_signatures(STUBBED[module])
    generated = [n for n in mod.__all__ if n in OPTIMIZERS or n[:-1] in FAMILIES]
    assert generated, module
    for name in generated:
        assert name in stubs, f"{module}.{name} has no stub"
        want = runtime_signature(getattr(mod, name))
        for sig in stubs[name]:
            assert sig == want, f"{module}.{name}"
            for (_, _, a), (_, _, b) in zip(sig, want):     # 1 == 1.0 == True: types too
                assert type(a) is type(b), f"{module}.{name}: {a!r} vs {b!r}"
    tree = ast.parse(read_stub(STUBBED[module]))
    stub_all = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and n.targets[0].id == "__all__")
    assert stub_all == list(mod.__all__)


def test_the_package_stub_exports_what_the_package_does():
    import fastopt
    tree = ast.parse(read_stub("__init__.pyi"))
    stub_all = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and n.targets[0].id == "__all__")
    assert stub_all == list(fastopt.__all__)
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom)
                for a in n.names}
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert set(fastopt.__all__) <= imported | defined


# ---- the README's examples under mypy --strict ----------------------------------------------

def readme_examples():
    """The README's Python examples: every ```python block but the functional API's signature
    listing (not a program: it names `param` and `grad` without defining them) and the
    fastopt.torch example.  That one is left out because mypy cannot check it here: torch is
    not installed everywhere this runs (.ci/matrix), fastopt.torch builds its classes at import
    and has no stub (mypy sees no `fastopt.torch.AdamW`), and under --strict torch 2.13's own
    annotations fail an nn.Module example (calling a module returns Any, `Tensor.backward` is
    untyped)."""
    from test_readme import blocks
    code = blocks("python")
    examples = [b for b in code if not b.startswith("sgd_(") and "fastopt.torch" not in b]
    assert len(code) - len(examples) == 2, ("exactly two blocks, the signature listing and the "
                                            "fastopt.torch example, are left out")
    return examples


@needs_mypy
def test_mypy_strict_accepts_the_readme_examples(tmp_path):
    """What a user's `mypy --strict` says of code like the README's: the stubs and annotations
    must type every call the examples make (an unannotated one is an error under --strict).
    fastopt's own modules are followed silently, as an installed package's are."""
    files = []
    for i, code in enumerate(readme_examples()):
        path = tmp_path / f"readme_example_{i}.py"
        path.write_text(code)
        files.append(str(path))
    out = run_mypy(["mypy", "--strict", "--follow-imports=silent", "--no-incremental", *files],
                   cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"no issues found in {len(files)} source files" in out.stdout


@needs_mypy
def test_mypy_strict_sees_the_generated_signatures(tmp_path):
    """The check above can fail: a wrong argument to a generated class or function, or a
    dict-only access on an optimizer of unnamed params, is an error."""
    path = tmp_path / "wrong.py"
    path.write_text("import numpy as np\nimport fastopt\n"
                    "opt = fastopt.AdamW([np.zeros(3, np.float32)], lr='0.1')\n"
                    "fastopt.adam_(opt.params[0], opt.grads[0], opt.params[0], opt.params[0], "
                    "step=1, betas=(0.9, 0.99))\n"
                    "named = fastopt.SGD([np.zeros(3, np.float32)])\n"
                    "named.params['w']\n")
    out = run_mypy(["mypy", "--strict", "--follow-imports=silent", "--no-incremental",
                    str(path)], cwd=tmp_path)
    assert out.returncode == 1
    assert 'No overload variant of "AdamW"' in out.stdout
    assert 'Unexpected keyword argument "betas" for "adam_"' in out.stdout
    assert 'No overload variant of "__getitem__" of "list"' in out.stdout
