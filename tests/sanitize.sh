#!/usr/bin/env bash
# The test suite against a build with AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   bash tests/sanitize.sh                 # the whole suite
#   bash tests/sanitize.sh tests/test_kernels.py -k adam     # or any pytest arguments
#
# The tracked files are copied to a temporary folder and built there, so the checkout's own
# build is left as it was.  Python itself is not instrumented, so libasan and libubsan are
# preloaded (subprocesses that the tests start inherit them, and the copy's PYTHONPATH);
# leak detection is off because CPython keeps memory until exit by design.  UBSan stops at
# the first report (-fno-sanitize-recover), so any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work"
cd "$work"
CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
LDFLAGS="-fsanitize=address,undefined" \
    python setup.py build_ext --inplace --force > build.log 2>&1 || { cat build.log; exit 1; }
export PYTHONPATH="$work" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1"
python - <<'PY'
import fastopt, os
assert fastopt.__file__.startswith(os.environ["PYTHONPATH"]), fastopt.__file__
assert "-fsanitize=address" in open("build.log").read()
print("sanitized build:", fastopt.__file__, fastopt.build_info()["isa"])
PY
python -m pytest -q -p no:cacheprovider "$@"
