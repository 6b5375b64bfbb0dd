"""Building blocks shared by the model: annotated params, RMSNorm, RoPE, SwiGLU."""

import jax
import jax.numpy as jnp
from flax import nnx

from sdlm_jax.parallel.sharding import constrain


def dtype_of(name: str):
  return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  """A normal(0, std) parameter carrying its logical axis names."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), out_sharding=tuple(axes))


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32."""

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def apply_rope(x_BxLxHxK, positions_BxL, theta: float):
  """Rotary position embedding on the last axis (split-half convention)."""
  half = x_BxLxHxK.shape[-1] // 2
  inv_freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_K2
  sin, cos = jnp.sin(angles_BxLxK2)[:, :, None, :], jnp.cos(angles_BxLxK2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class SwiGLU(nnx.Module):
  """Dense gated FFN: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, d_model: int, hidden: int, cfg, *, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    self.dtype = dtype_of(cfg.dtype)
    self.w_gate = param(rngs, (d_model, hidden), ("embed", "mlp"), cfg.init_std, pd)
    self.w_up = param(rngs, (d_model, hidden), ("embed", "mlp"), cfg.init_std, pd)
    self.w_down = param(rngs, (hidden, d_model), ("mlp", "embed"), cfg.init_std, pd)

  def __call__(self, x_BxLxD):
    x = x_BxLxD.astype(self.dtype)
    gate_BxLxF = jnp.einsum("bld,df->blf", x, self.w_gate[...].astype(self.dtype))
    up_BxLxF = jnp.einsum("bld,df->blf", x, self.w_up[...].astype(self.dtype))
    h_BxLxF = constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("activation_batch", "activation_length", "activation_mlp"))
    return jnp.einsum("blf,fd->bld", h_BxLxF, self.w_down[...].astype(self.dtype))
