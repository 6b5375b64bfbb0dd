"""Pure loss pieces, each checkable against a NumPy formula (tests/test_diffusion_losses.py).

All reductions run in float32 whatever the logits' dtype.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Float32, Int


def token_cross_entropy(logits_BxLxV: Float[Array, "B L V"], targets_BxL: Int[Array, "B L"]) -> Float32[Array, "B L"]:
  """-log softmax(logits)[target] at every position: [B, L] float32."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return lse_BxL - target_BxL


def megadlm_row_weights(is_masked_BxL: Bool[Array, "B L"], valid_BxL: Bool[Array, "B L"]) -> Float32[Array, "B"]:
  """MegaDLMs' per-token weight 1/p_mask, p_mask the row's realised masked fraction of its real tokens.

  Rows with no mask (only empty rows, after the forced mask) get weight 0.
  """
  n_masked_B = jnp.sum(is_masked_BxL, axis=1).astype(jnp.float32)
  n_valid_B = jnp.sum(valid_BxL, axis=1).astype(jnp.float32)
  return jnp.where(n_masked_B > 0, n_valid_B / jnp.maximum(n_masked_B, 1.0), 0.0)


def maskgit_row_weights(is_masked_BxL: Bool[Array, "B L"], valid_BxL: Bool[Array, "B L"]) -> Float32[Array, "B"]:
  """MaskGIT's unweighted mean over masked tokens, as a weight: (real tokens / masked tokens) of the batch.

  The same for every row, so `weighted_masked_ce` returns sum_masked CE / number masked (0 without masks).
  """
  n_masked = jnp.sum(is_masked_BxL).astype(jnp.float32)
  weight = jnp.where(n_masked > 0, jnp.sum(valid_BxL).astype(jnp.float32) / jnp.maximum(n_masked, 1.0), 0.0)
  return jnp.full((is_masked_BxL.shape[0],), weight)


def masked_ce_row_sum(ce_BxL: Float[Array, "B L"], is_masked_BxL: Bool[Array, "B L"]) -> Float[Array, "B"]:
  """Sum of the cross-entropy over each row's masked positions: [B]."""
  return jnp.sum(jnp.where(is_masked_BxL, ce_BxL, 0.0), axis=1)


def weighted_masked_ce(ce_BxL: Float[Array, "B L"], is_masked_BxL: Bool[Array, "B L"], weight_B: Float[Array, "B"],
                       valid_BxL: Bool[Array, "B L"]) -> tuple[Float[Array, ""], Float[Array, "B"]]:
  """sum_rows weight * sum_masked CE, divided by the number of real tokens in the batch.

  Returns (loss, row_loss_B) where row_loss_B is the same quantity per row, divided by the
  row's own real tokens (0 for an empty row): the row's per-token contribution, used for the
  per-t-bucket metrics. With MegaDLMs' weights it is the row's mean CE over masked tokens;
  with the ELBO weight w(t) it is the row's ELBO per token.
  """
  row_sum_B = weight_B * masked_ce_row_sum(ce_BxL, is_masked_BxL)
  n_valid_B = jnp.sum(valid_BxL, axis=1)
  loss = jnp.sum(row_sum_B) / jnp.maximum(jnp.sum(n_valid_B), 1)
  return loss, row_sum_B / jnp.maximum(n_valid_B, 1)


def ar_target_mask(segment_ids_BxL: Int[Array, "B L"]) -> Bool[Array, "B L-1"]:
  """[B, L-1]: position i may predict token i+1 (same real segment; never across a boundary or into padding)."""
  return (segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1]) & (segment_ids_BxL[:, 1:] > 0)


def ar_cross_entropy(logits_BxLxV: Float[Array, "B L V"], tokens_BxL: Int[Array, "B L"],
                     segment_ids_BxL: Int[Array, "B L"]) -> tuple[Float[Array, ""], Float[Array, ""], Int[Array, ""]]:
  """Mean next-token CE over valid (position, next position) pairs. Returns (mean, sum, count)."""
  ce_BxLm1 = token_cross_entropy(logits_BxLxV[:, :-1], tokens_BxL[:, 1:])
  valid_BxLm1 = ar_target_mask(segment_ids_BxL)
  total = jnp.sum(jnp.where(valid_BxLm1, ce_BxLm1, 0.0))
  count = jnp.sum(valid_BxLm1)
  return total / jnp.maximum(count, 1), total, count
