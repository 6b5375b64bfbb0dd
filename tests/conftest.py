"""Test-wide setup: run on CPU even where libtpu is installed (it is, for the AOT tests)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TPU AOT compilation loads libtpu, which otherwise holds a machine-wide lock file: let a
# benchmark or a second test process compile at the same time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import importlib.util
import socket
import subprocess
import sys
import time

import pytest


@pytest.fixture()
def gcs_emulator(monkeypatch):
  """A real local Cloud Storage server (gcp-storage-emulator) on 127.0.0.1 with a bucket
  `sdlmtest`; every storage client (gcsfs, tensorstore, array_record) is pointed at it."""
  from sdlm_jax import storage  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (pip install -e '.[test]')")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # The emulator with the download headers Cloud Storage sends (see tests/gcs_emulator.py).
  launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")
  server = subprocess.Popen([sys.executable, launcher, "start", "--host", "127.0.0.1", "--port", str(port),
                             "--in-memory", "--default-bucket", "sdlmtest"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while True:
      with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
          break
      if time.time() > deadline or server.poll() is not None:
        pytest.fail("the GCS emulator did not start within 30 s")
      time.sleep(0.1)
    for name in storage.CLIENT_EMULATOR_ENVS:  # recorded, so the test's values are undone after it
      monkeypatch.setenv(name, "")
      monkeypatch.delenv(name)
    monkeypatch.setenv(storage.EMULATOR_ENV, f"http://127.0.0.1:{port}")
    storage.configure_emulator()
    yield "gs://sdlmtest"
  finally:
    server.kill()
    server.wait()
