"""Published scaling laws as data, and what they predict.

Three forms, with N = parameters, D = training tokens (repeats included), C = training FLOPs:
  Parametric       L(N, D) = E + A / N^alpha + B / D^beta            (Chinchilla's approach 3)
  Frontier         N_opt(C) = n_coef * C^n_exp, D_opt(C) = d_coef * C^d_exp   (IsoFLOP power laws)
  DataConstrained  L(N, U, e) = A / N^alpha + B / D'^beta, with U unique tokens seen e times and
                   effective data D' = U * e^growth * exp(-(max(0, e - 1) / R)^decay),
                   R = r_coef * U^r_u / N^r_n                          (Quokka's data-constrained law)

FLOPs convention: C = 6 N D, the one both papers fit with. Quokka's Table 2 comes out of its
IsoFLOP laws under it: a model of N parameters is compute-optimal at the C that solves
N_opt(C) = N, and wants D_opt(C) tokens; 1B -> C = (1e9 / 0.0216)^(1 / 0.514) = 5.62e20 and
D = 7.7 * C^0.486 = 93.5B, and 6 N D = 5.61e20 agrees (0.0216 * 7.7 * 6 = 0.998 and the
exponents sum to 1, so the two power laws are one C = 6ND frontier). The exact per-config
count of `sdlm_jax.scaling.flops` (attention scores, LM head) is for planning runs, not for
reading these laws.

Every coefficient lives in LAWS below, with where it was published.
"""

import dataclasses
import math

import numpy as np
from scipy import optimize

FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D: forward 2ND + backward 4ND


@dataclasses.dataclass(frozen=True)
class Parametric:
  """L(N, D) = E + A / N^alpha + B / D^beta."""
  E: float
  A: float
  alpha: float
  B: float
  beta: float

  def loss(self, n, d):
    return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

  def optimum(self, compute):
    """(N, D) minimising L on C = 6ND: N = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))."""
    if not (self.alpha > 0 and self.beta > 0):
      raise ValueError(f"alpha={self.alpha}, beta={self.beta}: no compute-optimal frontier; allowed values: both > 0")
    s = self.alpha + self.beta
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
    n = g * np.power(np.asarray(compute, float) / FLOPS_PER_PARAM_TOKEN, self.beta / s)
    return n, np.asarray(compute, float) / (FLOPS_PER_PARAM_TOKEN * n)


@dataclasses.dataclass(frozen=True)
class Frontier:
  """Compute-optimal allocation: N_opt = n_coef * C^n_exp, D_opt = d_coef * C^d_exp."""
  n_coef: float
  n_exp: float
  d_coef: float
  d_exp: float

  def at_compute(self, compute):
    c = np.asarray(compute, float)
    return self.n_coef * np.power(c, self.n_exp), self.d_coef * np.power(c, self.d_exp)

  def compute_for_params(self, n):
    """The budget at which N parameters are compute-optimal (N_opt inverted)."""
    return np.power(np.asarray(n, float) / self.n_coef, 1.0 / self.n_exp)


@dataclasses.dataclass(frozen=True)
class DataConstrained:
  """L(N, U, e) = A / N^alpha + B / D'(N, U, e)^beta (see the module docstring for D')."""
  A: float
  alpha: float
  B: float
  beta: float
  growth: float   # D' grows as e^growth before repetition wears off
  r_coef: float   # R = r_coef * U^r_u / N^r_n: the epoch scale of the wear-off
  r_u: float
  r_n: float
  decay: float    # stretched-exponential exponent of the wear-off

  def epoch_scale(self, n, u):
    return self.r_coef * np.power(u, self.r_u) / np.power(n, self.r_n)

  def log_effective_data(self, n, u, epochs):
    e = np.asarray(epochs, float)
    worn = np.power(np.maximum(0.0, e - 1.0) / self.epoch_scale(n, u), self.decay)
    return np.log(u) + self.growth * np.log(e) - worn

  def effective_data(self, n, u, epochs):
    return np.exp(self.log_effective_data(n, u, epochs))

  def loss(self, n, u, epochs):
    return self.A / np.power(n, self.alpha) + self.B * np.exp(-self.beta * self.log_effective_data(n, u, epochs))

  def best_epochs(self, n: float, u: float, max_epochs: int | float = 1e6) -> float:
    """The epoch count of lowest predicted loss (= largest D') in [1, max_epochs]: past it every
    further repetition raises the loss. D' need not be unimodal (the wear-off term has an
    infinite slope at e = 1, so D' first dips below U), hence a log grid, then a bounded refine."""
    grid = np.geomspace(1.0, max_epochs, 4000)
    i = int(np.argmax(self.log_effective_data(n, u, grid)))
    if i == 0:
      return 1.0
    lo, hi = grid[i - 1], grid[min(i + 1, len(grid) - 1)]
    res = optimize.minimize_scalar(lambda x: -float(self.log_effective_data(n, u, math.exp(x))),
                                   bounds=(math.log(lo), math.log(hi)), method="bounded",
                                   options={"xatol": 1e-10})
    return float(math.exp(res.x))


