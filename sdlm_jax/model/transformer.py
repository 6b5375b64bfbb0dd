"""The SDLM backbone: embeddings, pre-norm blocks (attention + dense or MoE FFN), LM head.

Bidirectional for diffusion, causal for the AR baseline: the same code behind `cfg.causal`.
Masked diffusion needs no time input; with `time_embedding` (the uniform kernel, whose input
does not show how noisy it is) the model takes t per row: sinusoidal features of t through a
two-layer SiLU MLP, added to every token embedding of the row. Params live in `param_dtype`,
matmuls run in `dtype`, logits come back in float32.

Layers come in at most two stacks: the first `moe.first_k_dense` layers with a dense FFN,
then the MoE layers (all layers are dense without experts). With `scan_layers` each stack
holds its blocks' params stacked on a leading `layers` axis and runs them under one
`lax.scan`, so compile time does not grow with depth; otherwise the blocks are unrolled.
Either way each block is rematerialised by `remat` (see REMAT_POLICIES).
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jaxtyping import Array, Float, Float32, Int

from sdlm_jax.model.attention import Attention
from sdlm_jax.model.layers import ACT_BLD, RMSNorm, dtype_of, param
from sdlm_jax.model.mlp import SwiGLU
from sdlm_jax.model.moe import MoE
from sdlm_jax.model.stacks import layer_stacks
from sdlm_jax.parallel.sharding import constrain

_POLICIES = jax.checkpoint_policies
# Names the block tags its matmul outputs with (jax.ad_checkpoint.checkpoint_name), as MaxText
# does: attention's q/k/v projections, what the attention kernel keeps for its backward pass
# ("context": XLA attention's output, or the splash kernel's output and logsumexp), attention's
# output projection, and the gated FFN's (dense, shared or expert) two input projections and
# output projection. Also q and k as the attention kernel takes them, after QK-norm and RoPE,
# and expert choice's picks ("routing": each expert's token indices, a few hundred KiB a layer).
# With the expert-choice FFN kernel (model.moe.backend pallas), the rows it gathered
# ("expert_rows"): its gate/up outputs are mlpwi_0/mlpwi_1, and the three come out of one kernel
# call, so keeping them all is what spares the backward pass a rerun of the whole kernel.
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
ROPE_NAMES = ("query_rope", "key_rope")
MLP_NAMES = ("mlpwi_0", "mlpwi_1", "mlpwo")
_MINIMAL = (*QKV_NAMES, "out_proj", *MLP_NAMES, "routing", "expert_rows")
# What a block keeps for the backward pass (everything else is recomputed). The named ones
# follow MaxText's remat policies of the same name (with expert choice's picks kept as well).
REMAT_POLICIES = {
    "none": None,                                       # no remat: keep every activation
    "full": _POLICIES.nothing_saveable,                 # keep only the block's input
    # the projections' outputs, so only norms, RoPE, activations, routing's gates and attention
    # are recomputed
    "minimal": _POLICIES.save_only_these_names(*_MINIMAL),
    # ... and the attention kernel's residuals too: nothing but elementwise work is recomputed
    "minimal_with_context": _POLICIES.save_only_these_names(*_MINIMAL, "context"),
    # ... and q, k after QK-norm and RoPE: the backward pass recomputes only the block's norms,
    # the FFN's activation and EC's gather (two more [B, L, D]-sized activations per layer with MHA)
    "minimal_with_context_and_rope": _POLICIES.save_only_these_names(*_MINIMAL, "context", *ROPE_NAMES),
    "save_dot_except_mlp": _POLICIES.save_only_these_names(*QKV_NAMES, "out_proj"),  # recompute the FFN
    "save_qkv_proj": _POLICIES.save_only_these_names(*QKV_NAMES),
    "save_dots": _POLICIES.dots_saveable,               # keep every matmul output
    "save_dots_no_batch": _POLICIES.dots_with_no_batch_dims_saveable,  # ... except batched ones (attention, experts)
    "offload": _POLICIES.offload_dot_with_no_batch_dims("device", "pinned_host"),  # those, in host memory
}


class Block(nnx.Module):
  """x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense SwiGLU or MoE."""

  def __init__(self, cfg, is_moe: bool, *, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.is_moe = is_moe
    self.ffn = MoE(cfg, rngs=rngs) if is_moe else SwiGLU(cfg.d_model, cfg.mlp_dim, cfg, rngs=rngs)

  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, token_mask_BxL):
    """Returns (x_BxLxD, (router losses, router stats)); both None for a dense FFN."""
    x_BxLxD = constrain(x_BxLxD + self.attn(self.attn_norm(x_BxLxD), segment_ids_BxL, positions_BxL), ACT_BLD)
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if self.is_moe:
      y_BxLxD, losses, stats = self.ffn(h_BxLxD, token_mask_BxL)
    else:
      y_BxLxD, losses, stats = self.ffn(h_BxLxD), None, None
    return constrain(x_BxLxD + y_BxLxD, ACT_BLD), (losses, stats)


def run_block(remat: str):
  """run(graphdef, block_state, x, ...): the block applied, rematerialised by `remat`'s policy.

  Pure JAX (merge inside, jax.checkpoint / lax.scan outside) so that a stack can run under any
  outer transform, e.g. the ELBO's lax.scan over t samples or a sampler's while loop.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat={remat!r}; allowed values: {', '.join(REMAT_POLICIES)}")

  def run(graphdef, block_state, *args):
    return nnx.merge(graphdef, block_state)(*args)

  return run if remat == "none" else jax.checkpoint(run, policy=REMAT_POLICIES[remat], static_argnums=(0,))


