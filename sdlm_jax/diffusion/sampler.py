"""Generation by the reverse masked-diffusion process (LLaDA-style), in one jitted loop.

Every row is laid out as [prompt][MASK x length][padding]: rows start at position 0 and
padding (segment id 0) is invisible to attention, so a batch of prompts of different lengths
decodes each row exactly as that prompt alone would (MegaDLMs ignores the padding mask).
Each of `steps` iterations predicts every masked position and commits a fixed number of them:
the most confident ones (`low_confidence` remasking) or random ones, within the current
semi-autoregressive block when `block_size` > 0. Once an EOS is committed, the positions after
it become padding and stop being decoded. Temperature, top-p and classifier-free guidance
(prompt replaced by [MASK] for the unconditional pass) shape the predictions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REMASKING = ("low_confidence", "random")


def transfer_counts(block_size: int, steps_per_block: int) -> np.ndarray:
  """Tokens committed at each step of a block: as even as possible, earlier steps first."""
  base, extra = divmod(block_size, steps_per_block)
  return np.array([base + (i < extra) for i in range(steps_per_block)], np.int32)


def top_p_filter(logits_BxTxV, top_p: float):
  """Keeps the smallest set of tokens whose probability mass reaches top_p (at least one)."""
  if top_p >= 1.0:
    return logits_BxTxV
  sorted_desc = jnp.sort(logits_BxTxV, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxTxV >= threshold, logits_BxTxV, -jnp.inf)


def _layout(prompts, length: int, mask_id: int, pad_id: int):
  width = max(len(p) for p in prompts) + length
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  prompt_len = np.array([len(p) for p in prompts], np.int32)
  for r, p in enumerate(prompts):
    tokens[r, :len(p)] = p
    tokens[r, len(p):len(p) + length] = mask_id
  return tokens, prompt_len


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=(
    "length", "block_size", "steps_per_block", "temperature", "top_p", "remasking", "cfg_scale",
    "mask_id", "eos_id", "pad_id", "banned"))
def _generate(graphdef, state, tokens_BxT, prompt_len_B, rng, *, length, block_size, steps_per_block,
              temperature, top_p, remasking, cfg_scale, mask_id, eos_id, pad_id, banned):
  batch, width = tokens_BxT.shape
  idx_T = jnp.arange(width)
  rel_BxT = idx_T[None, :] - prompt_len_B[:, None]           # index inside the generated span
  gen_BxT = (rel_BxT >= 0) & (rel_BxT < length)
  is_prompt_BxT = rel_BxT < 0
  positions_BxT = jnp.broadcast_to(idx_T, (batch, width)).astype(jnp.int32)
  counts_S = jnp.asarray(transfer_counts(block_size, steps_per_block))
  num_steps = steps_per_block * (length // block_size)
  model = lambda toks, seg: nnx.merge(graphdef, state)(toks, segment_ids_BxL=seg, positions_BxL=positions_BxT)[0]

  def predict(x_BxT, seg_BxT, key):
    if cfg_scale > 0:
      uncond_BxT = jnp.where(is_prompt_BxT, mask_id, x_BxT)
      both = model(jnp.concatenate([x_BxT, uncond_BxT]), jnp.concatenate([seg_BxT, seg_BxT]))
      cond, uncond = both[:batch], both[batch:]
      logits = uncond + (1.0 + cfg_scale) * (cond - uncond)
    else:
      logits = model(x_BxT, seg_BxT)
    logits = logits.at[..., jnp.asarray(banned)].set(-jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if temperature > 0:
      filtered = top_p_filter(logits / temperature, top_p)
      pred_BxT = jax.random.categorical(key, filtered, axis=-1)
    else:
      pred_BxT = jnp.argmax(logits, axis=-1)
    conf_BxT = jnp.take_along_axis(probs, pred_BxT[..., None], axis=-1)[..., 0]
    return pred_BxT.astype(jnp.int32), conf_BxT

  def step(s, carry):
    x_BxT, seg_BxT, key = carry
    key, k_pred, k_rand = jax.random.split(key, 3)
    pred_BxT, conf_BxT = predict(x_BxT, seg_BxT, k_pred)
    if remasking == "random":
      conf_BxT = jax.random.uniform(k_rand, conf_BxT.shape)
    block = s // steps_per_block
    in_block_BxT = gen_BxT & (rel_BxT // block_size == block)
    candidate_BxT = (x_BxT == mask_id) & in_block_BxT
    score_BxT = jnp.where(candidate_BxT, conf_BxT, -jnp.inf)
    rank_BxT = jnp.argsort(jnp.argsort(-score_BxT, axis=-1, stable=True), axis=-1, stable=True)
    commit_BxT = candidate_BxT & (rank_BxT < counts_S[s % steps_per_block])
    x_BxT = jnp.where(commit_BxT, pred_BxT, x_BxT)
    # Stop at EOS: everything generated after the first committed EOS becomes padding.
    eos_rel_B = jnp.min(jnp.where(gen_BxT & (x_BxT == eos_id), rel_BxT, length), axis=-1)
    ended_BxT = gen_BxT & (rel_BxT > eos_rel_B[:, None])
    x_BxT = jnp.where(ended_BxT, pad_id, x_BxT)
    seg_BxT = jnp.where(ended_BxT, 0, seg_BxT)
    return x_BxT, seg_BxT, key

  seg_BxT = (rel_BxT < length).astype(jnp.int32)  # prompt and generated span; the rest is padding
  x_BxT, _, _ = jax.lax.fori_loop(0, num_steps, step, (tokens_BxT, seg_BxT, rng))
  return x_BxT


def generate(model, prompts, *, length: int, steps: int, block_size: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, remasking: str = "low_confidence", cfg_scale: float = 0.0,
             mask_id: int, eos_id: int, pad_id: int, rng, banned_ids=None) -> list[list[int]]:
  """Generates `length` tokens after each prompt; returns each continuation cut at its EOS."""
  if not prompts:
    raise ValueError("generate: prompts is empty")
  if remasking not in REMASKING:
    raise ValueError(f"remasking={remasking!r}; allowed values: {', '.join(REMASKING)}")
  block_size = block_size or length
  if length <= 0 or length % block_size:
    raise ValueError(f"length={length} must be a positive multiple of block_size={block_size}")
  num_blocks = length // block_size
  if steps <= 0 or steps % num_blocks:
    raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks ({num_blocks})")
  steps_per_block = steps // num_blocks
  if steps_per_block > block_size:
    raise ValueError(f"steps={steps} exceeds the tokens to generate ({length}); use at most one step per token")
  tokens, prompt_len = _layout(prompts, length, mask_id, pad_id)
  banned = tuple(sorted({mask_id, pad_id} | set(banned_ids or ())))
  graphdef, state = nnx.split(model)
  out = np.asarray(_generate(
      graphdef, state, jnp.asarray(tokens), jnp.asarray(prompt_len), rng, length=length, block_size=block_size,
      steps_per_block=steps_per_block, temperature=float(temperature), top_p=float(top_p), remasking=remasking,
      cfg_scale=float(cfg_scale), mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, banned=banned))
  results = []
  for r, p in enumerate(prompts):
    gen = out[r, len(p):len(p) + length].tolist()
    if eos_id in gen:
      gen = gen[:gen.index(eos_id)]
    results.append([t for t in gen if t not in (pad_id, mask_id)])
  return results
