"""The dense gated FFN (SwiGLU), used by dense layers and as the MoE's shared experts.

Its projections' outputs carry the checkpoint names the remat policies save (mlpwi_0, mlpwi_1, mlpwo).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float

from sdlm_jax.model.layers import dtype_of, param
from sdlm_jax.parallel.sharding import constrain


class SwiGLU(nnx.Module):
  """down(silu(x @ gate) * (x @ up)), no biases; params in param_dtype, matmuls in dtype."""

  def __init__(self, d_model: int, hidden: int, cfg, *, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    self.dtype = dtype_of(cfg.dtype)
    self.w_gate = param(rngs, (d_model, hidden), ("embed", "mlp"), cfg.init_std, pd)
    self.w_up = param(rngs, (d_model, hidden), ("embed", "mlp"), cfg.init_std, pd)
    self.w_down = param(rngs, (hidden, d_model), ("mlp", "embed"), cfg.init_std, pd)

  def __call__(self, x_BxLxD: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
    dt = self.dtype
    x_BxLxD = x_BxLxD.astype(dt)
    gate_BxLxF = checkpoint_name(jnp.einsum("bld,df->blf", x_BxLxD, self.w_gate[...].astype(dt)), "mlpwi_0")
    up_BxLxF = checkpoint_name(jnp.einsum("bld,df->blf", x_BxLxD, self.w_up[...].astype(dt)), "mlpwi_1")
    h_BxLxF = constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("activation_batch", "activation_length", "activation_mlp"))
    return checkpoint_name(jnp.einsum("blf,fd->bld", h_BxLxF, self.w_down[...].astype(dt)), "mlpwo")
