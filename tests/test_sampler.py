"""The reverse process: commit order, blocks, EOS, infilling, top-p, guidance, the batched padding mask."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdlm_jax.diffusion import sampler

PAD, BOS, EOS, MASK = 0, 2, 3, 4
LENGTH = 8
VOCAB = 10 + LENGTH + 2
# Confidence rank of each position (higher first), deliberately not monotone in the position.
HEIGHT = jnp.array([3.0, 9.0, 5.0, 1.0, 8.0, 2.0, 7.0, 4.0, 6.0, 10.0, 0.5, 0.2, 1.5, 2.5, 3.5, 4.5])
TRACES = []  # one entry each time a toy model is traced


class CountingModel(nnx.Module):
  """Predicts token 10 + (#[MASK] in the row) everywhere, with confidence HEIGHT[position].

  The token a position receives records how many masks were left when it was committed.
  `eos_at`: this position predicts EOS instead, with the top confidence.
  """

  def __init__(self, eos_at=-1):
    self.eos_at = eos_at

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL):
    TRACES.append(tokens_BxL.shape)
    n_masked_B = jnp.sum(tokens_BxL == MASK, axis=1)
    target_BxL = jnp.broadcast_to(10 + n_masked_B[:, None], tokens_BxL.shape)
    target_BxL = jnp.where(positions_BxL == self.eos_at, EOS, target_BxL)
    height_BxL = jnp.where(positions_BxL == self.eos_at, 100.0, HEIGHT[positions_BxL])
    return jax.nn.one_hot(target_BxL, VOCAB) * height_BxL[..., None], {}


def _gen(model, prompts, **kw):
  args = dict(length=LENGTH, steps=LENGTH, mask_id=MASK, eos_id=EOS, pad_id=PAD, rng=jax.random.key(0))
  args.update(kw)
  return sampler.generate(model, prompts, **args)


def _commit_order(heights):
  """Positions sorted by confidence, most confident first."""
  return list(np.argsort(-np.asarray(heights), kind="stable"))


def test_low_confidence_commits_the_most_confident_position_first_one_per_step():
  out = _gen(CountingModel(), [[BOS, 7]])[0]
  expected = [0] * LENGTH
  for step, i in enumerate(_commit_order(HEIGHT[2:2 + LENGTH])):  # generated span: positions 2..9
    expected[i] = 10 + LENGTH - step  # committed while LENGTH - step positions were masked
  assert out == expected


def test_two_tokens_per_step_when_steps_is_half_the_length():
  out = _gen(CountingModel(), [[BOS]], steps=LENGTH // 2)[0]
  expected = [0] * LENGTH
  for k, i in enumerate(_commit_order(HEIGHT[1:1 + LENGTH])):
    expected[i] = 10 + LENGTH - 2 * (k // 2)
  assert out == expected


def test_uneven_steps_give_the_earlier_steps_the_remainder():
  out = _gen(CountingModel(), [[BOS]], steps=3)[0]  # 8 tokens in 3 steps: 3, 3, 2
  assert sorted(out) == [10 + 2] * 2 + [10 + 5] * 3 + [10 + 8] * 3


def test_random_remasking_commits_one_per_step_in_a_random_order():
  low_conf = _gen(CountingModel(), [[BOS, 7]])[0]
  rand = _gen(CountingModel(), [[BOS, 7]], remasking="random", rng=jax.random.key(3))[0]
  assert sorted(rand) == list(range(11, 11 + LENGTH)) and rand != low_conf


def test_semi_autoregressive_blocks_fill_left_to_right():
  half = LENGTH // 2
  out = _gen(CountingModel(), [[BOS]], block_size=half)[0]
  first, second = out[:half], out[half:]
  assert min(first) > max(second)  # the whole first block was decoded while the second was masked
  expected = [0] * half
  for step, i in enumerate(_commit_order(HEIGHT[1 + half:1 + LENGTH])):  # inside a block: by confidence
    expected[i] = 10 + half - step
  assert second == expected


def test_stop_at_eos_pads_the_rest_and_stops_decoding_it():
  # Generated span: positions 2..9; EOS is predicted at position 6 (span index 4) and committed first.
  out = _gen(CountingModel(eos_at=6), [[BOS, 7], [BOS, 7, 8, 9, 10, 11, 12]])
  # Row 0: positions 7..9 become padding, so later steps see 4 masks, not 7; 1 token per step.
  expected = [0] * 4
  for step, i in enumerate(_commit_order(HEIGHT[2:6])):
    expected[i] = 10 + 4 - step
  assert out[0] == expected
  assert len(out[1]) == LENGTH and EOS not in out[1]  # row 1's prompt covers position 6: no EOS


class TinyAttentionModel(nnx.Module):
  """One bidirectional attention layer with segment masking and learned absolute positions.

  Every position's output depends on every visible token and on absolute positions, so a
  wrong padding mask or shifted positions change its predictions.
  """

  def __init__(self, rngs, vocab=VOCAB, d=16, max_len=32):
    self.emb = nnx.Param(jax.random.normal(rngs.params(), (vocab, d)))
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (max_len, d)) / 2)
    self.wqkv = nnx.Param(jax.random.normal(rngs.params(), (3, d, d)) / d ** 0.5)
    self.out = nnx.Param(jax.random.normal(rngs.params(), (d, vocab)))

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL):
    TRACES.append(tokens_BxL.shape)
    x_BxLxD = self.emb[...][tokens_BxL] + self.pos[...][positions_BxL]
    q_BxLxD, k_BxLxD, v_BxLxD = (x_BxLxD @ self.wqkv[...][i] for i in range(3))
    scores_BxLxL = jnp.einsum("bqd,bkd->bqk", q_BxLxD, k_BxLxD) / q_BxLxD.shape[-1] ** 0.5
    visible_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    attn_BxLxL = jax.nn.softmax(jnp.where(visible_BxLxL, scores_BxLxL, -1e30), axis=-1)
    h_BxLxD = x_BxLxD + 2.0 * jnp.einsum("bqk,bkd->bqd", attn_BxLxL, v_BxLxD)
    return h_BxLxD @ self.out[...], {}


PROMPTS = [[BOS, 11, 12], [BOS, 13, 14, 15, 16, 17, 18]]


class WithoutPaddingMask(nnx.Module):
  """Wraps a model so that padding is attended to, as in MegaDLMs' batched sampler."""

  def __init__(self, inner):
    self.inner = inner

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL):
    return self.inner(tokens_BxL, segment_ids_BxL=jnp.ones_like(segment_ids_BxL), positions_BxL=positions_BxL)


