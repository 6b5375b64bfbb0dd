"""Fitting scaling laws to training runs: Chinchilla's approaches 3 (parametric) and 2 (IsoFLOP).

Parametric (approach 3): L(N, D) = E + A/N^alpha + B/D^beta, fitted in log space as
  min over (a, b, e, alpha, beta) of  mean_i Huber_delta(LSE(a - alpha ln N_i, b - beta ln D_i, e) - ln L_i)
with A = exp(a), B = exp(b), E = exp(e) and delta = 1e-3, by L-BFGS (alpha, beta >= 0). The objective is
evaluated on Chinchilla's whole grid of starts (alpha, beta in 0..2 by 0.5, e in -1..1 by 0.5,
a, b in 0..25 by 5: 4500 points) and L-BFGS is run from the `starts` best of them. Bootstrap
intervals resample the runs with replacement and refit from the full fit's optimum; they are
percentile intervals.

IsoFLOP (approach 2): runs are grouped by budget (the `budget` column when present, else by
C = 6ND, a new group wherever sorted log10 C jumps by more than 0.15); per budget, a parabola
in ln N (and one in ln D) through the losses gives the loss-optimal N (D), kept only when it
lies within the sizes run (a minimum off the sweep's edge is an extrapolation); power laws
N_opt = k C^a and D_opt = k' C^b are then fitted through those minima by least squares in log space.
"""

import csv
import dataclasses

import numpy as np
from scipy import optimize

from sdlm_jax.scaling import laws

HUBER_DELTA = 1e-3
GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 1.01, 0.5),
        "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}
BUDGET_GAP_DECADES = 0.15
REQUIRED_COLUMNS = ("params", "tokens", "loss")
OPTIONAL_COLUMNS = ("unique_tokens", "epochs", "budget")


@dataclasses.dataclass
class Runs:
  """Training runs, one entry per run; optional columns are None when the CSV lacks them."""
  params: np.ndarray
  tokens: np.ndarray
  loss: np.ndarray
  unique_tokens: np.ndarray | None = None
  epochs: np.ndarray | None = None
  budget: np.ndarray | None = None

  def select(self, keep):
    return Runs(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[keep]
                   for f in dataclasses.fields(self)})

  def single_epoch(self):
    """The runs that saw no token twice (all of them when the CSV has no epochs column)."""
    return self if self.epochs is None else self.select(self.epochs <= 1.0 + 1e-9)


def _from_sweep_summary(rows: list[dict]) -> list[dict]:
  """An sdlm-sweep summary.csv as runs: N = active parameters, D = training tokens, L = the
  validation loss ln(val ppl) (a diffusion model's ELBO bound); unfinished runs and runs without one are left out."""
  return [{"params": r["params_active"], "tokens": r["tokens"], "loss": str(np.log(float(r["val_ppl"]))),
           "epochs": r.get("epochs", "")}
          for r in rows if r.get("status") == "finished" and r.get("val_ppl")]


