"""Model and optimizer state, created directly sharded on the mesh (or only described, for AOT).

`init_model` traces the model's constructor once abstractly (`nnx.eval_shape`) to learn every
param's shape and logical axes, then runs the constructor inside `jax.jit` with those
shardings as outputs: each device materialises only its own shards, so an 8B-parameter model
never exists whole on one host or device. `abstract_state` returns the same description as
`jax.ShapeDtypeStruct`s with shardings, which is all ahead-of-time compilation needs.
"""

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sdlm_jax.model.transformer import Transformer
from sdlm_jax.parallel.mesh import sharding_context


def _init_rngs(cfg) -> nnx.Rngs:
  return nnx.Rngs(params=jax.random.fold_in(jax.random.key(cfg.seed), 0))


def _build(cfg):
  return Transformer(cfg.model, rngs=_init_rngs(cfg))


def abstract_model(cfg, mesh):
  """(graphdef, abstract params, abstract rest): ShapeDtypeStructs carrying their NamedShardings."""
  with sharding_context(mesh, cfg.mesh.rules):
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: _build(cfg)), nnx.Param, ...)
    shardings = nnx.get_named_sharding((params, rest), mesh)
  attach = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  params, rest = jax.tree.map(attach, (params, rest), shardings)
  return graphdef, params, rest


def shardings_of(tree):
  """The shardings of a tree of arrays or ShapeDtypeStructs (for jit in/out_shardings)."""
  return jax.tree.map(lambda a: a.sharding, tree)


def init_model(cfg, mesh) -> nnx.Module:
  """The model with freshly initialised params, each created on its own shards."""
  graphdef, params, rest = abstract_model(cfg, mesh)
  with sharding_context(mesh, cfg.mesh.rules):
    state = jax.jit(lambda: nnx.split(_build(cfg), nnx.Param, ...)[1:],
                    out_shardings=shardings_of((params, rest)))()
  return nnx.merge(graphdef, *state)


def opt_state_shardings(optimizer, params, mesh):
  """Each optimizer moment sharded like its param; scalars (the step count) replicated.

  Spelled out because jit would otherwise be free to replicate them: zeros do not depend on
  the params, so nothing propagates their layout.
  """
  abstract = jax.eval_shape(optimizer.init, params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(optimizer, lambda _, param: param.sharding, abstract, params,
                               transform_non_params=lambda _: replicated)


def init_opt_state(optimizer, params, mesh):
  """optimizer.init(params) on device, laid out by opt_state_shardings."""
  with sharding_context(mesh):
    return jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, mesh))(params)


def abstract_opt_state(optimizer, params, mesh):
  """ShapeDtypeStructs (with shardings) of optimizer.init(params) for abstract `params`."""
  attach = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  return jax.tree.map(attach, jax.eval_shape(optimizer.init, params), opt_state_shardings(optimizer, params, mesh))
