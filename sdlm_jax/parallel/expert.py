"""Expert parallelism: moving tokens to the devices that hold their experts, and back.

Outside the expert FFNs the batch is split over the `expert` mesh axis too (it is data
parallelism there); the experts' weights are split over it by their `expert` dimension. The
mesh axis comes from the logical rules (`activation_expert`), so a rule set without it has
no expert parallelism and every function here is the identity.

Expert choice has static shapes: each device holds a [G, E, C, D] buffer of its routing
groups' picks, and one `all_to_all` turns it into [G * ep, E / ep, C, D], each device's own
experts' picks from every device of its expert group (`to_experts`); `from_experts` is the
inverse. Routing groups never cross devices, so no top-k ever needs another device's tokens.

Token choice sends a data-dependent number of rows to each device (`exchange`): with
`ragged_all_to_all` where the platform has it (TPU, GPU), otherwise (CPU) with a padded
`all_to_all` of [ep, M, D] buffers that have room for every row going to one device.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import target
from sdlm_jax.parallel.sharding import mesh_axes_of

EXCHANGES = ("ragged", "padded")


def expert_axes() -> tuple[str, ...]:
  """Mesh axes the experts are split over under the active mesh and rules (() for none)."""
  return mesh_axes_of("activation_expert")


def expert_parallelism() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in expert_axes())


def _group_axes(groups: int, experts: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(axes G is split over on the tokens' side, the non-expert ones of those).

  The shard_map is manual over every batch axis G is split over, so each device's block of
  G enters it as is: a shard_map manual over the expert axis alone would want the expert
  axis major in G's layout, where the batch rules put it minor, and XLA would all-gather
  the buffer to re-split it. A G that the batch axes do not divide (an odd-sized
  generation batch) is split over the expert axes only.
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch = mesh_axes_of("activation_batch")
  manual = batch if groups % math.prod(mesh.shape[a] for a in batch) == 0 else experts
  return manual, tuple(a for a in manual if a not in experts)


def _a2a(x, experts: tuple[str, ...], to_experts: bool):
  """all_to_all over the expert axes: G split -> E split (to_experts), or back."""
  manual, rest = _group_axes(x.shape[0], experts)
  by_group, by_expert = P(manual), P(rest or None, experts)
  split, concat, in_spec, out_spec = (1, 0, by_group, by_expert) if to_experts else (0, 1, by_expert, by_group)
  body = lambda t: jax.lax.all_to_all(t, experts, split, concat, tiled=True)
  return jax.shard_map(body, in_specs=in_spec, out_specs=out_spec, axis_names=set(manual))(x)


def to_experts(x_GxExCxD):
  """[G, E, C, ...] with G split over the expert axis -> the same array with E split over it."""
  experts = expert_axes()
  return _a2a(x_GxExCxD, experts, to_experts=True) if experts else x_GxExCxD


def from_experts(y_GxExCxD):
  """Inverse of to_experts: E split over the expert axis -> G split over it."""
  experts = expert_axes()
  return _a2a(y_GxExCxD, experts, to_experts=False) if experts else y_GxExCxD


def default_exchange() -> str:
  """ragged_all_to_all exists on TPU and GPU; CPU has only the padded form."""
  return "ragged" if target.platform() in ("tpu", "gpu") else "padded"


def _exclusive_cumsum(x, axis=0):
  return jnp.cumsum(x, axis=axis) - x


def exchange(payloads, dest_M, axes, ep: int, method: str):
  """Sends row m of every payload to device dest_M[m] of the expert group (inside a
  shard_map over `axes`); payloads are [M, ...] arrays sorted by destination.

  Returns (received payloads, each [ep * M, ...] and grouped by source device; valid_R,
  which received rows are real; reverse(out_RxD), which sends rows of the received layout
  back and returns them to their senders in the original order, [M, D]). The ragged form
  puts the real rows first; the padded form leaves gaps where a source sent fewer than M.
  """
  if method not in EXCHANGES:
    raise ValueError(f"exchange={method!r}; allowed values: {', '.join(EXCHANGES)}")
  m = dest_M.shape[0]
  counts_P = jnp.bincount(dest_M, length=ep).astype(jnp.int32)
  starts_P = _exclusive_cumsum(counts_P)
  if method == "padded":
    pos_1xM = jnp.arange(m, dtype=jnp.int32)[None]
    valid_PxM = pos_1xM < counts_P[:, None]
    src_PxM = jnp.minimum(starts_P[:, None] + pos_1xM, m - 1)
    send = lambda x: jax.lax.all_to_all(x[src_PxM], axes, 0, 0, tiled=True)
    received = [send(x).reshape((ep * m,) + x.shape[1:]) for x in payloads]
    valid_R = jax.lax.all_to_all(valid_PxM, axes, 0, 0, tiled=True).reshape(-1)

    def reverse(out_RxD):
      back_PxMxD = jax.lax.all_to_all(out_RxD.reshape((ep, m) + out_RxD.shape[1:]), axes, 0, 0, tiled=True)
      return back_PxMxD[dest_M, jnp.arange(m) - starts_P[dest_M]]
    return received, valid_R, reverse
  # ragged: counts[i, j] = rows device i sends to device j, known to every device.
  me = jax.lax.axis_index(axes)
  counts_PxP = jax.lax.all_gather(counts_P, axes, tiled=False)
  recv_sizes_P = counts_PxP[:, me]
  out_offsets_P = _exclusive_cumsum(counts_PxP, axis=0)[me]  # where my rows land at each receiver

  def send(x):
    out = jnp.zeros((ep * m,) + x.shape[1:], x.dtype)
    return jax.lax.ragged_all_to_all(x, out, starts_P, counts_P, out_offsets_P, recv_sizes_P, axis_name=axes)
  received = [send(x) for x in payloads]
  valid_R = jnp.arange(ep * m) < jnp.sum(recv_sizes_P)

  def reverse(out_RxD):
    back_offsets_P = _exclusive_cumsum(counts_PxP, axis=1)[:, me]  # where each sender keeps them
    out = jnp.zeros((m,) + out_RxD.shape[1:], out_RxD.dtype)
    return jax.lax.ragged_all_to_all(out_RxD, out, _exclusive_cumsum(recv_sizes_P), recv_sizes_P,
                                     back_offsets_P, counts_P, axis_name=axes)
  return received, valid_R, reverse
