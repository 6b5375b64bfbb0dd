"""A run directory nothing silently ruins: resume rules, corrupt checkpoints and metrics, the lock,
preemption. Each failure is reproduced through sdlm-train as a user would meet it."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from sdlm_jax import storage
from sdlm_jax import workdir as workdir_lib
from sdlm_jax.defaults import get_base_config
from sdlm_jax.train import resume_rules
from sdlm_jax.train import run_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, data_dir, variant="ec,smoke", *flags, timeout=600):
  cmd = [sys.executable, "-m", "sdlm_jax.cli.train", f"--config={REPO}/configs/demo.py:{variant}",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _digests(workdir) -> dict:
  """sha256 of every file of the run directory (what a refused resume must leave untouched)."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


# ---------------------------------------------------------------- resume rules (no training)

def _stored():
  return json.loads(json.dumps(get_base_config().to_dict()))


def test_unchanged_config_needs_no_history():
  assert resume_rules.check(_stored(), get_base_config().to_dict()) is None


def test_locked_fields_are_named_with_stored_and_new_values():
  new = get_base_config()
  new.model.moe.router = "token_choice"
  new.data.seq_len = 64
  new.train.optimizer.lr = 1e-3
  with pytest.raises(resume_rules.ResumeConfigError) as err:
    resume_rules.check(_stored(), new.to_dict())
  message = str(err.value)
  assert "model.moe.router: stored 'expert_choice', new 'token_choice'" in message
  assert "data.seq_len: stored 128, new 64" in message
  assert "--allow_changed=train.optimizer.lr" in message and "stored 0.0002, new 0.001" in message


def test_optimizer_changes_need_the_flag_and_safe_ones_do_not():
  new = get_base_config()
  new.train.num_steps = 5000
  new.train.log_every = 1
  new.train.optimizer.lr = 1e-3
  with pytest.raises(resume_rules.ResumeConfigError, match="only with --allow_changed=train.optimizer.lr:"):
    resume_rules.check(_stored(), new.to_dict())
  entry = resume_rules.check(_stored(), new.to_dict(), ("train.optimizer.lr",), step=300)
  assert entry["step"] == 300
  assert entry["changes"] == {"train.log_every": {"old": 10, "new": 1},
                              "train.num_steps": {"old": 1000, "new": 5000},
                              "train.optimizer.lr": {"old": 2e-4, "new": 1e-3}}


def test_allow_changed_refuses_a_field_that_can_never_change():
  with pytest.raises(resume_rules.ResumeConfigError, match="--allow_changed=model.d_model: only these"):
    resume_rules.check(_stored(), get_base_config().to_dict(), ("model.d_model",))


def test_history_is_applied_to_the_stored_config_and_the_fields_stay(tmp_path):
  workdir_lib.write_json(str(tmp_path), workdir_lib.CONFIG_FILE, _stored())
  workdir_lib.append_history(str(tmp_path), {"step": 3, "changes": {"train.optimizer.lr": {"old": 2e-4, "new": 1e-3}}})
  saved = workdir_lib.read_config_file(str(tmp_path))
  assert saved["train"]["optimizer"]["lr"] == 2e-4 and len(saved["history"]) == 1
  assert workdir_lib.load_config(str(tmp_path)).train.optimizer.lr == 1e-3
  new = get_base_config()
  new.train.optimizer.lr = 1e-3  # already recorded: no flag needed again
  assert resume_rules.check_workdir(str(tmp_path), new) is None


