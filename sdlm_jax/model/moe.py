"""The MoE FFN: a float32 router, E SwiGLU experts, optional always-on shared experts.

Expert choice (EC): routing groups are sequences (G=B, N=L) or all tokens of one batch shard
(`batch`: G = the batch's shard count on the active mesh, 1 without one, N = B*L/G), so
selection never needs tokens from another device. Tokens are gathered into a dense
[G, E, C, D] buffer (`ec_dispatch`), every expert runs one batched SwiGLU over its C tokens
with each slot's gate applied to its hidden activations (width F, not D: the same product,
as the down projection is linear), and `ec_combine` scatter-adds the outputs back. The expert
matmuls cover exactly E*C <= N*k (token, expert) pairs: there is no one-hot dispatch over the
batch. With `moe.backend` pallas (TPU) or interpret, dispatch and the three matmuls are one
Mosaic kernel instead (`pallas_kernels.ec_ffn`; routing and the combine stay XLA; no expert
parallelism); auto/xla keep the XLA path.

Token choice (TC): the N*k (token, expert) pairs are sorted by expert, their rows gathered and
run through grouped matmuls (`pallas_kernels.gmm`), then unsorted and summed with their gates.

Expert parallelism (parallel/expert.py): EC's [G, E, C, D] buffer goes to the experts'
devices and back with one all_to_all each way; TC's pairs are exchanged inside a shard_map.

Dynamic scaling factors (`moe.dynamic_scaling_factors`, E+1 numbers f[0..E]): a token's gates
are multiplied by f[n], n the number of experts routing it. Under EC n varies from 0 to E per
token; under TC it is always k, so the table acts as the constant factor f[k].

Aux-loss-free balancing (TC, `moe.bias_update_rate` > 0): a per-expert `selection_bias`
param, added to the scores only to choose each token's experts. It gets no gradient; the
train step moves it by `update_selection_biases` after each optimizer update. Being a param,
it is saved in every checkpoint and exported with the weights.

Padding tokens (token_mask False) get zero output from the whole layer.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax.core import spmd as core_spmd
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from pallas_kernels import target
from sdlm_jax.model import routing
from sdlm_jax.model.layers import ACT_BLD, dtype_of, param, zeros_param
from sdlm_jax.model.mlp import SwiGLU
from sdlm_jax.parallel import expert as expert_parallel
from sdlm_jax.parallel.sharding import constrain, logical_to_spec, mesh_axes_of, spec_entry_axes

ROUTERS = ("expert_choice", "token_choice")
EC_GROUPS = ("sequence", "batch")
# Expert choice: auto/xla run dispatch -> einsums -> combine in XLA; pallas/interpret run the expert
# FFN as one Mosaic kernel (pallas_kernels.ec_ffn; routing and combine stay XLA).
EC_KERNEL_BACKENDS = ("pallas", "interpret")
EC_BACKENDS = ("auto", "xla") + EC_KERNEL_BACKENDS
# Expert buffers: E over the expert axis, G over the remaining batch axes (parallel/expert.py).
_ACT_GECD = ("activation_batch_no_expert", "activation_expert", "activation_capacity", "activation_embed")
_ACT_GECF = ("activation_batch_no_expert", "activation_expert", "activation_capacity", "activation_mlp")
_ACT_ND = ("activation_batch", "activation_embed")
_EXPERT_WEIGHTS = {"w_gate": ("expert", "embed", "expert_mlp"), "w_up": ("expert", "embed", "expert_mlp"),
                   "w_down": ("expert", "expert_mlp", "embed")}


def batch_shards() -> int:
  """How many ways the active mesh and logical rules split the batch (1 without either)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in mesh_axes_of("activation_batch"))


