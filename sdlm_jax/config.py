"""Config validation: every check that can fail before any compute is spent.

`validate(cfg, num_devices, process_count)` raises `ConfigError` naming the bad field and the
values it accepts, so a typo in a 200-line override never surfaces as a shape error deep
inside a jitted function. Every numeric field is range-checked and every float must be
finite. The names a field accepts are defined once, by the module that implements them.
"""

import math

import jax
import ml_collections

from pallas_kernels import BACKENDS
from sdlm_jax import storage
from sdlm_jax.data.corpus import DATA_SOURCES
from sdlm_jax.diffusion.objectives import LOSS_NAMES as DIFFUSION_LOSSES
from sdlm_jax.diffusion.objectives import KERNELS, T_SAMPLINGS
from sdlm_jax.diffusion.sampler import REMASKING, check_settings
from sdlm_jax.diffusion.schedules import SCHEDULE_NAMES as SCHEDULES
from sdlm_jax.errors import UserInputError, check_choice, check_number
from sdlm_jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLS
from sdlm_jax.model.layers import DTYPES
from sdlm_jax.model.moe import EC_BACKENDS, EC_GROUPS, EC_KERNEL_BACKENDS, ROUTERS
from sdlm_jax.model.routing import ACTIVATIONS as ROUTER_ACTIVATIONS
from sdlm_jax.model.transformer import REMAT_POLICIES
from sdlm_jax.parallel.mesh import mesh_shape
from sdlm_jax.parallel.rules import MESH_AXES, RULE_SETS
from sdlm_jax.train.optimizer import LR_SCHEDULES

__all__ = ["ConfigError", "validate", "validate_eval", "validate_sample", "ATTENTION_IMPLS", "DATA_SOURCES",
           "DIFFUSION_LOSSES", "DTYPES", "EC_GROUPS", "LR_SCHEDULES", "REMASKING", "REMAT_POLICIES",
           "ROUTER_ACTIVATIONS", "ROUTERS", "SCHEDULES"]


class ConfigError(UserInputError):
  """A config field holds a value that cannot work."""


def _one_of(name, value, allowed):
  check_choice(name, value, tuple(allowed), error=ConfigError)


def _number(name, value, **bounds):
  check_number(name, value, error=ConfigError, **bounds)


def _positive(name, value):
  _number(name, value, lo=0, lo_open=True, integer=True)


def _check_model(m, seq_len, platform):
  for f in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    _positive(f"model.{f}", m[f])
  if m.vocab_size < 16:
    raise ConfigError(f"model.vocab_size={m.vocab_size}; allowed values: >= 16 (5 ids are special)")
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(
        f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
        "allowed values: num_kv_heads dividing num_heads")
  if m.head_dim % 2:
    raise ConfigError(f"model.head_dim={m.head_dim}; allowed values: an even integer (RoPE rotates pairs)")
  for f in ("causal", "qk_norm", "tie_embeddings", "scan_layers"):
    _one_of(f"model.{f}", m[f], (True, False))
  _number("model.rope_theta", m.rope_theta, lo=0, lo_open=True)
  _number("model.norm_eps", m.norm_eps, lo=0, lo_open=True)
  _number("model.init_std", m.init_std, lo=0, lo_open=True)
  _one_of("model.dtype", m.dtype, DTYPES)
  _one_of("model.param_dtype", m.param_dtype, DTYPES)
  if m.dtype == "float16" and platform == "cpu":
    raise ConfigError("model.dtype='float16' is for GPU: the CPU backend has no float16 matmul; "
                      "allowed values on CPU: float32, bfloat16")
  _one_of("model.attention", m.attention, ATTENTION_IMPLS)
  if m.attention == "cudnn" and m.dtype not in ("bfloat16", "float16"):
    raise ConfigError(f"model.attention='cudnn' needs model.dtype bfloat16 or float16 (cuDNN's fused attention "
                      f"takes no {m.dtype}); allowed values: auto (picks XLA for {m.dtype}), xla")
  if m.attention == "splash" and platform != "tpu":
    raise ConfigError(f"model.attention='splash' is a TPU kernel (this run compiles for {platform}); allowed "
                      "values here: auto, xla, splash_interpret (the kernel in Pallas TPU interpret mode, slow)")
  _one_of("model.remat", m.remat, REMAT_POLICIES)
  _check_moe(m.moe, m.num_layers, seq_len, m.causal)
  if m.moe.num_experts and m.moe.backend == "interpret" and m.remat != "none":
    raise ConfigError(f"model.moe.backend='interpret' with model.remat={m.remat!r}: TPU interpret mode simulates "
                      "the kernels with callbacks, which JAX cannot rematerialise; allowed values: model.remat=none")


