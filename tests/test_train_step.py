"""The jitted train step: gradient accumulation and the non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdlm_jax.config_files import repo_module
from sdlm_jax.parallel.mesh import make_mesh
from sdlm_jax.data.tokenizer import MASK_ID
from sdlm_jax.train import program as program_lib
from sdlm_jax.train.metrics import first_nonfinite
from sdlm_jax.train.step import make_train_step

demo = repo_module("demo")


def _setup(accum, lr=1e-3):
  cfg = demo.get_config("ar,smoke")  # the AR loss has no randomness: micro-batching must not matter
  cfg.train.grad_accum_steps = accum
  cfg.train.optimizer.lr = lr
  cfg.train.optimizer.warmup_steps = 0
  cfg.train.optimizer.schedule = "constant"
  cfg.train.optimizer.eps = 1.0  # Adam's first step is ~sign(g); a large eps keeps it linear in g
  program = program_lib.build(cfg, make_mesh(cfg.mesh))
  return program, program.synthetic_batch()


def test_gradient_accumulation_matches_one_big_batch():
  results = []
  for accum in (1, 4):
    program, batch = _setup(accum)
    with program.context():
      new_params, _, metrics = program.step(program.params, program.opt_state, batch, jnp.int32(0))
    results.append((jax.device_get(new_params), float(metrics["loss"]), float(metrics["grad_norm"])))
  (p1, l1, g1), (p4, l4, g4) = results
  assert abs(l1 - l4) < 1e-5 and abs(g1 - g4) / g1 < 1e-4
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_a_non_finite_step_leaves_the_state_untouched():
  program, batch = _setup(1, lr=1e-3)
  before = jax.device_get((program.params, program.opt_state))
  bad = dict(batch)
  bad["tokens"] = batch["tokens"].at[0, 3].set(10_000)  # out of vocabulary: the embedding gather gives NaN
  with program.context():
    new_params, new_opt_state, metrics = program.step(program.params, program.opt_state, bad, jnp.int32(0))
  assert not np.isfinite(float(metrics["total_loss"]))
  after = jax.device_get((new_params, new_opt_state))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_updated_params_leave_the_state_untouched():
  """Loss and gradients are finite, the update is not: the guard's param norm drops the step."""
  program, batch = _setup(1)
  to_inf = optax.stateless(lambda updates, params: jax.tree.map(lambda u: u + jnp.inf, updates))
  step = make_train_step(program.graphdef, program.rest, to_inf, program.lr_schedule, program.cfg, MASK_ID)
  before = jax.device_get(program.params)
  with program.context():
    new_params, _, metrics = step(program.params, to_inf.init(program.params), batch, jnp.int32(0))
  host = jax.device_get(metrics)
  assert np.isfinite(host["total_loss"]) and np.isfinite(host["grad_norm"])
  assert not np.isfinite(host["param_norm"])
  assert first_nonfinite([host]) == 0
  for a, b in zip(jax.tree.leaves(jax.device_get(new_params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
