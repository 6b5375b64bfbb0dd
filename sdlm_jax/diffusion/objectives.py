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

The randomness is factored out: `sample_noise(rng, ...)` draws everything, and
`diffusion_loss(...)` is deterministic given that noise, so tests can rebuild the loss from
the same masks. The loss returned is the data loss only; the model's aux dict (router
losses and statistics) comes back as metrics["aux"]. The formulas: docs/formulas.md, sections 2-3.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Float32, Int, PRNGKeyArray, Real

from sdlm_jax.diffusion import corruption, losses
from sdlm_jax.diffusion.schedules import get_schedule

LOSS_NAMES = ("megadlm", "maskgit", "mdlm_elbo", "ar")


class Noise(NamedTuple):
  """One draw of the forward process for a batch."""
  t_B: Float32[Array, "B"]           # diffusion time per row
  is_masked_BxL: Bool[Array, "B L"]  # positions replaced by [MASK]
  valid_BxL: Bool[Array, "B L"]      # real tokens (after any random-length cut)
  weight_B: Float32[Array, "B"]      # per-token loss weight of each row's masked tokens


def _megadlm_mask(rng, valid_BxL, cfg):
  """MegaDLMs' noise: random-length cut, t ~ U[0,1) per row, masking rate 1 - alpha(t), one forced mask."""
  schedule = get_schedule(cfg.schedule)
  rng_cut, rng_t, rng_mask, rng_force = jax.random.split(rng, 4)
  valid_BxL = valid_BxL & corruption.random_length_keep(rng_cut, valid_BxL.shape[1], cfg.random_length_prob)[None]
  t_B = jax.random.uniform(rng_t, (valid_BxL.shape[0],))
  is_masked_BxL = corruption.sample_mask(rng_mask, schedule.mask_prob(t_B), valid_BxL)
  is_masked_BxL = corruption.force_one_mask(rng_force, is_masked_BxL, valid_BxL)
  return t_B, is_masked_BxL, valid_BxL


def _megadlm_noise(rng, valid_BxL, cfg):
  t_B, is_masked_BxL, valid_BxL = _megadlm_mask(rng, valid_BxL, cfg)
  return Noise(t_B, is_masked_BxL, valid_BxL, losses.megadlm_row_weights(is_masked_BxL, valid_BxL))


def _maskgit_noise(rng, valid_BxL, cfg):
  t_B, is_masked_BxL, valid_BxL = _megadlm_mask(rng, valid_BxL, cfg)
  return Noise(t_B, is_masked_BxL, valid_BxL, losses.maskgit_row_weights(is_masked_BxL, valid_BxL))


def _mdlm_noise(rng, valid_BxL, cfg):
  schedule = get_schedule(cfg.schedule)
  rng_t, rng_mask = jax.random.split(rng)
  t_B = corruption.antithetic_t(rng_t, valid_BxL.shape[0], cfg.t_min)
  is_masked_BxL = corruption.sample_mask(rng_mask, schedule.mask_prob(t_B), valid_BxL)
  return Noise(t_B, is_masked_BxL, valid_BxL, schedule.weight(t_B))


_NOISE = {"megadlm": _megadlm_noise, "maskgit": _maskgit_noise, "mdlm_elbo": _mdlm_noise}


def _check_name(name: str):
  if name not in LOSS_NAMES:
    raise ValueError(f"diffusion.loss={name!r} is not supported; allowed values: {', '.join(LOSS_NAMES)}")


def sample_noise(rng: PRNGKeyArray, segment_ids_BxL: Int[Array, "B L"], diffusion_cfg) -> Noise:
  """All the randomness of a diffusion loss (`megadlm`, `maskgit` or `mdlm_elbo`) for one batch."""
  _check_name(diffusion_cfg.loss)
  if diffusion_cfg.loss not in _NOISE:
    raise ValueError(f"diffusion.loss={diffusion_cfg.loss!r} draws no noise; allowed values: {', '.join(_NOISE)}")
  return _NOISE[diffusion_cfg.loss](rng, segment_ids_BxL > 0, diffusion_cfg)


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


def compute_loss(apply_fn, batch, rng: PRNGKeyArray, diffusion_cfg, *,
                 mask_id: int) -> tuple[Float32[Array, ""], dict]:
  """(data loss f32 scalar, metrics) of the objective named by `diffusion_cfg.loss`; jittable."""
  _check_name(diffusion_cfg.loss)
  if diffusion_cfg.loss == "ar":
    return ar_loss(apply_fn, batch)
  noise = sample_noise(rng, batch["segment_ids"], diffusion_cfg)
  return diffusion_loss(apply_fn, batch, noise, mask_id=mask_id, num_t_buckets=diffusion_cfg.num_t_buckets)
