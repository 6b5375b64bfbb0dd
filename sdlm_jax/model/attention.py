"""Multi-head attention with grouped-query heads, RoPE, optional QK-norm and segment masks.

A query attends only to keys of its own segment. Padding (segment id 0) attends to padding,
so a padding query always sees at least itself and never produces NaN. `causal` adds the AR
baseline's causal mask through the kernel's own flag (cuDNN then skips the masked blocks).

One dispatch point (`attend`) picks the kernel for the platform the code is compiled for
(`pallas_kernels.target`, so an ahead-of-time compile for a TPU from a CPU host chooses as a
TPU would): `auto` is splash attention on TPU (jax's Pallas kernel, sdlm_jax/model/splash.py),
cuDNN on GPU when the compute dtype is bfloat16 or float16 (cuDNN's fused attention takes no
float32), and XLA otherwise (CPU). `splash` on a platform other than TPU raises;
`splash_interpret` runs the same kernel in Pallas TPU interpret mode anywhere (tests).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import target
from sdlm_jax.model.layers import RMSNorm, apply_rope, dtype_of, param
from sdlm_jax.model.splash import splash_attention
from sdlm_jax.parallel.sharding import constrain

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "splash_interpret")
_ACT_BLHK = ("activation_batch", "activation_length", "activation_heads", None)
_ACT_BLGK = ("activation_batch", "activation_length", "activation_kv_heads", None)


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_implementation(name: str, dtype=jnp.bfloat16) -> str:
  """What `model.attention=name` means on the target platform for compute dtype `dtype`: a
  `jax.nn.dot_product_attention` implementation ("xla", "cudnn"), "splash" or "splash_interpret"."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={name!r}; allowed values: {', '.join(IMPLEMENTATIONS)}")
  platform = target.platform()
  if name == "splash" and platform != "tpu":
    raise NotImplementedError(
        f"model.attention='splash' is a TPU kernel (this platform is {platform!r}); use 'auto' or 'xla', "
        "or 'splash_interpret' to run it in Pallas TPU interpret mode")
  if name == "auto":
    if platform == "tpu":
      return "splash"
    return "cudnn" if platform == "gpu" and jnp.dtype(dtype) in CUDNN_DTYPES else "xla"
  return name


def attend(q_BxLxHxK: Float[Array, "B L H K"], k_BxLxGxK: Float[Array, "B L G K"], v_BxLxGxK: Float[Array, "B L G K"],
           segment_ids_BxL: Int[Array, "B L"] | None, *, causal: bool, implementation: str
           ) -> Float[Array, "B L H K"]:
  """softmax(q k^T / sqrt(K)) v inside each segment (and causal if asked) with the kernel
  `implementation` (a `model.attention` value) resolves to; the one dispatch point. What the
  backward pass needs of it is tagged `context` for the remat policies: the output of XLA's
  attention, the residuals (output and logsumexp) inside the splash kernel."""
  impl = resolve_implementation(implementation, q_BxLxHxK.dtype)
  if impl in ("splash", "splash_interpret"):
    return splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal=causal,
                            interpret=impl == "splash_interpret")
  mask = None if segment_ids_BxL is None else attention_mask(segment_ids_BxL)
  out_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask, is_causal=causal,
                                             implementation=impl)
  return checkpoint_name(out_BxLxHxK, "context")


def attention_mask(segment_ids_BxL: Int[Array, "B L"], causal: bool = False) -> Bool[Array, "B 1 L L"]:
  """[B, 1, Lq, Lk] boolean mask: query and key in the same segment (and key <= query if causal)."""
  mask_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  if causal:
    length = segment_ids_BxL.shape[1]
    mask_BxLxL &= jnp.tril(jnp.ones((length, length), bool))[None]
  return mask_BxLxL[:, None]


class Attention(nnx.Module):
  """Self-attention over [B, L, D]; H query heads share G = num_kv_heads key/value heads."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    self.causal = cfg.causal
    self.rope_theta = cfg.rope_theta
    self.implementation = cfg.attention
    self.dtype = dtype_of(cfg.dtype)
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.wq = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), cfg.init_std, pd)
    self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), cfg.init_std, pd)
    self.q_norm = RMSNorm(k, cfg.norm_eps, pd) if cfg.qk_norm else None
    self.k_norm = RMSNorm(k, cfg.norm_eps, pd) if cfg.qk_norm else None

  def __call__(self, x_BxLxD: Float[Array, "B L D"], segment_ids_BxL: Int[Array, "B L"] | None,
               positions_BxL: Int[Array, "B L"]) -> Float[Array, "B L D"]:
    """segment_ids_BxL=None means one document per row (no mask beyond `causal`)."""
    dt = self.dtype
    x_BxLxD = x_BxLxD.astype(dt)
    q_BxLxHxK = checkpoint_name(jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wq[...].astype(dt)), "query_proj")
    k_BxLxGxK = checkpoint_name(jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wk[...].astype(dt)), "key_proj")
    v_BxLxGxK = checkpoint_name(jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wv[...].astype(dt)), "value_proj")
    if self.q_norm is not None:
      q_BxLxHxK, k_BxLxGxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxGxK)
    # The kernel's inputs (after QK-norm and RoPE), named for the policies that keep them.
    q_BxLxHxK = constrain(checkpoint_name(apply_rope(q_BxLxHxK, positions_BxL, self.rope_theta), "query_rope"),
                          _ACT_BLHK)
    k_BxLxGxK = constrain(checkpoint_name(apply_rope(k_BxLxGxK, positions_BxL, self.rope_theta), "key_rope"),
                          _ACT_BLGK)
    v_BxLxGxK = constrain(v_BxLxGxK, _ACT_BLGK)
    out_BxLxHxK = attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal=self.causal,
                         implementation=self.implementation)
    out_BxLxHxK = constrain(out_BxLxHxK, _ACT_BLHK)
    return checkpoint_name(jnp.einsum("blhk,hkd->bld", out_BxLxHxK, self.wo[...].astype(dt)), "out_proj")
