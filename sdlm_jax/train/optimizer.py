"""AdamW with a decay mask, global-norm clipping and warmup + cosine / WSD / constant schedules."""

import jax
import optax

LR_SCHEDULES = ("cosine", "wsd", "constant")


def learning_rate_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine decay, WSD (stable, then linear decay) or constant."""
  peak = opt_cfg.lr
  floor = peak * opt_cfg.min_lr_ratio
  warmup = int(opt_cfg.warmup_steps)
  warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
  after = max(num_steps - warmup, 1)
  if opt_cfg.schedule == "cosine":
    main_fn = optax.cosine_decay_schedule(peak, after, alpha=opt_cfg.min_lr_ratio)
  elif opt_cfg.schedule == "wsd":
    decay = max(int(round(num_steps * opt_cfg.decay_fraction)), 1)
    stable = max(after - decay, 0)
    main_fn = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])
  elif opt_cfg.schedule == "constant":
    main_fn = optax.constant_schedule(peak)
  else:
    raise ValueError(f"train.optimizer.schedule={opt_cfg.schedule!r}; allowed values: {', '.join(LR_SCHEDULES)}")
  if warmup == 0:
    return main_fn
  return optax.join_schedules([warmup_fn, main_fn], [warmup])


def decay_mask(params):
  """Weight decay applies to matrices only: never to norm scales or biases (all 1-D here)."""
  def keep(path, leaf):
    names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
    return leaf.ndim >= 2 and "norm" not in names and "bias" not in names
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
  """AdamW after clipping the global gradient norm to clip_norm (0: no clipping)."""
  clip = optax.clip_by_global_norm(opt_cfg.clip_norm) if opt_cfg.clip_norm > 0 else optax.identity()
  return optax.chain(
      clip,
      optax.adamw(
          learning_rate_schedule(opt_cfg, num_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
          weight_decay=opt_cfg.weight_decay, mask=decay_mask),
  )
