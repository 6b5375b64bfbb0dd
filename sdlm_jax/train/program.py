"""The train program: the one builder of everything that runs or compiles the train step.

`build(cfg, mesh)` assembles, for one config on one mesh: the optimizer and its learning-rate
schedule, the model state (initialised directly on its shards, or only described as sharded
`ShapeDtypeStruct`s with `abstract=True`: for a resume that restores onto it, or for
ahead-of-time compilation) and the jitted step. The training loop, the AOT fit check
(sdlm_jax.aot), the benchmarks and the tests all build the step here, so they run the same
program, traced under the same mesh and logical-axis rules (`program.context()`).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sdlm_jax.data.tokenizer import MASK_ID
from sdlm_jax.parallel.mesh import sharding_context
from sdlm_jax.parallel.rules import BATCH_MESH_AXES
from sdlm_jax.train import state as state_lib
from sdlm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from sdlm_jax.train.step import make_grad_fn, make_train_step, step_rng

BATCH_KEYS = ("tokens", "segment_ids", "positions")


@dataclasses.dataclass
class TrainProgram:
  """The train step of one config on one mesh, with the state it updates.

  `params` / `opt_state` are arrays, or sharded ShapeDtypeStructs when built abstract; `step`
  is jitted: step(params, opt_state, batch, step) -> (params, opt_state, metrics), donating
  the state. Call it (and `grads`) inside `context()`.
  """
  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  optimizer: optax.GradientTransformation
  lr_schedule: Callable
  graphdef: Any
  params: Any
  rest: Any
  opt_state: Any
  step: Callable
  grads: Callable  # jitted (params, batch, rng) -> ((loss, metrics), grads); for checks and tests

  def context(self):
    """The mesh and logical-axis rules the step is traced and run under."""
    return sharding_context(self.mesh, self.cfg.mesh.rules)

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(BATCH_MESH_AXES))

  def global_batch(self, local_batch: dict) -> dict:
    """Assembles each process's slice of the batch into one array sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def abstract_batch(self) -> dict:
    """The global batch's shapes and shardings (for lowering without data)."""
    shape = (self.cfg.train.batch_size, self.cfg.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding) for k in BATCH_KEYS}

  def synthetic_batch(self, seed: int = 0) -> dict:
    """A global batch of random real tokens, one document per row (benchmarks, tests)."""
    rng = np.random.default_rng(seed)
    shape = (self.cfg.train.batch_size // jax.process_count(), self.cfg.data.seq_len)
    return self.global_batch({
        "tokens": rng.integers(MASK_ID + 1, self.cfg.model.vocab_size, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
    })

  def model(self) -> nnx.Module:
    """The model with the program's current params."""
    return nnx.merge(self.graphdef, self.params, self.rest)

  def lower(self):
    """The step lowered for the program's state and an abstract batch (inside `context()`)."""
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(self.mesh, P()))
    with self.context():
      return self.step.lower(self.params, self.opt_state, self.abstract_batch(), step)

  def step_rng(self, step: int):
    return step_rng(self.cfg.seed, step)


def build(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, abstract: bool = False) -> TrainProgram:
  """The train program of `cfg` on `mesh`; `abstract=True` describes the state without
  allocating it (resume restores onto it; AOT compiles with it)."""
  optimizer = make_optimizer(cfg.train.optimizer, cfg.train.num_steps)
  lr_schedule = learning_rate_schedule(cfg.train.optimizer, cfg.train.num_steps)
  if abstract:
    graphdef, params, rest = state_lib.abstract_model(cfg, mesh)
    opt_state = state_lib.abstract_opt_state(optimizer, params, mesh)
  else:
    graphdef, params, rest = nnx.split(state_lib.init_model(cfg, mesh), nnx.Param, ...)
    opt_state = state_lib.init_opt_state(optimizer, params, mesh)
  step = make_train_step(graphdef, rest, optimizer, lr_schedule, cfg, MASK_ID,
                         state_shardings=state_lib.shardings_of((params, opt_state)))
  grads = jax.jit(make_grad_fn(graphdef, rest, cfg.diffusion, MASK_ID))
  return TrainProgram(cfg=cfg, mesh=mesh, optimizer=optimizer, lr_schedule=lr_schedule, graphdef=graphdef,
                      params=params, rest=rest, opt_state=opt_state, step=step, grads=grads)
