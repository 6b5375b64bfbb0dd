"""Objectives against NumPy float64: the masks the model saw are read back from its input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from sdlm_jax.diffusion import corruption, losses, objectives
from sdlm_jax.diffusion.schedules import SCHEDULE_NAMES, get_schedule

MASK = 4
V = 11


def _cfg(loss, **kw):
  base = dict(loss=loss, schedule="linear", t_min=1e-3, random_length_prob=0.0, num_t_buckets=4)
  base.update(kw)
  return ConfigDict(base)


def _batch(b=4, l=12, seed=0, pad_tail=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, V, (b, l)).astype(np.int32)
  seg = np.ones((b, l), np.int32)
  seg[0, 4:] = 2
  seg[1, l - pad_tail:] = 0
  pos = np.where(seg == 2, np.arange(l) - 4, np.arange(l)).astype(np.int32)
  return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


class Recorder:
  """A deterministic 'model' whose logits depend on its input; remembers what it saw."""

  def __init__(self):
    w = np.random.default_rng(9).normal(size=(V, V)).astype(np.float32)
    self.table = jnp.asarray(w)
    self.seen = None

  def __call__(self, tokens, seg, pos):
    self.seen = (np.asarray(tokens), np.asarray(seg))
    logits = self.table[tokens] + 0.1 * pos[..., None].astype(jnp.float32)
    return logits, {"aux_loss": jnp.zeros(()), "router": {}}


def _np_ce(logits, targets):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def test_megadlm_loss_matches_numpy():
  batch = _batch()
  model = Recorder()
  loss, metrics = objectives.compute_loss(model, batch, jax.random.key(0), _cfg("megadlm"), mask_id=MASK)
  noisy, seg = model.seen
  tokens = np.asarray(batch["tokens"])
  valid = seg > 0
  masked = noisy == MASK
  assert not (masked & ~valid).any()
  assert masked.any(1).all()  # forced one mask per row
  logits, _ = model(jnp.asarray(noisy), jnp.asarray(seg), batch["positions"])
  ce = _np_ce(logits, tokens)
  total = 0.0
  for r in range(tokens.shape[0]):
    p_mask = masked[r].sum() / valid[r].sum()
    total += (ce[r] * masked[r]).sum() / p_mask
  assert float(loss) == pytest.approx(total / valid.sum(), rel=1e-5)
  assert float(metrics["masked_frac"]) == pytest.approx(masked.sum() / valid.sum())
  assert float(np.sum(metrics["t_bucket_count"])) == 4


def test_forced_mask_and_random_length_cut():
  valid = jnp.ones((3, 10), bool).at[2].set(False)
  masked = jnp.zeros((3, 10), bool)
  forced = np.asarray(corruption.force_one_mask(jax.random.key(1), masked, valid))
  assert forced[:2].sum(1).tolist() == [1, 1] and forced[2].sum() == 0
  cut = np.asarray(objectives.random_length_cut(jax.random.key(2), jnp.ones((2, 10), bool), 1.0))
  n = cut[0].sum()
  assert 2 <= n <= 10 and (cut == cut[0]).all() and cut[0, :n].all() and not cut[0, n:].any()
  same = np.asarray(objectives.random_length_cut(jax.random.key(2), jnp.ones((2, 10), bool), 0.0))
  assert same.all()


def test_random_length_cut_turns_the_tail_into_padding_for_the_model():
  batch = _batch(pad_tail=0)
  model = Recorder()
  objectives.compute_loss(model, batch, jax.random.key(3), _cfg("megadlm", random_length_prob=1.0), mask_id=MASK)
  noisy, seg = model.seen
  n = (seg[2] > 0).sum()
  assert n < 12 and (seg[:, n:] == 0).all() and (noisy[:, n:] != MASK).all()


def test_mdlm_elbo_matches_numpy_and_t_is_stratified():
  batch = _batch(b=8)
  model = Recorder()
  cfg = _cfg("mdlm_elbo", schedule="poly2")
  loss, _ = objectives.compute_loss(model, batch, jax.random.key(4), cfg, mask_id=MASK)
  noisy, seg = model.seen
  rng_t, _ = jax.random.split(jax.random.key(4))
  t = np.asarray(corruption.antithetic_t(rng_t, 8, cfg.t_min), np.float64)
  assert sorted(np.floor((t - cfg.t_min) / (1 - cfg.t_min) * 8).astype(int).tolist()) == list(range(8))
  logits, _ = model(jnp.asarray(noisy), jnp.asarray(seg), batch["positions"])
  ce = _np_ce(logits, np.asarray(batch["tokens"]))
  masked = noisy == MASK
  expected = sum(2.0 / t[r] * (ce[r] * masked[r]).sum() for r in range(8)) / (seg > 0).sum()
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_ar_loss_matches_per_token_loop_without_crossing_segments():
  batch = _batch()
  model = Recorder()
  loss, _ = objectives.compute_loss(model, batch, jax.random.key(5), _cfg("ar"), mask_id=MASK)
  tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
  logits, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"])
  ce = _np_ce(logits, np.roll(tokens, -1, axis=1))
  terms = [ce[r, i] for r in range(tokens.shape[0]) for i in range(tokens.shape[1] - 1)
           if seg[r, i] == seg[r, i + 1] and seg[r, i + 1] > 0]
  assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)
  assert len(terms) == 4 * 11 - 1 - 3  # one boundary in row 0, three padding targets in row 1


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_weight_is_minus_alpha_prime_over_mask_prob(name):
  s = get_schedule(name)
  for t in (0.05, 0.3, 0.7, 0.95):
    h = 1e-3
    deriv = (float(s.alpha(t + h)) - float(s.alpha(t - h))) / (2 * h)
    assert float(s.weight(t)) == pytest.approx(-deriv / float(s.mask_prob(t)), rel=1e-3)
  with pytest.raises(ValueError, match="diffusion.schedule"):
    get_schedule("sqrt")


def test_unknown_loss_is_a_clear_error():
  with pytest.raises(ValueError, match="diffusion.loss='bert'"):
    objectives.compute_loss(Recorder(), _batch(), jax.random.key(0), _cfg("bert"), mask_id=MASK)


def test_megadlm_row_contributes_its_mean_masked_ce():
  ce = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  masked = jnp.array([[True, False, True, False]])
  valid = jnp.ones((1, 4), bool)
  loss, row_mean = losses.megadlm_loss(ce, masked, valid)
  assert float(loss) == pytest.approx(2.0) and float(row_mean[0]) == pytest.approx(2.0)
