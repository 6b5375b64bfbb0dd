"""The forward pass as a `jax.export` artifact, for serving without this library's Python code.

`forward.jax_export` holds `jax.export.Exported.serialize()` of

  forward(params, tokens, segment_ids, positions) -> logits
    params       {flat tensor name: array}: exactly the tensors of model.safetensors
                 (sdlm_jax.export.tensor_names), in the export's dtype
    tokens       int32 [batch, length]
    segment_ids  int32 [batch, length]: 0 padding, 1..n the packed documents (attention stays
                 inside a document)
    positions    int32 [batch, length]: RoPE positions, restarting at 0 in every document
    logits       float32 [batch, length, vocab]

with batch and length symbolic: one artifact serves every shape. Reload it with jax alone:
`jax.export.deserialize(data).call(params, tokens, segment_ids, positions)`. A model with
`time_embedding` (the uniform kernel) takes one more argument, `t` float32 [batch], the
diffusion time of each row: forward(params, tokens, segment_ids, positions, t).

The artifact is lowered with XLA attention and the XLA MoE kernels whatever the model's
`attention` / `moe.backend` say (they only choose kernels, never change the function), so it
runs on every platform it was lowered for. It holds no mesh: params and activations are
unsharded. An expert-choice model needs at least ceil(num_experts / top_k) tokens per routing
group (a sequence, or the whole batch with `ec_group=batch`), as in training.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from sdlm_jax.export import tensor_names
from sdlm_jax.model.transformer import Transformer

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def portable_model_config(model_cfg) -> ml_collections.FrozenConfigDict:
  """`model_cfg` with the kernels that lower for every platform (XLA attention and MoE ops)."""
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.attention = "xla"
  cfg.moe.backend = "xla"
  return ml_collections.FrozenConfigDict(cfg)


def forward_function(model_cfg):
  """forward(flat params, tokens_BxL, segment_ids_BxL, positions_BxL) -> logits_BxLxV of the
  model `model_cfg` describes (see the module docstring), as a pure function."""
  cfg = portable_model_config(model_cfg)
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
  template = nnx.to_pure_dict(params)

  def forward(flat, tokens_BxL, segment_ids_BxL, positions_BxL, *time):
    state = jax.tree.map(lambda x: x, params)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, tensor_names.unflatten(flat, template, cfg, jnp.stack))
    model = nnx.merge(graphdef, state, rest)
    t = {"t_B": time[0]} if time else {}
    logits_BxLxV, _ = model(tokens_BxL, segment_ids_BxL=segment_ids_BxL, positions_BxL=positions_BxL, **t)
    return logits_BxLxV

  return forward


def _constraints(model_cfg) -> tuple[str, ...]:
  """Symbolic-shape facts the routing code needs to trace: an expert-choice group holds at least
  ceil(E / k) tokens, so its capacity floor(N k / E) is >= 1."""
  moe = model_cfg.moe
  if not moe.num_experts or moe.router != "expert_choice":
    return ()
  fewest = math.ceil(moe.num_experts / moe.top_k)
  return (f"l >= {fewest}",) if moe.ec_group == "sequence" else (f"b*l >= {fewest}",)


def export_forward(model_cfg, param_specs: dict, platforms=DEFAULT_PLATFORMS) -> jax.export.Exported:
  """The forward pass exported for `platforms`; param_specs: {flat name: ShapeDtypeStruct}."""
  b, l = jax.export.symbolic_shape("b, l", constraints=_constraints(model_cfg))
  ids = jax.ShapeDtypeStruct((b, l), jnp.int32)
  time = (jax.ShapeDtypeStruct((b,), jnp.float32),) if model_cfg.get("time_embedding", False) else ()
  return jax.export.export(jax.jit(forward_function(model_cfg)), platforms=tuple(platforms))(
      param_specs, ids, ids, ids, *time)


def write(exported: jax.export.Exported, path) -> None:
  epath.Path(path).write_bytes(bytes(exported.serialize()))


def load(path) -> jax.export.Exported:
  """The exported forward pass of `path` (a forward.jax_export file); needs only jax."""
  return jax.export.deserialize(bytearray(epath.Path(path).read_bytes()))
