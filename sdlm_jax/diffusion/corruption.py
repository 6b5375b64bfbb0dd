"""The forward process q(x_t | x_0): absorbing-state ([MASK]) corruption and its randomness.

Every random choice of the objectives lives here (t, masks, the random-length cut), apart
from the model call, so tests can draw the same noise and check a loss against NumPy.
"""

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri
from jaxtyping import Array, ArrayLike, Bool, Float, Float32, Int, PRNGKeyArray


def sample_mask(rng: PRNGKeyArray, mask_prob: Float[ArrayLike, "B"] | Float[ArrayLike, "B L"],
                maskable_BxL: Bool[Array, "B L"]) -> Bool[Array, "B L"]:
  """Masks each maskable position independently with probability mask_prob ([B] or [B, L])."""
  mask_prob = jnp.asarray(mask_prob, jnp.float32)
  if mask_prob.ndim == 1:
    mask_prob = mask_prob[:, None]
  u_BxL = jax.random.uniform(rng, maskable_BxL.shape)
  return (u_BxL < mask_prob) & maskable_BxL


def apply_mask(tokens_BxL: Int[Array, "B L"], is_masked_BxL: Bool[Array, "B L"], mask_id: int) -> Int[Array, "B L"]:
  return jnp.where(is_masked_BxL, mask_id, tokens_BxL)


def mask_tokens(rng: PRNGKeyArray, tokens_BxL: Int[Array, "B L"],
                mask_prob: Float[ArrayLike, "B"] | Float[ArrayLike, "B L"], mask_id: int,
                maskable_BxL: Bool[Array, "B L"]) -> tuple[Int[Array, "B L"], Bool[Array, "B L"]]:
  """x_t from x_0: returns (noisy_BxL, is_masked_BxL); non-maskable positions (padding) stay."""
  is_masked_BxL = sample_mask(rng, mask_prob, maskable_BxL)
  return apply_mask(tokens_BxL, is_masked_BxL, mask_id), is_masked_BxL


def force_one_mask(rng: PRNGKeyArray, is_masked_BxL: Bool[Array, "B L"],
                   maskable_BxL: Bool[Array, "B L"]) -> Bool[Array, "B L"]:
  """MegaDLMs: a row with maskable tokens but no mask gets one, at a uniformly random position."""
  needs_B = ~jnp.any(is_masked_BxL, axis=1) & jnp.any(maskable_BxL, axis=1)
  score_BxL = jnp.where(maskable_BxL, jax.random.uniform(rng, maskable_BxL.shape), -1.0)
  pick_B = jnp.argmax(score_BxL, axis=1)
  forced_BxL = needs_B[:, None] & (jnp.arange(maskable_BxL.shape[1])[None, :] == pick_B[:, None])
  return is_masked_BxL | forced_BxL


def antithetic_t(rng: PRNGKeyArray, num: int, t_min: float) -> Float32[Array, "S"]:
  """`num` stratified t in [t_min, 1]: one uniform offset u, t_i = (u + i/num) mod 1, rescaled.

  Exactly one t falls in each of the `num` equal strata (MDLM's low-variance sampler).
  """
  u = jax.random.uniform(rng, ())
  t = jnp.mod(u + jnp.arange(num, dtype=jnp.float32) / num, 1.0)
  return t_min + (1.0 - t_min) * t


def moving_gaussian_mean(progress: Float[ArrayLike, ""]) -> Float32[Array, ""]:
  """Centre of the moving-Gaussian t window at training progress p in [0, 1]: mu(p) = p.

  The window starts centred on t = 0 (clean inputs) and slides at constant speed to t = 1
  (all masked) at the last step; see docs/formulas.md, section 6, for why.
  """
  return jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)


def moving_gaussian_t(u_S: Float[Array, "S"], progress: Float[ArrayLike, ""], std: float,
                      t_min: float) -> Float32[Array, "S"]:
  """Uniforms u in [0, 1) mapped to t ~ N(mu(progress), std^2) truncated to [t_min, 1].

  Inverse CDF: t = mu + std * Phi^-1(Phi(a) + u (Phi(b) - Phi(a))), a and b the truncation
  bounds in standard units, so stratified u (antithetic_t) give stratified t.
  """
  mu = moving_gaussian_mean(progress)
  cdf_lo, cdf_hi = ndtr((t_min - mu) / std), ndtr((1.0 - mu) / std)
  t_S = mu + std * ndtri(cdf_lo + u_S.astype(jnp.float32) * (cdf_hi - cdf_lo))
  return jnp.clip(t_S, t_min, 1.0)


def random_length_keep(rng: PRNGKeyArray, length: int, prob: float) -> Bool[Array, "L"]:
  """MegaDLMs' random-length batches: with probability `prob`, keep only positions < U{2..L}.

  Returns a [L] boolean keep mask shared by every row (all True when no cut happens); static
  shapes make the cut a mask rather than a slice.
  """
  rng_do, rng_len = jax.random.split(rng)
  do_cut = jax.random.uniform(rng_do, ()) < prob
  cut = jax.random.randint(rng_len, (), 2, length + 1)
  return jnp.where(do_cut, jnp.arange(length) < cut, True)