def ec_num_groups(ec_group: str, batch, shards: int):
  """Routing groups of a [batch, L] block (batch: an int, or symbolic under jax.export): one per
  sequence, or one per batch shard.

  With `batch`, gcd(batch, shards) keeps an unsharded odd-sized batch (e.g. generation) legal;
  one shard is one group without looking at `batch` (which may be symbolic, in jax.export).
  """
  if ec_group == "sequence":
    return batch
  if ec_group == "batch":
    return 1 if shards == 1 else math.gcd(batch, shards)
  raise ValueError(f"model.moe.ec_group={ec_group!r}; allowed values: {', '.join(EC_GROUPS)}")


class MoE(nnx.Module):
  """layer(x_BxLxD, token_mask_BxL) -> (y_BxLxD, {load_balance_loss, z_loss}, routing stats)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    moe = ml_collections.FrozenConfigDict(cfg.moe)
    if moe.router not in ROUTERS:
      raise ValueError(f"model.moe.router={moe.router!r}; allowed values: {', '.join(ROUTERS)}")
    ec_num_groups(moe.ec_group, 1, 1)  # validates the name
    pd = dtype_of(cfg.param_dtype)
    self.moe = moe
    self.dtype = dtype_of(cfg.dtype)
    d, e, f = cfg.d_model, moe.num_experts, moe.expert_mlp_dim
    # Router columns stay replicated: every token needs all E logits (TC top-k, EC gates).
    self.router = param(rngs, (d, e), ("embed", None), cfg.init_std, pd)
    self.w_gate = param(rngs, (e, d, f), _EXPERT_WEIGHTS["w_gate"], cfg.init_std, pd)
    self.w_up = param(rngs, (e, d, f), _EXPERT_WEIGHTS["w_up"], cfg.init_std, pd)
    self.w_down = param(rngs, (e, f, d), _EXPERT_WEIGHTS["w_down"], cfg.init_std, pd)
    balanced = moe.router == "token_choice" and moe.get("bias_update_rate", 0.0) > 0
    # float32 whatever param_dtype: it moves by steps of bias_update_rate
    self.selection_bias = zeros_param((e,), (None,), jnp.float32) if balanced else None
    # n shared experts of width F are one SwiGLU of width n*F (same function, one matmul).
    self.shared = SwiGLU(d, moe.num_shared_experts * f, cfg, rngs=rngs) if moe.num_shared_experts else None

  def __call__(self, x_BxLxD, token_mask_BxL):
    moe = self.moe
    batch, length, _ = x_BxLxD.shape
    router_DxE = constrain(self.router[...].astype(jnp.float32), (None, None))  # tiny: gather it whole
    logits_BxLxE = jnp.einsum("bld,de->ble", x_BxLxD.astype(jnp.float32), router_DxE)
    z_loss = routing.router_z_loss(logits_BxLxE.reshape(batch * length, -1), token_mask_BxL.reshape(-1))
    if moe.router == "expert_choice":
      routed_BxLxD, balance, stats = self._expert_choice(x_BxLxD, logits_BxLxE, token_mask_BxL)
    else:
      routed_BxLxD, balance, stats = self._token_choice(x_BxLxD, logits_BxLxE, token_mask_BxL)
    y_BxLxD = routed_BxLxD * jnp.asarray(moe.routed_scaling_factor, routed_BxLxD.dtype)
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
    y_BxLxD = jnp.where(token_mask_BxL[..., None], y_BxLxD, 0).astype(x_BxLxD.dtype)
    return constrain(y_BxLxD, ACT_BLD), {"load_balance_loss": balance, "z_loss": z_loss}, stats

  def _experts(self, xe_GxExCxD, gates_GxExC):
    """Every expert's SwiGLU over its C dispatched tokens, scaled by their gates: three batched einsums.

    On CPU the buffer is first laid out expert-major, [E, G*C, D]: each einsum is then a plain
    batched matmul, where the [G, E, C, D] form makes XLA's CPU backend transpose operands around
    every expert matmul (the demo's EC step ran ~10% slower; benchmarks/train_throughput.py).
    Elsewhere XLA picks the layouts itself and the sharded [G, E, C, D] form stays.
    """
    dt = self.dtype
    xe_GxExCxD = constrain(xe_GxExCxD.astype(dt), _ACT_GECD)
    if target.platform() == "cpu":
      g, e, c, d = xe_GxExCxD.shape
      xe_ExMxD = jnp.swapaxes(xe_GxExCxD, 0, 1).reshape(e, g * c, d)
      gates_ExM = jnp.swapaxes(gates_GxExC, 0, 1).reshape(e, g * c)
      ye_ExMxD = self._swiglu(xe_ExMxD, gates_ExM, "emd,edf->emf", "emf,efd->emd")
      return jnp.swapaxes(ye_ExMxD.reshape(e, g, c, d), 0, 1)
    return self._swiglu(xe_GxExCxD, gates_GxExC, "gecd,edf->gecf", "gecf,efd->gecd", (_ACT_GECF, _ACT_GECD))

  def _swiglu(self, xe, gates, eq_in: str, eq_out: str, axes=None):
    """silu(xe W_gate) * (xe W_up) * gate, then W_down, over an expert buffer whose einsum
    subscripts are `eq_in` / `eq_out`; `axes` = (hidden, output) logical axes to constrain to.
    The projections' outputs are named for the remat policies."""
    dt = self.dtype
    keep = (lambda x, _: x) if axes is None else constrain
    hidden_axes, out_axes = axes or (None, None)
    gate = checkpoint_name(jnp.einsum(eq_in, xe, self.w_gate[...].astype(dt)), "mlpwi_0")
    up = checkpoint_name(jnp.einsum(eq_in, xe, self.w_up[...].astype(dt)), "mlpwi_1")
    hidden = keep(jax.nn.silu(gate) * up * gates[..., None].astype(dt), hidden_axes)
    return checkpoint_name(keep(jnp.einsum(eq_out, hidden, self.w_down[...].astype(dt)), out_axes), "mlpwo")

  def _experts_kernel(self, x_GxNxD, token_idx_GxExC, gates_GxExC):
    """The same as dispatch + `_experts`, as one `pallas_kernels.ec_ffn` kernel per batch shard
    (a shard_map over the batch axes: XLA cannot partition a Pallas call). The expert weights
    enter whole (all-gathered, as the einsums gather them under FSDP)."""
    if expert_parallel.expert_parallelism() > 1:
      from sdlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel  (config imports this module)
      raise ConfigError(f"model.moe.backend={self.moe.backend!r} (the expert-choice FFN kernel) does not support "
                        "expert parallelism; allowed values: model.moe.backend auto or xla, or mesh.expert=1")
    dt = self.dtype
    weights = [getattr(self, name)[...].astype(dt) for name in _EXPERT_WEIGHTS]
    ffn = functools.partial(pallas_kernels.ec_ffn, backend=self.moe.backend)
    args = (x_GxNxD.astype(dt), token_idx_GxExC, gates_GxExC.astype(dt), *weights)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not core_spmd.get_logical_axis_rules():
      return ffn(*args)
    batch = mesh_axes_of("activation_batch")
    split = bool(batch) and x_GxNxD.shape[0] % math.prod(mesh.shape[a] for a in batch) == 0
    by_group = jax.sharding.PartitionSpec(batch if split else None)
    whole = jax.sharding.PartitionSpec()
    return jax.shard_map(ffn, in_specs=(by_group,) * 3 + (whole,) * 3, out_specs=by_group, check_vma=False)(*args)

  def _expert_choice(self, x_BxLxD, logits_BxLxE, token_mask_BxL):
    moe = self.moe
    batch, length, d = x_BxLxD.shape
    groups = ec_num_groups(moe.ec_group, batch, batch_shards())
    tokens = batch * length // groups
    x_GxNxD = constrain(x_BxLxD.reshape(groups, tokens, d), ACT_BLD)
    logits_GxNxE = logits_BxLxE.reshape(groups, tokens, -1)
    mask_GxN = token_mask_BxL.reshape(groups, tokens)
    kernel = moe.backend in EC_KERNEL_BACKENDS
    xla = "xla" if kernel else moe.backend  # routing and combine are XLA either way
    token_idx_GxExC, gates_GxExC, picked_GxNxE = routing.expert_choice(
        logits_GxNxE, mask_GxN, moe.top_k, moe.router_activation, backend=xla,
        scaling_factors=tuple(moe.get("dynamic_scaling_factors", ())))
    if kernel:
      ye_GxExCxD = self._experts_kernel(x_GxNxD, token_idx_GxExC, gates_GxExC)
    else:
      xe_GxExCxD = pallas_kernels.ec_dispatch(x_GxNxD, token_idx_GxExC, backend=xla)
      ye_GxExCxD = expert_parallel.from_experts(
          self._experts(expert_parallel.to_experts(xe_GxExCxD), expert_parallel.to_experts(gates_GxExC)))
    y_GxNxD = pallas_kernels.ec_combine(ye_GxExCxD, token_idx_GxExC, None, tokens, backend=xla)
    balance = routing.token_wise_balance_loss(logits_GxNxE, picked_GxNxE, mask_GxN, moe.top_k)
    stats = routing.routing_stats(jnp.sum(picked_GxNxE, -1).reshape(-1), jnp.sum(picked_GxNxE, (0, 1)),
                                  mask_GxN.reshape(-1))
    return y_GxNxD.reshape(batch, length, d), balance, stats

  def _token_choice(self, x_BxLxD, logits_BxLxE, token_mask_BxL):
    moe = self.moe
    batch, length, d = x_BxLxD.shape
    num_experts, k = moe.num_experts, moe.top_k
    x_NxD = constrain(x_BxLxD.reshape(batch * length, d).astype(self.dtype), _ACT_ND)
    mask_N = token_mask_BxL.reshape(-1)
    bias_E = None if self.selection_bias is None else self.selection_bias[...]
    expert_idx_NxK, gates_NxK, probs_NxE = routing.token_choice_topk(
        logits_BxLxE.reshape(batch * length, -1), mask_N, k, moe.router_activation, bias_E)
    if moe.get("dynamic_scaling_factors", ()):  # every token has exactly k experts: entry k, a constant
      gates_NxK = gates_NxK * float(moe.dynamic_scaling_factors[k])
    weights = [getattr(self, name)[...].astype(self.dtype) for name in _EXPERT_WEIGHTS]
    y_NxD = self._token_choice_ffn(x_NxD, expert_idx_NxK, gates_NxK.astype(self.dtype), *weights)
    y_NxD = constrain(y_NxD, _ACT_ND)
    balance = routing.switch_aux_loss(probs_NxE, expert_idx_NxK, mask_N)
    expert_M = expert_idx_NxK.reshape(-1)
    slots_E = jnp.bincount(expert_M, weights=jnp.repeat(mask_N, k).astype(jnp.float32), length=num_experts)
    stats = routing.routing_stats(jnp.where(mask_N, k, 0), slots_E, mask_N)
    return y_NxD.reshape(batch, length, d), balance, stats

  def _token_choice_ffn(self, x_NxD, expert_idx_NxK, gates_NxK, w_gate, w_up, w_down):
    """Routed SwiGLU of token choice; under a mesh, one shard_map over every mesh axis.

    Inside it each device sorts its own (token, expert) pairs by expert, gathers the FSDP
    shards of the expert weights, sends every pair to the device holding its expert
    (parallel/expert.exchange), runs the grouped matmuls on its local experts (the Pallas
    kernels on TPU need the manual partitioning), sums tensor-parallel partials over the
    expert_mlp axis, and sends the results back.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not core_spmd.get_logical_axis_rules():
      return self._token_choice_local(x_NxD, expert_idx_NxK, gates_NxK, w_gate, w_up, w_down, axes=None)
    specs = {name: logical_to_spec(axes) for name, axes in _EXPERT_WEIGHTS.items()}
    axes = {"expert": spec_entry_axes(specs["w_gate"][0], mesh), "embed": spec_entry_axes(specs["w_gate"][1], mesh),
            "mlp": spec_entry_axes(specs["w_gate"][2], mesh)}
    rows, batch_spec = logical_to_spec(_ACT_ND), logical_to_spec(("activation_batch", None))
    body = functools.partial(self._token_choice_local, axes=axes)
    return jax.shard_map(body, in_specs=(rows, batch_spec, batch_spec, specs["w_gate"], specs["w_up"],
                                         specs["w_down"]), out_specs=rows, check_vma=False)(
        x_NxD, expert_idx_NxK, gates_NxK, w_gate, w_up, w_down)

  def _token_choice_local(self, x_NxD, expert_idx_NxK, gates_NxK, w_gate, w_up, w_down, *, axes):
    """One device's part of _token_choice_ffn (`axes` None: no mesh, everything is local)."""
    moe = self.moe
    k, d = moe.top_k, x_NxD.shape[1]
    if axes and axes["embed"]:  # FSDP: gather the weights' embed shards
      w_gate, w_up = (jax.lax.all_gather(w, axes["embed"], axis=1, tiled=True) for w in (w_gate, w_up))
      w_down = jax.lax.all_gather(w_down, axes["embed"], axis=2, tiled=True)
    num_local = w_gate.shape[0]
    ep = moe.num_experts // num_local

    def ffn(rows_MxD, group_sizes):
      gmm = lambda lhs, w: pallas_kernels.gmm(lhs, w, group_sizes, backend=moe.backend)
      return gmm(jax.nn.silu(gmm(rows_MxD, w_gate)) * gmm(rows_MxD, w_up), w_down)

    # Pair m = (token m // k, its (m % k)-th expert); sort the pairs by expert for the grouped matmuls.
    expert_M = expert_idx_NxK.reshape(-1)
    order_M = jnp.argsort(expert_M, stable=True)
    sorted_expert_M = expert_M[order_M]
    rows_MxD = jnp.take(x_NxD, order_M // k, axis=0)
    if ep == 1:
      out_MxD = ffn(rows_MxD, jnp.bincount(sorted_expert_M, length=num_local).astype(jnp.int32))
    else:
      dest_M = sorted_expert_M // num_local
      (recv_RxD, recv_expert_R), valid_R, send_back = expert_parallel.exchange(
          [rows_MxD, sorted_expert_M - dest_M * num_local], dest_M, axes["expert"], ep,
          expert_parallel.default_exchange())
      local_R = jnp.where(valid_R, recv_expert_R, num_local)  # padding sorts last, in no group
      order_R = jnp.argsort(local_R, stable=True)
      sizes = jnp.bincount(local_R, length=num_local + 1)[:num_local].astype(jnp.int32)
      out_RxD = ffn(jnp.take(recv_RxD, order_R, axis=0), sizes)
      out_MxD = send_back(jnp.take(out_RxD, _inverse(order_R), axis=0))
    if axes and axes["mlp"]:  # tensor parallelism: each device summed over its expert_mlp shard
      out_MxD = jax.lax.psum(out_MxD, axes["mlp"])
    y_MxD = jnp.take(out_MxD, _inverse(order_M), axis=0)
    return jnp.einsum("nkd,nk->nd", y_MxD.reshape(-1, k, d), gates_NxK.astype(y_MxD.dtype))


def update_selection_biases(params, expert_load_LxE, rate: float):
  """params with every MoE layer's `selection_bias` moved one aux-loss-free step (routing.balance_bias_step).

  `expert_load_LxE`: each MoE layer's expert load of the step (the model's
  `router.expert_load_per_layer`). A scanned stack holds the biases as one [layers, E] leaf;
  an unrolled one as one [E] leaf per block, found by its block index.
  """
  def step(path, leaf):
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    if "selection_bias" not in [str(k) for k in keys]:
      return leaf
    if leaf.ndim == 2:
      return routing.balance_bias_step(leaf, expert_load_LxE, rate).astype(leaf.dtype)
    layer = int(keys[keys.index("blocks") + 1])
    return routing.balance_bias_step(leaf, expert_load_LxE[layer], rate).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(step, params)


def _inverse(order_M):
  """The inverse permutation of order_M."""
  return jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))
