"""Plain-XLA implementations of the MoE kernels: the semantics every backend must match, and
what runs on CPU (and, for the grouped matmul, on GPU under backend "auto").

Grouped matmul: on GPU and TPU, `lax.ragged_dot` (and its transpose for tgmm). On CPU,
`ragged_dot` is a dense masked loop over all groups (G times the FLOPs), so there the same
result is computed from row tiles instead: each (group, row tile) visit of gmm/plan.py
gathers its lhs tile and its group's weights, one batched einsum multiplies all visits, and the
tiles are summed back (FLOPs ~ (m + G * tile) * k * n; ~7-12x faster than `ragged_dot` at the
demo's sizes, fwd+bwd). `lax.platform_dependent` picks the formulation when lowering, so one
traced program is right on every platform; autodiff goes through either.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Int32

from pallas_kernels.gmm import plan

CPU_ROW_TILE = 128
CPU_GATHER_BYTES = 1 << 30  # above this, the tiled CPU form's gathered weights fall back to ragged_dot


def _local_sizes(sizes_G, first, local: int, m: int):
  """Sizes for ragged_dot over [rows before the local groups, local groups..., rows after],
  with zero weights for the outer two: rows of non-local groups come out zero."""
  ends_G = jnp.cumsum(sizes_G)
  start = jnp.where(first > 0, ends_G[jnp.maximum(first - 1, 0)], 0)
  local_L = jax.lax.dynamic_slice_in_dim(sizes_G, first, local)
  return jnp.concatenate([start[None], local_L, (m - start - jnp.sum(local_L))[None]]).astype(jnp.int32)


def _gmm_ragged(lhs_MxK, rhs_GxKxN, sizes_G, first, out_dtype, offset: bool):
  if offset:
    sizes_G = _local_sizes(sizes_G, first, rhs_GxKxN.shape[0], lhs_MxK.shape[0])
    zeros = jnp.zeros((1,) + rhs_GxKxN.shape[1:], rhs_GxKxN.dtype)
    rhs_GxKxN = jnp.concatenate([zeros, rhs_GxKxN, zeros])
  return jax.lax.ragged_dot(lhs_MxK, rhs_GxKxN, sizes_G, preferred_element_type=out_dtype).astype(out_dtype)


def _visit_tiles(x_MxD, sizes_G, first, local: int, tm: int):
  """Row tiles of x per visit of the local groups, rows outside the visit's group zeroed:
  ([V, tm, D] tiles, [V] group, [V] tile)."""
  m = x_MxD.shape[0]
  m_tiles = -(-m // tm)
  starts_L, ends_L = plan.local_bounds(sizes_G, first, local)
  group_V, tile_V, count = plan.visits(starts_L, ends_L, m, tm, zero_tiles=False, empty_groups=False)
  g_V = jnp.maximum(group_V, 0)
  rows_VxT = tile_V[:, None] * tm + jnp.arange(tm)
  mine_VxT = ((jnp.arange(group_V.shape[0]) < count[0])[:, None]
              & (rows_VxT >= starts_L[g_V][:, None]) & (rows_VxT < ends_L[g_V][:, None]))
  x_tiles = jnp.pad(x_MxD, ((0, m_tiles * tm - m), (0, 0))).reshape(m_tiles, tm, -1)[tile_V]
  return jnp.where(mine_VxT[..., None], x_tiles, 0), g_V, tile_V


def _gmm_tiled(lhs_MxK, rhs_GxKxN, sizes_G, first, out_dtype, tm):
  m = lhs_MxK.shape[0]
  lhs_VxTxK, g_V, tile_V = _visit_tiles(lhs_MxK, sizes_G, first, rhs_GxKxN.shape[0], tm)
  out_VxTxN = jnp.einsum("vtk,vkn->vtn", lhs_VxTxK, rhs_GxKxN[g_V], preferred_element_type=jnp.float32)
  m_tiles, n = -(-m // tm), rhs_GxKxN.shape[2]
  out_TxTMxN = jnp.zeros((m_tiles, tm, n), jnp.float32).at[tile_V].add(out_VxTxN)
  return out_TxTMxN.reshape(m_tiles * tm, n)[:m].astype(out_dtype)


def _cpu_tiled_fits(m, k, n, groups, itemsize) -> bool:
  return (-(-m // CPU_ROW_TILE) + groups) * k * n * itemsize <= CPU_GATHER_BYTES


def gmm(lhs_MxK: Float[Array, "M K"], rhs_GxKxN: Float[Array, "G_local K N"], group_sizes_G: Int[Array, "G"],
        preferred_element_type=None, group_offset: Int[ArrayLike, ""] | None = None) -> Float[Array, "M N"]:
  """Grouped matmul, equal to lax.ragged_dot: rows of lhs are sorted by group; rows past
  sum(group_sizes) are zero. With `group_offset`, rhs holds only groups [offset, offset +
  rhs.shape[0]) and the rows of every other group are zero."""
  sizes_G = group_sizes_G.astype(jnp.int32)
  out_dtype = jnp.dtype(preferred_element_type or lhs_MxK.dtype)
  first = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
  ragged = lambda a, b, s, f: _gmm_ragged(a, b, s, f, out_dtype, group_offset is not None)
  (m, k), (groups, _, n) = lhs_MxK.shape, rhs_GxKxN.shape
  # A symbolic row count (jax.export with a symbolic batch) cannot size the tiled form's buffers.
  if not isinstance(m, int) or m == 0 or not _cpu_tiled_fits(m, k, n, groups, lhs_MxK.dtype.itemsize):
    return ragged(lhs_MxK, rhs_GxKxN, sizes_G, first)
  tiled = lambda a, b, s, f: _gmm_tiled(a, b, s, f, out_dtype, CPU_ROW_TILE)
  return jax.lax.platform_dependent(lhs_MxK, rhs_GxKxN, sizes_G, first, cpu=tiled, default=ragged)


def tgmm(lhs_MxK: Float[Array, "M K"], grad_MxN: Float[Array, "M N"], group_sizes_G: Int[Array, "G"],
         preferred_element_type=None, group_offset: Int[ArrayLike, ""] | None = None, num_groups: int | None = None
         ) -> Float[Array, "G_out K N"]:
  """Transposed grouped matmul: out[g] = lhs[rows of g].T @ grad[rows of g], for groups
  group_offset .. group_offset + num_groups - 1 (default all): [num_groups, k, n]."""
  sizes_G = group_sizes_G.astype(jnp.int32)
  out_dtype = jnp.dtype(preferred_element_type or lhs_MxK.dtype)
  first = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
  local = num_groups or sizes_G.shape[0]
  (m, k), n = lhs_MxK.shape, grad_MxN.shape[1]

  def ragged(a, g, s, f):  # the weight gradient of ragged_dot is exactly tgmm
    dtype = jnp.promote_types(a.dtype, out_dtype)
    a = a.astype(dtype)
    _, vjp = jax.vjp(lambda r: _gmm_ragged(a, r, s, f, jnp.float32, True), jnp.zeros((local, k, n), dtype))
    return vjp(g.astype(jnp.float32))[0].astype(out_dtype)

  def tiled(a, g, s, f):
    a_VxTxK, g_V, _ = _visit_tiles(a, s, f, local, CPU_ROW_TILE)
    g_VxTxN, _, _ = _visit_tiles(g, s, f, local, CPU_ROW_TILE)
    out_VxKxN = jnp.einsum("vtk,vtn->vkn", a_VxTxK, g_VxTxN, preferred_element_type=jnp.float32)
    return jnp.zeros((local, k, n), jnp.float32).at[g_V].add(out_VxKxN).astype(out_dtype)

  if m == 0 or not _cpu_tiled_fits(m, k, n, local, 4):
    return ragged(lhs_MxK, grad_MxN, sizes_G, first)
  return jax.lax.platform_dependent(lhs_MxK, grad_MxN, sizes_G, first, cpu=tiled, default=ragged)


def expert_choice(logits_GxNxE: Float[Array, "G N E"], capacity
                  ) -> tuple[Int32[Array, "G E C"], Float[Array, "G E C"]]:
  """Each expert's top-`capacity` tokens per group; ties go to the lower token index."""
  scores_GxExC, token_idx_GxExC = jax.lax.top_k(jnp.swapaxes(logits_GxNxE, 1, 2), capacity)
  return token_idx_GxExC.astype(jnp.int32), scores_GxExC


