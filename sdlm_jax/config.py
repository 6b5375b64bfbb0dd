"""Config validation: every check that can fail before any compute is spent.

`validate(cfg, num_devices, process_count)` raises `ConfigError` naming the bad field and the
values it accepts, so a typo in a 200-line override never surfaces as a shape error deep
inside a jitted function.
"""

import math

import ml_collections

from pallas_kernels import BACKENDS
from sdlm_jax.parallel.mesh import mesh_shape
from sdlm_jax.parallel.rules import RULE_SETS

ROUTERS = ("expert_choice", "token_choice")
EC_GROUPS = ("sequence", "batch")
ROUTER_ACTIVATIONS = ("softmax", "sigmoid")
DTYPES = ("bfloat16", "float32", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "offload")
DATA_SOURCES = ("shakespeare", "text_files", "array_record")
LR_SCHEDULES = ("cosine", "wsd", "constant")
REMASKING = ("low_confidence", "random")
# Kept here (not imported from sdlm_jax.diffusion) so validation stays import-light;
# tests/test_config.py checks they equal the names the diffusion modules accept.
DIFFUSION_LOSSES = ("megadlm", "mdlm_elbo", "ar")
SCHEDULES = ("linear", "poly2", "cosine")


class ConfigError(ValueError):
  """A config field holds a value that cannot work."""


def _one_of(name, value, allowed):
  if value not in allowed:
    raise ConfigError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(str, allowed))}")


def _positive(name, value):
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"{name}={value!r}; allowed values: an integer > 0")


def _check_model(m, seq_len):
  for f in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    _positive(f"model.{f}", m[f])
  if m.vocab_size < 16:
    raise ConfigError(f"model.vocab_size={m.vocab_size}; allowed values: >= 16 (5 ids are special)")
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(
        f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
        "allowed values: num_kv_heads dividing num_heads")
  _one_of("model.dtype", m.dtype, DTYPES)
  _one_of("model.param_dtype", m.param_dtype, DTYPES)
  _one_of("model.attention", m.attention, ATTENTION_IMPLS)
  _one_of("model.remat", m.remat, REMAT_POLICIES)
  _one_of("model.scan_layers", m.scan_layers, (True, False))
  moe = m.moe
  if moe.num_experts < 0:
    raise ConfigError(f"model.moe.num_experts={moe.num_experts}; allowed values: 0 (dense) or a positive count")
  if moe.num_experts == 0:
    return
  _one_of("model.moe.router", moe.router, ROUTERS)
  _one_of("model.moe.ec_group", moe.ec_group, EC_GROUPS)
  _one_of("model.moe.router_activation", moe.router_activation, ROUTER_ACTIVATIONS)
  _one_of("model.moe.backend", moe.backend, BACKENDS)
  if moe.router == "expert_choice" and moe.backend not in ("auto", "xla"):
    raise ConfigError(
        f"model.moe.backend={moe.backend!r} selects a grouped-matmul kernel, which only token_choice uses; "
        "expert_choice runs XLA top-k/gather/scatter: allowed values auto, xla")
  _positive("model.moe.expert_mlp_dim", moe.expert_mlp_dim)
  _positive("model.moe.top_k", moe.top_k)
  if moe.router == "token_choice" and moe.top_k > moe.num_experts:
    raise ConfigError(
        f"model.moe.top_k={moe.top_k} exceeds model.moe.num_experts={moe.num_experts}; "
        f"allowed values: 1..{moe.num_experts} for token_choice")
  if not 0 <= moe.first_k_dense <= m.num_layers:
    raise ConfigError(f"model.moe.first_k_dense={moe.first_k_dense}; allowed values: 0..{m.num_layers}")
  if moe.num_shared_experts < 0:
    raise ConfigError(f"model.moe.num_shared_experts={moe.num_shared_experts}; allowed values: >= 0")
  if moe.router == "expert_choice" and moe.ec_group == "sequence":
    capacity = seq_len * moe.top_k // moe.num_experts
    if capacity == 0:
      raise ConfigError(
          f"expert-choice capacity floor(data.seq_len*top_k/num_experts) = floor({seq_len}*{moe.top_k}/"
          f"{moe.num_experts}) rounds to 0; raise model.moe.top_k or data.seq_len, or lower "
          "model.moe.num_experts")


