"""Training objectives: corrupt a batch, run the model, return (loss, metrics).

`compute_loss(apply_fn, batch, rng, diffusion_cfg, mask_id=...)` with
`apply_fn(tokens_BxL, segment_ids_BxL, positions_BxL) -> (logits_BxLxV, aux)`:
  megadlm    MegaDLMs' exact loss: t ~ U[0,1) per row, mask with prob t, force one mask per
             row, weight 1/p_mask with the row's realised masked fraction, divide by the
             number of real tokens; with prob `random_length_prob` the batch is cut to a
             random length U{2..L} (static shapes: positions past the cut become padding).
  mdlm_elbo  continuous-time ELBO with antithetic t in [t_min, 1] and schedule weight w(t).
  ar         next-token cross-entropy (causal model).
Metrics include per-t-bucket loss sums and counts (rows bucketed by their t).
"""

import jax
import jax.numpy as jnp

from sdlm_jax.diffusion import corruption, losses
from sdlm_jax.diffusion.schedules import get_schedule

LOSS_NAMES = ("megadlm", "mdlm_elbo", "ar")


def random_length_cut(rng, valid_BxL, prob: float):
  """With probability `prob`, keeps only the first U{2..L} positions of every row."""
  length = valid_BxL.shape[1]
  rng_do, rng_len = jax.random.split(rng)
  do_cut = jax.random.uniform(rng_do, ()) < prob
  cut = jax.random.randint(rng_len, (), 2, length + 1)
  keep_L = jnp.where(do_cut, jnp.arange(length) < cut, True)
  return valid_BxL & keep_L[None, :]


def _bucket_metrics(t_B, row_loss_B, row_has_loss_B, num_buckets: int):
  bucket_B = jnp.clip(jnp.floor(t_B * num_buckets).astype(jnp.int32), 0, num_buckets - 1)
  onehot_BxK = jax.nn.one_hot(bucket_B, num_buckets) * row_has_loss_B[:, None]
  return {"t_bucket_loss_sum": jnp.sum(onehot_BxK * row_loss_B[:, None], axis=0),
          "t_bucket_count": jnp.sum(onehot_BxK, axis=0)}


def _megadlm(apply_fn, tokens, segment_ids, positions, rng, cfg, mask_id):
  rng_cut, rng_t, rng_mask, rng_force = jax.random.split(rng, 4)
  valid_BxL = random_length_cut(rng_cut, segment_ids > 0, cfg.random_length_prob)
  segment_ids = jnp.where(valid_BxL, segment_ids, 0)
  t_B = jax.random.uniform(rng_t, (tokens.shape[0],))
  masked_BxL = corruption.sample_mask(rng_mask, t_B, valid_BxL)
  masked_BxL = corruption.force_one_mask(rng_force, masked_BxL, valid_BxL)
  logits, aux = apply_fn(corruption.apply_mask(tokens, masked_BxL, mask_id), segment_ids, positions)
  loss, row_mean_B = losses.megadlm_loss(losses.token_cross_entropy(logits, tokens), masked_BxL, valid_BxL)
  return loss, aux, t_B, row_mean_B, masked_BxL, valid_BxL


def _mdlm_elbo(apply_fn, tokens, segment_ids, positions, rng, cfg, mask_id):
  schedule = get_schedule(cfg.schedule)
  rng_t, rng_mask = jax.random.split(rng)
  valid_BxL = segment_ids > 0
  t_B = corruption.antithetic_t(rng_t, tokens.shape[0], cfg.t_min)
  masked_BxL = corruption.sample_mask(rng_mask, schedule.mask_prob(t_B), valid_BxL)
  logits, aux = apply_fn(corruption.apply_mask(tokens, masked_BxL, mask_id), segment_ids, positions)
  row_nll_B = losses.elbo_row_nll(losses.token_cross_entropy(logits, tokens), masked_BxL, schedule.weight(t_B))
  n_valid_B = jnp.sum(valid_BxL, axis=1)
  loss = jnp.sum(row_nll_B) / jnp.maximum(jnp.sum(n_valid_B), 1)
  return loss, aux, t_B, row_nll_B / jnp.maximum(n_valid_B, 1), masked_BxL, valid_BxL


def compute_loss(apply_fn, batch, rng, diffusion_cfg, *, mask_id: int):
  tokens, segment_ids, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
  name = diffusion_cfg.loss
  if name == "ar":
    logits, aux = apply_fn(tokens, segment_ids, positions)
    loss, _, _ = losses.ar_loss(logits, tokens, segment_ids)
    return loss, {"loss": loss, "aux": aux}
  if name == "megadlm":
    fn = _megadlm
  elif name == "mdlm_elbo":
    fn = _mdlm_elbo
  else:
    raise ValueError(f"diffusion.loss={name!r}; allowed values: {', '.join(LOSS_NAMES)}")
  loss, aux, t_B, row_loss_B, masked_BxL, valid_BxL = fn(
      apply_fn, tokens, segment_ids, positions, rng, diffusion_cfg, mask_id)
  metrics = {"loss": loss, "aux": aux,
             "masked_frac": jnp.sum(masked_BxL) / jnp.maximum(jnp.sum(valid_BxL), 1)}
  metrics.update(_bucket_metrics(t_B, row_loss_B, jnp.any(valid_BxL, axis=1), diffusion_cfg.num_t_buckets))
  return loss, metrics
