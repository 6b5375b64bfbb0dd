"""Objectives and schedules against NumPy float64 references fed the same noise."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from sdlm_jax.diffusion import corruption, losses, objectives
from sdlm_jax.diffusion.schedules import SCHEDULE_NAMES, get_schedule

MASK = 4
V = 11
TABLE_VxV = np.random.default_rng(9).normal(size=(V, V))


def _cfg(loss, **kw):
  base = dict(loss=loss, schedule="linear", t_min=1e-3, random_length_prob=0.0, num_t_buckets=4)
  base.update(kw)
  return ConfigDict(base)


def _batch(b=4, l=12, seed=0, pad_tail=3):
  """Row 0 packs two documents (the second starts at 4), row 1 ends in padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, V, (b, l)).astype(np.int32)
  seg = np.ones((b, l), np.int32)
  seg[0, 4:] = 2
  if pad_tail:
    seg[1, l - pad_tail:] = 0
  pos = np.where(seg == 2, np.arange(l) - 4, np.arange(l)).astype(np.int32)
  pos[seg == 0] = 0
  return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


def _toy_apply(tokens, seg, pos):
  """A deterministic apply_fn: logits table[token] + 0.1 * position; its aux echoes its inputs."""
  logits = jnp.asarray(TABLE_VxV, jnp.float32)[tokens] + 0.1 * pos[..., None].astype(jnp.float32)
  return logits, {"aux_loss": jnp.zeros(()), "router": {}, "seen_tokens": tokens, "seen_segment_ids": seg}


def _loss(batch, rng, cfg):
  """compute_loss, jitted (one compile instead of many eager ops)."""
  return jax.jit(lambda r: objectives.compute_loss(_toy_apply, batch, r, cfg, mask_id=MASK))(rng)


def _noise_np(noise):
  return (np.asarray(noise.t_B, np.float64), np.asarray(noise.is_masked_BxL), np.asarray(noise.valid_BxL))


def _noise_fn(segment_ids, cfg):
  """rng -> (t, is_masked, valid) as NumPy, from the jitted noise sampler."""
  fn = jax.jit(lambda r: objectives.sample_noise(r, jnp.asarray(segment_ids), cfg))
  return lambda rng: _noise_np(fn(rng))


def _np_ce(noisy, positions, targets):
  """float64 cross-entropy of _toy_apply's logits."""
  logits = TABLE_VxV[noisy] + 0.1 * np.asarray(positions, np.float64)[..., None]
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]


def test_megadlm_loss_matches_numpy_given_the_same_noise():
  batch, cfg, rng = _batch(), _cfg("megadlm"), jax.random.key(0)
  loss, metrics = _loss(batch, rng, cfg)
  t, masked, valid = _noise_fn(batch["segment_ids"], cfg)(rng)
  tokens = np.asarray(batch["tokens"])
  noisy = np.where(masked, MASK, tokens)
  np.testing.assert_array_equal(metrics["aux"]["seen_tokens"], noisy)  # the model saw exactly this noise
  ce = _np_ce(noisy, batch["positions"], tokens)
  total, row_mean = 0.0, []
  for r in range(tokens.shape[0]):
    p_mask = masked[r].sum() / valid[r].sum()  # the realised masked fraction of the row
    total += (ce[r] * masked[r]).sum() / p_mask
    row_mean.append(ce[r][masked[r]].mean())
  assert float(loss) == pytest.approx(total / valid.sum(), rel=1e-5)
  assert float(metrics["masked_frac"]) == pytest.approx(masked.sum() / valid.sum())
  bucket = np.minimum((t * 4).astype(int), 3)
  np.testing.assert_allclose(metrics["t_bucket_count"], np.bincount(bucket, minlength=4))
  np.testing.assert_allclose(metrics["t_bucket_loss_sum"], np.bincount(bucket, row_mean, minlength=4), rtol=1e-5)
  assert {"aux_loss", "router"} <= set(metrics["aux"])


def test_maskgit_loss_is_the_plain_mean_ce_over_every_masked_token():
  batch, cfg, rng = _batch(b=6), _cfg("maskgit", schedule="cosine"), jax.random.key(11)
  loss, metrics = _loss(batch, rng, cfg)
  t, masked, valid = _noise_fn(batch["segment_ids"], cfg)(rng)
  tokens = np.asarray(batch["tokens"])
  noisy = np.where(masked, MASK, tokens)
  np.testing.assert_array_equal(metrics["aux"]["seen_tokens"], noisy)
  ce = _np_ce(noisy, batch["positions"], tokens)
  terms = [ce[r, i] for r in range(6) for i in range(12) if masked[r, i]]  # a per-token loop
  assert masked.sum() > 6 and masked.sum(1).min() >= 1
  assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)
  # the same noise as megadlm: only the weights differ
  np.testing.assert_array_equal(masked, _noise_fn(batch["segment_ids"], _cfg("megadlm", schedule="cosine"))(rng)[1])


