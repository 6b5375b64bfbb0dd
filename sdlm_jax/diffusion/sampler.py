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

Infilling: a [MASK] inside a prompt is decoded like a generated position. The masked prompt
positions join the first block (they sit left of every generated block, and filling them
first lets the continuation condition on them), so the first block's steps commit them
together with its own positions, most confident first. They never become EOS. With
`length=0` only the prompts' masks are decoded, in one block. Guidance's unconditional pass
masks the prompt's given tokens only.

Stop at EOS: once an EOS is committed in the generated span, every generated position after
the first EOS becomes padding (pad id, segment id 0): it is no longer decoded, nor attended
to. The loop (a `lax.while_loop` in one `jax.jit`) ends after the last step, or earlier when
no row has a masked position left. The model is split with `nnx.split` and its state is an
argument of the compiled function, so a new checkpoint reuses the compiled sampler.

Progress: with `progress=True` the loop runs in up to PROGRESS_UPDATES calls of the same
compiled program (a range of steps each, the step index and tokens carried between them;
the result is the same as one call) and a tqdm bar on stderr counts the steps. One call per
step would cost a host round trip per step; a callback inside the loop would tie the
compiled program to a Python object.

Predictions: logits (with classifier-free guidance, uncond + (1 + s)(cond - uncond), where
the unconditional pass sees the prompt replaced by [MASK]) never propose [MASK] or padding;
temperature 0 takes the argmax, otherwise a sample from the top-p (nucleus) filtered,
temperature-scaled distribution. Confidence is the predicted token's probability under the
unscaled guided logits. See also docs/formulas.md, section 9.

Uniform kernel (`kernel="uniform"`, a model trained with diffusion.kernel=uniform): the
decoded positions start as uniformly random support tokens at t = 1, and each of the `steps`
ancestral steps from t to s = t - 1/steps replaces every decoded position by a draw from
p(z_s | z_t) = q(z_s | z_t, x_theta) (diffusion.uniform.posterior_probs), x_theta being the
model's prediction given z_t and t (temperature and top-p applied; temperature 0: the argmax
as a one-hot). Every position may change at every step; the last step (s = 0) draws from
x_theta reweighted by the chance of the last jump, so [MASK] and padding never come out.
One block, no guidance (UserInputError otherwise); the continuation is cut at its first EOS.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from sdlm_jax import progress as progress_lib
from sdlm_jax.diffusion import uniform
from sdlm_jax.diffusion.objectives import KERNELS
from sdlm_jax.diffusion.schedules import get_schedule
from sdlm_jax.errors import UserInputError, check_choice, check_number

REMASKING = ("low_confidence", "random")
PROGRESS_UPDATES = 16


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


