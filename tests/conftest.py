"""Test-wide setup: run on CPU even where libtpu is installed (it is, for the AOT tests)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TPU AOT compilation loads libtpu, which otherwise holds a machine-wide lock file: let a
# benchmark or a second test process compile at the same time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import atexit
import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


@pytest.fixture(scope="session")
def _gcs_server():
  """One local Cloud Storage server (gcp-storage-emulator, with the download headers Cloud Storage
  sends: see tests/gcs_emulator.py) for the whole session, with a bucket `sdlmtest`; its URL.

  It outlives the tests: a reader thread a test leaves behind (grain prefetching ArrayRecord
  shards) finishes against it instead of retrying a dead server for minutes. The interpreter
  joins such threads before it runs atexit functions, so the server is stopped by one of those."""
  if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (pip install -e '.[test]')")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
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
  except BaseException:
    server.kill()
    raise
  atexit.register(lambda: (server.kill(), server.wait()))
  return f"http://127.0.0.1:{port}"


@pytest.fixture()
def gcs_emulator(_gcs_server, monkeypatch):
  """"gs://sdlmtest", an empty bucket on the session's local Cloud Storage server; every storage
  client (gcsfs, tensorstore, array_record) of this process and its subprocesses is pointed at it."""
  from sdlm_jax import storage  # pylint: disable=import-outside-toplevel
  direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, whatever *_proxy says
  with direct.open(f"{_gcs_server}/wipe?keep-buckets=1", timeout=30):  # the objects of earlier tests
    pass
  for name in storage.CLIENT_EMULATOR_ENVS:  # recorded, so the test's values are undone after it
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)
  monkeypatch.setenv(storage.EMULATOR_ENV, _gcs_server)
  storage.configure_emulator()
  import fsspec  # pylint: disable=import-outside-toplevel
  fsspec.core.url_to_fs("gs://sdlmtest")[0].invalidate_cache()  # listings cached before the wipe
  yield "gs://sdlmtest"