def test_maskgit_hand_case():
  ce = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
  masked = jnp.array([[True, False, True, False], [False, True, False, False]])
  valid = jnp.array([[True] * 4, [True, True, False, False]])
  loss, _ = losses.weighted_masked_ce(ce, masked, losses.maskgit_row_weights(masked, valid), valid)
  assert float(loss) == pytest.approx((1.0 + 3.0 + 6.0) / 3)  # megadlm would give (2 + 6) / 2
  none = jnp.zeros_like(masked)
  assert float(losses.weighted_masked_ce(ce, none, losses.maskgit_row_weights(none, valid), valid)[0]) == 0.0


@pytest.mark.parametrize("loss", ["megadlm", "maskgit"])
def test_schedule_sets_the_masking_rate_of_megadlm_and_maskgit(loss):
  seg = jnp.ones((16, 1024), jnp.int32)
  for schedule, rate in (("linear", lambda t: t), ("poly2", lambda t: t ** 2),
                         ("cosine", lambda t: np.cos(np.pi / 2 * (1 - t)))):
    t, masked, _ = _noise_fn(seg, _cfg(loss, schedule=schedule))(jax.random.key(12))
    np.testing.assert_allclose(masked.mean(1), np.maximum(rate(t), 1 / 1024), atol=0.06)


def test_megadlm_masks_each_row_with_probability_t():
  seg = jnp.ones((8, 512), jnp.int32)
  t, masked, _ = _noise_fn(seg, _cfg("megadlm"))(jax.random.key(1))
  assert 0.0 <= t.min() and t.max() < 1.0
  np.testing.assert_allclose(masked.mean(1), t, atol=0.1)


def test_forced_one_mask_and_padding_never_masked():
  seg = np.ones((64, 6), np.int32)
  seg[:, 3:] = 0       # three real tokens per row: with t ~ U[0,1) many rows draw no mask
  seg[0] = 0           # an empty row stays empty
  noise_fn = _noise_fn(seg, _cfg("megadlm"))
  for seed in range(3):
    _, masked, valid = noise_fn(jax.random.key(seed))
    assert not (masked & ~valid).any()
    assert (masked[1:].sum(1) >= 1).all() and masked[0].sum() == 0
  unmasked = jnp.zeros((3, 10), bool).at[1, 2].set(True)
  maskable = jnp.ones((3, 10), bool).at[2].set(False)
  forced = np.asarray(corruption.force_one_mask(jax.random.key(1), unmasked, maskable))
  assert forced.sum(1).tolist() == [1, 1, 0] and forced[1, 2]


def test_mask_tokens_accepts_row_or_token_probabilities():
  tokens = jnp.full((2, 6), 7, jnp.int32)
  maskable = jnp.ones((2, 6), bool).at[:, 4:].set(False)
  noisy, is_masked = corruption.mask_tokens(jax.random.key(0), tokens, jnp.array([1.0, 0.0]), MASK, maskable)
  assert np.asarray(is_masked).tolist() == [[True] * 4 + [False] * 2, [False] * 6]
  np.testing.assert_array_equal(noisy, np.where(is_masked, MASK, 7))
  prob_BxL = jnp.zeros((2, 6)).at[:, 1].set(1.0)
  _, is_masked = corruption.mask_tokens(jax.random.key(0), tokens, prob_BxL, MASK, maskable)
  assert np.asarray(is_masked).sum() == 2 and np.asarray(is_masked)[:, 1].all()