def test_the_padding_test_can_fail():
  """Guards the next test: the toy model's output depends on padding and on absolute positions.

  (Checked by hand too: with the sampler's padding mask removed, the next test fails for both
  guidance scales.)
  """
  model = TinyAttentionModel(nnx.Rngs(0))
  unmasked, kw = WithoutPaddingMask(model), dict(length=6, steps=6, eos_id=VOCAB + 1)
  assert _gen(unmasked, PROMPTS, **kw)[0] != _gen(unmasked, PROMPTS[:1], **kw)[0]
  row, seg = jnp.array([[BOS, 11, 12, MASK, MASK]]), jnp.ones((1, 5), jnp.int32)
  logits = model(row, segment_ids_BxL=seg, positions_BxL=jnp.arange(5)[None])[0]
  shifted = model(row, segment_ids_BxL=seg, positions_BxL=jnp.arange(5)[None] + 2)[0]
  assert not np.allclose(logits, shifted, atol=0.1)


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_batched_prompts_of_different_lengths_decode_as_if_alone(cfg_scale):
  model = TinyAttentionModel(nnx.Rngs(0))
  kw = dict(length=6, steps=6, block_size=3, cfg_scale=cfg_scale, eos_id=VOCAB + 1)  # EOS never predicted
  batched = _gen(model, PROMPTS, **kw)
  assert batched == [_gen(model, [p], **kw)[0] for p in PROMPTS]
  assert all(len(x) == 6 for x in batched)


