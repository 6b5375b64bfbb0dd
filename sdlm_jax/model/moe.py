"""The MoE FFN: a router, E SwiGLU experts, optional always-on shared experts.

Expert choice (EC): routing groups are sequences (G=B, N=L) or the whole local batch (G=1,
N=B*L). Tokens are gathered into a dense [G, E, C, D] buffer (`ec_dispatch`), every expert
runs one batched SwiGLU over its C tokens, and `ec_combine` scatter-adds the gated outputs
back. The matmul work is exactly E*C = N*k token-expert pairs: no one-hot dispatch einsum.

Token choice (TC): (token, expert) pairs are sorted by expert and run through grouped
matmuls (`pallas_kernels.gmm`), then unsorted and summed with their gates.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from sdlm_jax.model import routing
from sdlm_jax.model.layers import SwiGLU, dtype_of, param
from sdlm_jax.parallel.sharding import constrain


class MoE(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    moe = cfg.moe
    pd = dtype_of(cfg.param_dtype)
    self.cfg = cfg
    self.dtype = dtype_of(cfg.dtype)
    d, e, f = cfg.d_model, moe.num_experts, moe.expert_mlp_dim
    self.router = param(rngs, (d, e), ("embed", None), cfg.init_std, pd)
    self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg.init_std, pd)
    self.w_up = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg.init_std, pd)
    self.w_down = param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), cfg.init_std, pd)
    self.shared = SwiGLU(d, moe.num_shared_experts * f, cfg, rngs=rngs) if moe.num_shared_experts else None

  def __call__(self, x_BxLxD, token_mask_BxL):
    """Returns (y_BxLxD, losses {load_balance_loss, z_loss}, stats)."""
    moe = self.cfg.moe
    batch, length, d = x_BxLxD.shape
    logits_BxLxE = jnp.einsum("bld,de->ble", x_BxLxD.astype(jnp.float32), self.router[...].astype(jnp.float32))
    flat_mask_N = token_mask_BxL.reshape(-1)
    z_loss = routing.router_z_loss(logits_BxLxE.reshape(batch * length, -1), flat_mask_N)
    if moe.router == "expert_choice":
      y_BxLxD, balance, stats = self._expert_choice(x_BxLxD, logits_BxLxE, token_mask_BxL)
    elif moe.router == "token_choice":
      y_BxLxD, balance, stats = self._token_choice(x_BxLxD, logits_BxLxE, token_mask_BxL)
    else:
      raise ValueError(f"model.moe.router={moe.router!r}; allowed values: expert_choice, token_choice")
    y_BxLxD = y_BxLxD * moe.routed_scaling_factor
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
    return y_BxLxD.astype(x_BxLxD.dtype), {"load_balance_loss": balance, "z_loss": z_loss}, stats

  def _experts(self, xe_GxExCxD):
    """All experts' SwiGLU over their dispatched tokens, as batched einsums."""
    dt = self.dtype
    xe = constrain(xe_GxExCxD.astype(dt), (None, "activation_expert", "activation_capacity", "activation_embed"))
    gate_GxExCxF = jnp.einsum("gecd,edf->gecf", xe, self.w_gate[...].astype(dt))
    up_GxExCxF = jnp.einsum("gecd,edf->gecf", xe, self.w_up[...].astype(dt))
    return jnp.einsum("gecf,efd->gecd", jax.nn.silu(gate_GxExCxF) * up_GxExCxF, self.w_down[...].astype(dt))

  def _expert_choice(self, x_BxLxD, logits_BxLxE, token_mask_BxL):
    moe = self.cfg.moe
    batch, length, d = x_BxLxD.shape
    if moe.ec_group == "sequence":
      x_GxNxD, logits_GxNxE, mask_GxN = x_BxLxD, logits_BxLxE, token_mask_BxL
    elif moe.ec_group == "batch":
      x_GxNxD = x_BxLxD.reshape(1, batch * length, d)
      logits_GxNxE = logits_BxLxE.reshape(1, batch * length, -1)
      mask_GxN = token_mask_BxL.reshape(1, batch * length)
    else:
      raise ValueError(f"model.moe.ec_group={moe.ec_group!r}; allowed values: sequence, batch")
    token_idx_GxExC, gates_GxExC, picked_GxNxE = routing.expert_choice(
        logits_GxNxE, mask_GxN, moe.top_k, moe.router_activation)
    xe_GxExCxD = pallas_kernels.ec_dispatch(x_GxNxD, token_idx_GxExC)
    ye_GxExCxD = self._experts(xe_GxExCxD)
    y_GxNxD = pallas_kernels.ec_combine(
        ye_GxExCxD, token_idx_GxExC, gates_GxExC.astype(ye_GxExCxD.dtype), x_GxNxD.shape[1])
    balance = routing.token_wise_balance_loss(logits_GxNxE, picked_GxNxE, mask_GxN, moe.top_k)
    stats = routing.routing_stats(
        jnp.sum(picked_GxNxE, -1).reshape(-1), jnp.sum(picked_GxNxE, (0, 1)), mask_GxN.reshape(-1))
    return y_GxNxD.reshape(batch, length, d), balance, stats

  def _token_choice(self, x_BxLxD, logits_BxLxE, token_mask_BxL):
    moe = self.cfg.moe
    batch, length, d = x_BxLxD.shape
    num_experts, k = moe.num_experts, moe.top_k
    x_NxD = x_BxLxD.reshape(batch * length, d).astype(self.dtype)
    mask_N = token_mask_BxL.reshape(-1)
    expert_idx_NxK, gates_NxK, probs_NxE = routing.token_choice(
        logits_BxLxE.reshape(batch * length, -1), mask_N, k, moe.router_activation)
    flat_expert_M = expert_idx_NxK.reshape(-1)
    order_M = jnp.argsort(flat_expert_M, stable=True)
    rows_MxD = x_NxD[order_M // k]
    group_sizes_E = jnp.bincount(flat_expert_M, length=num_experts).astype(jnp.int32)
    dt = self.dtype
    gmm = lambda lhs, rhs: pallas_kernels.gmm(lhs, rhs[...].astype(dt), group_sizes_E, backend=moe.backend)
    h_MxF = jax.nn.silu(gmm(rows_MxD, self.w_gate)) * gmm(rows_MxD, self.w_up)
    y_sorted_MxD = gmm(h_MxF, self.w_down)
    y_MxD = jnp.zeros_like(y_sorted_MxD).at[order_M].set(y_sorted_MxD)
    y_NxD = jnp.einsum("nkd,nk->nd", y_MxD.reshape(-1, k, d), gates_NxK.astype(y_MxD.dtype))
    balance = routing.switch_aux_loss(probs_NxE, expert_idx_NxK, mask_N)
    slots_E = jnp.bincount(flat_expert_M, weights=jnp.repeat(mask_N, k).astype(jnp.float32), length=num_experts)
    stats = routing.routing_stats(jnp.where(mask_N, k, 0), slots_E, mask_N)
    return y_NxD.reshape(batch, length, d), balance, stats
