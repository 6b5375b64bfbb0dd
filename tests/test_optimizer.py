"""LR schedules against hand-computed values, and the weight-decay mask."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from sdlm_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer


def _opt(**kw):
  base = dict(lr=1.0, schedule="cosine", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1,
              b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
  base.update(kw)
  return ConfigDict(base)


def test_cosine_schedule_hand_values():
  f = learning_rate_schedule(_opt(), 110)
  assert float(f(0)) == 0.0
  assert float(f(5)) == pytest.approx(0.5)
  assert float(f(10)) == pytest.approx(1.0)
  # halfway through the 100 cosine steps: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2))
  assert float(f(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)), rel=1e-5)
  assert float(f(110)) == pytest.approx(0.1, rel=1e-5)


def test_wsd_schedule_is_flat_then_decays_over_the_last_fraction():
  f = learning_rate_schedule(_opt(schedule="wsd"), 110)  # decay = 22 steps, starting at 88
  assert float(f(50)) == pytest.approx(1.0)
  assert float(f(88)) == pytest.approx(1.0)
  assert float(f(99)) == pytest.approx(1.0 - 0.9 * 11 / 22, rel=1e-5)
  assert float(f(110)) == pytest.approx(0.1, rel=1e-5)


def test_decay_mask_skips_norms_and_vectors():
  params = {"attn": {"wq": jnp.ones((4, 4))}, "attn_norm": {"scale": jnp.ones((4, 4))}, "b": jnp.ones(4)}
  mask = decay_mask(params)
  assert mask == {"attn": {"wq": True}, "attn_norm": {"scale": False}, "b": False}


def test_weight_decay_leaves_masked_params_alone():
  params = {"w": jnp.ones((2, 2)), "norm": jnp.ones(2)}
  tx = make_optimizer(_opt(warmup_steps=0, schedule="constant", lr=0.5), 10)
  zeros = {"w": jnp.zeros((2, 2)), "norm": jnp.zeros(2)}
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5 * 0.1 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["norm"], 0.0)


def test_clip_norm_zero_means_no_clipping():
  params = {"w": jnp.ones((2, 2))}
  grads = {"w": jnp.array([[3e3, -4e3], [1.0, 0.0]])}  # global norm ~5e3
  opt = _opt(warmup_steps=0, schedule="constant", lr=0.5, weight_decay=0.0, eps=1e-3)
  updates = {}
  for clip in (0.0, 1.0):
    tx = make_optimizer(_opt(**{**opt.to_dict(), "clip_norm": clip}), 10)
    updates[clip], _ = tx.update(grads, tx.init(params), params)
  # First Adam step, by hand: -lr * g / (|g| + eps) (bias-corrected moments are g and g^2).
  g = np.asarray(grads["w"])
  np.testing.assert_allclose(updates[0.0]["w"], -0.5 * g / (np.abs(g) + 1e-3), rtol=1e-5)
  clipped = g / np.linalg.norm(g)  # clip_norm 1 shrinks g first: eps now weighs more
  np.testing.assert_allclose(updates[1.0]["w"], -0.5 * clipped / (np.abs(clipped) + 1e-3), rtol=1e-5)
