#!/bin/sh
# The quickstart, end to end and offline, on the CIFAR-10 sample shipped with kdtoolkit: train a WRN-16-1,
# train a WRN-16-2 teacher and distil it into a WRN-16-1, fine-tune the float WRN-16-1 at 2-bit weights and
# activations (LSQ), export it as packed 2-bit codes. Run directories go to runs/quickstart*.
#   examples/quickstart.sh                                                   # the shipped sample
#   examples/quickstart.sh --set data.name=cifar10 --set data.download=true  # full CIFAR-10 (every run)
# Arguments are passed to every `kdtoolkit run`. Existing run directories are refused: remove them first.
set -eu
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo; echo "== $*"; "$@"; }
step kdtoolkit run examples/quickstart.toml "$@"
step kdtoolkit run examples/quickstart_teacher.toml "$@"
step kdtoolkit run examples/quickstart_kd.toml "$@"
step kdtoolkit eval runs/quickstart_kd
step kdtoolkit run examples/quickstart_qat.toml "$@"
step kdtoolkit export runs/quickstart_qat --out runs/wrn16_1_w2a2.safetensors
echo
echo "quickstart done in $(( $(date +%s) - start )) s; where each run stands: kdtoolkit status runs/quickstart_kd"
