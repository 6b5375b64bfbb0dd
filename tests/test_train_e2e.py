"""End to end through the CLIs: train, resume after SIGKILL, NaN stop, evaluate, generate."""

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_cache"))


def _cli(module, *args):
  return [sys.executable, "-m", f"sdlm_jax.cli.{module}", *args]


def _train_cmd(workdir, data_dir, variant="ec,smoke", *overrides):
  return _cli("train", f"--config={REPO}/configs/demo.py:{variant}", f"--workdir={workdir}",
              f"--config.data.data_dir={data_dir}", *overrides)


def _run(cmd, **kw):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)
  return proc


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _train_losses(workdir):
  return {m["step"]: m["loss"] for m in _metrics(workdir) if "loss" in m}


@pytest.mark.parametrize("variant", ["ec,smoke", "tc,smoke", "ar,smoke"])
def test_train_writes_metrics_checkpoints_and_eval(tmp_path, data_dir, variant):
  workdir = str(tmp_path / "run")
  proc = _run(_train_cmd(workdir, data_dir, variant))
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = _metrics(workdir)
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == list(range(1, 7))
  for r in train_records:
    for key in ("loss", "lr", "grad_norm", "param_norm", "tokens_per_sec", "total_loss", "aux_loss", "step_time_s",
                "model_tflops_per_sec_per_device"):
      assert math.isfinite(r[key]), (key, r)
    assert "mfu" not in r  # no peak FLOP/s is known for a CPU
  if variant != "ar,smoke":
    r = train_records[-1]
    assert 0.0 <= r["router/frac_tokens_zero_experts"] <= 1.0
    assert r["router/experts_per_token_min"] <= r["router/experts_per_token_mean"] <= r["router/experts_per_token_max"]
    assert len(r["router/expert_load"]) == 4
    load = np.asarray(r["router/expert_load_per_layer"])  # [MoE layers, experts], each layer's shares sum to 1
    assert load.shape == (2, 4) and np.allclose(load.sum(1), 1.0, atol=1e-5)
    assert {f"router/expert_load/{e:03d}" for e in range(4)} <= _tensorboard_tags(workdir)
    assert any(k.startswith("loss_t") for k in r)
  assert records[0]["lr"] == 0.0 or records[0]["lr"] < records[2]["lr"]  # warmup
  with open(os.path.join(workdir, "eval.json")) as f:
    ev = json.load(f)
  assert ev["step"] == 6 and ev["val/unigram_ppl"] > 1
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert {"loss", "step_time_s", "model_tflops_per_sec_per_device"} <= _tensorboard_tags(workdir)
  with open(os.path.join(workdir, "params.txt")) as f:  # clu's parameter overview
    assert "| embed " in f.read()


