"""Config loading and start-up validation: each bad field is named with its allowed values."""

import math

import pytest

from sdlm_jax.config_files import repo_module
from sdlm_jax.config import ConfigError, validate, validate_eval, validate_sample

demo = repo_module("demo")


@pytest.mark.parametrize("arg", ["ec", "tc", "dense", "ar", "ec,smoke", "tc,smoke", "dense,smoke", "ar,smoke"])
def test_demo_variants_validate(arg):
  validate(demo.get_config(arg))


def test_demo_rejects_unknown_argument():
  with pytest.raises(ValueError, match="unknown argument"):
    demo.get_config("ec,fast")


def _bad(mutate, *, num_devices=1, process_count=1):
  cfg = demo.get_config("ec")
  mutate(cfg)
  with pytest.raises(ConfigError) as err:
    validate(cfg, num_devices, process_count)
  return str(err.value)


def test_unknown_schedule_names_field_and_choices():
  msg = _bad(lambda c: setattr(c.diffusion, "schedule", "cosine2"))
  assert "diffusion.schedule='cosine2'" in msg and "linear, poly2, cosine" in msg


def test_unknown_router():
  msg = _bad(lambda c: setattr(c.model.moe, "router", "hash"))
  assert "model.moe.router" in msg and "expert_choice, token_choice" in msg


def test_capacity_rounding_to_zero():
  def mutate(c):
    c.data.seq_len = 8
    c.model.moe.num_experts = 64
    c.model.moe.top_k = 1
  msg = _bad(mutate)
  assert "rounds to 0" in msg and "model.moe.top_k" in msg


def test_experts_not_divisible_by_expert_axis():
  def mutate(c):
    c.model.moe.num_experts = 6
    c.mesh.expert = 4
    c.mesh.data = 1
  msg = _bad(mutate, num_devices=4)
  assert "model.moe.num_experts=6" in msg and "mesh.expert=4" in msg


def test_batch_not_divisible_by_devices():
  def mutate(c):
    c.train.batch_size = 30
  msg = _bad(mutate, num_devices=8)
  assert "train.batch_size=30" in msg and "multiples of 8" in msg


def test_batch_not_divisible_by_grad_accum():
  def mutate(c):
    c.train.grad_accum_steps = 3
  assert "train.grad_accum_steps=3" in _bad(mutate)


def test_mesh_that_does_not_match_devices():
  def mutate(c):
    c.mesh.data = 3
  assert "need 3 devices" in _bad(mutate, num_devices=2)


def test_ar_loss_needs_causal_model():
  assert "model.causal=True" in _bad(lambda c: setattr(c.diffusion, "loss", "ar"))


def test_ar_loss_rejects_a_masking_schedule():
  def mutate(c):
    c.model.causal, c.diffusion.loss, c.diffusion.schedule = True, "ar", "cosine"
    c.model.moe.router = "token_choice"
  assert "diffusion.schedule='cosine' has no meaning for diffusion.loss='ar'" in _bad(mutate)


def test_causal_expert_choice_is_an_error_and_causal_token_choice_is_not():
  def ar_moe(router):
    def mutate(c):
      c.model.causal, c.diffusion.loss = True, "ar"
      c.model.moe.num_experts, c.model.moe.router = 4, router
    return mutate
  msg = _bad(ar_moe("expert_choice"))
  assert "model.moe.router='expert_choice' with model.causal=True leaks future tokens" in msg
  assert "allowed values: token_choice" in msg
  cfg = demo.get_config("ec")
  ar_moe("token_choice")(cfg)
  validate(cfg)


def test_bias_update_rate_is_for_token_choice_and_not_negative():
  msg = _bad(lambda c: setattr(c.model.moe, "bias_update_rate", 1e-3))  # demo ec is expert choice
  assert "model.moe.bias_update_rate=0.001 balances token-choice routing" in msg
  assert "model.moe.bias_update_rate=-1" in _bad(lambda c: setattr(c.model.moe, "bias_update_rate", -1.0))


def test_dynamic_scaling_factors_need_num_experts_plus_one_finite_numbers():
  assert "num_experts+1=9 numbers" in _bad(lambda c: setattr(c.model.moe, "dynamic_scaling_factors", (1.0, 2.0)))
  msg = _bad(lambda c: setattr(c.model.moe, "dynamic_scaling_factors", (1.0,) * 8 + (math.inf,)))
  assert "model.moe.dynamic_scaling_factors[8]=inf" in msg
  cfg = demo.get_config("ec")
  cfg.model.moe.dynamic_scaling_factors = (0, 1, 1.2, 1.4, 1.6, 1.8, 2, 2, 2)
  validate(cfg)


