"""Generation by the reverse masked-diffusion process (LLaDA-style), in one jitted loop.

Each row of the batch is laid out as [prompt][MASK x length][padding]: every row starts at
position 0 and its padding has segment id 0 (invisible to attention), so prompts of different
lengths decode, row by row, exactly as each prompt would alone (MegaDLMs ignores this mask).

The `length` generated positions form `length / block_size` semi-autoregressive blocks
decoded left to right, each given `steps / num_blocks` steps. A step predicts every masked
position of the current block and commits ceil(masked left in the block / steps left in the
block) of them: the most confident predictions (`low_confidence`) or random ones. Without EOS
this is LLaDA's even split (earlier steps take the remainder); after an EOS it spreads the
fewer tokens left over the remaining steps.

Stop at EOS: once an EOS is committed in the generated span, every generated position after
the first EOS becomes padding (pad id, segment id 0): it is no longer decoded, nor attended
to. The loop (a `lax.while_loop` in one `jax.jit`) ends after the last step, or earlier when
no row has a masked position left. The model is split with `nnx.split` and its state is an
argument of the compiled function, so a new checkpoint reuses the compiled sampler.

Predictions: logits (with classifier-free guidance, uncond + (1 + s)(cond - uncond), where
the unconditional pass sees the prompt replaced by [MASK]) never propose [MASK] or padding;
temperature 0 takes the argmax, otherwise a sample from the top-p (nucleus) filtered,
temperature-scaled distribution. Confidence is the predicted token's probability under the
unscaled guided logits. See also docs/formulas.md, section 9.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

REMASKING = ("low_confidence", "random")


def top_p_filter(logits_NxV: Float[Array, "*N V"], top_p: float) -> Float[Array, "*N V"]:
  """Keeps the smallest set of most likely tokens whose probability reaches top_p; others -> -inf.

  Filters the last axis (any leading axes). The most likely token is always kept; ties at the
  threshold logit are all kept.
  """
  if top_p >= 1.0:
    return logits_NxV
  sorted_NxV = jnp.flip(jnp.sort(logits_NxV, axis=-1), axis=-1)
  probs_NxV = jax.nn.softmax(sorted_NxV, axis=-1)
  mass_before_NxV = jnp.cumsum(probs_NxV, axis=-1) - probs_NxV
  keep_NxV = mass_before_NxV < top_p
  threshold_Nx1 = jnp.min(jnp.where(keep_NxV, sorted_NxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_NxV >= threshold_Nx1, logits_NxV, -jnp.inf)


def commit_mask(score_BxT: Float[Array, "B T"], candidate_BxT: Bool[Array, "B T"],
                count_B: Int[Array, "B"]) -> Bool[Array, "B T"]:
  """The `count_B` highest-scoring candidates of each row (ties: leftmost first)."""
  score_BxT = jnp.where(candidate_BxT, score_BxT, -jnp.inf)
  order_BxT = jnp.argsort(-score_BxT, axis=-1, stable=True)
  rank_BxT = jnp.argsort(order_BxT, axis=-1, stable=True)
  return candidate_BxT & (rank_BxT < count_B[:, None])


def _layout(prompts, length: int, mask_id: int, pad_id: int):
  """Left-aligned rows [prompt][MASK x length][pad]; returns (tokens_BxT, prompt_len_B)."""
  width = max(len(p) for p in prompts) + length
  tokens_BxT = np.full((len(prompts), width), pad_id, np.int32)
  for r, p in enumerate(prompts):
    tokens_BxT[r, :len(p)] = p
    tokens_BxT[r, len(p):len(p) + length] = mask_id
  return tokens_BxT, np.array([len(p) for p in prompts], np.int32)


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "length", "block_size", "steps_per_block", "temperature", "top_p", "remasking",
    "cfg_scale", "mask_id", "eos_id", "pad_id"))
def _generate(graphdef, state, tokens_BxT, prompt_len_B, rng, *, length, block_size, steps_per_block,
              temperature, top_p, remasking, cfg_scale, mask_id, eos_id, pad_id):
  batch, width = tokens_BxT.shape
  rel_BxT = jnp.arange(width)[None, :] - prompt_len_B[:, None]  # index inside the generated span
  gen_BxT = (rel_BxT >= 0) & (rel_BxT < length)
  is_prompt_BxT = rel_BxT < 0
  positions_BxT = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
  num_steps = steps_per_block * (length // block_size)

  def model_logits(x_BxT, seg_BxT, pos_BxT):
    model = nnx.merge(graphdef, state)  # inside the loop body, so the model may touch its own state
    return model(x_BxT, segment_ids_BxL=seg_BxT, positions_BxL=pos_BxT)[0].astype(jnp.float32)

  def logits_fn(x_BxT, seg_BxT):
    if cfg_scale == 0.0:
      return model_logits(x_BxT, seg_BxT, positions_BxT)
    uncond_BxT = jnp.where(is_prompt_BxT, mask_id, x_BxT)
    both_2BxTxV = model_logits(jnp.concatenate([x_BxT, uncond_BxT]), jnp.concatenate([seg_BxT, seg_BxT]),
                               jnp.concatenate([positions_BxT, positions_BxT]))
    cond_BxTxV, uncond_BxTxV = both_2BxTxV[:batch], both_2BxTxV[batch:]
    return uncond_BxTxV + (1.0 + cfg_scale) * (cond_BxTxV - uncond_BxTxV)

  def predict(x_BxT, seg_BxT, key):
    logits_BxTxV = logits_fn(x_BxT, seg_BxT).at[..., jnp.array([mask_id, pad_id])].set(-jnp.inf)
    if temperature > 0.0:
      pred_BxT = jax.random.categorical(key, top_p_filter(logits_BxTxV / temperature, top_p), axis=-1)
    else:
      pred_BxT = jnp.argmax(logits_BxTxV, axis=-1)
    probs_BxTxV = jax.nn.softmax(logits_BxTxV, axis=-1)
    conf_BxT = jnp.take_along_axis(probs_BxTxV, pred_BxT[..., None], axis=-1)[..., 0]
    return pred_BxT.astype(jnp.int32), conf_BxT

  def undecided(x_BxT):
    return (x_BxT == mask_id) & gen_BxT

  def cond(carry):
    s, x_BxT, _ = carry
    return (s < num_steps) & jnp.any(undecided(x_BxT))

  def step(carry):
    s, x_BxT, seg_BxT = carry
    k_pred, k_rand = jax.random.split(jax.random.fold_in(rng, s))
    pred_BxT, conf_BxT = predict(x_BxT, seg_BxT, k_pred)
    if remasking == "random":
      conf_BxT = jax.random.uniform(k_rand, conf_BxT.shape)
    candidate_BxT = undecided(x_BxT) & (rel_BxT // block_size == s // steps_per_block)
    steps_left = steps_per_block - s % steps_per_block
    count_B = (jnp.sum(candidate_BxT, axis=1) + steps_left - 1) // steps_left
    x_BxT = jnp.where(commit_mask(conf_BxT, candidate_BxT, count_B), pred_BxT, x_BxT)
    first_eos_B = jnp.min(jnp.where(gen_BxT & (x_BxT == eos_id), rel_BxT, length), axis=1)
    ended_BxT = gen_BxT & (rel_BxT > first_eos_B[:, None])
    return s + 1, jnp.where(ended_BxT, pad_id, x_BxT), jnp.where(ended_BxT, 0, seg_BxT)

  seg_BxT = (rel_BxT < length).astype(jnp.int32)  # prompt and generated span; the rest is padding
  _, x_BxT, _ = jax.lax.while_loop(cond, step, (jnp.zeros((), jnp.int32), tokens_BxT, seg_BxT))
  return x_BxT


def _check_args(prompts, length, steps, block_size, temperature, top_p, remasking, cfg_scale):
  """Returns steps per block; raises ValueError naming the first bad argument."""
  if not prompts:
    raise ValueError("prompts is empty; allowed values: a list of token-id lists")
  if length <= 0:
    raise ValueError(f"length={length}; allowed values: an integer > 0")
  if block_size < 0 or (block_size and length % block_size):
    raise ValueError(f"block_size={block_size} does not divide length={length}; "
                     "allowed values: 0 (one block) or a divisor of length")
  num_blocks = length // block_size if block_size else 1
  if steps <= 0 or steps % num_blocks:
    raise ValueError(f"steps={steps} is not a positive multiple of the number of blocks "
                     f"({num_blocks} = length / block_size)")
  if steps > length:
    raise ValueError(f"steps={steps} exceeds the number of generated tokens (length={length}); "
                     "allowed values: at most one step per token")
  if temperature < 0:
    raise ValueError(f"temperature={temperature}; allowed values: >= 0 (0: greedy)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p}; allowed values: 0 < top_p <= 1")
  if remasking not in REMASKING:
    raise ValueError(f"remasking={remasking!r} is not supported; allowed values: {', '.join(REMASKING)}")
  if cfg_scale < 0:
    raise ValueError(f"cfg_scale={cfg_scale}; allowed values: >= 0 (0: off)")
  return steps // num_blocks


def generate(model, prompts, *, length: int, steps: int, block_size: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, remasking: str = "low_confidence", cfg_scale: float = 0.0, mask_id: int,
             eos_id: int, pad_id: int, rng: PRNGKeyArray) -> list[list[int]]:
  """Generates up to `length` tokens after each prompt (a list of token ids).

  Returns one continuation per prompt, cut before its first EOS (EOS excluded).
  `block_size` 0 means a single block; `steps` must be a multiple of the number of blocks
  and at most `length`.
  """
  steps_per_block = _check_args(prompts, length, steps, block_size, temperature, top_p, remasking, cfg_scale)
  tokens_BxT, prompt_len_B = _layout(prompts, length, mask_id, pad_id)
  graphdef, state = nnx.split(model)
  out_BxT = np.asarray(_generate(
      graphdef, state, jnp.asarray(tokens_BxT), jnp.asarray(prompt_len_B), rng, length=length,
      block_size=block_size or length, steps_per_block=steps_per_block, temperature=float(temperature),
      top_p=float(top_p), remasking=remasking, cfg_scale=float(cfg_scale), mask_id=mask_id, eos_id=eos_id,
      pad_id=pad_id))
  results = []
  for row_T, p in zip(out_BxT, prompts):
    gen = row_T[len(p):len(p) + length].tolist()
    results.append(gen[:gen.index(eos_id)] if eos_id in gen else gen)
  return results
