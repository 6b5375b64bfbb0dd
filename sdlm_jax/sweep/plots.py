"""PNG figures of one or several runs: training loss against tokens, validation perplexity bound
against tokens and epochs, and each MoE run's router load per expert per layer."""

import numpy as np

from sdlm_jax.plotting import pyplot, save
from sdlm_jax.sweep.run_dir import RunRecords, val_ppl


def loss_vs_tokens(runs: dict[str, RunRecords], path: str) -> str:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, run in runs.items():
    steps = np.array([m["step"] for m in run.train], float)
    ax.plot(steps * run.tokens_per_step, [m["loss"] for m in run.train], label=name, lw=1.2)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("training loss (nats/token)")
  ax.set_title("training loss")
  ax.legend(fontsize=8)
  return save(fig, path)


def val_ppl_curves(runs: dict[str, RunRecords], path: str) -> str:
  """The validation perplexity (bound) at every evaluation, against tokens and epochs."""
  plt = pyplot()
  fig, (by_tokens, by_epochs) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
  for name, run in runs.items():
    points = [m for m in run.val if val_ppl(m) is not None]
    if not points:
      continue
    tokens = [m["step"] * run.tokens_per_step for m in points]
    ppl = [val_ppl(m) for m in points]
    by_tokens.plot(tokens, ppl, "o-", label=name, ms=3)
    epochs = [run.epoch_at(m["step"]) for m in points]
    if all(e is not None for e in epochs):
      by_epochs.plot(epochs, ppl, "o-", label=name, ms=3)
  by_tokens.set_xlabel("training tokens")
  by_epochs.set_xlabel("epochs of the training data")
  by_tokens.set_ylabel("validation perplexity (diffusion: ELBO bound)")
  for ax in (by_tokens, by_epochs):
    ax.set_yscale("log")
    ax.legend(fontsize=8)
  fig.suptitle("validation perplexity")
  return save(fig, path)


def router_load(name: str, run: RunRecords, path: str, last: int = 10) -> str | None:
  """Heatmap of each expert's share of routed slots per layer, averaged over the last `last`
  logged steps (1/E everywhere is perfect balance; expert choice is balanced by construction)."""
  loads = [m["router/expert_load_per_layer"] for m in run.train[-last:] if "router/expert_load_per_layer" in m]
  if not loads:
    return None
  load_LxE = np.mean(np.asarray(loads, float), axis=0)
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(1.6 + 0.45 * load_LxE.shape[1], 1.4 + 0.4 * load_LxE.shape[0]))
  image = ax.imshow(load_LxE, cmap="viridis", aspect="auto")
  fig.colorbar(image, ax=ax, label="share of routed slots")
  ax.set_xticks(range(load_LxE.shape[1]))
  ax.set_yticks(range(load_LxE.shape[0]))
  ax.set_xlabel("expert")
  ax.set_ylabel("MoE layer")
  ax.set_title(f"{name}: router load (1/E = {1 / load_LxE.shape[1]:.3g} is balanced)", fontsize=9)
  return save(fig, path)


def plot_runs(runs: dict[str, RunRecords], out_dir: str) -> list[str]:
  """Every figure for `runs` into out_dir; returns the files written."""
  files = [loss_vs_tokens(runs, f"{out_dir}/loss_vs_tokens.png"),
           val_ppl_curves(runs, f"{out_dir}/val_ppl.png")]
  for name, run in runs.items():
    if run.is_moe:
      heatmap = router_load(name, run, f"{out_dir}/router_load_{name}.png")
      if heatmap:
        files.append(heatmap)
  return files
