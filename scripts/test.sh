#!/usr/bin/env bash
# Install cnet in place (compiling its kernels) with the test extras, then run the tests.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
python -m pytest "$@"
