"""Routers against plain NumPy float64 loops (per expert for EC, per token for TC)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdlm_jax.model import routing


def ec_reference(logits_GxNxE, mask_GxN, k, activation):
  """Each expert picks its top-C tokens, real ones first (ties: lower index); gates over pickers.

  Returns (chosen token ids [G, E, C], picked [G, N, E] bool (real tokens only), gates [G, N, E]).
  """
  num_groups, n, num_experts = logits_GxNxE.shape
  c = n * k // num_experts
  picked = np.zeros(logits_GxNxE.shape, bool)
  chosen = np.zeros((num_groups, num_experts, c), np.int64)
  for g in range(num_groups):
    for e in range(num_experts):
      # sort key: real before padding, then higher logit, then lower index
      keys = sorted((not mask_GxN[g, i], -float(logits_GxNxE[g, i, e]), i) for i in range(n))
      chosen[g, e] = [i for _, _, i in keys[:c]]
      for i in chosen[g, e]:
        picked[g, i, e] = mask_GxN[g, i]
  gates = np.zeros(logits_GxNxE.shape)
  for g in range(num_groups):
    for i in range(n):
      experts = np.nonzero(picked[g, i])[0]
      if len(experts) == 0:
        continue
      s = logits_GxNxE[g, i, experts].astype(np.float64)
      w = np.exp(s - s.max()) if activation == "softmax" else 1 / (1 + np.exp(-s))
      gates[g, i, experts] = w / w.sum()
  return chosen, picked, gates


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups,tokens,k", [(3, 12, 2), (1, 40, 1)])  # sequence-level and batch-level groups
def test_expert_choice_matches_per_expert_loop(activation, groups, tokens, k):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(groups, tokens, 4)).astype(np.float32)
  logits[0, 5, :] = logits[0, 3, :]  # exact ties: the lower index must win
  mask = rng.random((groups, tokens)) > 0.2
  idx, slot_gates, picked = routing.expert_choice(jnp.asarray(logits), jnp.asarray(mask), k, activation)
  ref_idx, ref_picked, ref_gates = ec_reference(logits, mask, k, activation)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_array_equal(np.asarray(picked), ref_picked)
  g = np.arange(groups)[:, None, None]
  e = np.arange(4)[None, :, None]
  np.testing.assert_allclose(np.asarray(slot_gates), ref_gates[g, ref_idx, e], rtol=1e-5, atol=1e-7)
  # some real token went unpicked and has no gate; picked tokens' gates sum to 1
  sums = ref_gates.sum(-1)
  assert (mask & ~ref_picked.any(-1)).any()
  assert np.allclose(sums[ref_picked.any(-1)], 1.0) and np.all(sums[~ref_picked.any(-1)] == 0)


def test_dynamic_scale_hand_case_and_expert_choice_gates():
  factors = (0.0, 1.0, 1.5, 2.0)
  np.testing.assert_allclose(routing.dynamic_scale(jnp.array([[0, 1], [2, 3]]), factors), [[0.0, 1.0], [1.5, 2.0]])
  logits = np.random.default_rng(6).normal(size=(2, 9, 3)).astype(np.float32)
  mask = np.ones((2, 9), bool)
  _, picked, gates = ec_reference(logits, mask, 1, "softmax")
  idx, slot_gates, _ = routing.expert_choice(jnp.asarray(logits), jnp.asarray(mask), 1, "softmax",
                                             scaling_factors=factors)
  want = gates * np.asarray(factors)[picked.sum(-1)][..., None]
  got = np.zeros_like(want)
  for g in range(2):
    for e in range(3):
      got[g, np.asarray(idx)[g, e], e] = np.asarray(slot_gates)[g, e]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_expert_choice_ties_go_to_the_lower_token_index():
  logits = np.zeros((1, 6, 2), np.float32)  # all tied: C = 3 -> tokens 0, 1, 2 for both experts
  idx, _, picked = routing.expert_choice(jnp.asarray(logits), jnp.ones((1, 6), bool), 1, "softmax")
  np.testing.assert_array_equal(np.asarray(idx), [[[0, 1, 2], [0, 1, 2]]])
  assert np.asarray(picked)[0, :3].all() and not np.asarray(picked)[0, 3:].any()


def test_padding_is_never_picked_before_real_tokens():
  logits = np.full((1, 8, 2), -5.0, np.float32)
  logits[0, :4] = 10.0  # padding has the highest scores...
  mask = np.array([[False] * 4 + [True] * 4])
  _, gates, picked = routing.expert_choice(jnp.asarray(logits), jnp.asarray(mask), 1, "softmax")
  assert not np.asarray(picked)[0, :4].any() and np.asarray(picked)[0, 4:].all()  # C=4 per expert
  # a group with fewer real tokens than C fills slots with padding, at gate 0
  mask = np.array([[False] * 6 + [True] * 2])
  idx, gates, picked = routing.expert_choice(jnp.asarray(logits), jnp.asarray(mask), 1, "softmax")
  slot_is_pad = ~mask[0][np.asarray(idx)[0]]
  assert slot_is_pad.any() and np.all(np.asarray(gates)[0][slot_is_pad] == 0)


def test_capacity_zero_is_a_clear_error():
  with pytest.raises(ValueError, match="model.moe.top_k.*model.moe.num_experts"):
    routing.ec_capacity(8, 1, 64)


def test_gates_ignore_huge_unpicked_logits_in_value_and_gradient():
  logits = jnp.array([[[200.0, 0.5, -1.0]]])
  picked = jnp.array([[[False, True, True]]])
  for activation in ("softmax", "sigmoid"):
    gates, grad = jax.value_and_grad(
        lambda x, a=activation: jnp.sum(routing.expert_choice_gates(x, picked, a) * jnp.array([1.0, 2.0, 3.0])))(logits)
    assert np.isfinite(float(gates)) and np.all(np.isfinite(np.asarray(grad)))
    assert float(grad[0, 0, 0]) == 0.0


def test_token_wise_balance_loss_is_one_when_uniform_and_matches_formula():
  n, e, k = 8, 4, 2
  logits = np.zeros((1, n, e), np.float32)
  mask = np.ones((1, n), bool)
  _, _, picked = routing.expert_choice(jnp.asarray(logits), jnp.asarray(mask), k, "softmax")
  loss = routing.token_wise_balance_loss(jnp.asarray(logits), picked, jnp.asarray(mask), k)
  assert float(loss) == pytest.approx(1.0, rel=1e-6)

  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, n, e)).astype(np.float32)
  mask = np.ones((2, n), bool)
  mask[1, 6:] = False
  _, ref_picked, _ = ec_reference(logits, mask, k, "softmax")
  expected = []
  for g in range(2):
    real = logits[g][mask[g]].astype(np.float64)
    p = np.exp(real - real.max(0)) / np.exp(real - real.max(0)).sum(0)  # softmax over tokens
    expected.append((p.sum(-1) * ref_picked[g][mask[g]].sum(-1)).sum() / (e * k))
  got = routing.token_wise_balance_loss(jnp.asarray(logits), jnp.asarray(ref_picked), jnp.asarray(mask), k)
  assert float(got) == pytest.approx(np.mean(expected), rel=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_token_choice_matches_per_token_loop(activation):
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(10, 6)).astype(np.float32)
  mask = np.ones(10, bool)
  mask[7] = False
  idx, gates, probs = routing.token_choice_topk(jnp.asarray(logits), jnp.asarray(mask), 2, activation)
  for i in range(10):
    s = logits[i].astype(np.float64)
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum() if activation == "softmax" else 1 / (1 + np.exp(-s))
    top = np.argsort(-p, kind="stable")[:2]
    np.testing.assert_array_equal(np.asarray(idx)[i], top)
    want = p[top] / p[top].sum() if mask[i] else np.zeros(2)
    np.testing.assert_allclose(np.asarray(gates)[i], want, rtol=1e-5, atol=1e-7)
  # Switch loss = E * sum_e f_e P_e over real tokens
  real = np.nonzero(mask)[0]
  pn = np.asarray(probs, np.float64)[real]
  pn = pn / pn.sum(-1, keepdims=True)
  f = np.bincount(np.asarray(idx)[real].ravel(), minlength=6) / (len(real) * 2)
  expected = 6 * np.sum(f * pn.mean(0))
  got = routing.switch_aux_loss(probs, idx, jnp.asarray(mask))
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_selection_bias_changes_which_experts_but_not_the_gates():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(12, 5)).astype(np.float32)
  bias = np.array([0.0, 0.5, -0.3, 0.2, -1.0], np.float32)
  mask = np.ones(12, bool)
  for activation in ("softmax", "sigmoid"):
    idx, gates, _ = routing.token_choice_topk(jnp.asarray(logits), jnp.asarray(mask), 2, activation, jnp.asarray(bias))
    for i in range(12):  # per-token loop: choose by score + bias, gate by the unbiased score
      s = logits[i].astype(np.float64)
      p = np.exp(s - s.max()) / np.exp(s - s.max()).sum() if activation == "softmax" else 1 / (1 + np.exp(-s))
      top = np.argsort(-(p + bias), kind="stable")[:2]
      np.testing.assert_array_equal(np.asarray(idx)[i], top)
      np.testing.assert_allclose(np.asarray(gates)[i], p[top] / p[top].sum(), rtol=1e-5)
  # the bias decides: +10 on expert 4 puts it in every token's top 2
  idx, _, _ = routing.token_choice_topk(jnp.asarray(logits), jnp.asarray(mask), 2, "softmax",
                                        jnp.array([0, 0, 0, 0, 10.0]))
  assert (np.asarray(idx) == 4).any(-1).all()


def test_balance_bias_step_hand_case():
  bias = jnp.array([[0.0, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  load = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
  got = routing.balance_bias_step(bias, load, 0.01)
  np.testing.assert_allclose(got, [[-0.01, 0.1, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]], atol=1e-7)


def test_switch_aux_loss_is_one_when_uniform():
  probs = jnp.full((8, 4), 0.25)
  idx = jnp.array([[i % 4, (i + 1) % 4] for i in range(8)], jnp.int32)
  assert float(routing.switch_aux_loss(probs, idx, jnp.ones(8, bool))) == pytest.approx(1.0)


def test_router_z_loss_matches_numpy():
  logits = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32) * 4
  mask = np.array([True, True, False, True, True])
  z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  got = routing.router_z_loss(jnp.asarray(logits), jnp.asarray(mask))
  assert float(got) == pytest.approx(np.mean(z[mask] ** 2), rel=1e-5)


def test_routing_stats_hand_case():
  stats = routing.routing_stats(jnp.array([0, 2, 4, 9]), jnp.array([1, 3]), jnp.array([True, True, True, False]))
  assert float(stats["frac_tokens_zero_experts"]) == pytest.approx(1 / 3)
  assert float(stats["experts_per_token_mean"]) == pytest.approx(2.0)
  assert float(stats["experts_per_token_min"]) == 0 and float(stats["experts_per_token_max"]) == 4
  assert float(stats["experts_per_token_std"]) == pytest.approx(np.std([0, 2, 4]))
  np.testing.assert_allclose(stats["expert_load"], [0.25, 0.75])
  empty = routing.routing_stats(jnp.array([1, 2]), jnp.array([0, 0]), jnp.array([False, False]))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in empty.values())
