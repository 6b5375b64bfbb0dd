"""Training objectives: draw the noise, run the model, return (data loss, metrics).

`compute_loss(apply_fn, batch, rng, diffusion_cfg, mask_id=...)`, with
`apply_fn(tokens_BxL, segment_ids_BxL, positions_BxL) -> (logits_BxLxV, aux)`, selects by
`diffusion_cfg.loss`:
  megadlm    MegaDLMs' exact loss: t ~ U[0,1) per row, mask each real token with prob
             1 - alpha(t) (= t for the default linear schedule), force one mask into a row
             that got none, weight 1/p_mask with p_mask the row's realised masked fraction,
             divide by the number of real tokens. With prob `random_length_prob` the batch
             is cut to a random length U{2..L}: shapes stay static, so positions past the
             cut become padding (segment id 0: not attended, not masked, not in the loss).
  maskgit    the same noise, no reweighting: the mean cross-entropy over every masked token
             of the batch (sum over masked tokens / their number; a batch-level mean, so a
             row with more masks counts more).
  mdlm_elbo  continuous-time ELBO: antithetic t in [t_min, 1] over the batch, mask with prob
             1 - alpha(t), weight w(t), divide by the number of real tokens.
  ar         next-token cross-entropy (needs a causal model; the caller validates that).
Under megadlm and maskgit the schedule sets how the masking rate is distributed (rate
1 - alpha(t), t uniform) and the weight stays the loss's own; under mdlm_elbo it sets both.
Input and target are the same tokens for the diffusion losses; the model gets no time input.

`diffusion.t_sampling=moving_gaussian` replaces the uniform t of the three diffusion losses by
a truncated Gaussian window whose centre moves from t=0 to t=1 over training (a clean-to-noisy
curriculum; corruption.moving_gaussian_t). It changes which t are trained on, not the
weights: under mdlm_elbo the loss is then no longer an unbiased ELBO estimate.

`diffusion.kernel=uniform` (with mdlm_elbo) replaces [MASK] by uniformly drawn tokens and the
masked cross-entropy by that kernel's ELBO over every position (`uniform_elbo_loss`; the
model then takes t: apply_fn(..., t_B=t_B)).

The randomness is factored out: `sample_noise(rng, ...)` draws everything, and
`diffusion_loss(...)` is deterministic given that noise, so tests can rebuild the loss from
the same masks. The loss returned is the data loss only; the model's aux dict (router
losses and statistics) comes back as metrics["aux"]. The formulas: docs/formulas.md, sections 2-6.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Float32, Int, PRNGKeyArray, Real

from sdlm_jax.diffusion import corruption, losses, uniform
from sdlm_jax.diffusion.schedules import get_schedule

LOSS_NAMES = ("megadlm", "maskgit", "mdlm_elbo", "ar")
T_SAMPLINGS = ("uniform", "moving_gaussian")
KERNELS = ("masked", "uniform")


class Noise(NamedTuple):
  """One draw of the forward process for a batch."""
  t_B: Float32[Array, "B"]           # diffusion time per row
  is_masked_BxL: Bool[Array, "B L"]  # positions replaced by [MASK]
  valid_BxL: Bool[Array, "B L"]      # real tokens (after any random-length cut)
  weight_B: Float32[Array, "B"]      # per-token loss weight of each row's masked tokens


def _t_from_uniform(u_B, cfg, progress, t_min):
  """t per row from uniforms u in [0, 1): t_min + (1 - t_min) u, or the moving-Gaussian window."""
  sampling = cfg.get("t_sampling", "uniform")
  if sampling == "uniform":
    return t_min + (1.0 - t_min) * u_B
  if sampling == "moving_gaussian":
    return corruption.moving_gaussian_t(u_B, progress, cfg.moving_gaussian_std, t_min)
  raise ValueError(f"diffusion.t_sampling={sampling!r}; allowed values: {', '.join(T_SAMPLINGS)}")


def _megadlm_mask(rng, valid_BxL, cfg, progress):
  """MegaDLMs' noise: random-length cut, t ~ U[0,1) per row, masking rate 1 - alpha(t), one forced mask."""
  schedule = get_schedule(cfg.schedule)
  rng_cut, rng_t, rng_mask, rng_force = jax.random.split(rng, 4)
  valid_BxL = valid_BxL & corruption.random_length_keep(rng_cut, valid_BxL.shape[1], cfg.random_length_prob)[None]
  t_B = _t_from_uniform(jax.random.uniform(rng_t, (valid_BxL.shape[0],)), cfg, progress, 0.0)
  is_masked_BxL = corruption.sample_mask(rng_mask, schedule.mask_prob(t_B), valid_BxL)
  is_masked_BxL = corruption.force_one_mask(rng_force, is_masked_BxL, valid_BxL)
  return t_B, is_masked_BxL, valid_BxL


