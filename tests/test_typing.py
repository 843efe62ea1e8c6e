"""Type information: the compiled module's stub agrees with it (stubtest), the generated stubs
are the declarations' (fastopt._stubs), and mypy --strict accepts the README's examples."""
import os
import subprocess
import sys

import pytest

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
def test_stubtest_agrees_with_the_compiled_module():
    out = run_mypy(["mypy.stubtest", "fastopt._core", "--allowlist",
                    os.path.join(ROOT, "tests", "stubtest_allowlist.txt")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_typing_marker_and_stubs_are_package_data():
    """py.typed and the .pyi files go into the wheel and the sdist."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    line = next(ln for ln in text.splitlines() if ln.startswith("fastopt = ["))
    assert '"py.typed"' in line and '"*.pyi"' in line
    assert os.path.exists(os.path.join(ROOT, "fastopt", "py.typed"))
