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
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec as P

from pallas_kernels import target
from sdlm_jax.parallel.sharding import logical_to_spec

EXCHANGES = ("ragged", "padded")


def expert_axes() -> tuple[str, ...]:
  """Mesh axes the experts are split over under the active mesh and rules (() for none)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not core_spmd.get_logical_axis_rules():
    return ()
  axes = logical_to_spec(("activation_expert",))[0]
  axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  return tuple(a for a in axes if mesh.shape[a] > 1)


def expert_parallelism() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in expert_axes())


def _a2a(x, split_axis: int, concat_axis: int, in_spec, out_spec):
  axes = expert_axes()
  body = lambda t: jax.lax.all_to_all(t, axes, split_axis, concat_axis, tiled=True)
  return jax.shard_map(body, in_specs=in_spec, out_specs=out_spec, axis_names=set(axes))(x)


def to_experts(x_GxExCxD):
  """[G, E, C, D] with G split over the expert axis -> the same array with E split over it."""
  axes = expert_axes()
  if not axes:
    return x_GxExCxD
  return _a2a(x_GxExCxD, 1, 0, P(axes), P(None, axes))


def from_experts(y_GxExCxD):
  """Inverse of to_experts: E split over the expert axis -> G split over it."""
  axes = expert_axes()
  if not axes:
    return y_GxExCxD
  return _a2a(y_GxExCxD, 0, 1, P(None, axes), P(axes))


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