def check_settings(*, length, steps, block_size, temperature, top_p, remasking, cfg_scale, fewest_masks: int = 0,
                   prefix: str = "") -> int:
  """Raises UserInputError naming the first bad setting; returns the steps per block.

  Every rule on the sampling settings lives here: config validation (prefix "sample.") and
  sdlm-generate's flags (prefix "--") both call it. `fewest_masks` is the fewest [MASK]s in
  any prompt; when every prompt has one, `length` may be 0 (infilling only).
  """
  check_number(f"{prefix}length", length, lo=0 if fewest_masks else 1, integer=True,
               note="" if fewest_masks else "(0 only when every prompt has a [MASK] to fill)")
  check_number(f"{prefix}block_size", block_size, lo=0, integer=True, note="(0: one block)")
  if block_size and length % block_size:
    raise UserInputError(f"{prefix}block_size={block_size} does not divide {prefix}length={length}; "
                         "allowed values: 0 (one block) or a divisor of length")
  num_blocks = length // block_size if block_size and length else 1
  check_number(f"{prefix}steps", steps, lo=1, hi=length or fewest_masks, integer=True,
               note="(at most one step per decoded position)")
  if steps % num_blocks:
    raise UserInputError(f"{prefix}steps={steps} is not a multiple of the number of blocks ({num_blocks} = "
                         f"{prefix}length / {prefix}block_size); allowed values: multiples of {num_blocks}")
  check_number(f"{prefix}temperature", temperature, lo=0, note="(0: greedy)")
  check_number(f"{prefix}top_p", top_p, lo=0, hi=1, lo_open=True)
  check_choice(f"{prefix}remasking", remasking, REMASKING)
  check_number(f"{prefix}cfg_scale", cfg_scale, lo=0, note="(0: no guidance)")
  return steps // num_blocks


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
def _run_steps(graphdef, state, x_BxT, seg_BxT, infill_BxT, prompt_len_B, start, stop, rng, *, length, block_size,
               steps_per_block, temperature, top_p, remasking, cfg_scale, mask_id, eos_id, pad_id):
  """Steps [start, stop) of the reverse process from (x, seg); returns (next step, x, seg).

  The next step is below `stop` when no row had a masked position left. `infill_BxT`
  marks the prompts' [MASK] positions.
  """
  batch, width = x_BxT.shape
  rel_BxT = jnp.arange(width)[None, :] - prompt_len_B[:, None]  # index inside the generated span
  gen_BxT = (rel_BxT >= 0) & (rel_BxT < length)
  decoded_BxT = gen_BxT | infill_BxT
  block_BxT = jnp.where(infill_BxT, 0, rel_BxT // block_size)  # the prompts' masks join the first block
  given_BxT = (rel_BxT < 0) & ~infill_BxT  # the prompt tokens guidance conditions on
  positions_BxT = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))

  def model_logits(x_BxT, seg_BxT, pos_BxT):
    model = nnx.merge(graphdef, state)  # inside the loop body, so the model may touch its own state
    return model(x_BxT, segment_ids_BxL=seg_BxT, positions_BxL=pos_BxT)[0].astype(jnp.float32)

  def logits_fn(x_BxT, seg_BxT):
    if cfg_scale == 0.0:
      return model_logits(x_BxT, seg_BxT, positions_BxT)
    uncond_BxT = jnp.where(given_BxT, mask_id, x_BxT)
    both_2BxTxV = model_logits(jnp.concatenate([x_BxT, uncond_BxT]), jnp.concatenate([seg_BxT, seg_BxT]),
                               jnp.concatenate([positions_BxT, positions_BxT]))
    cond_BxTxV, uncond_BxTxV = both_2BxTxV[:batch], both_2BxTxV[batch:]
    return uncond_BxTxV + (1.0 + cfg_scale) * (cond_BxTxV - uncond_BxTxV)

  def predict(x_BxT, seg_BxT, key):
    logits_BxTxV = logits_fn(x_BxT, seg_BxT)
    vocab_V = jnp.arange(logits_BxTxV.shape[-1])
    banned_BxTxV = (vocab_V == mask_id) | (vocab_V == pad_id) | (infill_BxT[..., None] & (vocab_V == eos_id))
    logits_BxTxV = jnp.where(banned_BxTxV, -jnp.inf, logits_BxTxV)
    if temperature > 0.0:
      pred_BxT = jax.random.categorical(key, top_p_filter(logits_BxTxV / temperature, top_p), axis=-1)
    else:
      pred_BxT = jnp.argmax(logits_BxTxV, axis=-1)
    probs_BxTxV = jax.nn.softmax(logits_BxTxV, axis=-1)
    conf_BxT = jnp.take_along_axis(probs_BxTxV, pred_BxT[..., None], axis=-1)[..., 0]
    return pred_BxT.astype(jnp.int32), conf_BxT

  def undecided(x_BxT):
    return (x_BxT == mask_id) & decoded_BxT

  def cond(carry):
    s, x_BxT, _ = carry
    return (s < stop) & jnp.any(undecided(x_BxT))

  def step(carry):
    s, x_BxT, seg_BxT = carry
    k_pred, k_rand = jax.random.split(jax.random.fold_in(rng, s))
    pred_BxT, conf_BxT = predict(x_BxT, seg_BxT, k_pred)
    if remasking == "random":
      conf_BxT = jax.random.uniform(k_rand, conf_BxT.shape)
    candidate_BxT = undecided(x_BxT) & (block_BxT == s // steps_per_block)
    steps_left = steps_per_block - s % steps_per_block
    count_B = (jnp.sum(candidate_BxT, axis=1) + steps_left - 1) // steps_left
    x_BxT = jnp.where(commit_mask(conf_BxT, candidate_BxT, count_B), pred_BxT, x_BxT)
    first_eos_B = jnp.min(jnp.where(gen_BxT & (x_BxT == eos_id), rel_BxT, length), axis=1)
    ended_BxT = gen_BxT & (rel_BxT > first_eos_B[:, None])
    return s + 1, jnp.where(ended_BxT, pad_id, x_BxT), jnp.where(ended_BxT, 0, seg_BxT)

  return jax.lax.while_loop(cond, step, (jnp.asarray(start, jnp.int32), x_BxT, seg_BxT))


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "steps", "temperature", "top_p", "schedule_name", "mask_id", "eos_id", "pad_id"))
def _run_uniform_steps(graphdef, state, x_BxT, seg_BxT, decoded_BxT, infill_BxT, start, stop, rng, *, steps,
                       temperature, top_p, schedule_name, mask_id, eos_id, pad_id):
  """Ancestral steps [start, stop) of the uniform kernel's reverse process; returns (stop, x, seg)."""
  schedule = get_schedule(schedule_name)
  batch, width = x_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))

  def step(s, x_BxT):
    t_now = 1.0 - s.astype(jnp.float32) / steps
    t_next = 1.0 - (s + 1).astype(jnp.float32) / steps
    model = nnx.merge(graphdef, state)
    logits_BxTxV = model(x_BxT, segment_ids_BxL=seg_BxT, positions_BxL=positions_BxT,
                         t_B=jnp.full((batch,), t_now))[0].astype(jnp.float32)
    vocab_V = jnp.arange(logits_BxTxV.shape[-1])
    banned_BxTxV = (vocab_V == mask_id) | (vocab_V == pad_id) | (infill_BxT[..., None] & (vocab_V == eos_id))
    logits_BxTxV = jnp.where(banned_BxTxV, -jnp.inf, logits_BxTxV)
    if temperature > 0.0:
      probs_BxTxV = jax.nn.softmax(top_p_filter(logits_BxTxV / temperature, top_p), axis=-1)
    else:
      probs_BxTxV = jax.nn.one_hot(jnp.argmax(logits_BxTxV, axis=-1), logits_BxTxV.shape[-1])
    post_BxTxV = uniform.posterior_probs(probs_BxTxV, x_BxT, schedule.alpha(t_now), schedule.alpha(t_next), mask_id)
    draw_BxT = jax.random.categorical(jax.random.fold_in(rng, s), jnp.log(post_BxTxV), axis=-1).astype(x_BxT.dtype)
    return jnp.where(decoded_BxT, draw_BxT, x_BxT)

  x_BxT = jax.lax.fori_loop(start, stop, step, x_BxT)
  return jnp.asarray(stop, jnp.int32), x_BxT, seg_BxT


