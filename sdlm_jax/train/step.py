"""The jitted train step: corrupt -> forward -> loss -> grads -> AdamW update.

Params and optimizer state are plain pytrees (nnx.State / optax state) passed as jit
arguments and donated, so one compiled program serves every step and buffers are reused.
Gradient accumulation scans over micro-batches inside the same program.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pallas_kernels import target
from sdlm_jax.diffusion import objectives
from sdlm_jax.model.moe import update_selection_biases
from sdlm_jax.parallel.compiler_options import train_step_options


def step_rng(seed: int, step):
  """The step's randomness is a pure function of (seed, step): resuming replays it exactly."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), step)


def make_loss_fn(graphdef, rest, diffusion_cfg, mask_id: int):
  """loss_fn(params, batch, rng, progress=0.0) -> (data loss + router aux loss, metrics).

  `progress` = step / train.num_steps (the moving-Gaussian t window needs it).
  """
  def loss_fn(params, batch, rng, progress=0.0):
    model = nnx.merge(graphdef, params, rest)
    def apply_fn(tokens_BxL, segment_ids_BxL, positions_BxL, t_B=None):
      return model(tokens_BxL, segment_ids_BxL=segment_ids_BxL, positions_BxL=positions_BxL, t_B=t_B)
    loss, metrics = objectives.compute_loss(apply_fn, batch, rng, diffusion_cfg, mask_id=mask_id, progress=progress,
                                            vocab_size=model.cfg.vocab_size)
    aux = metrics.pop("aux")
    metrics["aux_loss"] = aux["aux_loss"]
    metrics.update({f"router/{k}": v for k, v in aux["router"].items()})
    total = loss + aux["aux_loss"]
    metrics["total_loss"] = total
    return total, metrics
  return loss_fn


def make_grad_fn(graphdef, rest, diffusion_cfg, mask_id: int):
  """grad_fn(params, batch, rng) -> ((loss, metrics), grads of the loss w.r.t. params)."""
  return jax.value_and_grad(make_loss_fn(graphdef, rest, diffusion_cfg, mask_id), has_aux=True)


def _split_microbatches(batch, num_micro: int):
  return jax.tree.map(lambda x: x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:]), batch)


def _sum_buckets(metrics):
  """Micro-batch means, except per-t-bucket sums/counts, which add up."""
  return {k: (v.sum(0) if k.startswith("t_bucket") else v.mean(0)) for k, v in metrics.items()}


def make_train_step(graphdef, rest, optimizer: optax.GradientTransformation, lr_schedule, cfg,
                    mask_id: int, state_shardings=None):
  """Returns step(params, opt_state, batch, step) -> (params, opt_state, metrics), jitted.

  `state_shardings=(params shardings, opt_state shardings)` pins the updated state to the
  layout it came in with, so the donated buffers are reused and every step runs the same
  compiled program (None: let the compiler choose).
  """
  grad_fn = make_grad_fn(graphdef, rest, cfg.diffusion, mask_id)
  num_micro = cfg.train.grad_accum_steps

  def train_step(params, opt_state, batch, step):
    rng = step_rng(cfg.seed, step)
    progress = jnp.asarray(step, jnp.float32) / cfg.train.num_steps
    if num_micro == 1:
      (_, metrics), grads = grad_fn(params, batch, rng, progress)
    else:
      micro = _split_microbatches(batch, num_micro)
      def body(grads_acc, xs):
        i, mb = xs
        (_, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i), progress)
        return jax.tree.map(jnp.add, grads_acc, g), m
      zeros = jax.tree.map(jnp.zeros_like, params)
      grads, stacked = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
      grads = jax.tree.map(lambda g: g / num_micro, grads)
      metrics = _sum_buckets(stacked)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    bias_rate = cfg.model.moe.get("bias_update_rate", 0.0)
    if bias_rate > 0 and "router/expert_load_per_layer" in metrics:
      new_params = update_selection_biases(new_params, metrics["router/expert_load_per_layer"], bias_rate)
    param_norm = optax.tree.norm(new_params)
    # A non-finite loss, gradient or updated param never reaches the state: the step is dropped
    # (the loop then stops with an error), so whatever is checkpointed is the last good state.
    ok = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics.update(grad_norm=grad_norm, param_norm=param_norm, lr=lr_schedule(step))
    return keep(new_params, params), keep(new_opt_state, opt_state), metrics

  out_shardings = None if state_shardings is None else (*state_shardings, None)
  return jax.jit(train_step, donate_argnums=(0, 1), out_shardings=out_shardings,
                 compiler_options=train_step_options(target.platform()))
