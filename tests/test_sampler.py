"""The reverse process: commit order, blocks, EOS, top-p, and the batched padding mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdlm_jax.diffusion import sampler
from sdlm_jax.model.attention import attention_mask
from sdlm_jax.model.layers import apply_rope

PAD, EOS, MASK = 0, 3, 4
LENGTH = 8
TRACES = []  # one entry each time a CountingModel is traced
VOCAB = 10 + LENGTH + 2


class CountingModel(nnx.Module):
  """Predicts token 10 + (#masked in the row); confidence grows with the position index.

  The value a position receives therefore records *when* it was committed.
  """

  def __init__(self, eos_at=None):
    self.eos_at = eos_at

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL):
    TRACES.append(tokens_BxL.shape)
    n_masked_B = jnp.sum(tokens_BxL == MASK, axis=1)
    target_BxL = jnp.broadcast_to(10 + n_masked_B[:, None], tokens_BxL.shape)
    if self.eos_at is not None:
      target_BxL = jnp.where(positions_BxL == self.eos_at, EOS, target_BxL)
    height_BxL = 1.0 + positions_BxL.astype(jnp.float32)
    logits = jax.nn.one_hot(target_BxL, VOCAB) * height_BxL[..., None]
    return logits, {}


def _gen(model, prompts, **kw):
  args = dict(length=LENGTH, steps=LENGTH, mask_id=MASK, eos_id=EOS, pad_id=PAD, rng=jax.random.key(0))
  args.update(kw)
  return sampler.generate(model, prompts, **args)


def test_low_confidence_commits_most_confident_first_one_per_step():
  out = _gen(CountingModel(), [[2, 7]])[0]
  # the last position is most confident: committed first while 8 were masked, and so on
  assert out == [10 + i for i in range(1, LENGTH + 1)]


def test_random_remasking_commits_one_per_step_in_some_order():
  out = _gen(CountingModel(), [[2, 7]], remasking="random", rng=jax.random.key(3))[0]
  assert sorted(out) == [10 + i for i in range(1, LENGTH + 1)]


def test_semi_autoregressive_blocks_fill_left_to_right():
  out = _gen(CountingModel(), [[2]], block_size=LENGTH // 2)[0]
  first, second = out[:LENGTH // 2], out[LENGTH // 2:]
  assert min(first) > max(second)  # the whole first block was decoded while the second was masked


def test_two_tokens_per_step_when_steps_is_half_the_length():
  out = _gen(CountingModel(), [[2]], steps=LENGTH // 2)[0]
  assert out == [10 + 2 * (i // 2) + 2 for i in range(LENGTH)]


def test_stop_at_eos():
  out = _gen(CountingModel(eos_at=4), [[2, 7]])  # prompt occupies positions 0-1; EOS at position 4
  assert out[0] == out[0][:2] and len(out[0]) == 2


def test_the_step_loop_is_jitted_not_a_python_loop_per_step():
  model = CountingModel(eos_at=99)
  TRACES.clear()
  _gen(model, [[2, 5, 6]], steps=LENGTH)
  assert len(TRACES) == 1  # 8 steps, one trace: the loop runs inside one compiled program
  _gen(model, [[2, 7, 8]], steps=LENGTH)
  assert len(TRACES) == 1  # same shapes: the compiled sampler is reused


def test_top_p_filter_matches_numpy():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  for p, kept in ((0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.96, 4)):
    out = np.asarray(sampler.top_p_filter(jnp.asarray(logits)[None], p))[0, 0]
    assert np.isfinite(out).sum() == kept, (p, out)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="block_size"):
    _gen(CountingModel(), [[2]], block_size=3)
  with pytest.raises(ValueError, match="remasking"):
    _gen(CountingModel(), [[2]], remasking="confidence")


class TinyAttentionModel(nnx.Module):
  """A real one-layer bidirectional attention model with segment masking and RoPE."""

  def __init__(self, rngs):
    d = 16
    self.emb = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, d)))
    self.wqkv = nnx.Param(jax.random.normal(rngs.params(), (3, d, 2, 8)) / 4)
    self.wo = nnx.Param(jax.random.normal(rngs.params(), (2, 8, d)) / 4)

  def __call__(self, tokens_BxL, *, segment_ids_BxL, positions_BxL):
    x = self.emb[...][tokens_BxL]
    q, k, v = (jnp.einsum("bld,dhk->blhk", x, self.wqkv[...][i]) for i in range(3))
    q, k = apply_rope(q, positions_BxL, 100.0), apply_rope(k, positions_BxL, 100.0)
    h = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids_BxL, False))
    x = x + jnp.einsum("blhk,hkd->bld", h, self.wo[...])
    return x @ self.emb[...].T, {}


def test_batched_prompts_of_different_lengths_decode_as_if_alone():
  model = TinyAttentionModel(nnx.Rngs(0))
  prompts = [[2, 11, 12], [2, 13, 14, 15, 16, 17, 18], [2]]
  batched = _gen(model, prompts, length=6, steps=6)
  alone = [_gen(model, [p], length=6, steps=6)[0] for p in prompts]
  assert batched == alone
  assert all(len(x) == 6 for x in batched)  # EOS is never predicted by this model: full length
