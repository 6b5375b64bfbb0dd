"""Pure loss pieces, each checkable against a NumPy formula (tests/test_diffusion_losses.py)."""

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BxLxV, targets_BxL):
  """-log softmax(logits)[target] per position, in float32."""
  logits = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return lse_BxL - target_logit_BxL


def megadlm_row_weights(masked_BxL, valid_BxL):
  """1 / realised masked fraction of each row (over its real tokens); 0 for empty rows."""
  n_masked_B = jnp.sum(masked_BxL, axis=1).astype(jnp.float32)
  n_valid_B = jnp.sum(valid_BxL, axis=1).astype(jnp.float32)
  return jnp.where(n_masked_B > 0, n_valid_B / jnp.maximum(n_masked_B, 1.0), 0.0)


def megadlm_loss(ce_BxL, masked_BxL, valid_BxL):
  """MegaDLMs: sum of CE/p_mask over masked tokens, divided by the number of real tokens.

  Returns (loss, per-row mean CE over masked tokens [B]).
  """
  w_B = megadlm_row_weights(masked_BxL, valid_BxL)
  row_sum_B = jnp.sum(jnp.where(masked_BxL, ce_BxL, 0.0), axis=1)
  loss = jnp.sum(w_B * row_sum_B) / jnp.maximum(jnp.sum(valid_BxL), 1)
  row_mean_B = row_sum_B / jnp.maximum(jnp.sum(masked_BxL, axis=1), 1)
  return loss, row_mean_B


def elbo_row_nll(ce_BxL, masked_BxL, weight_B):
  """Continuous-time ELBO per row: w(t) * sum of CE over masked tokens."""
  return weight_B * jnp.sum(jnp.where(masked_BxL, ce_BxL, 0.0), axis=1)


def ar_pairs(segment_ids_BxL):
  """Which (position, next position) pairs are valid next-token targets: same real segment."""
  return (segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1]) & (segment_ids_BxL[:, 1:] > 0)


def ar_loss(logits_BxLxV, tokens_BxL, segment_ids_BxL):
  """Mean next-token CE, never across a segment boundary or into padding. Returns (loss, sum, count)."""
  ce_BxLm1 = token_cross_entropy(logits_BxLxV[:, :-1], tokens_BxL[:, 1:])
  valid_BxLm1 = ar_pairs(segment_ids_BxL)
  total = jnp.sum(jnp.where(valid_BxLm1, ce_BxLm1, 0.0))
  count = jnp.sum(valid_BxLm1)
  return total / jnp.maximum(count, 1), total, count