# ---------------------------------------------------------------- through sdlm-train

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A finished 6-step demo ec,smoke run (copy it before changing it)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  proc = _train(workdir, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


@pytest.mark.slow
def test_token_choice_on_an_expert_choice_run_stops_before_writing(run_copy, data_dir):
  before = _digests(run_copy)
  proc = _train(run_copy, data_dir, "tc,smoke")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "model.moe.router: stored 'expert_choice', new 'token_choice'" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert _digests(run_copy) == before


@pytest.mark.slow
def test_lr_change_needs_allow_changed_and_is_recorded(run_copy, data_dir):
  before = _digests(run_copy)
  flags = ("--config.train.optimizer.lr=1e-3", "--config.train.num_steps=8")
  proc = _train(run_copy, data_dir, "ec,smoke", *flags)
  assert proc.returncode == 2 and "--allow_changed=train.optimizer.lr" in proc.stderr, proc.stderr[-3000:]
  assert _digests(run_copy) == before
  proc = _train(run_copy, data_dir, "ec,smoke", *flags, "--allow_changed=train.optimizer.lr")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resumed from step 6" in proc.stdout
  saved = workdir_lib.read_config_file(run_copy)
  assert saved["train"]["optimizer"]["lr"] == 3e-3 and saved["train"]["num_steps"] == 6
  assert saved["history"][0]["step"] == 6
  assert saved["history"][0]["changes"] == {"train.num_steps": {"old": 6, "new": 8},
                                            "train.optimizer.lr": {"old": 3e-3, "new": 1e-3}}
  after = _digests(run_copy)
  assert after["tokenizer.model"] == before["tokenizer.model"]


# ---------------------------------------------------------------- corrupt checkpoints and metrics

def _largest_array_file(workdir, step) -> str:
  item = os.path.join(workdir, "checkpoints", str(step), "params")
  files = [os.path.join(root, n) for root, _, names in os.walk(item) for n in names]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_a_bit(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit], ids=["truncated", "bit_flip"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(run_copy, data_dir, damage):
  checksums = json.load(open(os.path.join(run_copy, "checkpoints", "6", "checksums.json")))
  damaged = _largest_array_file(run_copy, 6)
  assert os.path.relpath(damaged, os.path.join(run_copy, "checkpoints", "6")) in checksums
  damage(damaged)
  proc = _train(run_copy, data_dir, "ec,smoke", "--config.train.num_steps=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "warning: checkpoint 6" in proc.stderr and "could not be restored" in proc.stderr
  assert "CorruptCheckpointError" in proc.stderr and os.path.basename(damaged) in proc.stderr
  assert "Resumed from step 3" in proc.stdout
  assert os.path.isdir(os.path.join(run_copy, "checkpoints_corrupt", "6"))
  steps = sorted(int(d) for d in os.listdir(os.path.join(run_copy, "checkpoints")) if d.isdigit())
  assert steps == [3, 6, 8]
  logged = [json.loads(line)["step"] for line in open(os.path.join(run_copy, "metrics.jsonl"))]
  assert logged[:8] == list(range(1, 9))  # steps 4-6 are trained again, logged once


@pytest.mark.slow
def test_when_no_checkpoint_restores_the_run_stops_and_keeps_them(run_copy, data_dir):
  for step in (3, 6):
    _truncate(_largest_array_file(run_copy, step))
  proc = _train(run_copy, data_dir, "ec,smoke", "--config.train.num_steps=8")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("sdlm-train: error: no checkpoint in") and "step 6: CorruptCheckpointError" in last
  assert "step 3: CorruptCheckpointError" in last and "start a new run in another --workdir" in last
  assert sorted(os.listdir(os.path.join(run_copy, "checkpoints_corrupt"))) == ["3", "6"]


@pytest.mark.slow
def test_a_torn_metrics_line_is_dropped_with_a_warning(run_copy, data_dir):
  whole_lines = len(open(os.path.join(run_copy, "metrics.jsonl")).readlines())
  with open(os.path.join(run_copy, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "loss": 3.2')
  proc = _train(run_copy, data_dir, "ec,smoke", "--config.train.num_steps=7")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "is not a whole JSON record" in proc.stderr and f"line {whole_lines + 1} " in proc.stderr
  records = [json.loads(line) for line in open(os.path.join(run_copy, "metrics.jsonl"))]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 8))


# ---------------------------------------------------------------- the lock

def _write_lock(workdir, **fields):
  record = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": "earlier", "heartbeat": "earlier",
            "heartbeat_unix": time.time(), "token": "other", **fields}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, run_lock.LOCK_FILE), "w") as f:
    json.dump(record, f)


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_a_live_lock_is_refused_naming_the_holder(tmp_path):
  first = run_lock.RunLock(str(tmp_path))
  first.acquire()
  try:
    with pytest.raises(run_lock.RunLockedError) as err:
      run_lock.RunLock(str(tmp_path)).acquire()
    record = json.load(open(tmp_path / run_lock.LOCK_FILE))
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started {record['start_time']}" in str(err.value)
  finally:
    first.release()
  assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_a_lock_on_another_host_with_a_recent_heartbeat_is_refused(tmp_path):
  _write_lock(str(tmp_path), host="tpu-worker-7", pid=1234)
  with pytest.raises(run_lock.RunLockedError, match="host tpu-worker-7, pid 1234"):
    run_lock.RunLock(str(tmp_path)).acquire()
  run_lock.RunLock(str(tmp_path)).release()  # not its lock: left alone
  assert json.load(open(tmp_path / run_lock.LOCK_FILE))["pid"] == 1234


