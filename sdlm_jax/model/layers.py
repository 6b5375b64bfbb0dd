"""Building blocks shared by the model: annotated params, RMSNorm, rotary embeddings.

Every parameter carries logical axis names (sdlm_jax/parallel/rules.py). Under a mesh it is
created already sharded (flax's eager sharding); without one (unit tests, single-device
scripts) it is created plain but keeps its names, so the same module builds anywhere.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

ACT_BLD = ("activation_batch", "activation_length", "activation_embed")
# Names model.dtype and model.param_dtype accept (float16 needs a GPU: the CPU backend has no float16 matmul).
DTYPES = ("bfloat16", "float32", "float16")


def dtype_of(name: str):
  return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  """A normal(0, std) parameter carrying its logical axis names."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), out_sharding=tuple(axes),
                   eager_sharding=_can_shard_eagerly())


def zeros_param(shape, axes, dtype) -> nnx.Param:
  """A zero-initialised parameter carrying its logical axis names."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(jnp.zeros(shape, dtype), out_sharding=tuple(axes), eager_sharding=_can_shard_eagerly())


def _can_shard_eagerly() -> bool:
  """Eager sharding needs a mesh to place the value on; with none, names are metadata only."""
  return nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale over the last axis, computed in float32."""

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                           eager_sharding=_can_shard_eagerly())

  def __call__(self, x: Float[Array, "*batch D"]) -> Float[Array, "*batch D"]:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def apply_rope(x_BxLxHxK: Float[Array, "B L H K"], positions_BxL: Int[Array, "B L"],
               theta: float) -> Float[Array, "B L H K"]:
  """Rotary position embedding on the last axis (split-half convention).

  Angles, sin and cos in float32; the rotation itself in x's dtype, as MaxText does. A bfloat16
  model rotates in bfloat16: in float32 XLA's TPU fusions write float32 intermediates, and
  the block of the 1.7B dense seed cost 0.36 ms more per layer (benchmarks/ec_layer_cost.py).
  Positions are explicit so packed rows can restart them at every document.
  """
  half = x_BxLxHxK.shape[-1] // 2
  inv_freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_K2
  sin = jnp.sin(angles_BxLxK2)[:, :, None, :].astype(x_BxLxHxK.dtype)
  cos = jnp.cos(angles_BxLxK2)[:, :, None, :].astype(x_BxLxHxK.dtype)
  x1, x2 = jnp.split(x_BxLxHxK, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
