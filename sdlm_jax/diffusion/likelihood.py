"""Likelihood evaluation: the masked-diffusion ELBO bound, exact AR NLL, a unigram baseline.

The ELBO bound draws `num_t_samples` stratified t per sequence (antithetic across the batch
and the samples), so its variance is low, and every random number comes from `seed`: the
same model and data give the same number. exp(ELBO per token) bounds the perplexity.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdlm_jax.diffusion import corruption, losses
from sdlm_jax.diffusion.schedules import get_schedule


def _apply(graphdef, state, tokens, segment_ids, positions):
  logits, _ = nnx.merge(graphdef, state)(tokens, segment_ids_BxL=segment_ids, positions_BxL=positions)
  return logits


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_t_samples", "schedule_name", "t_min", "mask_id"))
def _elbo_batch(graphdef, state, batch, rng, *, num_t_samples, schedule_name, t_min, mask_id):
  """(sum over rows of the per-row ELBO averaged over t samples, number of real tokens)."""
  schedule = get_schedule(schedule_name)
  tokens, segment_ids, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
  batch_size = tokens.shape[0]
  valid_BxL = segment_ids > 0
  rng_t, rng_mask = jax.random.split(rng)
  t_SxB = corruption.antithetic_t(rng_t, num_t_samples * batch_size, t_min).reshape(num_t_samples, batch_size)

  def one_sample(carry, xs):
    t_B, key = xs
    masked_BxL = corruption.sample_mask(key, schedule.mask_prob(t_B), valid_BxL)
    logits = _apply(graphdef, state, corruption.apply_mask(tokens, masked_BxL, mask_id), segment_ids, positions)
    nll_B = losses.elbo_row_nll(losses.token_cross_entropy(logits, tokens), masked_BxL, schedule.weight(t_B))
    return carry + jnp.sum(nll_B), None

  total, _ = jax.lax.scan(one_sample, jnp.zeros((), jnp.float32),
                          (t_SxB, jax.random.split(rng_mask, num_t_samples)))
  return total / num_t_samples, jnp.sum(valid_BxL)


def elbo_bound(model, batches, *, num_t_samples: int, seed: int, schedule_name: str, t_min: float,
               mask_id: int) -> dict:
  graphdef, state = nnx.split(model)
  nll, count = 0.0, 0
  for i, batch in enumerate(batches):
    b_nll, b_count = _elbo_batch(graphdef, state, batch, jax.random.fold_in(jax.random.key(seed), i),
                                 num_t_samples=num_t_samples, schedule_name=schedule_name, t_min=t_min,
                                 mask_id=mask_id)
    nll += float(b_nll)
    count += int(b_count)
  per_token = nll / max(count, 1)
  return {"nll_per_token": per_token, "ppl_bound": math.exp(per_token), "num_tokens": count}


@functools.partial(jax.jit, static_argnums=(0,))
def _ar_batch(graphdef, state, batch):
  logits = _apply(graphdef, state, batch["tokens"], batch["segment_ids"], batch["positions"])
  _, total, count = losses.ar_loss(logits, batch["tokens"], batch["segment_ids"])
  return total, count


def ar_nll(model, batches) -> dict:
  """Exact next-token NLL of a causal model (the AR baseline's counterpart of the ELBO)."""
  graphdef, state = nnx.split(model)
  nll, count = 0.0, 0
  for batch in batches:
    b_nll, b_count = _ar_batch(graphdef, state, batch)
    nll += float(b_nll)
    count += int(b_count)
  per_token = nll / max(count, 1)
  return {"nll_per_token": per_token, "ppl": math.exp(per_token), "num_tokens": count}


def unigram_perplexity(train_counts_V, val_tokens) -> float:
  """Perplexity of an add-one smoothed unigram model fit on train counts, on val tokens."""
  counts = np.asarray(train_counts_V, np.float64) + 1.0
  log_p = np.log(counts / counts.sum())
  return float(np.exp(-np.mean(log_p[np.asarray(val_tokens)])))