def read_runs(path: str) -> Runs:
  """Reads a runs CSV: columns params,tokens,loss and optionally unique_tokens,epochs,budget, or
  an sdlm-sweep summary.csv (see _from_sweep_summary)."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if rows and "params_active" in rows[0] and "params" not in rows[0]:
    rows = _from_sweep_summary(rows)
    if rows and not all(r["epochs"] for r in rows):
      rows = [{k: v for k, v in r.items() if k != "epochs"} for r in rows]
  header = list(rows[0]) if rows else []
  missing = [c for c in REQUIRED_COLUMNS if c not in header]
  if missing:
    raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; allowed columns: "
                     f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)} (the first three required)")
  cols = {}
  for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
    if name not in header:
      continue
    try:
      cols[name] = np.array([float(r[name]) for r in rows])
    except (TypeError, ValueError):
      raise ValueError(f"{path}: column {name} holds a non-number; allowed values: positive numbers") from None
    if not np.all(cols[name] > 0):
      raise ValueError(f"{path}: column {name} holds a value <= 0; allowed values: positive numbers")
  if "epochs" not in cols and "unique_tokens" in cols:
    cols["epochs"] = cols["tokens"] / cols["unique_tokens"]
  return Runs(**cols)


# ---------------------------------------------------------------- parametric (approach 3)

def _huber(r, delta):
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)) / delta


def _objective(theta, log_n, log_d, log_l, delta):
  """Mean Huber loss (scaled by 1/delta) of the log-space residuals, and its gradient."""
  a, b, e, alpha, beta = theta
  u = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  top = u.max(axis=0)
  w = np.exp(u - top)
  total = w.sum(axis=0)
  r = top + np.log(total) - log_l
  w = w / total
  dr = np.clip(r, -delta, delta) / delta / len(r)
  grad = np.array([dr @ w[0], dr @ w[1], dr @ w[2], -(dr * w[0]) @ log_n, -(dr * w[1]) @ log_d])
  return float(_huber(r, delta).mean()), grad


def _grid_starts(log_n, log_d, log_l, delta, count):
  """The `count` grid points of lowest objective, as (a, b, e, alpha, beta) rows."""
  g = np.stack(np.meshgrid(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"], indexing="ij"), -1)
  g = g.reshape(-1, 5)
  u1 = g[:, 0:1] - g[:, 3:4] * log_n
  u2 = g[:, 1:2] - g[:, 4:5] * log_d
  pred = np.logaddexp(np.logaddexp(u1, u2), g[:, 2:3])
  scores = _huber(pred - log_l, delta).mean(axis=1)
  return g[np.argsort(scores)[:count]]


_BOUNDS = [(None, None)] * 3 + [(0.0, None)] * 2  # a, b, e free; alpha, beta >= 0 (loss falls with N and D)


def _minimize(starts, log_n, log_d, log_l, delta):
  best = None
  for x0 in starts:
    res = optimize.minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                            bounds=_BOUNDS, options={"maxiter": 10000, "ftol": 1e-14, "gtol": 1e-10})
    if best is None or res.fun < best.fun:
      best = res
  return best.x, float(best.fun)


def _to_law(theta) -> laws.Parametric:
  a, b, e, alpha, beta = (float(v) for v in theta)
  return laws.Parametric(E=float(np.exp(e)), A=float(np.exp(a)), alpha=alpha, B=float(np.exp(b)), beta=beta)


@dataclasses.dataclass
class ParametricFit:
  law: laws.Parametric
  objective: float
  num_runs: int
  intervals: dict          # coefficient -> (low, high); also the frontier exponents n_exp, d_exp
  samples: np.ndarray      # bootstrap coefficient rows (E, A, alpha, B, beta)
  level: float


COEFFICIENTS = ("E", "A", "alpha", "B", "beta")


def _row(law: laws.Parametric):
  return [getattr(law, k) for k in COEFFICIENTS]


def fit_parametric(params, tokens, loss, *, starts: int = 16, bootstrap: int = 200, level: float = 0.95,
                   seed: int = 0, delta: float = HUBER_DELTA) -> ParametricFit:
  """Fits L(N, D) (approach 3) and bootstrap percentile intervals at `level`."""
  log_n, log_d, log_l = np.log(params), np.log(tokens), np.log(loss)
  if len(log_n) < 6:
    raise ValueError(f"{len(log_n)} runs; the parametric law has 5 coefficients: allowed values: >= 6 runs")
  theta, objective = _minimize(_grid_starts(log_n, log_d, log_l, delta, starts), log_n, log_d, log_l, delta)
  law = _to_law(theta)
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    idx = rng.integers(0, len(log_n), len(log_n))
    t, _ = _minimize([theta], log_n[idx], log_d[idx], log_l[idx], delta)
    samples.append(_row(_to_law(t)))
  samples = np.array(samples).reshape(-1, len(COEFFICIENTS))
  intervals = {}
  if bootstrap:
    q = [50 * (1 - level), 50 * (1 + level)]
    for i, k in enumerate(COEFFICIENTS):
      intervals[k] = tuple(np.percentile(samples[:, i], q))
    alpha, beta = samples[:, 2], samples[:, 4]
    with np.errstate(invalid="ignore"):  # alpha = beta = 0 (a flat fit) has no frontier: nan
      intervals["n_exp"] = tuple(np.percentile(beta / (alpha + beta), q))
      intervals["d_exp"] = tuple(np.percentile(alpha / (alpha + beta), q))
  return ParametricFit(law, objective, len(log_n), intervals, samples, level)


# ---------------------------------------------------------------- IsoFLOP (approach 2)

@dataclasses.dataclass
class IsoflopBudget:
  """One budget's runs, the parabolas' minima, and the loss at the N minimum."""
  compute: float
  params: np.ndarray
  tokens: np.ndarray
  loss: np.ndarray
  n_parabola: np.ndarray   # loss = p[0] x^2 + p[1] x + p[2], x = ln N
  d_parabola: np.ndarray   # the same in ln D
  params_opt: float
  tokens_opt: float
  loss_opt: float


@dataclasses.dataclass
class IsoflopFit:
  budgets: list
  frontier: laws.Frontier
  skipped: list            # (compute, why) for budgets left out


def group_budgets(runs: Runs) -> list:
  """Index arrays of the runs in each budget, by ascending compute, with each group's compute."""
  if runs.budget is not None:
    values = np.unique(runs.budget)
    return [(float(c), np.flatnonzero(runs.budget == c)) for c in values]
  c = laws.FLOPS_PER_PARAM_TOKEN * runs.params * runs.tokens
  order = np.argsort(c)
  log_c = np.log10(c[order])
  cuts = np.flatnonzero(np.diff(log_c) > BUDGET_GAP_DECADES) + 1
  groups = np.split(order, cuts)
  return [(float(np.exp(np.mean(np.log(c[g])))), g) for g in groups]


