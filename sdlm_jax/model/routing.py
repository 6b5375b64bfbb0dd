"""Routers as pure functions: expert choice (EC), token choice (TC), balance losses, stats.

All routing math runs in float32. `token_mask` marks real (non-padding) tokens: padding is
never chosen ahead of a real token, gets zero weight, and is left out of every statistic.

Expert choice (OpenMoE 2 / MegaDLMs): in each routing group of N tokens, every expert takes
its top C = floor(N*k/E) tokens by router logit. A token's gates are a softmax over only the
experts that picked it (sigmoid option: sigmoids normalised over those experts); a token
nobody picked gets no routed output. Token choice: each token takes its top-k experts.
"""

import jax
import jax.numpy as jnp

import pallas_kernels

NEG_INF = -1e9


def ec_capacity(num_tokens: int, top_k: int, num_experts: int) -> int:
  capacity = num_tokens * top_k // num_experts
  if capacity <= 0:
    raise ValueError(
        f"expert-choice capacity floor({num_tokens}*model.moe.top_k={top_k}/model.moe.num_experts="
        f"{num_experts}) is 0; raise top_k or the routing group size, or lower num_experts")
  return min(capacity, num_tokens)


def expert_choice(logits_GxNxE, token_mask_GxN, top_k: int, activation: str):
  """Returns (token_idx_GxExC, slot_gates_GxExC, picked_GxNxE)."""
  num_groups, num_tokens, num_experts = logits_GxNxE.shape
  capacity = ec_capacity(num_tokens, top_k, num_experts)
  select_GxNxE = jnp.where(token_mask_GxN[..., None], logits_GxNxE, NEG_INF)
  token_idx_GxExC, _ = pallas_kernels.expert_choice(jax.lax.stop_gradient(select_GxNxE), capacity)
  g_idx = jnp.arange(num_groups)[:, None, None]
  e_idx = jnp.arange(num_experts)[None, :, None]
  picked_GxNxE = jnp.zeros(logits_GxNxE.shape, bool).at[g_idx, token_idx_GxExC, e_idx].set(True)
  picked_GxNxE &= token_mask_GxN[..., None]
  gates_GxNxE = picked_gates(logits_GxNxE, picked_GxNxE, activation)
  slot_gates_GxExC = gates_GxNxE[g_idx, token_idx_GxExC, e_idx]
  return token_idx_GxExC, slot_gates_GxExC, picked_GxNxE


def picked_gates(logits_GxNxE, picked_GxNxE, activation: str):
  """Per token, normalised gates over the experts that picked it (0 elsewhere)."""
  if activation == "softmax":
    masked = jnp.where(picked_GxNxE, logits_GxNxE, NEG_INF)
    weights = jnp.exp(masked - jnp.max(masked, axis=-1, keepdims=True)) * picked_GxNxE
  elif activation == "sigmoid":
    weights = jax.nn.sigmoid(logits_GxNxE) * picked_GxNxE
  else:
    raise ValueError(f"model.moe.router_activation={activation!r}; allowed values: softmax, sigmoid")
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def token_wise_balance_loss(logits_GxNxE, picked_GxNxE, token_mask_GxN, top_k: int):
  """OpenMoE 2's EC balance loss: sum_i P_i c_i / (E k), P_i = sum_e softmax_over_tokens; 1 if uniform."""
  num_experts = logits_GxNxE.shape[-1]
  masked = jnp.where(token_mask_GxN[..., None], logits_GxNxE, NEG_INF)
  p_GxNxE = jax.nn.softmax(masked, axis=1)
  counts_GxN = jax.lax.stop_gradient(jnp.sum(picked_GxNxE, axis=-1).astype(jnp.float32))
  per_group_G = jnp.sum(jnp.sum(p_GxNxE, axis=-1) * counts_GxN, axis=-1) / (num_experts * top_k)
  return jnp.mean(per_group_G)


def token_choice(logits_NxE, token_mask_N, top_k: int, activation: str):
  """Returns (expert_idx_NxK, gates_NxK, probs_NxE); gates normalised over the top-k."""
  if activation == "softmax":
    probs_NxE = jax.nn.softmax(logits_NxE, axis=-1)
  elif activation == "sigmoid":
    probs_NxE = jax.nn.sigmoid(logits_NxE)
  else:
    raise ValueError(f"model.moe.router_activation={activation!r}; allowed values: softmax, sigmoid")
  top_NxK, expert_idx_NxK = jax.lax.top_k(probs_NxE, top_k)
  gates_NxK = top_NxK / jnp.sum(top_NxK, axis=-1, keepdims=True)
  gates_NxK = gates_NxK * token_mask_N[:, None]
  return expert_idx_NxK.astype(jnp.int32), gates_NxK, probs_NxE


def switch_aux_loss(probs_NxE, expert_idx_NxK, token_mask_N):
  """Switch Transformer balance loss E * sum_e f_e P_e over real tokens (1 when uniform)."""
  num_experts = probs_NxE.shape[-1]
  mask = token_mask_N.astype(jnp.float32)
  num_real = jnp.maximum(jnp.sum(mask), 1.0)
  assigned_NxE = jnp.zeros_like(probs_NxE).at[jnp.arange(probs_NxE.shape[0])[:, None], expert_idx_NxK].add(1.0)
  f_E = jnp.sum(assigned_NxE * mask[:, None], axis=0) / (num_real * expert_idx_NxK.shape[-1])
  p_E = jnp.sum(probs_NxE / jnp.sum(probs_NxE, -1, keepdims=True) * mask[:, None], axis=0) / num_real
  return num_experts * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)


def router_z_loss(logits_NxE, token_mask_N):
  mask = token_mask_N.astype(jnp.float32)
  z_N = jax.nn.logsumexp(logits_NxE, axis=-1)
  return jnp.sum(z_N * z_N * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def routing_stats(experts_per_token_N, expert_slots_E, token_mask_N) -> dict:
  """Experts-per-token distribution over real tokens and each expert's share of routed slots."""
  mask = token_mask_N.astype(bool)
  n = experts_per_token_N.astype(jnp.float32)
  num_real = jnp.maximum(jnp.sum(mask), 1)
  mean = jnp.sum(jnp.where(mask, n, 0.0)) / num_real
  var = jnp.sum(jnp.where(mask, (n - mean) ** 2, 0.0)) / num_real
  slots = expert_slots_E.astype(jnp.float32)
  return {
      "frac_tokens_zero_experts": jnp.sum(mask & (n == 0)) / num_real,
      "experts_per_token_mean": mean,
      "experts_per_token_min": jnp.min(jnp.where(mask, n, jnp.inf)),
      "experts_per_token_max": jnp.max(jnp.where(mask, n, -jnp.inf)),
      "experts_per_token_std": jnp.sqrt(var),
      "expert_load": slots / jnp.maximum(jnp.sum(slots), 1.0),
  }
