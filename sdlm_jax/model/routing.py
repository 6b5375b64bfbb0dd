"""Routers as pure functions: expert choice (EC), token choice (TC), balance losses, stats.

All routing math runs in float32. `token_mask` marks real (non-padding) tokens: padding is
never chosen ahead of a real token, gets zero weight, and is left out of every loss and
statistic.

Expert choice (OpenMoE 2 / MegaDLMs): in each routing group of N tokens, every expert takes
its top C = floor(N*k/E) tokens by router logit (ties: the lower token index). A token's gates
are a softmax over only the experts that picked it (sigmoid option: sigmoids normalised over
those experts); a token nobody picked gets no routed output. Token choice: each token takes
its top-k experts, gates normalised over those k. The formulas: docs/formulas.md, sections 7-8.
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Float32, Int, Int32, Real

import pallas_kernels

ACTIVATIONS = ("softmax", "sigmoid")
# Selection score of padding: below any real logit, finite so every kernel handles it.
_PAD_SCORE = -1e9


def _check_activation(activation: str):
  if activation not in ACTIVATIONS:
    raise ValueError(f"model.moe.router_activation={activation!r}; allowed values: {', '.join(ACTIVATIONS)}")


def ec_capacity(num_tokens, top_k: int, num_experts: int):
  """Tokens each expert takes from a group of `num_tokens` (an int, or symbolic under jax.export):
  floor(N*k/E) (at most N)."""
  capacity = num_tokens * top_k // num_experts
  if capacity <= 0:
    raise ValueError(
        f"expert-choice capacity floor({num_tokens} tokens * model.moe.top_k={top_k} / "
        f"model.moe.num_experts={num_experts}) is 0; raise top_k or the routing group size, "
        "or lower num_experts")
  return min(capacity, num_tokens)


def expert_choice(logits_GxNxE: Float[Array, "G N E"], token_mask_GxN: Bool[Array, "G N"], top_k: int,
                  activation: str, *, backend: str = "auto", scaling_factors: tuple = ()
                  ) -> tuple[Int32[Array, "G E C"], Float32[Array, "G E C"], Bool[Array, "G N E"]]:
  """Each expert's top-C tokens per group and their gates.

  Returns (token_idx_GxExC int32, slot_gates_GxExC f32, picked_GxNxE bool). A slot holding a
  padding token (only when a group has fewer than C real tokens) has gate 0 and is not
  `picked`. Gradients reach the logits through the gates only. `scaling_factors` (E+1 numbers,
  empty: off) multiplies a token's gates by its entry n, n the number of experts that picked it.
  """
  num_groups, num_tokens, num_experts = logits_GxNxE.shape
  capacity = ec_capacity(num_tokens, top_k, num_experts)
  logits_GxNxE = logits_GxNxE.astype(jnp.float32)
  select_GxNxE = jnp.where(token_mask_GxN[..., None], logits_GxNxE, _PAD_SCORE)
  token_idx_GxExC, _ = pallas_kernels.expert_choice(jax.lax.stop_gradient(select_GxNxE), capacity,
                                                    backend=backend)
  token_idx_GxExC = checkpoint_name(token_idx_GxExC, "routing")  # the remat policies keep it: no top-C rerun
  g_idx = jnp.arange(num_groups)[:, None, None]
  e_idx = jnp.arange(num_experts)[None, :, None]
  picked_GxNxE = jnp.zeros(logits_GxNxE.shape, bool).at[g_idx, token_idx_GxExC, e_idx].set(True)
  picked_GxNxE &= token_mask_GxN[..., None]
  gates_GxNxE = expert_choice_gates(logits_GxNxE, picked_GxNxE, activation)
  if scaling_factors:
    gates_GxNxE = gates_GxNxE * dynamic_scale(jnp.sum(picked_GxNxE, axis=-1), scaling_factors)[..., None]
  slot_gates_GxExC = gates_GxNxE[g_idx, token_idx_GxExC, e_idx]
  return token_idx_GxExC, slot_gates_GxExC, picked_GxNxE


def dynamic_scale(experts_per_token_N: Int[Array, "*N"], scaling_factors: tuple) -> Float32[Array, "*N"]:
  """The dynamic scaling factor of each token: entry n of the E+1 numbers, n its number of experts."""
  table_En1 = jnp.asarray(scaling_factors, jnp.float32)
  return table_En1[jnp.clip(experts_per_token_N, 0, table_En1.shape[0] - 1)]


def expert_choice_gates(logits_GxNxE: Float[Array, "G N E"], picked_GxNxE: Bool[Array, "G N E"],
                        activation: str) -> Float[Array, "G N E"]:
  """Per token, gates normalised over the experts that picked it; 0 elsewhere and for unpicked tokens."""
  _check_activation(activation)
  if activation == "softmax":
    # exp of -inf (not a `where` after exp) so unpicked logits can neither overflow nor send
    # NaN gradients back.
    peak_GxNx1 = jnp.max(jnp.where(picked_GxNxE, logits_GxNxE, -jnp.inf), axis=-1, keepdims=True)
    peak_GxNx1 = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak_GxNx1), peak_GxNx1, 0.0))
    weights_GxNxE = jnp.exp(jnp.where(picked_GxNxE, logits_GxNxE - peak_GxNx1, -jnp.inf))
  else:
    weights_GxNxE = jnp.where(picked_GxNxE, jax.nn.sigmoid(logits_GxNxE), 0.0)
  total_GxNx1 = jnp.sum(weights_GxNxE, axis=-1, keepdims=True)
  return weights_GxNxE / jnp.where(total_GxNx1 > 0, total_GxNx1, 1.0)


def token_wise_balance_loss(logits_GxNxE: Float[Array, "G N E"], picked_GxNxE: Bool[Array, "G N E"],
                            token_mask_GxN: Bool[Array, "G N"], top_k: int) -> Float32[Array, ""]:
  """OpenMoE 2's EC balance loss, averaged over groups: sum_i P_i c_i / (E k).

  p = softmax over a group's real tokens for each expert, P_i = sum_e p[i, e], c_i = how many
  experts picked token i (no gradient). Uniform logits with every slot filled give exactly 1.
  Minimising it lowers the logits of tokens many experts chose and raises the others', which
  evens out how many experts each token gets.
  """
  num_experts = logits_GxNxE.shape[-1]
  masked_GxNxE = jnp.where(token_mask_GxN[..., None], logits_GxNxE.astype(jnp.float32), _PAD_SCORE)
  p_GxNxE = jax.nn.softmax(masked_GxNxE, axis=1)
  counts_GxN = jax.lax.stop_gradient(jnp.sum(picked_GxNxE, axis=-1).astype(jnp.float32))
  per_group_G = jnp.sum(jnp.sum(p_GxNxE, axis=-1) * counts_GxN, axis=-1) / (num_experts * top_k)
  return jnp.mean(per_group_G)


def token_choice_topk(logits_NxE: Float[Array, "N E"], token_mask_N: Bool[Array, "N"], top_k: int, activation: str,
                      selection_bias_E: Float[Array, "E"] | None = None
                      ) -> tuple[Int32[Array, "N K"], Float32[Array, "N K"], Float32[Array, "N E"]]:
  """Each token's top-k experts. Returns (expert_idx_NxK int32, gates_NxK, probs_NxE).

  Gates are the top-k scores normalised to sum 1 (0 for padding); probs are the per-expert
  scores (softmax or sigmoid) that the Switch aux loss uses. `selection_bias_E` (aux-loss-free
  balancing) is added to the scores for choosing the k experts only: the gates stay the
  unbiased scores of the chosen experts, and no gradient flows into the bias.
  """
  _check_activation(activation)
  logits_NxE = logits_NxE.astype(jnp.float32)
  probs_NxE = jax.nn.softmax(logits_NxE, axis=-1) if activation == "softmax" else jax.nn.sigmoid(logits_NxE)
  if selection_bias_E is None:
    top_NxK, expert_idx_NxK = jax.lax.top_k(probs_NxE, top_k)
  else:
    choice_NxE = jax.lax.stop_gradient(probs_NxE + selection_bias_E.astype(jnp.float32))
    _, expert_idx_NxK = jax.lax.top_k(choice_NxE, top_k)
    top_NxK = jnp.take_along_axis(probs_NxE, expert_idx_NxK, axis=-1)
  gates_NxK = top_NxK / jnp.sum(top_NxK, axis=-1, keepdims=True)
  gates_NxK = jnp.where(token_mask_N[:, None], gates_NxK, 0.0)
  return expert_idx_NxK.astype(jnp.int32), gates_NxK, probs_NxE


def balance_bias_step(bias_LxE: Float[Array, "*L E"], load_LxE: Float[Array, "*L E"], rate: float
                      ) -> Float32[Array, "*L E"]:
  """One aux-loss-free balancing update: b_e += rate * sign(mean load - load_e), per layer.

  `load` is each expert's share of the routed slots (rows sum to 1): an under-used expert's
  bias rises by `rate`, an over-used one's falls by `rate`, an exactly balanced one's stays.
  """
  load_LxE = load_LxE.astype(jnp.float32)
  mean_Lx1 = jnp.mean(load_LxE, axis=-1, keepdims=True)
  return bias_LxE.astype(jnp.float32) + rate * jnp.sign(mean_Lx1 - load_LxE)


def switch_aux_loss(probs_NxE: Float[Array, "N E"], expert_idx_NxK: Int[Array, "N K"],
                    token_mask_N: Bool[Array, "N"]) -> Float32[Array, ""]:
  """Switch Transformer balance loss E * sum_e f_e P_e over real tokens (1 when uniform).

  f_e: share of the real tokens' k slots routed to e (no gradient); P_e: mean of the token's
  per-expert scores normalised to sum 1 (a no-op for softmax, needed for sigmoid).
  """
  num_experts = probs_NxE.shape[-1]
  mask_N = token_mask_N.astype(jnp.float32)
  num_real = jnp.maximum(jnp.sum(mask_N), 1.0)
  slots_E = jnp.zeros((num_experts,), jnp.float32).at[expert_idx_NxK].add(
      jnp.broadcast_to(mask_N[:, None], expert_idx_NxK.shape))
  f_E = slots_E / (num_real * expert_idx_NxK.shape[-1])
  p_E = jnp.sum(probs_NxE / jnp.sum(probs_NxE, -1, keepdims=True) * mask_N[:, None], axis=0) / num_real
  return num_experts * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)


def router_z_loss(logits_NxE: Float[Array, "N E"], token_mask_N: Bool[Array, "N"]) -> Float32[Array, ""]:
  """Mean over real tokens of logsumexp(logits)^2: keeps router logits from drifting large."""
  mask_N = token_mask_N.astype(jnp.float32)
  z_N = jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)
  return jnp.sum(z_N * z_N * mask_N) / jnp.maximum(jnp.sum(mask_N), 1.0)


def routing_stats(experts_per_token_N: Int[Array, "N"], expert_slots_E: Real[Array, "E"],
                  token_mask_N: Bool[Array, "N"]) -> dict[str, Float32[Array, "..."]]:
  """Experts-per-token distribution over real tokens and each expert's share of routed slots.

  All zeros (not inf) when there is no real token, so a batch of padding logs cleanly.
  """
  mask_N = token_mask_N.astype(bool)
  n_N = experts_per_token_N.astype(jnp.float32)
  any_real = jnp.any(mask_N)
  num_real = jnp.maximum(jnp.sum(mask_N), 1)
  mean = jnp.sum(jnp.where(mask_N, n_N, 0.0)) / num_real
  var = jnp.sum(jnp.where(mask_N, (n_N - mean) ** 2, 0.0)) / num_real
  slots_E = expert_slots_E.astype(jnp.float32)
  return {
      "frac_tokens_zero_experts": jnp.sum(mask_N & (n_N == 0)) / num_real,
      "experts_per_token_mean": mean,
      "experts_per_token_min": jnp.where(any_real, jnp.min(jnp.where(mask_N, n_N, jnp.inf)), 0.0),
      "experts_per_token_max": jnp.where(any_real, jnp.max(jnp.where(mask_N, n_N, -jnp.inf)), 0.0),
      "experts_per_token_std": jnp.sqrt(var),
      "expert_load": slots_E / jnp.maximum(jnp.sum(slots_E), 1.0),
  }