def _megadlm_noise(rng, valid_BxL, cfg, progress):
  t_B, is_masked_BxL, valid_BxL = _megadlm_mask(rng, valid_BxL, cfg, progress)
  return Noise(t_B, is_masked_BxL, valid_BxL, losses.megadlm_row_weights(is_masked_BxL, valid_BxL))


def _maskgit_noise(rng, valid_BxL, cfg, progress):
  t_B, is_masked_BxL, valid_BxL = _megadlm_mask(rng, valid_BxL, cfg, progress)
  return Noise(t_B, is_masked_BxL, valid_BxL, losses.maskgit_row_weights(is_masked_BxL, valid_BxL))


def _mdlm_noise(rng, valid_BxL, cfg, progress):
  schedule = get_schedule(cfg.schedule)
  rng_t, rng_mask = jax.random.split(rng)
  u_B = corruption.antithetic_t(rng_t, valid_BxL.shape[0], 0.0)  # stratified uniforms
  t_B = _t_from_uniform(u_B, cfg, progress, cfg.t_min)
  is_masked_BxL = corruption.sample_mask(rng_mask, schedule.mask_prob(t_B), valid_BxL)
  return Noise(t_B, is_masked_BxL, valid_BxL, schedule.weight(t_B))


_NOISE = {"megadlm": _megadlm_noise, "maskgit": _maskgit_noise, "mdlm_elbo": _mdlm_noise}


def _check_name(name: str):
  if name not in LOSS_NAMES:
    raise ValueError(f"diffusion.loss={name!r} is not supported; allowed values: {', '.join(LOSS_NAMES)}")


def sample_noise(rng: PRNGKeyArray, segment_ids_BxL: Int[Array, "B L"], diffusion_cfg, progress=0.0) -> Noise:
  """All the randomness of a diffusion loss (`megadlm`, `maskgit` or `mdlm_elbo`) for one batch.

  `progress` (step / train.num_steps, in [0, 1]) places the moving-Gaussian t window.
  """
  _check_name(diffusion_cfg.loss)
  if diffusion_cfg.loss not in _NOISE:
    raise ValueError(f"diffusion.loss={diffusion_cfg.loss!r} draws no noise; allowed values: {', '.join(_NOISE)}")
  return _NOISE[diffusion_cfg.loss](rng, segment_ids_BxL > 0, diffusion_cfg, progress)


def t_bucket_metrics(t_B: Float[Array, "B"], row_loss_B: Float[Array, "B"],
                     row_counts_B: Bool[Array, "B"] | Real[Array, "B"], num_buckets: int
                     ) -> dict[str, Float32[Array, "K"]]:
  """Per-bucket sums of row losses and row counts over `num_buckets` equal-width buckets of t.

  Sums (not means) so the caller can add them over steps and micro-batches before dividing.
  """
  bucket_B = jnp.clip(jnp.floor(t_B * num_buckets).astype(jnp.int32), 0, num_buckets - 1)
  onehot_BxK = jax.nn.one_hot(bucket_B, num_buckets) * row_counts_B[:, None]
  return {"t_bucket_loss_sum": jnp.sum(onehot_BxK * row_loss_B[:, None], axis=0),
          "t_bucket_count": jnp.sum(onehot_BxK, axis=0)}


def diffusion_loss(apply_fn, batch, noise: Noise, *, mask_id: int, num_t_buckets: int) -> tuple[Float32[Array, ""], dict]:
  """The weighted masked cross-entropy of the model on the batch corrupted by `noise`."""
  tokens_BxL = batch["tokens"]
  segment_ids_BxL = jnp.where(noise.valid_BxL, batch["segment_ids"], 0)
  noisy_BxL = corruption.apply_mask(tokens_BxL, noise.is_masked_BxL, mask_id)
  logits_BxLxV, aux = apply_fn(noisy_BxL, segment_ids_BxL, batch["positions"])
  ce_BxL = losses.token_cross_entropy(logits_BxLxV, tokens_BxL)
  loss, row_loss_B = losses.weighted_masked_ce(ce_BxL, noise.is_masked_BxL, noise.weight_B, noise.valid_BxL)
  metrics = {"loss": loss, "aux": aux,
             "masked_frac": jnp.sum(noise.is_masked_BxL) / jnp.maximum(jnp.sum(noise.valid_BxL), 1)}
  metrics.update(t_bucket_metrics(noise.t_B, row_loss_B, jnp.any(noise.valid_BxL, axis=1), num_t_buckets))
  return loss, metrics


