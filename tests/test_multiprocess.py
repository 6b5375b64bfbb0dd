"""Two jax processes on 127.0.0.1: train, checkpoint, get killed (or preempted), resume, match an
uninterrupted run."""

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


def _start(workdir, data_dir, steps=tuple(STEPS)):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return [subprocess.Popen(
      [sys.executable, "-m", "sdlm_jax.cli.train", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", f"--config={REPO}/configs/demo.py:ec,smoke",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *steps],
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


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_they_resume(tmp_path):
  """JAX's preemption service: the notice reaches every process, which all save at the same step
  (reached_preemption_sync_point) and exit 75."""
  data_dir, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  long_run = ["--config.train.num_steps=100000", "--config.train.checkpoint_every=100000"]
  procs = _start(workdir, data_dir, long_run)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 400
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
    assert time.time() < deadline and all(p.poll() is None for p in procs), "training ended before the signal"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # one worker preempted
  errors = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [75, 75], [e[-2000:] for e in errors]
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert len(saved) == 1 and max(_losses(workdir)) == saved[0]
  assert all(f"checkpoint {saved[0]} saved" in e for e in errors)

  _finish(_start(workdir, data_dir, [f"--config.train.num_steps={saved[0] + 1}"] + long_run[1:]))
  assert sorted(_losses(workdir)) == list(range(1, saved[0] + 2))
