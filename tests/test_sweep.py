"""sdlm-sweep and sdlm-plot: three demo variants at smoke scale, tables and PNGs, resumability."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from sdlm_jax.cli import sweep as sweep_cli
from sdlm_jax.sweep import run_dir, runner, summary

DEMO = "configs/demo.py"
FAST = ["--set", "train.num_steps=3", "--set", "train.checkpoint_every=3", "--set", "eval.num_batches=1"]


def _sweep(*args):
  return subprocess.run([sys.executable, "-m", "sdlm_jax.cli.sweep", *args], capture_output=True, text=True,
                        timeout=600, check=False)


def _png(path):
  data = path.read_bytes()
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_run_names_and_plan_errors(tmp_path):
  assert runner.run_name("configs/demo.py:tc,smoke") == "demo-tc-smoke"
  assert runner.run_name("sweeps/C1e15_L4.py") == "C1e15_L4"
  runs = runner.plan([f"{DEMO}:smoke", f"{DEMO}:ar,smoke"], str(tmp_path), ["train.num_steps=2"])
  assert [r.name for r in runs] == ["demo-smoke", "demo-ar-smoke"]
  assert runs[1].command()[-1] == "--config.train.num_steps=2"
  with pytest.raises(Exception, match="no field 'num_step'"):
    runner.plan([f"{DEMO}:smoke"], str(tmp_path), ["train.num_step=2"])
  with pytest.raises(Exception, match="already has"):
    runner.plan([f"{DEMO}:smoke", f"{DEMO}:smoke"], str(tmp_path), [])
  with pytest.raises(Exception, match="unknown argument"):
    runner.plan([f"{DEMO}:nonsense"], str(tmp_path), [])


def test_bad_input_is_one_line_exit_2(tmp_path):
  for args in (["--workdir", str(tmp_path)], ["--config", "nope/*.py", "--workdir", str(tmp_path)],
               ["--config", f"{DEMO}:smoke", "--workdir", str(tmp_path), "--set", "model.nope=1"]):
    result = _sweep(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("sdlm-sweep: error:"), result.stderr


def test_markdown_table_rounds_and_marks_missing_values():
  row = {c: None for c in summary.COLUMNS} | {"run": "a", "config": "c.py", "status": "finished",
                                              "params_total": 8_400_000, "tokens": 2_048_000, "wall_s": 754.2}
  line = summary.markdown([row]).splitlines()[2]
  assert line.startswith("| a | c.py | finished | 8.4M | – | 2.05M |") and line.endswith("| 12m34s |")


def test_epochs_at_evaluations_between_logged_lines():
  """Per-epoch evaluations fall between the training lines (logged every 20 steps here): their
  epoch is the nearest logged line's scaled by steps (hand case: 2048 tokens/step over 204,800
  unique tokens is 0.01 epochs per step)."""
  train = [{"step": s, "loss": 1.0, "epoch": s * 0.01} for s in range(20, 201, 20)]
  records = run_dir.RunRecords(workdir="w", config=ml_collections.ConfigDict(), train=train, val=[], final_eval=None,
                               sweep=None)
  assert records.epoch_at(100) == pytest.approx(1.0)   # logged
  assert records.epoch_at(99) == pytest.approx(0.99)   # between lines
  assert records.epoch_at(250) == pytest.approx(2.5)   # after the last line
  unlogged = run_dir.RunRecords("w", ml_collections.ConfigDict(), [{"step": 5, "loss": 1.0}], [], None, None)
  assert unlogged.epoch_at(5) is None


@pytest.mark.slow
def test_sweep_of_three_demo_variants_writes_tables_and_plots_and_skips_finished_runs(tmp_path):
  out = tmp_path / "sweep"
  specs = [f"{DEMO}:smoke", f"{DEMO}:tc,smoke", f"{DEMO}:dense,smoke"]
  args = [a for spec in specs for a in ("--config", spec)] + ["--workdir", str(out)] + FAST
  first = _sweep(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = list(csv.DictReader((out / "summary.csv").open()))
  assert [r["run"] for r in rows] == ["demo-smoke", "demo-tc-smoke", "demo-dense-smoke"]
  for row in rows:
    run = out / row["run"]
    eval_json = json.loads((run / "eval.json").read_text())
    assert row["status"] == "finished"
    assert float(row["val_ppl"]) == pytest.approx(eval_json.get("val/ppl_bound", eval_json.get("val/ppl")))
    last_train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)][-1]
    assert float(row["train_loss"]) == pytest.approx(last_train["loss"])
    cfg = json.loads((run / "config.json").read_text())
    assert int(row["tokens"]) == 3 * cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    assert float(row["wall_s"]) > 0
  by_name = {r["run"]: r for r in rows}
  assert by_name["demo-dense-smoke"]["params_total"] == by_name["demo-dense-smoke"]["params_active"]
  assert int(by_name["demo-smoke"]["params_total"]) > int(by_name["demo-smoke"]["params_active"])
  assert (out / "summary.md").read_text().count("\n") == 5
  plots = out / "plots"
  assert _png(plots / "loss_vs_tokens.png") and _png(plots / "val_ppl.png")
  assert _png(plots / "router_load_demo-smoke.png") and _png(plots / "router_load_demo-tc-smoke.png")
  assert not (plots / "router_load_demo-dense-smoke.png").exists()

  again = _sweep(*args)  # everything finished: nothing is retrained
  assert again.returncode == 0 and again.stdout.count(": skipped") == 3, again.stdout
  assert list(csv.DictReader((out / "summary.csv").open())) == rows


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
  """A run killed after its first checkpoint is resumed by the next sweep, not restarted."""
  out = tmp_path / "sweep"
  args = ["--config", f"{DEMO}:smoke", "--workdir", str(out), "--set", "train.checkpoint_every=2",
          "--set", "eval.num_batches=1"]
  run = out / "demo-smoke"
  first = subprocess.Popen([sys.executable, "-m", "sdlm_jax.cli.sweep", *args], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (run / "checkpoints" / "2").exists() and first.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  os.killpg(first.pid, signal.SIGKILL)
  first.wait()
  assert not (run / "eval.json").exists(), "the run finished before it could be interrupted"
  second = _sweep(*args)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "demo-smoke: resuming" in second.stdout
  record = json.loads((run / "sweep_run.json").read_text())
  assert record["status"] == "finished"
  assert json.loads((run / "eval.json").read_text())["step"] == 6
  assert list(csv.DictReader((out / "summary.csv").open()))[0]["status"] == "finished"


def test_glob_specs_expand_sorted(tmp_path):
  for name in ("b.py", "a.py"):
    (tmp_path / name).write_text("")
  assert sweep_cli.expand([f"{tmp_path}/*.py:smoke"]) == [f"{tmp_path}/a.py:smoke", f"{tmp_path}/b.py:smoke"]
