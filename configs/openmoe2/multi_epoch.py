"""OpenMoE 2's "diffusion + MoE is a double win" runs: 1B unique tokens repeated for 96 epochs
(96B tokens), diffusion against AR, dense against MoE.

OpenMoE 2 reports that on repeated data the sparse diffusion model beats the FLOPs-matched
dense DLM and every AR model, while the AR MoE is the worst of the AR models (worse than its
FLOPs- and parameter-matched dense counterparts): a low compute-to-parameter ratio hurts on
repeated data, and diffusion raises it.

The argument picks the model (combine with `ar` for the AR arm and the other common options of
sdlm_jax/recipes.py, e.g. `moe8b1a,ar,smoke`):
  dense1b   (default) Quokka's 1B dense model (sdlm_jax.recipes.gpt2_1b)
  dense8b   the 8B dense model (configs/openmoe2/dense_8b.py's shape)
  moe8b1a   the 1B backbone with 96 routed token-choice experts of width 592 (4736 / 8), top-8:
            the dense model's active FFN width, 8.3B parameters in all (the seeds' run is token
            choice; its exact expert shape is not published, this one is ours)

Needs a prepared corpus: sdlm-prepare --input 'corpus/*.jsonl' --out DIR, then
  sdlm-train --config configs/openmoe2/multi_epoch.py:moe8b1a --workdir RUN --config.data.paths=DIR
"""

from sdlm_jax import recipes

UNIQUE_TOKENS = 1_000_000_000
EPOCHS = 96


def _moe8b1a(c):
  moe = c.model.moe
  moe.num_experts = 96
  moe.expert_mlp_dim = c.model.mlp_dim // 8
  moe.top_k = 8
  recipes.to_token_choice(c)


VARIANTS = {"dense1b": lambda c: None, "dense8b": lambda c: recipes.dense_8b_shape(c.model), "moe8b1a": _moe8b1a}


def get_config(arg: str = ""):
  c = recipes.gpt2_1b()
  recipes.set_tokens(c, UNIQUE_TOKENS * EPOCHS)
  recipes.repeat_data(c, EPOCHS)
  return recipes.finish(c, arg, VARIANTS)
