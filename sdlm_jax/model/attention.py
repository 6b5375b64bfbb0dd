"""Multi-head attention with grouped-query heads, RoPE, optional QK-norm and segment masks.

A query attends only to keys of its own segment (segment id 0 = padding attends only to
padding, so no row is ever fully masked); `causal` adds the AR baseline's causal mask.
One dispatch point picks the kernel: `auto` is cuDNN on GPU and XLA elsewhere. A TPU splash-
attention path is future work: `splash` raises rather than silently running something else.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from sdlm_jax.model.layers import RMSNorm, apply_rope, dtype_of, param
from sdlm_jax.parallel.sharding import constrain

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def resolve_implementation(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={name!r}; allowed values: {', '.join(IMPLEMENTATIONS)}")
  if name == "splash":
    raise NotImplementedError("model.attention='splash' (TPU splash attention) is not implemented yet; use 'auto' or 'xla'")
  if name == "auto":
    return "cudnn" if jax.default_backend() == "gpu" else "xla"
  return name


def attention_mask(segment_ids_BxL, causal: bool):
  """[B, 1, Lq, Lk] boolean mask: same segment (and causal if asked)."""
  mask_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  if causal:
    length = segment_ids_BxL.shape[1]
    mask_BxLxL &= jnp.tril(jnp.ones((length, length), bool))[None]
  return mask_BxLxL[:, None]


class Attention(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    self.cfg = cfg
    self.dtype = dtype_of(cfg.dtype)
    d, h, kv, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.wq = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), cfg.init_std, pd)
    self.wk = param(rngs, (d, kv, k), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    self.wv = param(rngs, (d, kv, k), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), cfg.init_std, pd)
    self.q_norm = RMSNorm(k, cfg.norm_eps, pd) if cfg.qk_norm else None
    self.k_norm = RMSNorm(k, cfg.norm_eps, pd) if cfg.qk_norm else None

  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL):
    dt = self.dtype
    x = x_BxLxD.astype(dt)
    q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x, self.wq[...].astype(dt))
    k_BxLxGxK = jnp.einsum("bld,dgk->blgk", x, self.wk[...].astype(dt))
    v_BxLxGxK = jnp.einsum("bld,dgk->blgk", x, self.wv[...].astype(dt))
    if self.q_norm is not None:
      q_BxLxHxK, k_BxLxGxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxGxK)
    q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, self.cfg.rope_theta)
    k_BxLxGxK = apply_rope(k_BxLxGxK, positions_BxL, self.cfg.rope_theta)
    q_BxLxHxK = constrain(q_BxLxHxK, ("activation_batch", "activation_length", "activation_heads", None))
    out_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=attention_mask(segment_ids_BxL, self.cfg.causal),
        implementation=resolve_implementation(self.cfg.attention))
    out_BxLxHxK = constrain(out_BxLxHxK, ("activation_batch", "activation_length", "activation_heads", None))
    return jnp.einsum("blhk,hkd->bld", out_BxLxHxK, self.wo[...].astype(dt))