def _tensorboard_tags(workdir) -> set[str]:
  """Scalar tags in the run's TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
  tags = set()
  folder = os.path.join(workdir, "tensorboard")
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      tags.update(value.tag for value in event.summary.value)
      pos += 12 + length + 4
  return tags


def test_sigkill_resume_matches_uninterrupted_run_bitwise(tmp_path, data_dir):
  steps = ["--config.train.num_steps=80", "--config.train.checkpoint_every=10"]
  ref_dir = str(tmp_path / "ref")
  proc = _run(_train_cmd(ref_dir, data_dir, "ec,smoke", *steps))
  assert proc.returncode == 0, proc.stderr[-3000:]
  reference = _train_losses(ref_dir)
  assert len(reference) == 80

  workdir = str(tmp_path / "killed")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  child = subprocess.Popen(_train_cmd(workdir, data_dir, "ec,smoke", *steps), cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  try:
    while time.time() < deadline:
      if os.path.isdir(ckpt_dir) and any(d.isdigit() and int(d) >= 20 for d in os.listdir(ckpt_dir)):
        break
      assert child.poll() is None, "training finished before it could be killed"
      time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
  finally:
    child.wait(timeout=60)
  assert child.returncode == -signal.SIGKILL
  finished = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert finished and finished[-1] < 80, finished

  proc = _run(_train_cmd(workdir, data_dir, "ec,smoke", *steps))
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = _train_losses(workdir)
  assert sorted(resumed) == list(range(1, 81))
  assert resumed == reference  # exact float equality: bitwise on CPU


def test_nonfinite_loss_stops_without_checkpointing_bad_state(tmp_path, data_dir):
  workdir = str(tmp_path / "nan")
  proc = _run(_train_cmd(workdir, data_dir, "ec,smoke", "--config.train.optimizer.lr=1e30",
                         "--config.train.optimizer.warmup_steps=0", "--config.train.num_steps=30",
                         "--config.train.checkpoint_every=1", "--config.train.log_every=5"))
  assert proc.returncode != 0
  assert "stopping without saving" in proc.stderr
  bad_step = int(proc.stderr.split(" at step ")[1].split(";")[0])
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert all(s < bad_step for s in saved), (saved, bad_step)


def test_eval_is_reproducible_and_generate_prints_text(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  assert _run(_train_cmd(workdir, data_dir)).returncode == 0
  first = _run(_cli("evaluate", f"--workdir={workdir}"))
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    a = json.load(f)
  second = _run(_cli("evaluate", f"--workdir={workdir}"))
  with open(os.path.join(workdir, "eval.json")) as f:
    b = json.load(f)
  assert a == b and np.isfinite(a["val/ppl_bound"])
  gen = _run(_cli("generate", f"--workdir={workdir}", "--prompt=KING.", "--prompt=To be, or not",
                  "--length=8", "--steps=4"))
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert gen.stdout.count("--- prompt:") == 2
  assert "KING." in gen.stdout and "To be, or not" in gen.stdout
  del second


def test_bad_config_fails_fast_naming_the_field(tmp_path, data_dir):
  proc = _run(_train_cmd(str(tmp_path / "bad"), data_dir, "ec,smoke", "--config.diffusion.schedule=cosine2"))
  assert proc.returncode != 0
  assert "diffusion.schedule='cosine2'" in proc.stderr and "allowed values" in proc.stderr


def test_uniform_kernel_trains_evaluates_and_generates_from_the_cli(tmp_path, data_dir):
  workdir = str(tmp_path / "uniform")
  proc = _run(_train_cmd(workdir, data_dir, "ec,smoke", "--config.diffusion.kernel=uniform",
                         "--config.diffusion.loss=mdlm_elbo", "--config.model.time_embedding=True",
                         "--config.sample.block_size=0", "--config.diffusion.t_sampling=moving_gaussian",
                         "--config.model.moe.dynamic_scaling_factors=(0,1,1.2,1.4,1.6)"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert all(np.isfinite(v) for v in _train_losses(workdir).values())
  ev = _run(_cli("evaluate", f"--workdir={workdir}"))
  assert ev.returncode == 0, ev.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  assert 0 < result["val/nll_per_token"] < 2 * math.log(512)  # a barely trained model: near log N, finite
  gen = _run(_cli("generate", f"--workdir={workdir}", "--prompt=KING.", "--length=8", "--steps=4"))
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert "KING." in gen.stdout


def test_token_choice_bias_balancing_and_maskgit_train_from_the_cli(tmp_path, data_dir):
  workdir = str(tmp_path / "tc_bias")
  proc = _run(_train_cmd(workdir, data_dir, "tc,smoke", "--config.model.moe.bias_update_rate=0.001",
                         "--config.diffusion.loss=maskgit", "--config.diffusion.schedule=cosine"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert all(np.isfinite(v) for v in _train_losses(workdir).values())
  check = _run([sys.executable, "-c", (
      "import sys, numpy as np\n"
      "from sdlm_jax.train.restore import load_trained_model\n"
      "_, _, model, step = load_trained_model(sys.argv[1])\n"
      "bias = np.asarray(model.stacks[-1].blocks.ffn.selection_bias[...])\n"
      "print(step, bias.shape, np.abs(bias).max())\n"
      "assert step == 6 and bias.shape == (2, 4) and np.abs(bias).max() > 0\n"), workdir])
  assert check.returncode == 0, check.stderr[-3000:]  # the biases moved and came back from the checkpoint
  bad = _run(_train_cmd(str(tmp_path / "bad"), data_dir, "ec,smoke", "--config.model.causal=True",
                        "--config.diffusion.loss=ar"))
  assert bad.returncode != 0 and "leaks future tokens" in bad.stderr and "Traceback" not in bad.stderr
