"""Test-wide setup: run on CPU even where libtpu is installed (it is, for the AOT tests)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