def test_t_sampling_names_and_width():
  assert "diffusion.t_sampling='normal'" in _bad(lambda c: setattr(c.diffusion, "t_sampling", "normal"))
  assert "diffusion.moving_gaussian_std=0.01" in _bad(lambda c: setattr(c.diffusion, "moving_gaussian_std", 0.01))
  def ar(c):
    c.model.causal, c.diffusion.loss, c.diffusion.t_sampling = True, "ar", "moving_gaussian"
    c.model.moe.router = "token_choice"
  assert "diffusion.t_sampling='moving_gaussian' has no meaning for diffusion.loss='ar'" in _bad(ar)


def test_uniform_kernel_needs_the_elbo_a_time_input_and_one_block():
  def uniform(loss="mdlm_elbo", time=True, block=0):
    def mutate(c):
      c.diffusion.kernel, c.diffusion.loss, c.model.time_embedding, c.sample.block_size = "uniform", loss, time, block
    return mutate
  assert "diffusion.kernel='gauss'" in _bad(lambda c: setattr(c.diffusion, "kernel", "gauss"))
  assert "diffusion.loss='megadlm' is a masked-kernel loss" in _bad(uniform(loss="megadlm"))
  assert "needs model.time_embedding=True" in _bad(uniform(time=False))
  assert "sample.block_size=8" in _bad(uniform(block=8))
  assert "model.time_embedding=True is for diffusion.kernel='uniform'" in _bad(
      lambda c: setattr(c.model, "time_embedding", True))
  cfg = demo.get_config("ec")
  uniform()(cfg)
  validate(cfg)


def test_gqa_heads_must_divide():
  assert "num_kv_heads" in _bad(lambda c: setattr(c.model, "num_kv_heads", 3))


def test_text_files_source_needs_paths():
  assert "data.paths" in _bad(lambda c: setattr(c.data, "source", "text_files"))


def test_bad_backend_and_remasking():
  assert "model.moe.backend" in _bad(lambda c: setattr(c.model.moe, "backend", "cuda"))
  assert "only token_choice" in _bad(lambda c: setattr(c.model.moe, "backend", "interpret_gpu"))
  assert "sample.remasking" in _bad(lambda c: setattr(c.sample, "remasking", "greedy"))


def test_expert_choice_kernel_backend_is_valid_without_expert_parallelism_only():
  cfg = demo.get_config("ec")
  cfg.model.moe.backend = "interpret"
  validate(cfg)  # the demo runs without remat

  def interpret_under_remat(c):
    c.model.moe.backend = "interpret"
    c.model.remat = "full"
  assert "model.remat=none" in _bad(interpret_under_remat)

  def kernel_with_experts_split(c):
    c.model.moe.backend = "pallas"
    c.mesh.expert = 2
  assert "does not support expert parallelism" in _bad(kernel_with_experts_split, num_devices=2)


def test_bad_remat():
  assert "model.remat='some'" in _bad(lambda c: setattr(c.model, "remat", "some"))


NAN, INF = math.nan, math.inf


# (field, bad value, what the message must say it accepts); the demo "ec" config otherwise.
OUT_OF_RANGE = [
    ("train.optimizer.clip_norm", -1.0, "a finite number >= 0 (0: no clipping)"),
    ("train.optimizer.min_lr_ratio", -1.0, "a finite number in [0, 1]"),
    ("train.optimizer.b1", 1.5, "a finite number in [0, 1)"),
    ("train.optimizer.b2", 1.0, "a finite number in [0, 1)"),
    ("train.optimizer.eps", 0.0, "a finite number > 0"),
    ("train.optimizer.weight_decay", -5.0, "a finite number >= 0"),
    ("train.optimizer.lr", NAN, "a finite number > 0"),
    ("train.optimizer.lr", INF, "a finite number > 0"),
    ("train.optimizer.decay_fraction", NAN, "a finite number in [0, 1]"),
    ("train.optimizer.warmup_steps", -1, "an integer in [0, 800]"),  # [0, train.num_steps]
    ("train.eval_every", -1, "an integer >= 0"),
    ("model.init_std", -1.0, "a finite number > 0"),
    ("model.rope_theta", 0.0, "a finite number > 0"),
    ("model.norm_eps", 0.0, "a finite number > 0"),
    ("model.head_dim", 33, "an even integer"),
    ("model.moe.routed_scaling_factor", -1.0, "a finite number > 0"),
    ("model.moe.load_balance_weight", -0.5, "a finite number >= 0"),
    ("model.moe.z_loss_weight", NAN, "a finite number >= 0"),
    ("model.moe.top_k", 9, "allowed values: 1..8"),  # expert choice: an error, not a clamp
    ("model.moe.first_k_dense", 5, "an integer in [0, 4]"),
    ("diffusion.t_min", NAN, "a finite number in (0, 1)"),
    ("diffusion.random_length_prob", 1.5, "a finite number in [0, 1]"),
    ("eval.num_t_samples", 0, "an integer > 0"),
    ("eval.num_batches", 0, "an integer > 0"),
    ("data.tokenizer_sample_chars", 0, "an integer > 0"),
    ("data.val_fraction", INF, "a finite number in (0, 1)"),
    ("sample.block_size", -1, "an integer >= 0"),
    ("sample.block_size", 5, "does not divide sample.length=48"),
    ("sample.steps", 47, "multiples of 6"),  # 48 / block_size 8 = 6 blocks
    ("sample.steps", 49, "an integer in [1, 48]"),
    ("sample.length", 0, "an integer >= 1"),
    ("sample.cfg_scale", NAN, "a finite number >= 0"),
    ("sample.cfg_scale", -1.0, "a finite number >= 0"),
    ("sample.temperature", INF, "a finite number >= 0"),
    ("sample.top_p", NAN, "a finite number in (0, 1]"),
]