def _check_moe(moe, num_layers, seq_len, causal):
  _number("model.moe.num_experts", moe.num_experts, lo=0, integer=True, note="(0: dense)")
  if moe.num_experts == 0:
    return
  _one_of("model.moe.router", moe.router, ROUTERS)
  if causal and moe.router == "expert_choice":
    raise ConfigError("model.moe.router='expert_choice' with model.causal=True leaks future tokens (each expert "
                      "ranks the tokens of a whole routing group, later ones included); allowed values: token_choice")
  _one_of("model.moe.ec_group", moe.ec_group, EC_GROUPS)
  _one_of("model.moe.router_activation", moe.router_activation, ROUTER_ACTIVATIONS)
  _one_of("model.moe.backend", moe.backend, BACKENDS)
  if moe.router == "expert_choice" and moe.backend not in EC_BACKENDS:
    raise ConfigError(
        f"model.moe.backend={moe.backend!r} selects a GPU grouped-matmul kernel, which only token_choice uses; "
        f"expert_choice has an XLA path (auto, xla) and a TPU expert-FFN kernel (pallas, interpret): allowed "
        f"values {', '.join(EC_BACKENDS)}")
  _positive("model.moe.expert_mlp_dim", moe.expert_mlp_dim)
  _positive("model.moe.top_k", moe.top_k)
  if moe.top_k > moe.num_experts:
    raise ConfigError(
        f"model.moe.top_k={moe.top_k} exceeds model.moe.num_experts={moe.num_experts}; "
        f"allowed values: 1..{moe.num_experts}")
  _number("model.moe.first_k_dense", moe.first_k_dense, lo=0, hi=num_layers, integer=True)
  _number("model.moe.num_shared_experts", moe.num_shared_experts, lo=0, integer=True)
  _number("model.moe.routed_scaling_factor", moe.routed_scaling_factor, lo=0, lo_open=True)
  _number("model.moe.load_balance_weight", moe.load_balance_weight, lo=0)
  _check_scaling_factors(moe.dynamic_scaling_factors, moe.num_experts)
  _number("model.moe.bias_update_rate", moe.bias_update_rate, lo=0, note="(0: off)")
  if moe.bias_update_rate > 0 and moe.router != "token_choice":
    raise ConfigError(f"model.moe.bias_update_rate={moe.bias_update_rate} balances token-choice routing (expert "
                      "choice is balanced by construction); allowed values with expert_choice: 0")
  _number("model.moe.z_loss_weight", moe.z_loss_weight, lo=0)
  if moe.router == "expert_choice" and moe.ec_group == "sequence":
    capacity = seq_len * moe.top_k // moe.num_experts
    if capacity == 0:
      raise ConfigError(
          f"expert-choice capacity floor(data.seq_len*top_k/num_experts) = floor({seq_len}*{moe.top_k}/"
          f"{moe.num_experts}) rounds to 0; raise model.moe.top_k or data.seq_len, or lower "
          "model.moe.num_experts")


def _check_scaling_factors(factors, num_experts):
  name = "model.moe.dynamic_scaling_factors"
  if not isinstance(factors, (tuple, list)) or len(factors) not in (0, num_experts + 1):
    raise ConfigError(f"{name}={factors!r}; allowed values: () (off) or num_experts+1={num_experts + 1} numbers, "
                      "entry n scaling the gates of a token that n experts route")
  for n, f in enumerate(factors):
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 0:
      raise ConfigError(f"{name}[{n}]={f!r}; allowed values: finite numbers >= 0")


