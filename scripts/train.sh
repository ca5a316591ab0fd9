#!/usr/bin/env bash
# The main job: install cnet in place (compiling its kernels), then train LeNet-5 on the
# MNIST copy bundled in the package (offline). Extra arguments go to `cnet train`,
# e.g.  bash scripts/train.sh --model resnet20 --optimizer sgd --nesterov --epochs 5
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
python -m cnet train "$@"