def _uniform_runner(model, tokens_BxT, seg_BxT, prompt_len_B, *, length, steps, block_size, temperature, top_p,
                    cfg_scale, schedule, mask_id, eos_id, pad_id, rng):
  """(initial tokens, run(x, seg, start, stop)) of the uniform kernel's sampler."""
  if block_size or cfg_scale:
    raise UserInputError(f"block_size={block_size} / cfg_scale={cfg_scale}: the uniform kernel's sampler decodes one "
                         "block without guidance; allowed values: 0 for both")
  rel_BxT = np.arange(tokens_BxT.shape[1])[None, :] - prompt_len_B[:, None]
  infill_BxT = (rel_BxT < 0) & (tokens_BxT == mask_id)
  decoded_BxT = infill_BxT | ((rel_BxT >= 0) & (rel_BxT < length))
  rng_init, rng_steps = jax.random.split(rng)
  start_BxT = uniform.uniform_tokens(rng_init, tokens_BxT.shape, model.cfg.vocab_size, mask_id)
  x_BxT = jnp.where(jnp.asarray(decoded_BxT), start_BxT, jnp.asarray(tokens_BxT))
  graphdef, state = nnx.split(model)
  run = functools.partial(
      _run_uniform_steps, graphdef, state, decoded_BxT=jnp.asarray(decoded_BxT), infill_BxT=jnp.asarray(infill_BxT),
      rng=rng_steps, steps=steps, temperature=float(temperature), top_p=float(top_p), schedule_name=schedule,
      mask_id=mask_id, eos_id=eos_id, pad_id=pad_id)
  return x_BxT, run


