"""Quokka's modelling and optimisation ablations on its 1B DLM: 96B tokens, one epoch.

The model is Quokka's 1B "gpt2" shape (26 layers, d 1792, 14 heads, SwiGLU 4736, tied
embeddings, vocab 50269; sdlm_jax.recipes.gpt2_1b) with the seeds' shared training setup
(AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, lr 2e-4, WSD, batch 256 x 2048). Quokka
published the logs of every arm; its conclusions are in its paper, not in the seeds, so the
arms are listed without a claimed winner.

Variants (the argument; combine with commas):
  linear, cosine, poly2   the masking schedule alpha(t) (default: linear)
  bs256, bs1024, bs4096   global batch at the same 96B tokens (do batch sizes transfer from AR?)
  lr1e-4, lr2e-4, lr4e-4  peak learning rate (does the AR-optimal lr transfer?)
  ar                      the AR model of the same shape (pair with bs*/lr* for the AR side)
  wd0                     weight decay off; with ep<N> for the multi-epoch side, e.g. `wd0,ep16`
  smoke                   a CPU run of seconds
Run a transfer grid with sdlm-sweep, e.g.
  sdlm-sweep --config configs/quokka/gpt2_1b.py:bs256 --config configs/quokka/gpt2_1b.py:bs1024 \\
             --config configs/quokka/gpt2_1b.py:ar,bs256 --config configs/quokka/gpt2_1b.py:ar,bs1024 \\
             --workdir gs://BUCKET/sweeps/batch --set data.source=prepared --set data.paths=gs://BUCKET/prep
"""

from sdlm_jax import recipes

VARIANTS = {name: (lambda c, name=name: setattr(c.diffusion, "schedule", name))
            for name in ("linear", "cosine", "poly2")}


def get_config(arg: str = ""):
  return recipes.finish(recipes.gpt2_1b(), arg, VARIANTS)