def ar_loss(apply_fn, batch) -> tuple[Float32[Array, ""], dict]:
  """Next-token cross-entropy; t-bucket metrics are empty arrays so every loss has the same keys."""
  logits_BxLxV, aux = apply_fn(batch["tokens"], batch["segment_ids"], batch["positions"])
  loss, _, _ = losses.ar_cross_entropy(logits_BxLxV, batch["tokens"], batch["segment_ids"])
  empty = jnp.zeros((0,), jnp.float32)
  return loss, {"loss": loss, "aux": aux, "masked_frac": jnp.zeros((), jnp.float32),
                "t_bucket_loss_sum": empty, "t_bucket_count": empty}


def uniform_t(rng: PRNGKeyArray, batch_size: int, diffusion_cfg, progress=0.0) -> Float32[Array, "B"]:
  """The uniform kernel's t per row: stratified (or the moving-Gaussian window), in [t_min, 1 - t_min].

  The ELBO weight -alpha'/(N alpha) is infinite at t = 1 (alpha = 0), where the integrand's
  factor h vanishes like alpha^2; stopping t_min short of 1 drops a part of the integral of
  order t_min^2 and keeps float32 away from 0 * inf.
  """
  u_B = corruption.antithetic_t(rng, batch_size, 0.0)
  return jnp.minimum(_t_from_uniform(u_B, diffusion_cfg, progress, diffusion_cfg.t_min), 1.0 - diffusion_cfg.t_min)


def uniform_elbo_loss(apply_fn, batch, rng: PRNGKeyArray, diffusion_cfg, *, mask_id: int, vocab_size: int,
                      progress=0.0) -> tuple[Float32[Array, ""], dict]:
  """The uniform kernel's continuous-time NELBO per real token (module uniform), every position counted.

  apply_fn gets t: apply_fn(noisy_BxL, segment_ids_BxL, positions_BxL, t_B=t_B).
  """
  schedule = get_schedule(diffusion_cfg.schedule)
  rng_t, rng_noise = jax.random.split(rng)
  tokens_BxL, segment_ids_BxL = batch["tokens"], batch["segment_ids"]
  valid_BxL = segment_ids_BxL > 0
  t_B = uniform_t(rng_t, tokens_BxL.shape[0], diffusion_cfg, progress)
  alpha_B = schedule.alpha(t_B)
  noisy_BxL = uniform.corrupt(rng_noise, tokens_BxL, alpha_B, valid_BxL, vocab_size, mask_id)
  logits_BxLxV, aux = apply_fn(noisy_BxL, segment_ids_BxL, batch["positions"], t_B=t_B)
  h_BxL = uniform.elbo_integrand(logits_BxLxV, noisy_BxL, tokens_BxL, alpha_B, mask_id)
  weight_B = schedule.decay_rate(t_B) / uniform.support_size(vocab_size)
  row_sum_B = weight_B * jnp.sum(jnp.where(valid_BxL, h_BxL, 0.0), axis=1)
  n_valid_B = jnp.sum(valid_BxL, axis=1)
  loss = jnp.sum(row_sum_B) / jnp.maximum(jnp.sum(n_valid_B), 1)
  changed_BxL = (noisy_BxL != tokens_BxL) & valid_BxL
  metrics = {"loss": loss, "aux": aux, "masked_frac": jnp.sum(changed_BxL) / jnp.maximum(jnp.sum(n_valid_B), 1)}
  metrics.update(t_bucket_metrics(t_B, row_sum_B / jnp.maximum(n_valid_B, 1), jnp.any(valid_BxL, axis=1),
                                  diffusion_cfg.num_t_buckets))
  return loss, metrics


def compute_loss(apply_fn, batch, rng: PRNGKeyArray, diffusion_cfg, *, mask_id: int,
                 progress=0.0, vocab_size: int | None = None) -> tuple[Float32[Array, ""], dict]:
  """(data loss f32 scalar, metrics) of the objective named by `diffusion_cfg.loss`; jittable.

  `progress`: how far training is (step / train.num_steps), for the moving-Gaussian t window.
  With `diffusion_cfg.kernel == "uniform"` the loss is the uniform kernel's ELBO (`vocab_size`
  needed) and apply_fn takes `t_B=`.
  """
  _check_name(diffusion_cfg.loss)
  if diffusion_cfg.loss == "ar":
    return ar_loss(apply_fn, batch)
  if diffusion_cfg.get("kernel", "masked") == "uniform":
    return uniform_elbo_loss(apply_fn, batch, rng, diffusion_cfg, mask_id=mask_id, vocab_size=vocab_size,
                             progress=progress)
  noise = sample_noise(rng, batch["segment_ids"], diffusion_cfg, progress)
  return diffusion_loss(apply_fn, batch, noise, mask_id=mask_id, num_t_buckets=diffusion_cfg.num_t_buckets)