def test_the_step_loop_is_jitted_and_params_are_arguments():
  kw = dict(length=6, steps=6, eos_id=VOCAB + 1)
  model_a, model_b = TinyAttentionModel(nnx.Rngs(1)), TinyAttentionModel(nnx.Rngs(2))
  TRACES.clear()
  out_a = _gen(model_a, [[BOS, 5, 6]], **kw)
  assert len(TRACES) == 1  # 6 steps, one trace: the loop runs inside one compiled program
  out_b = _gen(model_b, [[BOS, 5, 6]], **kw)
  assert len(TRACES) == 1 and out_a != out_b  # new weights, same compiled program


class GuidedModel(nnx.Module):
  """Cond logits favour token 11 slightly over 12; without the prompt, 12 is far less likely."""

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL):
    cond_B = tokens_BxL[:, 0] != MASK  # the unconditional pass sees the prompt as [MASK]
    logits_V = jnp.zeros(VOCAB).at[11].set(2.0)
    logits_BxV = jnp.where(cond_B[:, None], logits_V.at[12].set(1.9), logits_V)
    return jnp.broadcast_to(logits_BxV[:, None], tokens_BxL.shape + (VOCAB,)), {}


def test_classifier_free_guidance():
  # guided = uncond + (1 + s)(cond - uncond): token 11 stays 2.0, token 12 becomes (1 + s) * 1.9
  assert _gen(GuidedModel(), [[BOS]], cfg_scale=0.0)[0] == [11] * LENGTH
  assert _gen(GuidedModel(), [[BOS]], cfg_scale=0.1)[0] == [12] * LENGTH


def test_top_p_filter_matches_numpy():
  logits = np.random.default_rng(0).normal(size=(5, 3, 12)).astype(np.float32) * 2
  for p in (0.05, 0.3, 0.5, 0.9, 0.99):
    out = np.asarray(sampler.top_p_filter(jnp.asarray(logits), p))
    for row, got in zip(logits.reshape(-1, 12), out.reshape(-1, 12)):
      probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
      order = np.argsort(-probs)
      n_keep = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest prefix reaching p
      assert set(np.flatnonzero(np.isfinite(got))) == set(order[:n_keep].tolist())
      np.testing.assert_array_equal(got[order[:n_keep]], row[order[:n_keep]])


def test_sampling_with_temperature_and_top_p():
  model = TinyAttentionModel(nnx.Rngs(0))
  kw = dict(length=6, steps=6, eos_id=VOCAB + 1)
  greedy = _gen(model, [[BOS, 11]], **kw)
  assert _gen(model, [[BOS, 11]], temperature=1.0, top_p=1e-6, **kw) == greedy  # nucleus of one token
  hot = [_gen(model, [[BOS, 11]], temperature=5.0, rng=jax.random.key(s), **kw)[0] for s in range(3)]
  assert any(h != greedy[0] for h in hot) and len({tuple(h) for h in hot}) > 1
  assert all(MASK not in h and PAD not in h for h in hot)