@pytest.mark.parametrize("fields, reason", [
    (lambda: {"pid": _dead_pid()}, "on this host is gone"),
    (lambda: {"host": "tpu-worker-7", "heartbeat_unix": time.time() - 3600}, "last heartbeat was 60 min ago"),
], ids=["dead_pid_on_this_host", "silent_other_host"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys, fields, reason):
  _write_lock(str(tmp_path), **fields())
  lock = run_lock.RunLock(str(tmp_path))
  lock.acquire()
  warning = capsys.readouterr().err
  assert "warning: taking over the stale lock" in warning and reason in warning
  record = json.load(open(tmp_path / run_lock.LOCK_FILE))
  assert record["pid"] == os.getpid() and record["token"] != "other"
  lock.release()


def test_the_heartbeat_thread_refreshes_the_lock(tmp_path):
  lock = run_lock.RunLock(str(tmp_path), heartbeat_s=0.05)
  lock.acquire()
  first = json.load(open(tmp_path / run_lock.LOCK_FILE))["heartbeat_unix"]
  time.sleep(0.5)
  assert json.load(open(tmp_path / run_lock.LOCK_FILE))["heartbeat_unix"] > first
  lock.release()


# ---------------------------------------------------------------- preemption (and the lock, live)

def _logged_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.endswith("\n")]


@pytest.mark.slow
def test_sigterm_saves_at_the_step_reached_exits_75_and_the_run_resumes(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  flags = ("--config.train.num_steps=100000", "--config.train.checkpoint_every=100000")
  cmd = [sys.executable, "-m", "sdlm_jax.cli.train", f"--config={REPO}/configs/demo.py:ec,smoke",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags]
  child = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while len(_logged_steps(workdir)) < 3:
      assert child.poll() is None and time.time() < deadline, "training ended before it could be stopped"
      time.sleep(0.05)
    second = _train(workdir, data_dir, "ec,smoke", *flags)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {child.pid}" in second.stderr and "in use by another sdlm-train" in second.stderr
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=300)
  finally:
    if child.poll() is None:
      child.kill()
  assert child.returncode == 75, stderr[-3000:]
  reached = _logged_steps(workdir)[-1]
  assert f"preempted (SIGTERM): checkpoint {reached} saved" in stderr
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [reached]
  assert not os.path.exists(os.path.join(workdir, run_lock.LOCK_FILE))

  proc = _train(workdir, data_dir, "ec,smoke", f"--config.train.num_steps={reached + 2}",
                "--config.train.checkpoint_every=100000")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resumed from step {reached}" in proc.stdout
  assert [s for s in _logged_steps(workdir)][:reached + 2] == list(range(1, reached + 3))


# ---------------------------------------------------------------- the same on gs://

@pytest.mark.slow
def test_lock_digests_and_set_aside_work_on_gcs(gcs_emulator, capsys):
  workdir = f"{gcs_emulator}/run"
  first = run_lock.RunLock(workdir)
  first.acquire()
  with pytest.raises(run_lock.RunLockedError, match=f"pid {os.getpid()}"):
    run_lock.RunLock(workdir).acquire()
  first.heartbeat()
  first.release()
  assert not storage.path(f"{workdir}/{run_lock.LOCK_FILE}").exists()
  # a lock whose holder ran on another host and went silent is taken over
  storage.write_text(f"{workdir}/{run_lock.LOCK_FILE}", json.dumps(
      {"host": "tpu-worker-7", "pid": 1, "start_time": "earlier", "heartbeat_unix": time.time() - 3600}))
  taker = run_lock.RunLock(workdir)
  taker.acquire()
  assert "taking over the stale lock" in capsys.readouterr().err
  taker.release()

  step_dir = f"{workdir}/checkpoints/6"
  storage.write_bytes(f"{step_dir}/params/d/0", b"x" * 1000)
  storage.write_bytes(f"{step_dir}/meta/meta.json", b"{}")
  files = [str(f) for f in storage.files_under(step_dir)]
  assert files == [f"{step_dir}/meta/meta.json", f"{step_dir}/params/d/0"]
  before = storage.digest(f"{step_dir}/params/d/0")
  storage.write_bytes(f"{step_dir}/params/d/0", b"x" * 999 + b"y")
  assert storage.digest(f"{step_dir}/params/d/0") != before
  storage.move_tree(step_dir, f"{workdir}/checkpoints_corrupt/6")
  assert not storage.path(step_dir).exists()
  assert storage.path(f"{workdir}/checkpoints_corrupt/6/params/d/0").read_bytes() == b"x" * 999 + b"y"
