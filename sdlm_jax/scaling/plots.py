"""PNG plots of a scaling fit: the IsoFLOP curves and the compute-optimal frontier.

matplotlib is imported on first use (sdlm_jax.plotting), so the fits work without loading it.
"""

import numpy as np

from sdlm_jax.plotting import pyplot, save
from sdlm_jax.scaling import laws


def plot_isoflop(iso, path: str) -> str:
  """Loss against N per budget, each with its parabola and its minimum."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(iso.budgets)))
  for budget, color in zip(iso.budgets, colors):
    ax.scatter(budget.params, budget.loss, color=color, s=18, label=f"C = {budget.compute:.2g}")
    x = np.linspace(np.log(budget.params.min()), np.log(budget.params.max()), 100)
    ax.plot(np.exp(x), np.polyval(budget.n_parabola, x), color=color, lw=1)
    ax.scatter([budget.params_opt], [budget.loss_opt], color=color, marker="*", s=120, edgecolor="k", zorder=3)
  ax.set_xscale("log")
  ax.set_xlabel("parameters N")
  ax.set_ylabel("loss")
  ax.set_title("IsoFLOP curves (parabola in ln N per budget; stars: minima)")
  ax.legend(fontsize=8)
  return save(fig, path)


def plot_frontier(iso, parametric, path: str, reference: laws.Law | None = None) -> str:
  """N_opt(C) and D_opt(C): IsoFLOP minima, the power laws through them, the fitted parametric
  law's optimum, and a published law's IsoFLOP frontier for reference."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  budgets = iso.budgets if iso else []
  computes = [b.compute for b in budgets]
  lo, hi = (min(computes) / 3, max(computes) * 3) if computes else (1e17, 1e22)
  c = np.geomspace(lo, hi, 100)
  curves = []
  if iso:
    f = iso.frontier
    curves.append((f.at_compute(c), "-", f"IsoFLOP fit: N ~ C^{f.n_exp:.3f}, D ~ C^{f.d_exp:.3f}"))
  if parametric is not None and parametric.alpha > 0 and parametric.beta > 0:
    curves.append((parametric.optimum(c), "--", "parametric fit's optimum"))
  if reference is not None:
    curves.append((reference.frontier.at_compute(c), ":", f"{reference.name} (published)"))
  for i, (ax, label) in enumerate(zip(axes, ("N_opt (parameters)", "D_opt (tokens)"))):
    for values, style, name in curves:
      ax.plot(c, values[i], style, label=name)
    if budgets:
      ax.scatter(computes, [b.params_opt if i == 0 else b.tokens_opt for b in budgets], color="k", zorder=3,
                 label="IsoFLOP minima")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  fig.suptitle("compute-optimal frontier")
  return save(fig, path)

