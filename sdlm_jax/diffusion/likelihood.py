"""Likelihood evaluation: the masked-diffusion ELBO bound, the exact AR NLL, a unigram baseline.

ELBO bound: for every row, `num_t_samples` values of t in [t_min, 1] (antithetic: one offset
for the whole batch, t_i = (u + i/(S*B)) mod 1, so each row's S samples sit in S different
strata of width 1/S and the batch covers S*B strata once each), each giving the MDLM estimate
w(t) * sum_masked -log p(x0_i | x_t). Averaged over the samples, summed over all rows and
batches and divided by the number of real tokens it bounds the NLL per token, and exp of it
bounds the perplexity. All randomness derives from `seed` and the batch index: the same model
and batches give exactly the same number. With the uniform kernel (`kernel="uniform"`) each
sample is instead that kernel's ELBO integrand summed over every real token, weighted by
-alpha'/(N alpha), at t in [t_min, 1 - t_min] (diffusion.uniform). See also
docs/formulas.md, sections 5 and 10.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Int, Real

from sdlm_jax import progress as progress_lib
from sdlm_jax.diffusion import corruption, losses, uniform
from sdlm_jax.diffusion.schedules import get_schedule


def _logits(graphdef, state, tokens_BxL, segment_ids_BxL, positions_BxL, t_B=None):
  model = nnx.merge(graphdef, state)
  time = {} if t_B is None else {"t_B": t_B}
  logits_BxLxV, _ = model(tokens_BxL, segment_ids_BxL=segment_ids_BxL, positions_BxL=positions_BxL, **time)
  return logits_BxLxV


@functools.partial(jax.jit, static_argnames=("graphdef", "num_t_samples", "schedule_name", "t_min", "mask_id",
                                             "kernel", "vocab_size"))
def _elbo_nats(graphdef, state, tokens_BxL, segment_ids_BxL, positions_BxL, rng, *, num_t_samples: int,
               schedule_name: str, t_min: float, mask_id: int, kernel: str = "masked", vocab_size: int = 0):
  """(ELBO of the batch in nats, averaged over the t samples; number of real tokens)."""
  schedule = get_schedule(schedule_name)
  batch_size = tokens_BxL.shape[0]
  valid_BxL = segment_ids_BxL > 0
  rng_t, rng_mask = jax.random.split(rng)
  t_SxB = corruption.antithetic_t(rng_t, num_t_samples * batch_size, t_min).reshape(num_t_samples, batch_size)

  def one_sample(total, xs):
    t_B, key = xs
    if kernel == "uniform":
      t_B = jnp.minimum(t_B, 1.0 - t_min)
      alpha_B = schedule.alpha(t_B)
      noisy_BxL = uniform.corrupt(key, tokens_BxL, alpha_B, valid_BxL, vocab_size, mask_id)
      logits_BxLxV = _logits(graphdef, state, noisy_BxL, segment_ids_BxL, positions_BxL, t_B)
      h_BxL = uniform.elbo_integrand(logits_BxLxV, noisy_BxL, tokens_BxL, alpha_B, mask_id)
      row_nats_B = jnp.sum(jnp.where(valid_BxL, h_BxL, 0.0), axis=1) / uniform.support_size(vocab_size)
      return total + jnp.sum(schedule.decay_rate(t_B) * row_nats_B), None
    noisy_BxL, is_masked_BxL = corruption.mask_tokens(key, tokens_BxL, schedule.mask_prob(t_B), mask_id, valid_BxL)
    logits_BxLxV = _logits(graphdef, state, noisy_BxL, segment_ids_BxL, positions_BxL)
    row_nats_B = losses.masked_ce_row_sum(losses.token_cross_entropy(logits_BxLxV, tokens_BxL), is_masked_BxL)
    return total + jnp.sum(schedule.weight(t_B) * row_nats_B), None

  total, _ = jax.lax.scan(one_sample, jnp.zeros((), jnp.float32),
                          (t_SxB, jax.random.split(rng_mask, num_t_samples)))
  return total / num_t_samples, jnp.sum(valid_BxL)


def _per_token(nats: float, count: int) -> dict:
  per_token = nats / max(count, 1)
  return {"nll_per_token": per_token, "num_tokens": count, "ppl": math.exp(per_token)}


def elbo_bound(model, batches, *, num_t_samples: int, seed: int, schedule_name: str, t_min: float,
               mask_id: int, kernel: str = "masked", progress: bool = False) -> dict:
  """ELBO NLL bound per real token over `batches` (dicts of tokens/segment_ids/positions, [B, L]).

  `kernel`: masked (absorbing [MASK]) or uniform (the model must take t: model.time_embedding).
  Returns dict(nll_per_token, ppl_bound = exp(nll_per_token), num_tokens). One compiled
  program per batch shape; the model's parameters are arguments, not constants.
  `progress`: a bar over the batches on stderr.
  """
  graphdef, state = nnx.split(model)
  nats, count = 0.0, 0
  for i, batch in enumerate(progress_lib.bar(batches, desc="eval", unit="batch", enabled=progress)):
    b_nats, b_count = _elbo_nats(
        graphdef, state, jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]),
        jnp.asarray(batch["positions"]), jax.random.fold_in(jax.random.key(seed), i),
        num_t_samples=num_t_samples, schedule_name=schedule_name, t_min=t_min, mask_id=mask_id, kernel=kernel,
        vocab_size=model.cfg.vocab_size if kernel == "uniform" else 0)
    nats += float(b_nats)
    count += int(b_count)
  out = _per_token(nats, count)
  out["ppl_bound"] = out.pop("ppl")
  return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ar_nats(graphdef, state, tokens_BxL, segment_ids_BxL, positions_BxL):
  logits_BxLxV = _logits(graphdef, state, tokens_BxL, segment_ids_BxL, positions_BxL)
  _, total, count = losses.ar_cross_entropy(logits_BxLxV, tokens_BxL, segment_ids_BxL)
  return total, count


def ar_nll(model, batches, *, progress: bool = False) -> dict:
  """Exact next-token NLL of a causal model (the AR baseline's counterpart of the ELBO bound).

  Returns dict(nll_per_token, ppl, num_tokens); the first token of each document is not
  predicted, so num_tokens counts predicted tokens. `progress`: a bar over the batches.
  """
  graphdef, state = nnx.split(model)
  nats, count = 0.0, 0
  for batch in progress_lib.bar(batches, desc="eval", unit="batch", enabled=progress):
    b_nats, b_count = _ar_nats(graphdef, state, jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]),
                               jnp.asarray(batch["positions"]))
    nats += float(b_nats)
    count += int(b_count)
  return _per_token(nats, count)


def unigram_perplexity(train_counts_V: Real[np.ndarray, "V"], val_tokens: Int[np.ndarray, "..."]) -> float:
  """Perplexity on `val_tokens` of an add-one-smoothed unigram model fit on `train_counts_V`.

  p(v) = (count_v + 1) / (sum counts + V): the floor any language model must beat by far.
  """
  counts_V = np.asarray(train_counts_V, np.float64) + 1.0
  log_p_V = np.log(counts_V / counts_V.sum())
  return float(np.exp(-np.mean(log_p_V[np.asarray(val_tokens).reshape(-1)])))
