"""fastopt.__version__ comes from the package metadata (pyproject.toml's version), and
`python -m fastopt` prints build_info() for bug reports."""
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

import fastopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def pyproject_version():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


def test_version_is_the_metadatas_and_pyprojects():
    try:
        installed = metadata.version("fastopt")
    except metadata.PackageNotFoundError:
        pytest.skip("fastopt is not installed (pip install -e .): no metadata to compare with")
    assert fastopt.__version__ == installed == pyproject_version()


def test_version_without_metadata_is_the_fallback(tmp_path):
    script = textwrap.dedent("""
        from importlib import metadata
        def missing(name):
            raise metadata.PackageNotFoundError(name)
        metadata.version = missing
        import fastopt
        print(fastopt.__version__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0+unknown"


def test_python_m_fastopt_prints_the_build_facts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastopt"], capture_output=True, text=True,
                         cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split(None, 1) for line in out.stdout.splitlines())
    info = fastopt.build_info()
    assert rows["version"] == fastopt.__version__
    assert rows["compiler"] == info["compiler"] and rows["flags"] == info["flags"]
    assert rows["isa"] == info["isa"]
    assert rows["available_isas"] == ", ".join(info["available_isas"])
    assert rows["openmp"] == str(info["openmp"])
    assert rows["num_threads"] == str(info["num_threads"])
    if info["openmp"] and sys.platform.startswith("linux"):
        # the runtime the compiled core links is mapped into the process
        assert "omp" in rows["openmp_libraries"]
        assert all(os.path.exists(p) for p in rows["openmp_libraries"].split(", "))


def test_python_m_fastopt_without_the_core_says_why(tmp_path):
    """A bug report from a broken install still carries the version and the import error."""
    script = ("import sys, runpy; sys.modules['fastopt._core'] = None; "
              "runpy.run_module('fastopt', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env=ENV)
    assert out.returncode == 1
    assert f"fastopt {fastopt.__version__}:" in out.stderr and "compiled core" in out.stderr
