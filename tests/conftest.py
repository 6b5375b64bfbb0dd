"""Test-wide setup: run on CPU even where libtpu is installed (it is, for the AOT tests)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TPU AOT compilation loads libtpu, which otherwise holds a machine-wide lock file: let a
# benchmark or a second test process compile at the same time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