def _check_diffusion(d, causal):
  _one_of("diffusion.loss", d.loss, DIFFUSION_LOSSES)
  _one_of("diffusion.schedule", d.schedule, SCHEDULES)
  if d.loss == "ar" and not causal:
    raise ConfigError("diffusion.loss='ar' needs model.causal=True (the AR baseline is causal)")
  if d.loss != "ar" and causal:
    raise ConfigError(f"diffusion.loss={d.loss!r} needs model.causal=False (diffusion is bidirectional)")
  if d.loss == "ar" and d.schedule != "linear":
    raise ConfigError(f"diffusion.schedule={d.schedule!r} has no meaning for diffusion.loss='ar' (nothing is "
                      "masked); allowed values: linear (the default, ignored)")
  _number("diffusion.t_min", d.t_min, lo=0, hi=1, lo_open=True, hi_open=True)
  _one_of("diffusion.t_sampling", d.t_sampling, T_SAMPLINGS)
  if d.loss == "ar" and d.t_sampling != "uniform":
    raise ConfigError(f"diffusion.t_sampling={d.t_sampling!r} has no meaning for diffusion.loss='ar' (there is no "
                      "t); allowed values: uniform (the default, ignored)")
  _number("diffusion.moving_gaussian_std", d.moving_gaussian_std, lo=0.05, hi=10,
          note="(the window's width in t; below 0.05 its truncation is numerically unsafe)")
  _number("diffusion.random_length_prob", d.random_length_prob, lo=0, hi=1)
  _positive("diffusion.num_t_buckets", d.num_t_buckets)


def _check_kernel(d, m, s):
  _one_of("diffusion.kernel", d.kernel, KERNELS)
  if d.kernel == "uniform":
    if d.loss != "mdlm_elbo":
      raise ConfigError(f"diffusion.loss={d.loss!r} is a masked-kernel loss; with diffusion.kernel='uniform' allowed "
                        "values: mdlm_elbo (the continuous-time ELBO, here of the uniform kernel)")
    if not m.time_embedding:
      raise ConfigError("diffusion.kernel='uniform' needs model.time_embedding=True (a uniformly corrupted input does "
                        "not show how noisy it is)")
    if s.block_size or s.cfg_scale:
      raise ConfigError(f"sample.block_size={s.block_size} / sample.cfg_scale={s.cfg_scale}: the uniform kernel's "
                        "sampler decodes one block without guidance; allowed values: 0 for both")
  elif m.time_embedding:
    raise ConfigError(f"model.time_embedding=True is for diffusion.kernel='uniform' (diffusion.kernel="
                      f"{d.kernel!r} gives the model no t); allowed values: False")


def _check_data(data):
  _one_of("data.source", data.source, DATA_SOURCES)
  if data.source != "shakespeare" and not data.paths:
    raise ConfigError(f"data.paths is empty; data.source={data.source!r} needs "
                      f"{'the directory sdlm-prepare wrote' if data.source == 'prepared' else 'comma-separated file globs'}")
  if not data.data_dir:
    raise ConfigError("data.data_dir is empty; allowed values: a directory for the tokenizer and split caches")
  if storage.is_remote(data.data_dir):
    raise ConfigError(f"data.data_dir={data.data_dir!r} is a gs:// URL; allowed values: a local directory (a "
                      "per-host cache; data.paths and the work dir may be on gs://)")
  _number("data.seq_len", data.seq_len, lo=2, integer=True)
  _number("data.val_fraction", data.val_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
  if data.num_epochs == 0 or data.num_epochs < -1:
    raise ConfigError(f"data.num_epochs={data.num_epochs}; allowed values: -1 (forever) or >= 1")
  _one_of("data.shuffle", data.shuffle, (True, False))
  _positive("data.tokenizer_sample_chars", data.tokenizer_sample_chars)
  _number("data.unique_tokens", data.unique_tokens, lo=0, integer=True, note="(0: the whole train split)")
  _number("data.shuffle_window", data.shuffle_window, lo=0, integer=True, note="(0: global shuffle)")
  if data.unique_tokens and data.source != "prepared":
    raise ConfigError(f"data.unique_tokens={data.unique_tokens} needs data.source='prepared' (counts come from "
                      f"its manifest); data.source={data.source!r} allows only 0")


def _check_optimizer(o, num_steps):
  _one_of("train.optimizer.schedule", o.schedule, LR_SCHEDULES)
  _number("train.optimizer.lr", o.lr, lo=0, lo_open=True)
  _number("train.optimizer.warmup_steps", o.warmup_steps, lo=0, hi=num_steps, integer=True,
          note="(at most train.num_steps)")
  _number("train.optimizer.decay_fraction", o.decay_fraction, lo=0, hi=1)
  _number("train.optimizer.min_lr_ratio", o.min_lr_ratio, lo=0, hi=1)
  _number("train.optimizer.b1", o.b1, lo=0, hi=1, hi_open=True)
  _number("train.optimizer.b2", o.b2, lo=0, hi=1, hi_open=True)
  _number("train.optimizer.eps", o.eps, lo=0, lo_open=True)
  _number("train.optimizer.weight_decay", o.weight_decay, lo=0)
  _number("train.optimizer.clip_norm", o.clip_norm, lo=0, note="(0: no clipping)")


def _check_train(cfg, num_devices, process_count, num_slices):
  t = cfg.train
  for f in ("batch_size", "grad_accum_steps", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    _positive(f"train.{f}", t[f])
  _number("train.eval_every", t.eval_every, lo=0, integer=True, note="(0: only at the end)")
  _check_optimizer(t.optimizer, t.num_steps)
  _one_of("mesh.rules", cfg.mesh.rules, tuple(RULE_SETS))
  sizes = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, num_devices, num_slices)))
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
  if experts and moe.router == "expert_choice" and moe.backend in EC_KERNEL_BACKENDS and sizes["expert"] > 1:
    raise ConfigError(
        f"model.moe.backend={moe.backend!r} (the expert-choice FFN kernel) does not support expert parallelism "
        f"(mesh.expert={sizes['expert']}); allowed values: model.moe.backend auto or xla, or mesh.expert=1")
  if experts and moe.router == "expert_choice" and moe.ec_group == "batch":
    local_tokens = t.batch_size // batch_shards // t.grad_accum_steps * cfg.data.seq_len
    if local_tokens * moe.top_k // experts == 0:
      raise ConfigError(
          f"expert-choice capacity floor(local tokens {local_tokens}*top_k/num_experts) rounds to 0; "
          "raise train.batch_size or model.moe.top_k")