LANES = 128  # a TPU vreg's lane width: rows of a multiple of it move as whole [d/128, 128] tiles


def _gather_tiles(x_NxD, idx_M):
  """x[idx] for one group. A TPU gather of single rows into an (8, 128)-tiled [M, d] array
  writes one sublane of a tile at a time; viewed as [N, d/128, 128], every row is whole tiles
  (benchmarks/ec_layer_cost.py, v5p: dispatch fwd+bwd 1.35 -> 0.75 ms, combine 1.66 -> 0.55).
  Elsewhere the plain row gather is kept: on CPU the tiled view costs the demo ~7% of its
  throughput. `lax.platform_dependent` picks when lowering, so an AOT compile for TPU on a
  CPU host gets the tiled form."""
  n, d = x_NxD.shape
  if d % LANES:
    return x_NxD[idx_M]
  tiled = lambda x, i: x.reshape(n, d // LANES, LANES)[i].reshape(i.shape[0], d)
  return jax.lax.platform_dependent(x_NxD, idx_M, tpu=tiled, default=lambda x, i: x[i])


def _scatter_add(rows_MxD, idx_M, num_tokens):
  return jnp.zeros((num_tokens, rows_MxD.shape[1]), rows_MxD.dtype).at[idx_M].add(rows_MxD)


# The two ops are each other's transpose; custom VJPs make the backward pass use the tiled
# gather too (autodiff of a scatter-add would emit the row gather).
@jax.custom_vjp
def _take_rows(x_NxD, idx_M):
  return _gather_tiles(x_NxD, idx_M)


def _take_rows_fwd(x_NxD, idx_M):
  return _gather_tiles(x_NxD, idx_M), (idx_M, x_NxD.shape[0])


def _take_rows_bwd(residuals, grad_MxD):
  idx_M, num_tokens = residuals
  return _scatter_add(grad_MxD, idx_M, num_tokens), None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_rows(rows_MxD, idx_M, num_tokens):
  return _scatter_add(rows_MxD, idx_M, num_tokens)


def _add_rows_fwd(rows_MxD, idx_M, num_tokens):
  return _scatter_add(rows_MxD, idx_M, num_tokens), idx_M


def _add_rows_bwd(num_tokens, idx_M, grad_NxD):
  del num_tokens
  return _gather_tiles(grad_NxD, idx_M), None


_add_rows.defvjp(_add_rows_fwd, _add_rows_bwd)


def ec_dispatch(x_GxNxD: Float[Array, "G N D"], token_idx_GxExC: Int[Array, "G E C"]) -> Float[Array, "G E C D"]:
  """Gathers each expert's chosen tokens: [G, E, C, D]; the gradient scatter-adds."""
  _, num_experts, capacity = token_idx_GxExC.shape
  out_GxMxD = jax.vmap(_take_rows)(x_GxNxD, token_idx_GxExC.reshape(x_GxNxD.shape[0], -1))
  return out_GxMxD.reshape(x_GxNxD.shape[0], num_experts, capacity, -1)


def ec_combine(y_GxExCxD: Float[Array, "G E C D"], token_idx_GxExC: Int[Array, "G E C"],
               weights_GxExC: Float[Array, "G E C"] | None, num_tokens) -> Float[Array, "G N D"]:
  """Scatter-add of expert outputs back to token positions, each weighted by weights_GxExC
  (None: unweighted): [G, N, D]. The gradient gathers."""
  groups, _, _, d = y_GxExCxD.shape
  if weights_GxExC is not None:
    y_GxExCxD = y_GxExCxD * weights_GxExC[..., None].astype(y_GxExCxD.dtype)
  add = lambda rows_MxD, idx_M: _add_rows(rows_MxD, idx_M, num_tokens)
  return jax.vmap(add)(y_GxExCxD.reshape(groups, -1, d), token_idx_GxExC.reshape(groups, -1))


def ec_ffn(x_GxNxD: Float[Array, "G N D"], token_idx_GxExC: Int[Array, "G E C"], gates_GxExC: Float[Array, "G E C"],
           w_gate_ExDxF: Float[Array, "E D F"], w_up_ExDxF: Float[Array, "E D F"], w_down_ExFxD: Float[Array, "E F D"]
           ) -> Float[Array, "G E C D"]:
  """The expert-choice expert FFN as the model's XLA path computes it: dispatch, then three
  batched einsums with each slot's gate on its hidden activations (in the operands' dtype)."""
  xe_GxExCxD = ec_dispatch(x_GxNxD, token_idx_GxExC)
  gate_GxExCxF = jnp.einsum("gecd,edf->gecf", xe_GxExCxD, w_gate_ExDxF)
  up_GxExCxF = jnp.einsum("gecd,edf->gecf", xe_GxExCxD, w_up_ExDxF)
  h_GxExCxF = jax.nn.silu(gate_GxExCxF) * up_GxExCxF * gates_GxExC[..., None].astype(gate_GxExCxF.dtype)
  return jnp.einsum("gecf,efd->gecd", h_GxExCxF, w_down_ExFxD)
