"""The forward process q(x_t | x_0): absorbing-state ([MASK]) corruption."""

import jax
import jax.numpy as jnp


def sample_mask(rng, mask_prob_B, valid_BxL):
  """Each real token is masked independently with its row's probability."""
  u_BxL = jax.random.uniform(rng, valid_BxL.shape)
  return (u_BxL < mask_prob_B[:, None]) & valid_BxL


def force_one_mask(rng, masked_BxL, valid_BxL):
  """MegaDLMs: a row with real tokens but no mask gets one mask at a random real position."""
  needs_B = ~jnp.any(masked_BxL, axis=1) & jnp.any(valid_BxL, axis=1)
  scores_BxL = jnp.where(valid_BxL, jax.random.uniform(rng, valid_BxL.shape), -1.0)
  pick_B = jnp.argmax(scores_BxL, axis=1)
  forced_BxL = needs_B[:, None] & (jnp.arange(valid_BxL.shape[1])[None, :] == pick_B[:, None])
  return masked_BxL | forced_BxL


def apply_mask(tokens_BxL, masked_BxL, mask_id: int):
  return jnp.where(masked_BxL, mask_id, tokens_BxL)


def antithetic_t(rng, num: int, t_min: float):
  """Stratified t over [t_min, 1]: one uniform offset shifted by i/num (MDLM's low-variance sampler)."""
  u = jax.random.uniform(rng, ())
  t = jnp.mod(u + jnp.arange(num, dtype=jnp.float32) / num, 1.0)
  return t_min + (1.0 - t_min) * t
