"""Scaling laws: Quokka's Table 2 from its published coefficients, the fits on synthetic runs of
a known law, IsoFLOP sweep configs that sdlm-train loads, and the sdlm-scaling CLI."""

import csv
import json
import math
import os
import subprocess
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny L-BFGS problems: BLAS threads only slow them down

import numpy as np
import pytest

from sdlm_jax.config_files import repo_module
from sdlm_jax.scaling import fit, laws, plan
from sdlm_jax.scaling.flops import flops_per_token, param_counts

demo = repo_module("demo")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUOKKA, CHINCHILLA = laws.LAWS["quokka"], laws.LAWS["chinchilla"]


# ---------------------------------------------------------------- published laws

@pytest.mark.parametrize("params, compute, tokens", [(1e9, 5.62e20, 93.5e9), (10e9, None, 825e9)])
def test_quokka_table2_from_published_coefficients(params, compute, tokens):
  row = laws.optimal_for_params(QUOKKA, params)
  assert row["tokens"] == pytest.approx(tokens, rel=0.05)
  if compute:
    assert row["compute"] == pytest.approx(compute, rel=0.05)
  # The two IsoFLOP power laws are one C = 6ND frontier.
  assert row["compute_6nd"] == pytest.approx(row["compute"], rel=0.01)


def test_chinchilla_1b_row_and_dlms_want_more_data_per_parameter():
  row = laws.optimal_for_params(CHINCHILLA, 1e9)
  assert row["tokens"] == pytest.approx(20.2e9, rel=0.05)  # Quokka's Table 2 quotes Chinchilla's 20.2B
  assert row["compute"] == pytest.approx(1.21e20, rel=0.05)  # Chinchilla's Table 3
  for compute in np.geomspace(1e20, 1e25, 6):  # Table 2's range: 5.6e20 FLOPs (1B) and up
    dlm = laws.allocation(QUOKKA, compute)["isoflop"]
    ar = laws.allocation(CHINCHILLA, compute)["isoflop"]
    assert 2 <= dlm["tokens_per_param"] / ar["tokens_per_param"] <= 5


@pytest.mark.parametrize("name", list(laws.LAWS))
def test_parametric_optimum_matches_a_brute_force_search(name):
  law = laws.LAWS[name].parametric
  for compute in (1e19, 1e23):
    n = np.geomspace(1e6, 1e13, 200_001)
    reference = n[np.argmin(law.loss(n, compute / (6 * n)))]
    n_opt, d_opt = law.optimum(compute)
    assert n_opt == pytest.approx(reference, rel=1e-3)
    assert 6 * n_opt * d_opt == pytest.approx(compute)


def test_data_constrained_example_1b_params_on_1b_unique_tokens():
  """The example: N = 1B parameters repeating U = 1B unique tokens for up to 500 epochs."""
  dc = QUOKKA.data_constrained
  n = u = 1e9

  def hand(e):  # the published formula, written out independently
    r = 254.35 * u ** 0.39 / n ** 0.55
    d_eff = u * e ** 1.49 * math.exp(-(max(0.0, e - 1) / r) ** 0.40)
    return 1535.23 / n ** 0.42 + 54.21 / d_eff ** 0.13

  for e in (1, 2, 4, 16, 96, 500):
    assert float(dc.loss(n, u, e)) == pytest.approx(hand(e), rel=1e-9)
  assert hand(1) == pytest.approx(3.920, abs=1e-3)
  grid = np.arange(1.0, 500.0, 0.1)
  reference = grid[np.argmin([hand(e) for e in grid])]
  best = dc.best_epochs(n, u, 500)
  assert best == pytest.approx(reference, abs=0.2)
  assert best == pytest.approx(245.8, abs=0.5)
  assert hand(best) < hand(best - 20) and hand(best) < hand(best + 20)
  assert float(dc.loss(n, u, best)) == pytest.approx(2.299, abs=1e-3)


def test_hardware_compute_of_a_v5p_slice():
  hw = plan.hardware_compute("v5p-256", days=30, mfu=0.5)
  assert hw["chips"] == 128  # v5p accelerator types count TensorCores, two per chip
  assert hw["compute"] == pytest.approx(128 * 459e12 * 0.5 * 30 * 86_400)
  with pytest.raises(ValueError, match="mfu"):
    plan.hardware_compute("v5p-256", days=30, mfu=1.5)


# ---------------------------------------------------------------- fits on synthetic runs

def _synthetic_runs(law, noise, seed=0):
  """An IsoFLOP-style design (9 budgets x 9 sizes around the law's optimum), losses from `law`
  times lognormal noise of relative size `noise`."""
  rng = np.random.default_rng(seed)
  n, d, c = [], [], []
  for compute in np.geomspace(1e18, 1e22, 9):
    n_opt, _ = law.optimum(compute)
    for factor in np.geomspace(0.1, 10, 9):
      n.append(n_opt * factor)
      d.append(compute / (6 * n_opt * factor))
      c.append(compute)
  n, d, c = map(np.array, (n, d, c))
  return n, d, law.loss(n, d) * np.exp(rng.normal(0.0, noise, len(n))), c