def _parabola_min(x, y):
  p = np.polyfit(x, y, 2)
  if p[0] <= 0:
    return p, None
  return p, -p[1] / (2 * p[0])


def fit_isoflop(runs: Runs) -> IsoflopFit:
  """Parabola minima per budget, then power laws through them (needs >= 2 budgets of >= 3 sizes)."""
  budgets, skipped = [], []
  for compute, idx in group_budgets(runs):
    n, d, l = runs.params[idx], runs.tokens[idx], runs.loss[idx]
    if len(np.unique(n)) < 3:
      skipped.append((compute, f"{len(np.unique(n))} model size(s); a parabola needs >= 3"))
      continue
    pn, xn = _parabola_min(np.log(n), l)
    pd, xd = _parabola_min(np.log(d), l)
    if xn is None or xd is None:
      skipped.append((compute, "the losses do not curve upward around a minimum"))
      continue
    if not (np.log(n.min()) <= xn <= np.log(n.max()) and np.log(d.min()) <= xd <= np.log(d.max())):
      skipped.append((compute, "the parabola's minimum lies outside the sizes run (an extrapolation)"))
      continue
    budgets.append(IsoflopBudget(compute, n, d, l, pn, pd, float(np.exp(xn)), float(np.exp(xd)),
                                 float(np.polyval(pn, xn))))
  if len(budgets) < 2:
    why = "; ".join(f"C = {c:.3g}: {reason}" for c, reason in skipped)
    raise ValueError(f"{len(budgets)} usable IsoFLOP budget(s) ({why or 'no other budgets'}); allowed values: "
                     ">= 2 budgets of >= 3 model sizes each, minimum inside the sizes run")
  log_c = np.log([b.compute for b in budgets])
  n_exp, n_log_coef = np.polyfit(log_c, np.log([b.params_opt for b in budgets]), 1)
  d_exp, d_log_coef = np.polyfit(log_c, np.log([b.tokens_opt for b in budgets]), 1)
  frontier = laws.Frontier(n_coef=float(np.exp(n_log_coef)), n_exp=float(n_exp), d_coef=float(np.exp(d_log_coef)),
                           d_exp=float(d_exp))
  return IsoflopFit(budgets, frontier, skipped)