@dataclasses.dataclass(frozen=True)
class Law:
  """One paper's laws for one model family (DLM or AR), with their sources."""
  name: str
  family: str                    # dlm | ar
  parametric: Parametric
  frontier: Frontier
  data_constrained: DataConstrained | None
  sources: dict                  # form -> where the numbers were published


# The coefficient table. Quokka: Ni et al., "Training Optimal Large Diffusion Language Models"
# (arXiv 2510.03280). Chinchilla: Hoffmann et al., "Training Compute-Optimal Large Language
# Models" (2022).
LAWS = {
    "quokka": Law(
        name="quokka", family="dlm",
        parametric=Parametric(E=2.413, A=798.6, alpha=0.379, B=4604.9, beta=0.378),
        frontier=Frontier(n_coef=0.0216, n_exp=0.514, d_coef=7.7, d_exp=0.486),
        data_constrained=DataConstrained(A=1535.23, alpha=0.42, B=54.21, beta=0.13, growth=1.49,
                                         r_coef=254.35, r_u=0.39, r_n=0.55, decay=0.40),
        sources={
            "parametric": "Quokka: the parametric fit L(N, D) of its compute-constrained runs",
            "frontier": "Quokka: the IsoFLOP approach's power laws N_opt(C), D_opt(C) (its Table 2 follows from them)",
            "data_constrained": "Quokka: the data-constrained fit of loss against N, unique tokens and epochs",
        }),
    "chinchilla": Law(
        name="chinchilla", family="ar",
        parametric=Parametric(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28),
        # Approach 1: exponents a = b = 0.50 (Chinchilla Table 2); the prefactors put the frontier
        # through its Table 3 row for 1B parameters (1.21e20 FLOPs, 20.2B tokens), i.e. a constant
        # 20.2 tokens per parameter on C = 6ND.
        frontier=Frontier(n_coef=(6 * 20.2) ** -0.5, n_exp=0.5, d_coef=(20.2 / 6) ** 0.5, d_exp=0.5),
        data_constrained=None,
        sources={
            "parametric": "Chinchilla: approach 3 (parametric fit, Huber loss, L-BFGS)",
            "frontier": "Chinchilla: approach 1 exponents (Table 2) through its Table 3 1B row (20.2 tokens/param)",
        }),
}
FAMILY_LAW = {"dlm": "quokka", "ar": "chinchilla"}


def get_law(name: str) -> Law:
  if name not in LAWS:
    raise ValueError(f"law={name!r}; allowed values: {', '.join(LAWS)}")
  return LAWS[name]


def allocation(law: Law, compute: float) -> dict:
  """Compute-optimal N, D at C from the law's IsoFLOP frontier and from its parametric law,
  each with tokens per parameter and the parametric loss there."""
  rows = {}
  methods = {"isoflop": law.frontier.at_compute(compute), "parametric": law.parametric.optimum(compute)}
  for method, (n, d) in methods.items():
    n, d = float(n), float(d)
    rows[method] = {"params": n, "tokens": d, "tokens_per_param": d / n, "loss": float(law.parametric.loss(n, d)),
                    "compute": float(compute)}
  return rows


def optimal_for_params(law: Law, params: float) -> dict:
  """The budget at which `params` is compute-optimal on the IsoFLOP frontier, and its D."""
  compute = float(law.frontier.compute_for_params(params))
  _, tokens = law.frontier.at_compute(compute)
  tokens = float(tokens)
  return {"params": float(params), "tokens": tokens, "tokens_per_param": tokens / params, "compute": compute,
          "compute_6nd": FLOPS_PER_PARAM_TOKEN * params * tokens, "loss": float(law.parametric.loss(params, tokens))}


def epochs_curve(law: Law, params: float, unique: float, epochs) -> list[dict]:
  """Predicted loss and effective data at each epoch count for U unique tokens."""
  dc = law.data_constrained
  if dc is None:
    raise ValueError(f"law={law.name!r} has no data-constrained form; allowed values: "
                     f"{', '.join(k for k, v in LAWS.items() if v.data_constrained)}")
  return [{"epochs": float(e), "tokens": float(unique * e),
           "effective_tokens": float(dc.effective_data(params, unique, e)),
           "loss": float(dc.loss(params, unique, e))} for e in epochs]