def _set(cfg, field, value):
  *sections, name = field.split(".")
  node = cfg
  for section in sections:
    node = node[section]
  node[name] = value


@pytest.mark.parametrize("field, value, allowed", OUT_OF_RANGE)
def test_out_of_range_field_is_named_with_its_allowed_values(field, value, allowed):
  msg = _bad(lambda c: _set(c, field, value))
  assert msg.startswith(f"{field}=") and allowed in msg, msg


def test_token_choice_top_k_above_num_experts():
  def mutate(c):
    c.model.moe.router = "token_choice"
    c.model.moe.top_k = 9
  assert "model.moe.top_k=9 exceeds model.moe.num_experts=8" in _bad(mutate)


def test_boundary_values_are_accepted():
  cfg = demo.get_config("ec")
  for field, value in (("train.optimizer.clip_norm", 0.0), ("train.optimizer.min_lr_ratio", 1.0),
                       ("train.optimizer.b1", 0.0), ("train.optimizer.weight_decay", 0.0),
                       ("model.moe.top_k", 8), ("sample.temperature", 0.0), ("sample.block_size", 0),
                       ("train.eval_every", 0), ("data.tokenizer_sample_chars", 1)):
    _set(cfg, field, value)
  validate(cfg)


def test_every_float_must_be_finite_even_without_a_range():
  def mutate(c):
    c.model.future_float = NAN  # a field no range check knows
  assert _bad(mutate) == "model.future_float=nan; allowed values: a finite number"


def test_float16_is_rejected_on_cpu_only():
  cfg = demo.get_config("ec")
  cfg.model.dtype = "float16"
  for platform in ("cpu", None):  # None: jax.default_backend(), the CPU in tests
    with pytest.raises(ConfigError, match="float16' is for GPU.*float32, bfloat16"):
      validate(cfg, platform=platform)
  validate(cfg, platform="gpu")


def test_cudnn_attention_needs_a_half_precision_compute_dtype():
  cfg = demo.get_config("ec")  # float32 compute
  cfg.model.attention = "cudnn"
  with pytest.raises(ConfigError, match="attention='cudnn' needs model.dtype bfloat16 or float16"):
    validate(cfg, platform="gpu")
  cfg.model.dtype = "bfloat16"
  validate(cfg, platform="gpu")


def test_splash_attention_needs_a_tpu_and_interpret_mode_runs_anywhere():
  cfg = demo.get_config("ec")
  cfg.model.attention = "splash"
  with pytest.raises(ConfigError, match="model.attention='splash' is a TPU kernel.*splash_interpret"):
    validate(cfg, platform="cpu")
  validate(cfg, platform="tpu")
  cfg.model.attention = "splash_interpret"
  validate(cfg, platform="cpu")


@pytest.mark.parametrize("remat", ["minimal", "minimal_with_context", "minimal_with_context_and_rope",
                                   "save_dot_except_mlp", "save_qkv_proj"])
def test_named_remat_policies_validate(remat):
  cfg = demo.get_config("ec")
  cfg.model.remat = remat
  validate(cfg)


def test_section_checks_take_the_names_of_their_flags():
  cfg = demo.get_config("ec")
  cfg.eval.num_t_samples = 0
  with pytest.raises(ConfigError, match=r"^--num_t_samples=0; allowed values: an integer > 0$"):
    validate_eval(cfg.eval, prefix="--")
  cfg.sample.length = 0
  with pytest.raises(ConfigError, match=r"^--length=0;"):
    validate_sample(cfg.sample, prefix="--")
  cfg.sample.steps = 2
  validate_sample(cfg.sample, fewest_masks=2, prefix="--")  # infilling only: 2 masks, at most 2 steps
  with pytest.raises(ConfigError, match=r"^--steps=2; allowed values: an integer in \[1, 1\]"):
    validate_sample(cfg.sample, fewest_masks=1, prefix="--")
