"""The uniform transition kernel against float64 references computed other ways.

The closed-form ELBO integrand is checked against (a) the ratio form summed term by term over
the vocabulary and (b) the limit of the discrete-time ELBO, a sum of KL divergences between
Bayes posteriors built from the forward transition matrices, with the jump rate taken by
numerically differentiating alpha(t).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from sdlm_jax.diffusion import likelihood, objectives, sampler, uniform
from sdlm_jax.diffusion.schedules import get_schedule
from sdlm_jax.errors import UserInputError

MASK = 4
V = 7                 # ids 0..6; [MASK] = 4 is outside the support, so N = 6
N = V - 1
SUPPORT = [v for v in range(V) if v != MASK]
TABLE_VxV = np.random.default_rng(3).normal(size=(V, V))


def _xbar(dist_V, alpha):
  """N alpha dist + (1 - alpha) on the support (float64)."""
  out = N * alpha * np.asarray(dist_V, np.float64) + (1.0 - alpha)
  out[MASK] = 0.0
  return out


def _probs(logits_V):
  p = np.exp(logits_V - logits_V[SUPPORT].max())
  p[MASK] = 0.0
  return p / p.sum()


def h_ratio_form(logits_V, z, x, alpha):
  """sum_{y != z} [s_y - r_y log s_y + r_y log r_y - r_y], one term per vocabulary entry."""
  onehot = np.eye(V)[x]
  xb, xbt = _xbar(onehot, alpha), _xbar(_probs(np.asarray(logits_V, np.float64)), alpha)
  total = 0.0
  for y in SUPPORT:
    if y == z:
      continue
    r, s = xb[y] / xb[z], xbt[y] / xbt[z]
    total += s - r * math.log(s) + r * math.log(r) - r
  return total


@pytest.mark.parametrize("alpha", [0.02, 0.3, 0.9, 0.999])
def test_closed_form_integrand_matches_the_ratio_form(alpha):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, V)) * 2
  clean = rng.choice(SUPPORT, size=(2, 5))
  noisy = clean.copy()
  noisy[:, ::2] = rng.choice(SUPPORT, size=(2, 3))  # some corrupted, some (by chance) not
  noisy[0, 1] = clean[0, 1]
  got = np.asarray(uniform.elbo_integrand(jnp.asarray(logits, jnp.float32), jnp.asarray(noisy), jnp.asarray(clean),
                                          jnp.full((2,), alpha), MASK))
  want = np.array([[h_ratio_form(logits[b, i], noisy[b, i], clean[b, i], alpha) for i in range(5)] for b in range(2)])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  assert (got > -1e-5).all()


def test_hand_case_perfect_prediction_costs_nothing_at_an_uncorrupted_token():
  """x_theta = x exactly: xbar_theta = xbar, so every term s - r log s + r log r - r is 0."""
  logits = np.full((1, 1, V), -1e4)
  logits[0, 0, 2] = 0.0
  h = uniform.elbo_integrand(jnp.asarray(logits, jnp.float32), jnp.array([[5]]), jnp.array([[2]]),
                             jnp.array([0.4]), MASK)
  assert float(h[0, 0]) == pytest.approx(0.0, abs=1e-5)
  # uniform x_theta at alpha = 0.5, z = x: xbar = (4, 1, 1, 1, 1, 1) / xbar_theta = all 1.5 -> by hand
  h = uniform.elbo_integrand(jnp.zeros((1, 1, V)), jnp.array([[2]]), jnp.array([[2]]), jnp.array([0.5]), MASK)
  r, s = 0.5 / 3.5, 1.0  # xbar = N*0.5 + 0.5 = 3.5 at x, 0.5 elsewhere; xbar_theta = 1 everywhere
  assert float(h[0, 0]) == pytest.approx(5 * (s - r * math.log(s) + r * math.log(r) - r), rel=1e-5)


def _model_logits(z, t):
  """A fixed toy denoiser x_theta(z_t, t): a table row plus a t-dependent tilt."""
  return TABLE_VxV[z] + 1.5 * t * np.arange(V) / V


def _forward_matrix(a):
  """Q[y, z] = q(z_t = z | z_s = y) = a [y = z] + (1 - a)/N on the support."""
  q = np.zeros((V, V))
  for y in SUPPORT:
    for z in SUPPORT:
      q[y, z] = a * (y == z) + (1.0 - a) / N
  return q


def _posterior(z, dist_s_V, a_ts):
  """q(z_s | z_t = z, x ~ dist): Bayes with the one-step forward matrix."""
  w = _forward_matrix(a_ts)[:, z] * dist_s_V
  return w / w.sum()


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_continuous_elbo_is_the_limit_of_the_discrete_time_elbo(schedule_name):
  schedule = get_schedule(schedule_name)
  alpha = lambda t: float(schedule.alpha(t))
  lo, hi, x = 0.05, 0.95, 2
  # discrete time: sum_k E_{z_t ~ q_t(.|x)} KL(q(z_s | z_t, x) || q(z_s | z_t, x_theta(z_t, t)))
  steps = 1000  # the gap to the continuous limit falls like 1/steps: ~5e-5 relative here
  grid = np.linspace(lo, hi, steps + 1)
  discrete = 0.0
  for k in range(1, steps + 1):
    s, t = grid[k - 1], grid[k]
    a_s, a_t = alpha(s), alpha(t)
    q_t = _xbar(np.eye(V)[x], a_t) / N
    for z in SUPPORT:
      post = _posterior(z, _xbar(np.eye(V)[x], a_s) / N, a_t / a_s)
      model = _posterior(z, _xbar(_probs(_model_logits(z, t)), a_s) / N, a_t / a_s)
      keep = post > 0
      discrete += q_t[z] * np.sum(post[keep] * np.log(post[keep] / model[keep]))
  # continuous time, our integrand, with -alpha'/alpha from a numerical derivative of alpha
  quad = 2000
  mids = lo + (np.arange(quad) + 0.5) * (hi - lo) / quad
  continuous = 0.0
  for t in mids:
    a, eps = alpha(t), 1e-4
    rate = -(alpha(t + eps) - alpha(t - eps)) / (2 * eps) / a
    q_t = _xbar(np.eye(V)[x], a) / N
    zs = np.array(SUPPORT)
    logits = np.stack([_model_logits(z, t) for z in zs])[None]
    h = np.asarray(uniform.elbo_integrand(jnp.asarray(logits, jnp.float32), jnp.asarray(zs)[None],
                                          jnp.full((1, len(zs)), x), jnp.array([a]), MASK), np.float64)[0]
    continuous += np.sum(q_t[zs] * rate / N * h) * (hi - lo) / quad
  assert continuous == pytest.approx(discrete, rel=2e-4)


def test_posterior_probs_match_bayes_and_never_propose_mask():
  rng = np.random.default_rng(1)
  probs = np.stack([_probs(rng.normal(size=V)) for _ in range(3)])[None]
  noisy = np.array([[0, 2, 6]])
  got = np.asarray(uniform.posterior_probs(jnp.asarray(probs, jnp.float32), jnp.asarray(noisy), 0.3, 0.6, MASK))
  for i in range(3):
    want = _posterior(noisy[0, i], _xbar(probs[0, i], 0.6) / N, 0.3 / 0.6)
    np.testing.assert_allclose(got[0, i], want, rtol=1e-5, atol=1e-7)
  assert (got[..., MASK] == 0).all()
  final = np.asarray(uniform.posterior_probs(jnp.asarray(probs, jnp.float32), jnp.asarray(noisy), 0.3, 1.0, MASK))
  np.testing.assert_allclose(final[0, 0], _posterior(0, probs[0, 0], 0.3), rtol=1e-5, atol=1e-7)


def test_corruption_rate_support_and_padding():
  tokens = jnp.full((4, 4000), 2, jnp.int32)
  valid = jnp.ones((4, 4000), bool).at[3, 2000:].set(False)
  alpha = jnp.array([1.0, 0.5, 0.0, 0.0])
  noisy = np.asarray(uniform.corrupt(jax.random.key(0), tokens, alpha, valid, V, MASK))
  changed = noisy != 2
  assert changed[0].sum() == 0
  assert changed[1].mean() == pytest.approx(0.5 * (1 - 1 / N), abs=0.03)
  assert changed[2].mean() == pytest.approx(1 - 1 / N, abs=0.03)
  assert (noisy != MASK).all() and (noisy[3, 2000:] == 2).all()
  assert set(np.unique(noisy[2]).tolist()) == set(SUPPORT)


def _cfg(**kw):
  base = dict(loss="mdlm_elbo", kernel="uniform", schedule="linear", t_min=1e-3, random_length_prob=0.0,
              num_t_buckets=4, t_sampling="uniform", moving_gaussian_std=0.25)
  base.update(kw)
  return ConfigDict(base)


def _toy_apply(tokens, seg, pos, t_B=None):
  logits = jnp.asarray(TABLE_VxV, jnp.float32)[tokens] + 0.1 * pos[..., None] + t_B[:, None, None]
  return logits, {"aux_loss": jnp.zeros(()), "router": {}, "seen_tokens": tokens, "seen_t": t_B}


def test_uniform_loss_matches_a_per_token_float64_loop():
  rng = np.random.default_rng(2)
  tokens = rng.choice(SUPPORT, size=(6, 10)).astype(np.int32)
  seg = np.ones((6, 10), np.int32)
  seg[1, 7:] = 0
  pos = np.tile(np.arange(10, dtype=np.int32), (6, 1))
  batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}
  loss, metrics = jax.jit(lambda r: objectives.compute_loss(_toy_apply, batch, r, _cfg(), mask_id=MASK,
                                                            vocab_size=V))(jax.random.key(4))
  noisy, t = np.asarray(metrics["aux"]["seen_tokens"]), np.asarray(metrics["aux"]["seen_t"], np.float64)
  assert 1e-3 <= t.min() and t.max() <= 1 - 1e-3
  assert sorted(np.floor(t * 6).astype(int).tolist()) == list(range(6))  # stratified
  total = 0.0
  for b in range(6):
    for i in range(10):
      if seg[b, i]:
        logits = TABLE_VxV[noisy[b, i]] + 0.1 * i + t[b]
        total += 1.0 / (N * (1.0 - t[b])) * h_ratio_form(logits, noisy[b, i], tokens[b, i], 1.0 - t[b])
  assert float(loss) == pytest.approx(total / seg.sum(), rel=1e-4)
  assert (noisy[seg == 0] == tokens[seg == 0]).all()
  assert float(metrics["masked_frac"]) == pytest.approx(((noisy != tokens) & (seg > 0)).sum() / seg.sum())


class _Config:
  vocab_size = 16


class UniformTimeModel(nnx.Module):
  """x_theta uniform over the support whatever z_t and t (takes t, as a time-embedding model does)."""
  cfg = _Config()

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL, t_B):
    return jnp.zeros(tokens_BxL.shape + (16,)) + 0.0 * t_B[:, None, None], {}


class OracleTimeModel(nnx.Module):
  """Knows the clean batch: x_theta = x, so every ELBO term vanishes."""
  cfg = _Config()

  def __init__(self, tokens_BxL):
    self.answer = nnx.Variable(jnp.asarray(tokens_BxL))

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL, t_B):
    return 40.0 * jax.nn.one_hot(self.answer[...], 16), {}


def _eval_batches(b=16, l=64):
  rng = np.random.default_rng(0)
  seg = np.ones((b, l), np.int32)
  seg[1, 40:] = 0
  return [{"tokens": rng.integers(5, 16, (b, l)).astype(np.int32), "segment_ids": seg,
           "positions": (np.arange(l)[None] * seg).astype(np.int32)}]


def test_uniform_kernel_elbo_bound_of_an_oracle_is_zero_and_of_a_uniform_model_matches_quadrature():
  batches = _eval_batches()
  args = dict(num_t_samples=16, seed=0, schedule_name="linear", t_min=1e-3, mask_id=MASK, kernel="uniform")
  oracle = likelihood.elbo_bound(OracleTimeModel(batches[0]["tokens"]), batches, **args)
  assert oracle["num_tokens"] == 16 * 64 - 24 and abs(oracle["nll_per_token"]) < 1e-4  # float32 rounding
  got = likelihood.elbo_bound(UniformTimeModel(), batches, **args)["nll_per_token"]
  # float64: E_t E_z [rate/N * h]; x_theta uniform makes xbar_theta = 1, so s_y = 1 and
  # h = sum_{y != z} [1 + r_y log r_y - r_y], with r = small/big (N-1 times) when z = x, else
  # r_x = big/small and r = 1 at the N-2 others
  n, quad, lo, hi = 15, 4000, 1e-3, 1 - 1e-3
  want = 0.0
  for t in lo + (np.arange(quad) + 0.5) * (hi - lo) / quad:
    a = 1.0 - t
    big, small = n * a + 1 - a, 1 - a
    h_same = (n - 1) * (1.0 - small / big + small / big * math.log(small / big))
    h_diff = 1.0 - big / small + big / small * math.log(big / small)
    p_same = a + (1 - a) / n
    want += (p_same * h_same + (1 - p_same) * h_diff) / ((1 - t) * n) * (hi - lo) / quad
  assert got == pytest.approx(want, rel=0.03)


class ConstantModel(nnx.Module):
  """x_theta = the same distribution p at every position, whatever z_t and t."""
  cfg = _Config()

  def __init__(self, logits_V):
    self.logits = nnx.Variable(jnp.asarray(logits_V, jnp.float32))

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL, t_B):
    return jnp.broadcast_to(self.logits[...], tokens_BxL.shape + (16,)) + 0.0 * t_B[:, None, None], {}


def _sample(model, prompts, **kw):
  args = dict(length=32, steps=4, temperature=1.0, mask_id=MASK, eos_id=3, pad_id=0, rng=jax.random.key(0),
              kernel="uniform", schedule="cosine")
  args.update(kw)
  return sampler.complete(model, prompts, **args)


def test_uniform_sampler_keeps_the_marginal_of_a_constant_prediction():
  """With x_theta = p fixed, every ancestral step maps q_t(. | p) to q_s(. | p), so z_0 ~ p exactly."""
  rng = np.random.default_rng(5)
  logits = rng.normal(size=16) * 1.5
  logits[[0, 3, MASK]] = -np.inf  # pad, EOS (which would cut rows short) and [MASK] are never drawn
  p = np.exp(logits - logits[np.isfinite(logits)].max())
  p /= p.sum()
  rows = _sample(ConstantModel(np.where(np.isfinite(logits), logits, -1e9)), [[2, 7]] * 128)
  out = np.concatenate([np.asarray(c) for _, c in rows])
  assert out.size == 128 * 32
  freq = np.bincount(out, minlength=16) / out.size
  np.testing.assert_allclose(freq, p, atol=0.012)  # 4096 draws: std <= 0.008


def test_uniform_sampler_reaches_a_confident_target_and_fills_prompt_masks():
  target = np.array([2, 9, 10, 11, 12, 13, 14, 15, 5, 6], np.int32)

  class Target(nnx.Module):
    cfg = _Config()

    def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL, t_B):
      return 30.0 * jax.nn.one_hot(jnp.asarray(target)[positions_BxL], 16), {}

  prompt = [2, MASK, 10]
  for temperature in (0.0, 1.0):
    (filled, continuation), = _sample(Target(), [prompt], length=7, steps=7, temperature=temperature)
    assert filled == [2, 9, 10] and continuation == target[3:].tolist()


def test_uniform_sampler_rejects_blocks_and_guidance():
  with pytest.raises(UserInputError, match="block_size=8"):
    _sample(ConstantModel(np.zeros(16)), [[2]], block_size=8)
  with pytest.raises(UserInputError, match="kernel='gaussian'"):
    _sample(ConstantModel(np.zeros(16)), [[2]], kernel="gaussian")