def test_parametric_fit_recovers_the_law_and_its_intervals_cover_it():
  truth = QUOKKA.parametric
  n, d, loss, _ = _synthetic_runs(truth, noise=0.001)  # 0.1% loss noise
  fitted = fit.fit_parametric(n, d, loss, bootstrap=100, seed=1)
  for k in fit.COEFFICIENTS:
    value, (lo, hi) = getattr(truth, k), fitted.intervals[k]
    assert getattr(fitted.law, k) == pytest.approx(value, rel=0.05), k
    assert lo <= value <= hi, (k, lo, value, hi)
    assert hi - lo < 0.2 * value, (k, lo, hi)  # an interval that says something


def test_isoflop_fit_recovers_the_generating_laws_frontier():
  truth = CHINCHILLA.parametric  # a frontier exponent (0.45) unlike Quokka's, so nothing is hard-wired
  n, d, loss, c = _synthetic_runs(truth, noise=0.0)
  iso = fit.fit_isoflop(fit.Runs(n, d, loss, budget=c))
  assert len(iso.budgets) == 9
  n_exp = truth.beta / (truth.alpha + truth.beta)
  assert iso.frontier.n_exp == pytest.approx(n_exp, rel=0.02)
  assert iso.frontier.d_exp == pytest.approx(1 - n_exp, rel=0.02)
  for b in iso.budgets:
    n_opt, d_opt = truth.optimum(b.compute)
    assert b.params_opt == pytest.approx(n_opt, rel=0.05)
    assert b.tokens_opt == pytest.approx(d_opt, rel=0.05)
  # Without a budget column the runs are grouped by 6ND: the same nine groups.
  assert [len(idx) for _, idx in fit.group_budgets(fit.Runs(n, d, loss))] == [9] * 9


def test_isoflop_fit_refuses_minima_off_the_sweeps_edge():
  truth = QUOKKA.parametric
  n, d, c = [], [], []
  for compute in (1e19, 1e20, 1e21):
    n_opt, _ = truth.optimum(compute)
    for factor in (3, 6, 12, 24):  # every size above the optimum: loss rises monotonically with N
      n.append(n_opt * factor)
      d.append(compute / (6 * n_opt * factor))
      c.append(compute)
  n, d, c = map(np.array, (n, d, c))
  with pytest.raises(ValueError, match="outside the sizes run"):
    fit.fit_isoflop(fit.Runs(n, d, truth.loss(n, d), budget=c))


def test_a_sweep_summary_reads_as_runs(tmp_path):
  """sdlm-sweep's summary.csv feeds the fits: N = active params, D = tokens, L = ln(val ppl bound)."""
  from sdlm_jax.sweep import summary  # pylint: disable=import-outside-toplevel
  rows = [{c: None for c in summary.COLUMNS} | dict(run=f"r{i}", config="c.py", status=status, params_total=2 * n,
                                                    params_active=n, tokens=d, epochs=0.5, val_ppl=ppl)
          for i, (status, n, d, ppl) in enumerate([("finished", 1e6, 2e7, 150.0), ("step 3/10", 2e6, 6e6, 300.0),
                                                    ("finished", 4e6, 5e6, 120.0)])]
  summary.write(rows, tmp_path)
  runs = fit.read_runs(str(tmp_path / "summary.csv"))
  np.testing.assert_allclose(runs.params, [1e6, 4e6])
  np.testing.assert_allclose(runs.tokens, [2e7, 5e6])
  np.testing.assert_allclose(runs.loss, np.log([150.0, 120.0]))
  np.testing.assert_allclose(runs.epochs, [0.5, 0.5])