def _check_diffusion(d, causal):
  _one_of("diffusion.loss", d.loss, DIFFUSION_LOSSES)
  _one_of("diffusion.schedule", d.schedule, SCHEDULES)
  if d.loss == "ar" and not causal:
    raise ConfigError("diffusion.loss='ar' needs model.causal=True (the AR baseline is causal)")
  if d.loss != "ar" and causal:
    raise ConfigError(f"diffusion.loss={d.loss!r} needs model.causal=False (diffusion is bidirectional)")
  if not 0.0 < d.t_min < 1.0:
    raise ConfigError(f"diffusion.t_min={d.t_min}; allowed values: 0 < t_min < 1")
  if not 0.0 <= d.random_length_prob <= 1.0:
    raise ConfigError(f"diffusion.random_length_prob={d.random_length_prob}; allowed values: [0, 1]")
  _positive("diffusion.num_t_buckets", d.num_t_buckets)


def _check_data(data):
  _one_of("data.source", data.source, DATA_SOURCES)
  if data.source != "shakespeare" and not data.paths:
    raise ConfigError(f"data.paths is empty; data.source={data.source!r} needs comma-separated file globs")
  if not isinstance(data.seq_len, int) or data.seq_len < 2:
    raise ConfigError(f"data.seq_len={data.seq_len!r}; allowed values: an integer >= 2")
  if not 0.0 < data.val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction={data.val_fraction}; allowed values: 0 < val_fraction < 1")
  if data.num_epochs == 0 or data.num_epochs < -1:
    raise ConfigError(f"data.num_epochs={data.num_epochs}; allowed values: -1 (forever) or >= 1")


def _check_train(cfg, num_devices, process_count, num_slices):
  t = cfg.train
  for f in ("batch_size", "grad_accum_steps", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    _positive(f"train.{f}", t[f])
  _one_of("train.optimizer.schedule", t.optimizer.schedule, LR_SCHEDULES)
  if t.optimizer.lr <= 0:
    raise ConfigError(f"train.optimizer.lr={t.optimizer.lr}; allowed values: > 0")
  if t.optimizer.warmup_steps < 0 or t.optimizer.warmup_steps > t.num_steps:
    raise ConfigError(
        f"train.optimizer.warmup_steps={t.optimizer.warmup_steps}; allowed values: 0..train.num_steps={t.num_steps}")
  if not 0.0 <= t.optimizer.decay_fraction <= 1.0:
    raise ConfigError(f"train.optimizer.decay_fraction={t.optimizer.decay_fraction}; allowed values: [0, 1]")
  _one_of("mesh.rules", cfg.mesh.rules, tuple(RULE_SETS))
  sizes = dict(zip(("data", "fsdp", "expert", "model"), mesh_shape(cfg.mesh, num_devices, num_slices)))
  batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  divisor = math.lcm(batch_shards, process_count) * t.grad_accum_steps
  if t.batch_size % divisor:
    raise ConfigError(
        f"train.batch_size={t.batch_size} is not divisible by (data*fsdp*expert devices={batch_shards}, "
        f"processes={process_count}) x train.grad_accum_steps={t.grad_accum_steps}; allowed values: "
        f"multiples of {divisor}")
  experts = cfg.model.moe.num_experts
  if experts and experts % sizes["expert"]:
    raise ConfigError(
        f"model.moe.num_experts={experts} is not divisible by mesh.expert={sizes['expert']}; "
        "allowed values: a multiple of the expert-parallel size")
  moe = cfg.model.moe
  if experts and moe.router == "expert_choice" and moe.ec_group == "batch":
    local_tokens = t.batch_size // batch_shards // t.grad_accum_steps * cfg.data.seq_len
    if local_tokens * moe.top_k // experts == 0:
      raise ConfigError(
          f"expert-choice capacity floor(local tokens {local_tokens}*top_k/num_experts) rounds to 0; "
          "raise train.batch_size or model.moe.top_k")


def _check_sample(s):
  _one_of("sample.remasking", s.remasking, REMASKING)
  _positive("sample.length", s.length)
  _positive("sample.steps", s.steps)
  if not 0.0 < s.top_p <= 1.0:
    raise ConfigError(f"sample.top_p={s.top_p}; allowed values: 0 < top_p <= 1")
  if s.temperature < 0:
    raise ConfigError(f"sample.temperature={s.temperature}; allowed values: >= 0")


def validate(cfg: ml_collections.ConfigDict, num_devices: int = 1, process_count: int = 1, num_slices: int = 1):
  """Raises ConfigError for the first field that cannot work; returns cfg otherwise."""
  _check_model(cfg.model, cfg.data.seq_len)
  _check_diffusion(cfg.diffusion, cfg.model.causal)
  _check_data(cfg.data)
  try:
    _check_train(cfg, num_devices, process_count, num_slices)
  except ValueError as e:  # mesh_shape errors name their field already
    raise ConfigError(str(e)) from None
  _check_sample(cfg.sample)
  return cfg
