#!/usr/bin/env bash
# Exits 1 with a one-line fix when `python3` is older than 3.11, the oldest Python that
# jax 0.10.2, flax 0.12, grain and orbax support (some TPU VM images still ship 3.10).
# Run before any install: scripts/install.sh, launch/tpu/tpu.sh setup, launch/gpu/run.sh.
set -euo pipefail
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "sdlm_jax needs Python >= 3.11 but python3 is $(python3 -V 2>&1 || echo missing): install 3.11+ (Ubuntu/TPU VM: sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11 python3.11-venv), then python3.11 -m venv ~/venv && source ~/venv/bin/activate, and rerun" >&2
  exit 1
fi
