#!/usr/bin/env bash
# Install cnet in place (compiling its kernels) with the test extras, then run the tests.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python -m pip install -q "setuptools>=77" wheel "Cython>=3.0" "numpy>=2.0"
python -m pip install -q --no-build-isolation -e ".[test]"
python -m pytest "$@"
