"""Two jax processes on 127.0.0.1: train, checkpoint, get killed, resume, match an uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--config.train.num_steps=40", "--config.train.checkpoint_every=10"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, data_dir):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return [subprocess.Popen(
      [sys.executable, "-m", "sdlm_jax.cli.train", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", f"--config={REPO}/configs/demo.py:ec,smoke",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *STEPS],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs):
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}


def test_two_processes_resume_after_sigkill_like_an_uninterrupted_run(tmp_path):
  data_dir = str(tmp_path / "data")
  reference = str(tmp_path / "ref")
  _finish(_start(reference, data_dir))
  expected = _losses(reference)
  assert sorted(expected) == list(range(1, 41))

  workdir = str(tmp_path / "killed")
  procs = _start(workdir, data_dir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() and int(d) >= 10 for d in os.listdir(ckpt_dir)):
      break
    assert all(p.poll() is None for p in procs), "training ended before it could be killed"
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
  saved = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert saved and saved[-1] < 40, saved

  _finish(_start(workdir, data_dir))
  assert _losses(workdir) == expected  # bitwise: same data shards, same steps, same RNG
