"""Build of the C core and its Cython binding; metadata lives in pyproject.toml.

Flags, and why:
  -O3                 the kernels are plain loops written for the auto-vectorizer.
  -ffp-contract=off   the kernels write every fused multiply-add explicitly (fmaf), exactly where
                      torch's fused kernels have one; a contraction added by the compiler would
                      change results and break bitwise parity.
  -fno-math-errno     lets GCC vectorize sqrtf (without it, each sqrtf keeps a scalar errno
                      path); it changes no IEEE result, unlike -ffast-math, which we never use.
No -march: one wheel runs on any x86-64, and csrc/ compiles each kernel once more for
x86-64-v3 (AVX2+FMA) and picks the path at import (see csrc/isa.h).
"""
import glob
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args = ["/O2", "/fp:precise"]
else:
    compile_args = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-math-errno",
                    "-Wall", "-Wextra", "-Wno-unused-function"]

csrc = sorted(glob.glob(os.path.join("csrc", "*.c")))
extensions = [
    Extension(
        "fastopt._core",
        sources=[os.path.join("fastopt", "_core.pyx")] + csrc,
        include_dirs=["csrc"],
        extra_compile_args=compile_args,
        libraries=[] if sys.platform == "win32" else ["m"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