def _sdlm_scaling(*args):
  return subprocess.run([sys.executable, "-m", "sdlm_jax.cli.scaling", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)


def test_fit_cli_prints_coefficients_and_writes_plots(tmp_path):
  n, d, loss, _ = _synthetic_runs(QUOKKA.parametric, noise=0.001)
  path = tmp_path / "runs.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["params", "tokens", "loss"])
    w.writerows(zip(n, d, loss))
  proc = _sdlm_scaling("fit", "--runs", str(path), "--bootstrap", "20", "--out", str(tmp_path / "plots"))
  assert proc.returncode == 0, proc.stderr
  fitted = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in fit.COEFFICIENTS}
  assert fitted["alpha"] == pytest.approx(QUOKKA.parametric.alpha, rel=0.05)
  assert "IsoFLOP fit: 9 budgets" in proc.stdout
  for name in ("isoflop.png", "frontier.png"):
    with open(tmp_path / "plots" / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- IsoFLOP sweep planning

def test_demo_config_is_on_its_own_size_family():
  model = demo.get_config("ec").model
  assert plan.family_model(model, 4).to_dict() == model.to_dict()
  m = plan.family_model(model, 10)
  assert (m.num_heads, m.num_kv_heads, m.d_model, m.mlp_dim, m.moe.expert_mlp_dim) == (10, 5, 640, 1920, 640)
  with pytest.raises(ValueError, match="multiples"):
    plan.family_model(model, 3)  # 3 heads cannot share kv heads in pairs


def _load_like_sdlm_train(path):
  """The config as sdlm-train's --config flag builds it (ml_collections config_flags), as JSON."""
  code = ("import sys; from absl import flags; from ml_collections import config_flags; "
          "c = config_flags.DEFINE_config_file('config', lock_config=True); flags.FLAGS(['x', '--config', sys.argv[1]]); "
          "print(c.value.to_json())")
  proc = subprocess.run([sys.executable, "-c", code, path], cwd=REPO, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout)


def test_isoflop_cli_writes_configs_sdlm_train_loads_at_the_budget(tmp_path):
  base = "configs/demo.py:ec,smoke"
  proc = _sdlm_scaling("isoflop", "--budgets", "1e12,3e12", "--sizes", "3", "--base", base, "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  with open(tmp_path / plan.MANIFEST) as f:
    points = json.load(f)["points"]
  assert len(points) == 6
  base_cfg = demo.get_config("ec,smoke")
  batch_tokens = base_cfg.train.batch_size * base_cfg.data.seq_len
  for p in points:
    cfg = _load_like_sdlm_train(str(tmp_path / p["config"]))
    m = cfg["model"]
    assert (m["num_layers"], m["num_heads"], m["d_model"]) == (p["layers"], p["layers"], p["layers"] * 32)
    assert cfg["train"]["num_steps"] == p["steps"]
    assert cfg["data"] == base_cfg.data.to_dict() and cfg["diffusion"] == base_cfg.diffusion.to_dict()
    # Exact FLOPs (sdlm_jax.scaling.flops, recomputed from the loaded config) hit the budget up to one step.
    model = plan.family_model(base_cfg.model, p["layers"])
    assert param_counts(model)["active"] == p["params"]
    flops = p["steps"] * batch_tokens * flops_per_token(model, base_cfg.data.seq_len)
    assert flops == pytest.approx(p["flops"])
    assert abs(flops / p["budget"] - 1) <= 0.5 / p["steps"] + 1e-12


def test_isoflop_head_dim_sets_the_family_width(tmp_path):
  proc = _sdlm_scaling("isoflop", "--budgets", "2e12", "--sizes", "3", "--base", "configs/demo.py:dense",
                       "--head_dim", "16", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  with open(tmp_path / plan.MANIFEST) as f:
    points = json.load(f)["points"]
  assert [p["layers"] for p in points] == [2, 4, 6]
  for p in points:
    m = plan.load_config_file(str(tmp_path / p["config"])).model
    assert (m.head_dim, m.num_heads, m.num_kv_heads, m.d_model) == (16, p["layers"], p["layers"] // 2, p["layers"] * 16)
    assert m.mlp_dim == 3 * m.d_model  # the demo's FFN ratio
    assert p["d_model"] == m.d_model and param_counts(m)["active"] == p["params"]


def test_isoflop_kv_group_makes_every_depth_a_member(tmp_path):
  proc = _sdlm_scaling("isoflop", "--budgets", "1e12", "--sizes", "4", "--base", "configs/demo.py:dense",
                       "--head_dim", "8", "--kv_group", "1", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  with open(tmp_path / plan.MANIFEST) as f:
    points = json.load(f)["points"]
  assert [p["layers"] for p in points] == [1, 2, 3, 4]  # with the demo's group of 2: 2, 4, 6, 8
  for p in points:
    m = plan.load_config_file(str(tmp_path / p["config"])).model
    assert (m.num_heads, m.num_kv_heads, m.d_model) == (p["layers"], p["layers"], p["layers"] * 8)


# ---------------------------------------------------------------- CLI errors

@pytest.mark.parametrize("args, flag", [
    (["allocate", "--compute", "lots"], "--compute"),
    (["allocate", "--unique", "1B"], "--unique"),
    (["allocate", "--chips", "v5p-7", "--days", "1", "--mfu", "0.5"], "--chips"),
    (["fit", "--runs", "/nonexistent/runs.csv"], "--runs"),
    (["isoflop", "--budgets", "1e17", "--sizes", "0", "--base", "configs/demo.py", "--out", "/tmp/x"], "--sizes"),
    (["isoflop", "--budgets", "1e17", "--sizes", "2", "--base", "configs/demo.py", "--head_dim", "0", "--out", "/tmp/x"],
     "--head_dim"),
    (["isoflop", "--budgets", "1e17", "--sizes", "2", "--base", "configs/demo.py", "--kv_group", "3", "--out", "/tmp/x"],
     "--kv_group"),
])
def test_cli_errors_are_one_line_naming_the_flag(args, flag):
  proc = _sdlm_scaling(*args)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and flag in lines[0] and "allowed" in lines[0], proc.stderr
