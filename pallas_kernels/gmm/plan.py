"""Group metadata for the grouped-matmul kernels, computed on device from `group_sizes`.

Rows of lhs are sorted by group, so group g owns rows [start_g, end_g). The TPU kernels walk
a static-length list of *visits*, each one (group, row tile) pair in row-tile order: a tile
whose rows span several groups is visited once per group, consecutively, and every visit masks
the rows outside its group. The list's length bound is static (row tiles + groups), so the
grid is static; visits past the real ones are padding that the kernels skip.

Everything here is small integer work over [groups] and [visits] arrays (no scatter, so XLA's
TPU cost model stays finite), traced into the caller's jit.
"""

import jax
import jax.numpy as jnp

NO_GROUP = -1  # visit group id of a tile that no local group touches (written as zeros)


def local_bounds(group_sizes_G, first_group, num_local: int):
  """Row ranges [start, end) of groups first_group .. first_group + num_local - 1."""
  sizes_G = group_sizes_G.astype(jnp.int32)
  ends_G = jnp.cumsum(sizes_G)
  starts_G = ends_G - sizes_G
  first = jnp.asarray(first_group, jnp.int32)
  return (jax.lax.dynamic_slice_in_dim(starts_G, first, num_local),
          jax.lax.dynamic_slice_in_dim(ends_G, first, num_local))


def visits(starts_L, ends_L, m: int, tm: int, *, zero_tiles: bool, empty_groups: bool):
  """The visit list for row tile `tm` over m rows.

  zero_tiles: also visit (with group NO_GROUP) every tile no local group touches, so a
    kernel that writes row tiles (gmm) writes all of its output.
  empty_groups: give each empty group one visit, so a kernel that writes per-group output
    (tgmm) writes its zeros.

  Returns (group_V, tile_V, count[1]) with V = ceil(m/tm) + num_local; entries at and past
  `count` are padding that repeats the last real visit (so the pipeline neither fetches nor
  writes back anything new for them); kernels skip them by comparing with `count`.
  """
  num_local = starts_L.shape[0]
  m_tiles = -(-m // tm)
  capacity = m_tiles + num_local
  sizes_L = ends_L - starts_L
  first_tile_L = jnp.minimum(starts_L // tm, m_tiles - 1)
  last_tile_L = jnp.where(sizes_L > 0, (ends_L - 1) // tm, first_tile_L)
  tiles_L = jnp.where(sizes_L > 0, last_tile_L - first_tile_L + 1, 1 if empty_groups else 0)
  cum_L = jnp.cumsum(tiles_L)
  num_real = cum_L[-1]
  if zero_tiles:
    lo, hi = starts_L[0], ends_L[-1]
    covered = hi > lo
    before = jnp.where(covered, lo // tm, m_tiles)
    after_start = jnp.where(covered, -(-hi // tm), m_tiles)
    after = m_tiles - after_start
  else:
    before = after_start = after = jnp.int32(0)
  pos_V = jnp.arange(capacity, dtype=jnp.int32)
  q_V = pos_V - before
  group_V = jnp.sum(cum_L[None, :] <= q_V[:, None], axis=1, dtype=jnp.int32)  # searchsorted, compare-all
  g_V = jnp.minimum(group_V, num_local - 1)
  real_tile_V = first_tile_L[g_V] + q_V - (cum_L[g_V] - tiles_L[g_V])
  in_real = (q_V >= 0) & (q_V < num_real)
  tile_V = jnp.where(pos_V < before, pos_V, jnp.where(in_real, real_tile_V, after_start + q_V - num_real))
  group_V = jnp.where(in_real, g_V, NO_GROUP)
  count = before + num_real + after
  last = jnp.maximum(count - 1, 0)
  tile_V = jnp.clip(jnp.where(pos_V < count, tile_V, tile_V[last]), 0, m_tiles - 1)
  group_V = jnp.where(pos_V < count, group_V, group_V[last])
  return group_V.astype(jnp.int32), tile_V.astype(jnp.int32), count.reshape(1).astype(jnp.int32)


class Meta:
  """Static offsets of the groups' row ranges and the visit list packed into one int32
  array (one scalar-prefetch operand per kernel: fewer SMEM arguments, and nothing shared
  between the forward and backward kernels that XLA would copy between memory spaces)."""

  def __init__(self, num_local: int, num_visits: int):
    self.start, self.end = 0, num_local
    self.group, self.tile = 2 * num_local, 2 * num_local + num_visits
    self.count = 2 * num_local + 2 * num_visits


def pack(starts_L, ends_L, group_V, tile_V, count):
  """(meta int32 array, Meta offsets)."""
  meta = jnp.concatenate([starts_L, ends_L, group_V, tile_V, count]).astype(jnp.int32)
  return meta, Meta(starts_L.shape[0], group_V.shape[0])