def test_random_length_cut_turns_the_tail_into_padding():
  batch, cfg, rng = _batch(pad_tail=0), _cfg("megadlm", random_length_prob=1.0), jax.random.key(3)
  loss, metrics = _loss(batch, rng, cfg)
  noisy, seg = np.asarray(metrics["aux"]["seen_tokens"]), np.asarray(metrics["aux"]["seen_segment_ids"])
  n = int((seg[2] > 0).sum())
  assert 2 <= n < 12
  assert (seg[:, n:] == 0).all() and (noisy[:, n:] == np.asarray(batch["tokens"])[:, n:]).all()
  np.testing.assert_array_equal(seg[:, :n], np.asarray(batch["segment_ids"])[:, :n])
  _, masked, valid = _noise_fn(batch["segment_ids"], cfg)(rng)
  assert valid.sum() == 4 * n
  ce = _np_ce(noisy, batch["positions"], np.asarray(batch["tokens"]))
  expected = sum(ce[r][masked[r]].mean() * n for r in range(4)) / (4 * n)  # divided by B * cut
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_random_length_cut_draws_lengths_2_to_L_with_the_given_probability():
  def kept_lengths(prob, num):
    draw = jax.jit(jax.vmap(lambda k: corruption.random_length_keep(k, 6, prob)))
    keep_NxL = draw(jax.random.split(jax.random.key(0), num))
    return np.asarray(keep_NxL).sum(1)
  assert set(kept_lengths(1.0, 100).tolist()) == {2, 3, 4, 5, 6}
  assert 150 < (kept_lengths(0.1, 200) == 6).sum() < 200  # ~90% stay whole (a cut to L counts as whole)
  assert (kept_lengths(0.0, 10) == 6).all()


@pytest.mark.parametrize("schedule", ["poly2", "cosine"])
def test_mdlm_elbo_matches_numpy_given_the_same_noise(schedule):
  batch, cfg, rng = _batch(b=8), _cfg("mdlm_elbo", schedule=schedule, t_min=0.05), jax.random.key(4)
  loss, metrics = _loss(batch, rng, cfg)
  t, masked, valid = _noise_fn(batch["segment_ids"], cfg)(rng)
  np.testing.assert_array_equal(valid, np.asarray(batch["segment_ids"]) > 0)
  noisy = np.where(masked, MASK, np.asarray(batch["tokens"]))
  np.testing.assert_array_equal(metrics["aux"]["seen_tokens"], noisy)
  ce = _np_ce(noisy, batch["positions"], np.asarray(batch["tokens"]))
  w = 2.0 / t if schedule == "poly2" else math.pi / 2 * np.tan(math.pi / 2 * (1.0 - t))
  expected = sum(w[r] * (ce[r] * masked[r]).sum() for r in range(8)) / valid.sum()
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["masked_frac"]) == pytest.approx(masked.sum() / valid.sum())


def test_mdlm_elbo_masks_with_probability_one_minus_alpha():
  seg = jnp.ones((16, 1024), jnp.int32)
  t, masked, _ = _noise_fn(seg, _cfg("mdlm_elbo", schedule="poly2"))(jax.random.key(5))
  np.testing.assert_allclose(masked.mean(1), t ** 2, atol=0.06)


def test_antithetic_t_covers_every_stratum_once():
  for seed in range(5):
    t = np.asarray(corruption.antithetic_t(jax.random.key(seed), 16, 0.01), np.float64)
    assert 0.01 <= t.min() and t.max() <= 1.0
    strata = np.floor((t - 0.01) / 0.99 * 16).astype(int)
    assert sorted(strata.tolist()) == list(range(16))
  seg = jnp.ones((8, 4), jnp.int32)
  t, _, _ = _noise_fn(seg, _cfg("mdlm_elbo", t_min=0.0))(jax.random.key(6))
  assert sorted(np.floor(t * 8).astype(int).tolist()) == list(range(8))


@pytest.mark.parametrize("progress,std,t_min", [(0.0, 0.25, 0.0), (0.3, 0.25, 1e-3), (1.0, 0.1, 1e-3), (0.7, 2.0, 0.0)])
def test_moving_gaussian_t_is_the_truncated_normal_inverse_cdf(progress, std, t_min):
  from scipy import stats  # pylint: disable=import-outside-toplevel
  u = np.linspace(0.0, 0.999, 37)
  got = np.asarray(corruption.moving_gaussian_t(jnp.asarray(u, jnp.float32), progress, std, t_min), np.float64)
  a, b = (t_min - progress) / std, (1.0 - progress) / std
  want = stats.truncnorm.ppf(u, a, b, loc=progress, scale=std)  # float64, computed another way
  np.testing.assert_allclose(got, np.clip(want, t_min, 1.0), atol=2e-4)
  assert got.min() >= t_min and got.max() <= 1.0 and (np.diff(got) >= 0).all()