def validate_eval(e: ml_collections.ConfigDict, prefix: str = "eval."):
  """Checks the eval section; `prefix` names its fields (sdlm-eval passes "--" for its flags)."""
  _positive(f"{prefix}num_batches", e.num_batches)
  _positive(f"{prefix}num_t_samples", e.num_t_samples)
  _number(f"{prefix}seed", e.seed, integer=True)
  if "every_epochs" in e:
    _number(f"{prefix}every_epochs", e.every_epochs, lo=0, integer=True, note="(0: off)")


def validate_sample(s: ml_collections.ConfigDict, *, fewest_masks: int = 0, prefix: str = "sample."):
  """Checks the sample section (the sampler's own rules, sampler.check_settings).

  `prefix` names its fields (sdlm-generate passes "--" for its flags); `fewest_masks` is the
  fewest [MASK]s in any prompt (a config has no prompts: 0, so sample.length >= 1).
  """
  try:
    check_settings(length=s.length, steps=s.steps, block_size=s.block_size, temperature=s.temperature,
                   top_p=s.top_p, remasking=s.remasking, cfg_scale=s.cfg_scale, fewest_masks=fewest_masks,
                   prefix=prefix)
  except UserInputError as e:
    raise ConfigError(str(e)) from None


def _check_finite(node, path=""):
  """The rule for every float field, including any without a range check above."""
  for key, value in node.items():
    name = f"{path}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      _check_finite(value, name + ".")
    elif isinstance(value, float):
      _number(name, value)


def validate(cfg: ml_collections.ConfigDict, num_devices: int = 1, process_count: int = 1, num_slices: int = 1,
             platform: str | None = None):
  """Raises ConfigError for the first field that cannot work; returns cfg otherwise.

  `platform` is the backend the run will compile for (default: jax.default_backend()).
  """
  _number("seed", cfg.seed, integer=True)
  _check_model(cfg.model, cfg.data.seq_len, platform or jax.default_backend())
  _check_diffusion(cfg.diffusion, cfg.model.causal)
  _check_kernel(cfg.diffusion, cfg.model, cfg.sample)
  _check_data(cfg.data)
  try:
    _check_train(cfg, num_devices, process_count, num_slices)
  except ConfigError:
    raise
  except ValueError as e:  # mesh_shape errors name their field already
    raise ConfigError(str(e)) from None
  validate_eval(cfg.eval)
  validate_sample(cfg.sample)
  _check_finite(cfg)
  return cfg