def complete(model, prompts, *, length: int, steps: int, block_size: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, remasking: str = "low_confidence", cfg_scale: float = 0.0, mask_id: int,
             eos_id: int, pad_id: int, rng: PRNGKeyArray, progress: bool = False, kernel: str = "masked",
             schedule: str = "linear") -> list[tuple[list[int], list[int]]]:
  """Fills every [MASK] of each prompt (a list of token ids) and generates up to `length` tokens after it.

  Returns (the prompt with its masks filled, its continuation cut before the first EOS) per
  prompt. `block_size` 0 means a single block; `steps` must be a multiple of the number of
  blocks and at most `length` (with `length` 0: at most the fewest masks in a prompt);
  see check_settings. `progress`: a step counter on stderr (see the module docstring).
  `kernel`: the kernel the model was trained with (masked, or uniform with its `schedule`).
  """
  check_choice("kernel", kernel, KERNELS)
  if not prompts:
    raise UserInputError("prompts is empty; allowed values: a list of token-id lists")
  fewest_masks = min(list(p).count(mask_id) for p in prompts)
  steps_per_block = check_settings(length=length, steps=steps, block_size=block_size, temperature=temperature,
                                   top_p=top_p, remasking=remasking, cfg_scale=cfg_scale, fewest_masks=fewest_masks)
  tokens_BxT, prompt_len_B = _layout(prompts, length, mask_id, pad_id)
  rel_BxT = np.arange(tokens_BxT.shape[1])[None, :] - prompt_len_B[:, None]
  infill_BxT = (rel_BxT < 0) & (tokens_BxT == mask_id)
  seg_BxT = (rel_BxT < length).astype(np.int32)  # prompt and generated span; the rest is padding
  if kernel == "uniform":
    x_BxT, run = _uniform_runner(model, tokens_BxT, seg_BxT, prompt_len_B, length=length, steps=steps,
                                 block_size=block_size, temperature=temperature, top_p=top_p, cfg_scale=cfg_scale,
                                 schedule=schedule, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, rng=rng)
  else:
    graphdef, state = nnx.split(model)
    run = functools.partial(
        _run_steps, graphdef, state, infill_BxT=jnp.asarray(infill_BxT), prompt_len_B=jnp.asarray(prompt_len_B),
        rng=rng, length=length, block_size=block_size or max(length, 1), steps_per_block=steps_per_block,
        temperature=float(temperature), top_p=float(top_p), remasking=remasking, cfg_scale=float(cfg_scale),
        mask_id=mask_id, eos_id=eos_id, pad_id=pad_id)
    x_BxT = jnp.asarray(tokens_BxT)
  num_steps = steps
  chunk = math.ceil(num_steps / PROGRESS_UPDATES) if progress else num_steps
  seg_BxT = jnp.asarray(seg_BxT)
  with progress_lib.bar(total=num_steps, desc="sample", unit="step", enabled=progress) as bar:
    s = 0
    while s < num_steps:
      stop = min(s + chunk, num_steps)
      s_next, x_BxT, seg_BxT = run(x_BxT, seg_BxT, start=s, stop=stop)
      bar.update(stop - s)
      if int(s_next) < stop:  # nothing left to decode
        bar.update(num_steps - stop)
        break
      s = stop
  out_BxT = np.asarray(x_BxT)
  results = []
  for row_T, p in zip(out_BxT, prompts):
    gen = row_T[len(p):len(p) + length].tolist()
    results.append((row_T[:len(p)].tolist(), gen[:gen.index(eos_id)] if eos_id in gen else gen))
  return results


def generate(model, prompts, **kwargs) -> list[list[int]]:
  """The continuations of `complete` (same arguments): up to `length` tokens per prompt, EOS excluded."""
  return [continuation for _, continuation in complete(model, prompts, **kwargs)]
