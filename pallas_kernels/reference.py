"""Plain-XLA reference implementations of the MoE kernels.

These define the semantics every backend must match; on CPU they are also what runs.
"""

import jax
import jax.numpy as jnp


def gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, preferred_element_type=None, group_offset=None):
  """Grouped matmul: rows of lhs are sorted by group; rows past sum(group_sizes) are zero.

  With `group_offset`, rhs holds only groups [offset, offset + rhs.shape[0]); the rows before
  and after them go to two zero weight groups, so they come out zero.
  """
  sizes = group_sizes_G.astype(jnp.int32)
  if group_offset is not None:
    local = rhs_GxKxN.shape[0]
    ends = jnp.cumsum(sizes)
    start = jnp.where(group_offset > 0, ends[jnp.maximum(group_offset - 1, 0)], 0)
    local_sizes = jax.lax.dynamic_slice_in_dim(sizes, group_offset, local)
    after = lhs_MxK.shape[0] - start - jnp.sum(local_sizes)
    sizes = jnp.concatenate([start[None], local_sizes, after[None]]).astype(jnp.int32)
    zeros = jnp.zeros((1,) + rhs_GxKxN.shape[1:], rhs_GxKxN.dtype)
    rhs_GxKxN = jnp.concatenate([zeros, rhs_GxKxN, zeros])
  return jax.lax.ragged_dot(lhs_MxK, rhs_GxKxN, sizes, preferred_element_type=preferred_element_type)


def tgmm(lhs_MxK, grad_MxN, group_sizes_G, preferred_element_type=None):
  """Transposed grouped matmul: out[g] = lhs[rows of g].T @ grad[rows of g]."""
  m = lhs_MxK.shape[0]
  num_groups = group_sizes_G.shape[0]
  ends_G = jnp.cumsum(group_sizes_G)
  row_group_M = jnp.searchsorted(ends_G, jnp.arange(m), side="right")
  onehot_MxG = (row_group_M[:, None] == jnp.arange(num_groups)[None, :]).astype(lhs_MxK.dtype)
  out_dtype = preferred_element_type or lhs_MxK.dtype
  return jnp.einsum("mk,mg,mn->gkn", lhs_MxK, onehot_MxG, grad_MxN,
                    preferred_element_type=out_dtype).astype(out_dtype)


def expert_choice(logits_GxNxE, capacity):
  """Each expert's top-`capacity` tokens per group; ties go to the lower token index."""
  scores_GxExC, token_idx_GxExC = jax.lax.top_k(jnp.swapaxes(logits_GxNxE, 1, 2), capacity)
  return token_idx_GxExC.astype(jnp.int32), scores_GxExC


def ec_dispatch(x_GxNxD, token_idx_GxExC):
  """Gathers each expert's chosen tokens: [G, E, C, D]."""
  return jax.vmap(lambda x_NxD, idx_ExC: x_NxD[idx_ExC])(x_GxNxD, token_idx_GxExC)


def ec_combine(y_GxExCxD, token_idx_GxExC, weights_GxExC, num_tokens):
  """Weighted scatter-add of expert outputs back to token positions: [G, N, D]."""
  def one_group(y_ExCxD, idx_ExC, w_ExC):
    contrib_ExCxD = y_ExCxD * w_ExC[..., None].astype(y_ExCxD.dtype)
    out_NxD = jnp.zeros((num_tokens, y_ExCxD.shape[-1]), y_ExCxD.dtype)
    return out_NxD.at[idx_ExC.reshape(-1)].add(contrib_ExCxD.reshape(-1, y_ExCxD.shape[-1]))
  return jax.vmap(one_group)(y_GxExCxD, token_idx_GxExC, weights_GxExC)
