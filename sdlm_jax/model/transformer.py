"""The SDLM backbone: embeddings, pre-norm blocks (attention + dense or MoE FFN), LM head.

Bidirectional for diffusion, causal for the AR baseline: the same code behind `cfg.causal`.
There is no time embedding (masked diffusion needs none). Params live in `param_dtype`,
matmuls run in `dtype`, logits come back in float32.
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from sdlm_jax.model.attention import Attention
from sdlm_jax.model.layers import ACT_BLD, RMSNorm, dtype_of, param
from sdlm_jax.model.mlp import SwiGLU
from sdlm_jax.model.moe import MoE
from sdlm_jax.parallel.sharding import constrain


def is_moe_layer(cfg, layer: int) -> bool:
  """Layer `layer` (0-based) uses an MoE FFN: experts exist and it is past the first_k_dense."""
  return cfg.moe.num_experts > 0 and layer >= cfg.moe.first_k_dense


class Block(nnx.Module):
  """x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense SwiGLU or MoE."""

  def __init__(self, cfg, layer: int, *, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.is_moe = is_moe_layer(cfg, layer)
    self.ffn = MoE(cfg, rngs=rngs) if self.is_moe else SwiGLU(cfg.d_model, cfg.mlp_dim, cfg, rngs=rngs)

  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, token_mask_BxL):
    """Returns (x_BxLxD, router losses, router stats); the last two are None for a dense FFN."""
    x_BxLxD = constrain(x_BxLxD + self.attn(self.attn_norm(x_BxLxD), segment_ids_BxL, positions_BxL), ACT_BLD)
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if self.is_moe:
      y_BxLxD, losses, stats = self.ffn(h_BxLxD, token_mask_BxL)
    else:
      y_BxLxD, losses, stats = self.ffn(h_BxLxD), None, None
    return constrain(x_BxLxD + y_BxLxD, ACT_BLD), losses, stats


class Transformer(nnx.Module):
  """model(tokens_BxL, *, segment_ids_BxL=None, positions_BxL=None) -> (logits_BxLxV f32, aux).

  segment_ids_BxL: 0 = padding, 1..n = packed documents (attention stays inside a document);
  None means one document filling every row. positions_BxL (RoPE) default to arange(L).
  aux = {"aux_loss": weighted router losses summed over MoE layers (0 for a dense model),
         "router": routing statistics and unweighted losses averaged over MoE layers ({} if dense)}.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: the model graph is a jit static
    pd = dtype_of(cfg.param_dtype)
    self.cfg = cfg
    self.dtype = dtype_of(cfg.dtype)
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.lm_head = None if cfg.tie_embeddings else param(
        rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd)

  def __call__(self, tokens_BxL, *, segment_ids_BxL=None, positions_BxL=None):
    batch, length = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    token_mask_BxL = jnp.ones((batch, length), bool) if segment_ids_BxL is None else segment_ids_BxL > 0
    # Gather the table's fsdp shards before the lookup (as FSDP does for any matmul weight); a
    # lookup into a d_model-sharded table would have to re-shard its output from d to batch.
    table_VxD = constrain(self.embed[...], ("vocab", None))
    x_BxLxD = constrain(jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype), ACT_BLD)
    losses, stats = [], []
    for block in self.blocks:
      x_BxLxD, layer_losses, layer_stats = block(x_BxLxD, segment_ids_BxL, positions_BxL, token_mask_BxL)
      if layer_losses is not None:
        losses.append(layer_losses)
        stats.append(layer_stats)
    x_BxLxD = self.final_norm(x_BxLxD)
    head_DxV = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(self.dtype),
                              preferred_element_type=jnp.float32)
    logits_BxLxV = constrain(logits_BxLxV, ("activation_batch", "activation_length", "activation_vocab"))
    return logits_BxLxV, self._aux(losses, stats)

  def _aux(self, losses, stats) -> dict:
    if not losses:
      return {"aux_loss": jnp.zeros((), jnp.float32), "router": {}}
    moe = self.cfg.moe
    layer_mean = lambda key, items: jnp.mean(jnp.stack([x[key] for x in items]), axis=0).astype(jnp.float32)
    router = {key: layer_mean(key, stats) for key in stats[0]}
    router.update(load_balance_loss=layer_mean("load_balance_loss", losses), z_loss=layer_mean("z_loss", losses))
    aux_loss = sum(moe.load_balance_weight * x["load_balance_loss"] + moe.z_loss_weight * x["z_loss"] for x in losses)
    return {"aux_loss": jnp.asarray(aux_loss, jnp.float32), "router": router}
