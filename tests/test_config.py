"""Config loading and start-up validation: each bad field is named with its allowed values."""

import pytest

from sdlm_jax.config_files import repo_module
from sdlm_jax import config as config_lib
from sdlm_jax.config import ConfigError, validate

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


def test_gqa_heads_must_divide():
  assert "num_kv_heads" in _bad(lambda c: setattr(c.model, "num_kv_heads", 3))


def test_text_files_source_needs_paths():
  assert "data.paths" in _bad(lambda c: setattr(c.data, "source", "text_files"))


def test_bad_backend_and_remasking():
  assert "model.moe.backend" in _bad(lambda c: setattr(c.model.moe, "backend", "cuda"))
  assert "only token_choice" in _bad(lambda c: setattr(c.model.moe, "backend", "interpret"))
  assert "sample.remasking" in _bad(lambda c: setattr(c.sample, "remasking", "greedy"))


def test_validation_names_match_the_modules_that_implement_them():
  from sdlm_jax.diffusion import objectives, schedules  # pylint: disable=import-outside-toplevel
  assert set(config_lib.SCHEDULES) == set(schedules.SCHEDULE_NAMES)
  assert set(config_lib.DIFFUSION_LOSSES) == set(objectives.LOSS_NAMES)
  from sdlm_jax.model import transformer  # pylint: disable=import-outside-toplevel
  assert set(config_lib.REMAT_POLICIES) == set(transformer.REMAT_POLICIES)


def test_bad_remat():
  assert "model.remat='some'" in _bad(lambda c: setattr(c.model, "remat", "some"))