def test_bad_arguments_are_named():
  for kw, name in ((dict(block_size=3), "block_size"), (dict(steps=5, block_size=4), "steps"),
                   (dict(steps=16), "steps"), (dict(remasking="confidence"), "remasking"),
                   (dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                   (dict(length=0), "length"), (dict(cfg_scale=-1.0), "cfg_scale"),
                   (dict(temperature=float("nan")), "temperature"), (dict(cfg_scale=float("inf")), "cfg_scale")):
    with pytest.raises(ValueError, match=name):
      _gen(CountingModel(), [[BOS]], **kw)


def test_infilling_only_fills_the_prompt_masks_by_confidence():
  # Masks at positions 1 and 3 (HEIGHT 9 and 1), 2 steps, nothing generated after the prompt:
  # step 1 commits position 1 while 2 masks are left, step 2 position 3 with 1 left.
  rows = sampler.complete(CountingModel(), [[BOS, MASK, 7, MASK]], length=0, steps=2, mask_id=MASK, eos_id=EOS,
                          pad_id=PAD, rng=jax.random.key(0))
  assert rows == [([BOS, 10 + 2, 7, 10 + 1], [])]


def test_prompt_masks_join_the_first_block():
  # Prompt [BOS, MASK, 7]; 8 generated positions (3..10) in 2 blocks of 4, 2 steps each.
  # Block 1 = position 1 and positions 3..6: 5 candidates, 3 then 2 commits, by HEIGHT
  # (1: 9, 3: 1, 4: 8, 5: 2, 6: 7): step 1 takes 1, 4, 6 with 9 masks left, step 2 takes 3, 5
  # with 6 left. Block 2 (7: 4, 8: 6, 9: 10, 10: 0.5): 9 and 8 with 4 left, then 7 and 10 with 2.
  rows = sampler.complete(CountingModel(), [[BOS, MASK, 7]], length=8, steps=4, block_size=4, mask_id=MASK,
                          eos_id=EOS, pad_id=PAD, rng=jax.random.key(0))
  assert rows == [([BOS, 19, 7], [16, 19, 16, 19, 12, 14, 14, 12])]


def test_a_prompt_mask_never_becomes_eos_and_does_not_end_the_generation():
  prompt = [BOS, 7, MASK]
  rows = sampler.complete(CountingModel(eos_at=2), [prompt], length=LENGTH, steps=LENGTH, mask_id=MASK, eos_id=EOS,
                          pad_id=PAD, rng=jax.random.key(0))
  filled, continuation = rows[0]
  assert filled[:2] == prompt[:2] and filled[2] not in (MASK, EOS, PAD)
  assert len(continuation) == LENGTH and MASK not in continuation


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_batched_infilling_decodes_each_prompt_as_if_alone(cfg_scale):
  model = TinyAttentionModel(nnx.Rngs(0))
  prompts = [[BOS, MASK, 12, MASK], [BOS, 13, MASK, 15, 16, 17, 18]]
  kw = dict(length=3, steps=2, cfg_scale=cfg_scale, mask_id=MASK, eos_id=VOCAB + 1, pad_id=PAD,
            rng=jax.random.key(0))
  batched = sampler.complete(model, prompts, **kw)
  assert batched == [sampler.complete(model, [p], **kw)[0] for p in prompts]
  for (filled, continuation), prompt in zip(batched, prompts):
    assert MASK not in filled and len(continuation) == 3
    assert all(f == p for f, p in zip(filled, prompt) if p != MASK)  # given tokens are kept


@pytest.mark.parametrize("kw", [dict(), dict(block_size=2, temperature=2.0)])
def test_progress_runs_the_same_steps_in_chunks(kw):
  model = TinyAttentionModel(nnx.Rngs(0))
  args = dict(length=8, steps=8, eos_id=VOCAB + 1, **kw)
  TRACES.clear()
  chunked = _gen(model, PROMPTS, progress=True, **args)
  assert len(TRACES) == 1  # every chunk reuses the one compiled loop
  assert chunked == _gen(model, PROMPTS, **args)
  # An EOS that pads the rest ends the loop early in both.
  assert _gen(CountingModel(eos_at=3), [[BOS]], progress=True) == _gen(CountingModel(eos_at=3), [[BOS]])


def test_settings_are_named_with_the_callers_prefix():
  good = dict(length=8, steps=8, block_size=0, temperature=0.0, top_p=1.0, remasking="random", cfg_scale=0.0)
  for name, value, allowed in (("temperature", float("nan"), "a finite number >= 0"),
                               ("cfg_scale", float("inf"), "a finite number >= 0"),
                               ("top_p", float("nan"), "a finite number in (0, 1]"),
                               ("length", 0, "an integer >= 1"), ("steps", 0, "an integer in [1, 8]")):
    with pytest.raises(ValueError, match=rf"^--{name}={value}; allowed values: {re.escape(allowed)}"):
      sampler.check_settings(**{**good, name: value}, prefix="--")
  assert sampler.check_settings(**{**good, "length": 0, "steps": 3}, fewest_masks=3) == 3
  with pytest.raises(ValueError, match="steps=4; allowed values: an integer in"):
    sampler.check_settings(**{**good, "length": 0, "steps": 4}, fewest_masks=3)
