"""Interval summaries and the metrics.jsonl writer (including truncation on resume)."""

import json

import numpy as np

from sdlm_jax.train.metrics import MetricsWriter, first_nonfinite, summarize


def test_summarize_means_and_bucket_losses():
  steps = [
      {"loss": 2.0, "load": np.array([0.5, 0.5]), "t_bucket_loss_sum": np.array([4.0, 0.0]),
       "t_bucket_count": np.array([2.0, 0.0])},
      {"loss": 4.0, "load": np.array([1.0, 0.0]), "t_bucket_loss_sum": np.array([2.0, 9.0]),
       "t_bucket_count": np.array([2.0, 3.0])},
  ]
  out = summarize(steps)
  assert out["loss"] == 3.0
  assert out["load"] == [0.75, 0.25]
  assert out["loss_t0.00-0.50"] == 1.5 and out["loss_t0.50-1.00"] == 3.0


def test_first_nonfinite_finds_first_bad_step():
  ok = {"total_loss": 1.0, "grad_norm": 1.0}
  assert first_nonfinite([ok, ok]) is None
  assert first_nonfinite([ok, {"total_loss": float("nan"), "grad_norm": 1.0}, ok]) == 1
  assert first_nonfinite([ok, ok, {"total_loss": 1.0, "grad_norm": float("inf")}]) == 2


def test_writer_appends_and_truncates_on_resume(tmp_path):
  w = MetricsWriter(str(tmp_path))
  for s in (10, 20, 30):
    w.write(s, {"loss": float(s)})
  w.close()
  w = MetricsWriter(str(tmp_path), resume_step=20)
  w.write(30, {"loss": 3.5})
  w.close()
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(x["step"], x["loss"]) for x in lines] == [(10, 10.0), (20, 20.0), (30, 3.5)]
  assert any((tmp_path / "tensorboard").iterdir())