def test_moving_gaussian_window_moves_from_clean_to_noisy_over_training():
  from scipy import stats  # pylint: disable=import-outside-toplevel
  seg = jnp.ones((256, 4), jnp.int32)
  for loss in ("megadlm", "mdlm_elbo"):
    cfg = _cfg(loss, t_sampling="moving_gaussian", moving_gaussian_std=0.25)
    fn = jax.jit(lambda r, p, cfg=cfg: objectives.sample_noise(r, seg, cfg, p).t_B)
    means = []
    for progress in (0.0, 0.5, 1.0):
      t = np.asarray(fn(jax.random.key(13), progress), np.float64)
      lo = cfg.t_min if loss == "mdlm_elbo" else 0.0
      want = stats.truncnorm.mean((lo - progress) / 0.25, (1 - progress) / 0.25, loc=progress, scale=0.25)
      assert t.mean() == pytest.approx(want, abs=0.02)
      means.append(t.mean())
    assert means[0] < 0.25 < means[1] < 0.75 < means[2]
  assert _cfg("megadlm").get("t_sampling", "uniform") == "uniform"


def test_progress_reaches_the_loss_through_the_train_step_argument():
  batch = _batch(b=8)
  cfg = _cfg("mdlm_elbo", t_sampling="moving_gaussian", moving_gaussian_std=0.1)
  fn = jax.jit(lambda r, p: objectives.compute_loss(_toy_apply, batch, r, cfg, mask_id=MASK, progress=p)[1])
  early, late = fn(jax.random.key(0), 0.0), fn(jax.random.key(0), 1.0)
  assert float(early["masked_frac"]) < 0.3 < 0.7 < float(late["masked_frac"])
  assert float(early["t_bucket_count"][0]) == 8 and float(late["t_bucket_count"][-1]) == 8


def test_compute_loss_is_jittable_and_deterministic_given_rng():
  batch, cfg = _batch(), _cfg("megadlm", random_length_prob=0.5)
  fn = jax.jit(lambda rng: objectives.compute_loss(_toy_apply, batch, rng, cfg, mask_id=MASK)[0])
  a, b, c = fn(jax.random.key(7)), fn(jax.random.key(7)), fn(jax.random.key(8))
  assert a.dtype == jnp.float32 and float(a) == float(b) and float(a) != float(c)


def test_ar_loss_matches_per_token_loop_without_crossing_segments():
  batch = _batch()
  loss, metrics = _loss(batch, jax.random.key(5), _cfg("ar"))
  tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
  logits_ce = _np_ce(tokens, batch["positions"], np.roll(tokens, -1, axis=1))  # ce[r, i]: predict i+1 from i
  terms = []
  for r in range(tokens.shape[0]):
    for i in range(tokens.shape[1] - 1):
      if seg[r, i] == seg[r, i + 1] and seg[r, i + 1] > 0:
        terms.append(logits_ce[r, i])
  assert len(terms) == 4 * 11 - 1 - 3  # one document boundary in row 0, three padding targets in row 1
  assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)
  assert metrics["t_bucket_count"].shape == (0,) and float(metrics["masked_frac"]) == 0.0


def test_megadlm_weights_make_each_row_contribute_its_mean_masked_ce():
  ce = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
  masked = jnp.array([[True, False, True, False], [False, True, False, False]])
  valid = jnp.array([[True] * 4, [True, True, False, False]])
  w = losses.megadlm_row_weights(masked, valid)
  np.testing.assert_allclose(w, [2.0, 2.0])
  loss, row_loss = losses.weighted_masked_ce(ce, masked, w, valid)
  np.testing.assert_allclose(row_loss, [2.0, 6.0])
  assert float(loss) == pytest.approx((2.0 * 4 + 6.0 * 2) / 6)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_weight_is_minus_alpha_prime_over_mask_prob(name):
  s = get_schedule(name)
  assert float(s.alpha(0.0)) == pytest.approx(1.0) and float(s.alpha(1.0)) == pytest.approx(0.0, abs=1e-7)
  for t in (0.05, 0.3, 0.7, 0.95):
    h = 1e-3  # alpha is evaluated in float32
    deriv = (float(s.alpha(t + h)) - float(s.alpha(t - h))) / (2 * h)
    assert float(s.weight(t)) == pytest.approx(-deriv / float(s.mask_prob(t)), rel=1e-3)


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match=r"diffusion\.schedule='sqrt'.*linear, poly2, cosine"):
    get_schedule("sqrt")
  with pytest.raises(ValueError, match=r"diffusion\.loss='bert'.*megadlm, maskgit, mdlm_elbo, ar"):
    objectives.compute_loss(_toy_apply, _batch(), jax.random.key(0), _cfg("bert"), mask_id=MASK)
  assert objectives.LOSS_NAMES == ("megadlm", "maskgit", "mdlm_elbo", "ar")
  assert SCHEDULE_NAMES == ("linear", "poly2", "cosine")
