"""Which layers are MoE, and the stacks they form: the one definition of a model's layer kinds.

Plain Python over the model config, so parameter and FLOP counting (sdlm_jax.scaling) and the
fit check read the same answer the model is built from, without building it.
"""


def is_moe_layer(model_cfg, layer: int) -> bool:
  """Layer `layer` (0-based) uses an MoE FFN: experts exist and it is past the first_k_dense."""
  return model_cfg.moe.num_experts > 0 and layer >= model_cfg.moe.first_k_dense


def layer_stacks(model_cfg) -> list[tuple[int, bool]]:
  """(number of layers, is MoE) of each stack, in order: the first_k_dense dense layers, then
  the MoE layers (all dense without experts); empty stacks are left out."""
  num_moe = sum(is_moe_layer(model_cfg, i) for i in range(model_cfg.num_layers))
  return [(n, moe) for n, moe in ((model_cfg.num_layers - num_moe, False), (num_moe, True)) if n]
