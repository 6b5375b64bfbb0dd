"""The uniform transition kernel: corruption, its continuous-time ELBO, and its reverse step.

Forward process over the N = V - 1 tokens that are not [MASK] (the support):
q_t(z | x) = alpha_t [z = x] + (1 - alpha_t) / N, i.e. each token is kept with probability
alpha_t and otherwise replaced by a uniformly drawn support token (possibly itself). The model
sees z_t and t and predicts x_theta = softmax over the support; it parameterises the reverse
process through the forward marginal of its prediction, q_t(. | x_theta) (UDLM / Duo).

With xbar = N alpha x + (1 - alpha) 1 (and xbar_theta likewise from x_theta), z the noisy
token, r_y = xbar_y / xbar_z and s_y = xbar_theta_y / xbar_theta_z, the per-token NELBO
integrand is

    (-alpha'/(N alpha)) * h,   h = sum_{y != z} [ s_y - r_y log s_y + r_y log r_y - r_y ]
                                 = N/xbar_theta_z - N/xbar_z + sum_{y != z} r_y log r_y
                                   - sum_{y != z} r_y (log xbar_theta_y - log xbar_theta_z)

summed over every real position (corrupted or not) and integrated over t ~ U. r takes two
values only, so h costs one reduction over the vocabulary (sum_y log xbar_theta_y), like a
cross-entropy. The derivation: docs/formulas.md, section 5.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Float32, Int, PRNGKeyArray


def support_size(vocab_size: int) -> int:
  """N: every token id but [MASK]."""
  return vocab_size - 1


def support_logits(logits_BxLxV: Float[Array, "B L V"], mask_id: int) -> Float32[Array, "B L V"]:
  """float32 logits with [MASK] (outside the support) at -inf."""
  vocab_V = jnp.arange(logits_BxLxV.shape[-1])
  return jnp.where(vocab_V == mask_id, -jnp.inf, logits_BxLxV.astype(jnp.float32))


def uniform_tokens(rng: PRNGKeyArray, shape, vocab_size: int, mask_id: int) -> Int[Array, "..."]:
  """Support tokens drawn uniformly: an index in [0, N) with the ids from [MASK] on shifted up by one."""
  r = jax.random.randint(rng, shape, 0, support_size(vocab_size))
  return jnp.where(r >= mask_id, r + 1, r).astype(jnp.int32)


def corrupt(rng: PRNGKeyArray, tokens_BxL: Int[Array, "B L"], alpha_B: Float[Array, "B"], valid_BxL: Bool[Array, "B L"],
            vocab_size: int, mask_id: int) -> Int[Array, "B L"]:
  """z_t ~ q_t(. | x) at every real position: kept with probability alpha, else uniform. Padding stays."""
  rng_keep, rng_tok = jax.random.split(rng)
  resample_BxL = jax.random.uniform(rng_keep, tokens_BxL.shape) >= alpha_B[:, None]
  noise_BxL = uniform_tokens(rng_tok, tokens_BxL.shape, vocab_size, mask_id)
  return jnp.where(resample_BxL & valid_BxL, noise_BxL, tokens_BxL)


def elbo_integrand(logits_BxLxV: Float[Array, "B L V"], noisy_BxL: Int[Array, "B L"], clean_BxL: Int[Array, "B L"],
                   alpha_B: Float[ArrayLike, "B"], mask_id: int) -> Float32[Array, "B L"]:
  """h of the module docstring at every position (>= 0; weight it by -alpha'/(N alpha))."""
  vocab = logits_BxLxV.shape[-1]
  n = float(support_size(vocab))
  alpha_Bx1 = jnp.asarray(alpha_B, jnp.float32)[:, None]
  logp_BxLxV = jax.nn.log_softmax(support_logits(logits_BxLxV, mask_id), axis=-1)
  # log xbar_theta_y = log(N alpha p_y + 1 - alpha), stable for p_y -> 0 and alpha -> 0 or 1
  log_scale_Bx1x1 = jnp.log(n * alpha_Bx1)[..., None]
  log_floor_Bx1x1 = jnp.log1p(-alpha_Bx1)[..., None]
  log_xbt_BxLxV = jnp.logaddexp(log_scale_Bx1x1 + logp_BxLxV, log_floor_Bx1x1)
  in_support_V = jnp.arange(vocab) != mask_id
  sum_log_xbt_BxL = jnp.sum(jnp.where(in_support_V, log_xbt_BxLxV, 0.0), axis=-1)
  take = lambda ids_BxL: jnp.take_along_axis(log_xbt_BxLxV, ids_BxL[..., None], axis=-1)[..., 0]
  log_xbt_z_BxL, log_xbt_x_BxL = take(noisy_BxL), take(clean_BxL)

  same_BxL = noisy_BxL == clean_BxL
  big_Bx1 = n * alpha_Bx1 + 1.0 - alpha_Bx1    # xbar at the clean token
  small_Bx1 = 1.0 - alpha_Bx1                  # xbar elsewhere
  xbar_z_BxL = jnp.where(same_BxL, big_Bx1, small_Bx1)
  r_other_BxL = small_Bx1 / xbar_z_BxL         # r_y for y not in {x, z}
  r_x_BxL = big_Bx1 / small_Bx1                # r_x when z != x
  log_ratio_Bx1 = jnp.log(small_Bx1) - jnp.log(big_Bx1)
  r_log_r_BxL = jnp.where(same_BxL, (n - 1.0) * (small_Bx1 / big_Bx1) * log_ratio_Bx1,
                          r_x_BxL * -log_ratio_Bx1)
  # sum_{y != z} r_y log xbar_theta_y: r_other over all y != z, corrected at y = x when x != z
  r_log_xbt_BxL = r_other_BxL * (sum_log_xbt_BxL - log_xbt_z_BxL) + jnp.where(
      same_BxL, 0.0, (r_x_BxL - r_other_BxL) * log_xbt_x_BxL)
  sum_r_BxL = n / xbar_z_BxL - 1.0
  return (n * jnp.exp(-log_xbt_z_BxL) - n / xbar_z_BxL + r_log_r_BxL
          - r_log_xbt_BxL + sum_r_BxL * log_xbt_z_BxL)


def posterior_probs(probs_BxTxV: Float[Array, "B T V"], noisy_BxT: Int[Array, "B T"], alpha_t: Float[ArrayLike, ""],
                    alpha_s: Float[ArrayLike, ""], mask_id: int) -> Float32[Array, "B T V"]:
  """p(z_s | z_t) = q(z_s | z_t, x_theta) for s < t (ancestral step of the uniform kernel).

  q(z_s = y | z_t, x_theta) is proportional to q(z_t | z_s = y) q_s(y | x_theta) with
  q(z_t | z_s = y) = a [y = z_t] + (1 - a)/N, a = alpha_t / alpha_s, and
  q_s(y | x_theta) = alpha_s x_theta(y) + (1 - alpha_s)/N; normalised over the support.
  `probs_BxTxV` is x_theta (0 at [MASK]).
  """
  vocab = probs_BxTxV.shape[-1]
  n = float(support_size(vocab))
  alpha_t, alpha_s = jnp.asarray(alpha_t, jnp.float32), jnp.asarray(alpha_s, jnp.float32)
  a = alpha_t / jnp.maximum(alpha_s, 1e-30)
  in_support_V = jnp.arange(vocab) != mask_id
  is_z_BxTxV = jnp.arange(vocab)[None, None, :] == noisy_BxT[..., None]
  to_z_BxTxV = a * is_z_BxTxV + (1.0 - a) / n
  marginal_BxTxV = jnp.where(in_support_V, alpha_s * probs_BxTxV.astype(jnp.float32) + (1.0 - alpha_s) / n, 0.0)
  unnorm_BxTxV = to_z_BxTxV * marginal_BxTxV
  return unnorm_BxTxV / jnp.sum(unnorm_BxTxV, axis=-1, keepdims=True)
