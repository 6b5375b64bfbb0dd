"""The ELBO bound (reproducible, exact for models we can integrate by hand) and the unigram baseline."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdlm_jax.diffusion import likelihood

MASK = 4
V = 16
TRACES = []


class Uniform(nnx.Module):
  """Uniform logits: every masked token costs exactly log V nats."""

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL):
    return jnp.zeros(tokens_BxL.shape + (V,)), {}


class Oracle(nnx.Module):
  """Knows the clean batch: near-zero cross-entropy on every target, masked or not."""

  def __init__(self, tokens_BxL):
    self.answer = nnx.Variable(jnp.asarray(tokens_BxL))

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL):
    return 30.0 * jax.nn.one_hot(self.answer[...], V), {}


class Tiny(nnx.Module):
  """Embeddings plus the mean of the token's segment: a bidirectional model with parameters."""

  def __init__(self, rngs):
    self.emb = nnx.Param(jax.random.normal(rngs.params(), (V, 8)))
    self.out = nnx.Param(jax.random.normal(rngs.params(), (8, V)))

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL):
    TRACES.append(tokens_BxL.shape)
    x_BxLxD = self.emb[...][tokens_BxL]
    same_BxLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]).astype(jnp.float32)
    ctx_BxLxD = jnp.einsum("bqk,bkd->bqd", same_BxLxL, x_BxLxD) / jnp.sum(same_BxLxL, -1, keepdims=True)
    return (x_BxLxD + ctx_BxLxD) @ self.out[...], {}


def _batches(num, b=16, l=128, seed=0):
  """Random tokens; row 1 ends in padding and row 2 packs two documents."""
  rng = np.random.default_rng(seed)
  seg = np.ones((b, l), np.int32)
  seg[1, 40:] = 0
  seg[2, 50:] = 2
  pos = np.where(seg == 2, np.arange(l) - 50, np.arange(l)) * (seg > 0)
  return [{"tokens": rng.integers(5, V, (b, l)).astype(np.int32), "segment_ids": seg,
           "positions": pos.astype(np.int32)} for _ in range(num)]


def _elbo(model, batches, **kw):
  args = dict(num_t_samples=4, seed=0, schedule_name="linear", t_min=1e-3, mask_id=MASK)
  args.update(kw)
  return likelihood.elbo_bound(model, batches, **args)


@pytest.mark.parametrize("schedule, factor", [
    ("linear", 1.0),
    ("poly2", 1.0 + 0.2),                                       # (1 - t_min^2) / (1 - t_min)
    ("cosine", (1.0 - math.sin(math.pi / 2 * 0.2)) / 0.8),      # alpha(t_min) / (1 - t_min)
])
def test_uniform_model_elbo_is_log_v_times_alpha_tmin_over_one_minus_tmin(schedule, factor):
  # E_t~U[t_min,1][w(t) (1 - alpha(t))] * log V = E[-alpha'(t)] log V = alpha(t_min) / (1 - t_min) * log V
  batches = _batches(1)
  out = _elbo(Uniform(), batches, num_t_samples=16, schedule_name=schedule, t_min=0.2)
  assert out["num_tokens"] == 16 * 128 - 88
  assert out["nll_per_token"] == pytest.approx(math.log(V) * factor, rel=0.03)  # estimator std ~0.7%
  assert out["ppl_bound"] == pytest.approx(math.exp(out["nll_per_token"]))


def test_oracle_model_elbo_is_near_zero():
  batches = _batches(1, b=4, l=16)
  out = _elbo(Oracle(batches[0]["tokens"]), batches)
  assert 0.0 <= out["nll_per_token"] < 1e-6


def test_elbo_is_reproducible_and_jitted_per_batch_shape():
  model, batches = Tiny(nnx.Rngs(0)), _batches(2, b=4, l=32)
  TRACES.clear()
  first = _elbo(model, batches, seed=7)
  assert len(TRACES) == 1  # two batches, four t samples: one trace of the model
  assert _elbo(model, batches, seed=7) == first and len(TRACES) == 1
  assert _elbo(model, batches, seed=8)["nll_per_token"] != first["nll_per_token"]
  other = _elbo(Tiny(nnx.Rngs(1)), batches, seed=7)  # parameters are arguments, not constants
  assert len(TRACES) == 1 and other["nll_per_token"] != first["nll_per_token"]


def test_ar_nll_of_a_uniform_model_is_log_v_over_next_token_pairs():
  out = likelihood.ar_nll(Uniform(), _batches(1, b=4, l=64))
  assert out["num_tokens"] == 4 * 63 - 24 - 1  # row 1: 24 padding targets; row 2: one document boundary
  assert out["nll_per_token"] == pytest.approx(math.log(V), rel=1e-6)


def test_unigram_perplexity_hand_computed():
  # counts [3, 1, 0] + 1 -> p = [4, 2, 1] / 7; val tokens 0, 1, 2, 0
  ppl = likelihood.unigram_perplexity(np.array([3, 1, 0]), np.array([[0, 1], [2, 0]]))
  assert ppl == pytest.approx((7 ** 4 / 32) ** 0.25)