class LayerStack(nnx.Module):
  """`num` blocks of one kind, scanned (stacked params) or unrolled; see the module docstring."""

  def __init__(self, cfg, num: int, is_moe: bool, *, rngs: nnx.Rngs):
    self.scan = cfg.scan_layers
    self.remat = cfg.remat

    # Both layouts draw the params this way, so a config initialises the same weights whether
    # its layers are scanned or unrolled (scan_layers changes the program, not the model).
    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(block_rngs):
      return Block(cfg, is_moe, rngs=block_rngs)

    stacked = make(rngs)
    if self.scan:
      self.blocks = stacked
      return
    per_layer = nnx.to_pure_dict(nnx.state(stacked, nnx.Param))
    blocks = [Block(cfg, is_moe, rngs=nnx.Rngs(0)) for _ in range(num)]  # the structure; values below
    for i, block in enumerate(blocks):
      params = nnx.state(block, nnx.Param)
      nnx.replace_by_pure_dict(params, jax.tree.map(lambda stacked_param: stacked_param[i], per_layer))
      nnx.update(block, params)
    self.blocks = nnx.List(blocks)

  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, token_mask_BxL):
    """Returns (x_BxLxD, per-layer (losses, stats) stacked on a leading axis; None if dense)."""
    run = run_block(self.remat)
    if self.scan:
      graphdef, state = nnx.split(self.blocks)
      body = lambda x, block_state: run(graphdef, block_state, x, segment_ids_BxL, positions_BxL, token_mask_BxL)
      return jax.lax.scan(body, x_BxLxD, state)
    outs = []
    for block in self.blocks:
      x_BxLxD, out = run(*nnx.split(block), x_BxLxD, segment_ids_BxL, positions_BxL, token_mask_BxL)
      outs.append(out)
    return x_BxLxD, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


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
    self.stacks = nnx.List([LayerStack(cfg, n, moe, rngs=rngs) for n, moe in layer_stacks(cfg)])
    self.time_in, self.time_out = (
        (param(rngs, (cfg.d_model, cfg.d_model), (None, "embed"), cfg.init_std, pd),
         param(rngs, (cfg.d_model, cfg.d_model), (None, "embed"), cfg.init_std, pd))
        if cfg.get("time_embedding", False) else (None, None))
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.lm_head = None if cfg.tie_embeddings else param(
        rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd)

  def __call__(self, tokens_BxL: Int[Array, "B L"], *, segment_ids_BxL: Int[Array, "B L"] | None = None,
               positions_BxL: Int[Array, "B L"] | None = None,
               t_B: Float[Array, "B"] | None = None) -> tuple[Float32[Array, "B L V"], dict]:
    batch, length = tokens_BxL.shape
    if (t_B is None) != (self.time_in is None):
      raise ValueError("model.time_embedding=True needs the diffusion time t_B, and a model without it takes none")
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    token_mask_BxL = jnp.ones((batch, length), bool) if segment_ids_BxL is None else segment_ids_BxL > 0
    # Gather the table's fsdp shards before the lookup (as FSDP does for any matmul weight); a
    # lookup into a d_model-sharded table would have to re-shard its output from d to batch.
    table_VxD = constrain(self.embed[...], ("vocab", None))
    x_BxLxD = constrain(jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype), ACT_BLD)
    if t_B is not None:
      x_BxLxD = x_BxLxD + self._time_embedding(t_B)[:, None, :].astype(self.dtype)
    router_outs = []
    for stack in self.stacks:
      x_BxLxD, (losses, stats) = stack(x_BxLxD, segment_ids_BxL, positions_BxL, token_mask_BxL)
      if losses is not None:
        router_outs.append((losses, stats))
    x_BxLxD = self.final_norm(x_BxLxD)
    head_DxV = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(self.dtype),
                              preferred_element_type=jnp.float32)
    logits_BxLxV = constrain(logits_BxLxV, ("activation_batch", "activation_length", "activation_vocab"))
    return logits_BxLxV, self._aux(router_outs)

  def _time_embedding(self, t_B: Float[Array, "B"]) -> Float32[Array, "B D"]:
    """MLP(sinusoidal(1000 t)): d_model/2 frequencies from 1 to 1/10000, as for positions."""
    half = self.cfg.d_model // 2
    freqs_H = jnp.exp(-jnp.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxH = 1000.0 * t_B.astype(jnp.float32)[:, None] * freqs_H[None, :]
    feats_BxD = jnp.concatenate([jnp.cos(angle_BxH), jnp.sin(angle_BxH)], axis=-1)
    if feats_BxD.shape[-1] < self.cfg.d_model:  # odd d_model
      feats_BxD = jnp.pad(feats_BxD, ((0, 0), (0, 1)))
    hidden_BxD = jax.nn.silu(feats_BxD @ self.time_in[...].astype(jnp.float32))
    return hidden_BxD @ self.time_out[...].astype(jnp.float32)

  def _aux(self, router_outs) -> dict:
    """Router losses and stats over all MoE layers; each stack's come stacked on axis 0."""
    if not router_outs:
      return {"aux_loss": jnp.zeros((), jnp.float32), "router": {}}
    moe = self.cfg.moe
    (losses, stats), = router_outs  # MoE layers form one stack
    layer_mean = lambda x: jnp.mean(x, axis=0).astype(jnp.float32)
    router = {key: layer_mean(v) for key, v in stats.items()}
    router["expert_load_per_layer"] = stats["expert_load"].astype(jnp.float32)  # [MoE layers, E]
    router.update({key: layer_mean(v) for key, v in losses.items()})
    aux_loss = jnp.sum(moe.load_balance_weight * losses["load_balance_loss"] + moe.z_loss_weight * losses["z_loss"])
    return {"aux_loss": aux_loss.astype(jnp.float32), "router": router}
