"""Build of the C core and its Cython binding; metadata lives in pyproject.toml.

Flags, and why:
  -O3                 the kernels are plain loops written for the auto-vectorizer.
  -ffp-contract=off   the kernels write every fused multiply-add explicitly (fmaf), exactly where
                      torch's fused kernels have one; a contraction added by the compiler would
                      change results and break bitwise parity.
  -fno-math-errno     lets GCC vectorize sqrtf (without it, each sqrtf keeps a scalar errno
                      path); it changes no IEEE result, unlike -ffast-math, which we never use.
  -fopenmp            when the compiler has OpenMP (probed below): steps over large arenas
                      split across threads; without it everything runs on one thread.
No -march: one wheel runs on any x86-64, and csrc/ compiles each kernel again for x86-64-v3
(AVX2+FMA) and x86-64-v4 (AVX-512) and picks the path at import (see csrc/internal.h).
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup


def openmp_flags():
    """-fopenmp if this compiler builds and links an OpenMP program, else nothing (the kernels
    then run on one thread); FASTOPT_OPENMP=0 turns it off."""
    if os.environ.get("FASTOPT_OPENMP", "1") == "0" or sys.platform == "win32":
        return []
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not shutil.which(cc[0]):
        return []
    src = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(src)
        ok = subprocess.run(cc + ["-fopenmp", path, "-o", os.path.join(tmp, "probe")],
                            capture_output=True).returncode == 0
    return ["-fopenmp"] if ok else []


omp = openmp_flags()
if sys.platform == "win32":
    compile_args = ["/O2", "/fp:precise"]
else:
    compile_args = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-math-errno",
                    "-Wall", "-Wextra", "-Wno-unused-function"] + omp

# FASTOPT_PORTABLE=1 compiles the C core as a compiler without GCC's extensions sees it
# (csrc/internal.h: no always_inline, no vector extensions, no multiversioning: the baseline
# path alone), so that the path MSVC takes is built and tested on this machine too.
if os.environ.get("FASTOPT_PORTABLE", "0") == "1":
    compile_args.append("/DFO_PORTABLE" if sys.platform == "win32" else "-DFO_PORTABLE")

csrc = sorted(glob.glob(os.path.join("csrc", "*.c")))
# One file per optimizer family; csrc/step.c lists them from this define, so a family is added
# by adding its file.
family_files = sorted(glob.glob(os.path.join("csrc", "families", "*.c")))
families = [os.path.splitext(os.path.basename(f))[0] for f in family_files]
extensions = [
    Extension(
        "fastopt._core",
        sources=[os.path.join("fastopt", "_core.pyx")] + csrc + family_files,
        include_dirs=["csrc"],
        extra_compile_args=compile_args,
        extra_link_args=omp,
        libraries=[] if sys.platform == "win32" else ["m"],
        define_macros=[("FASTOPT_COMPILE_ARGS", '"' + " ".join(compile_args) + '"'),
                       ("FO_FAMILY_LIST", " ".join(f"X({name})" for name in families))],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
