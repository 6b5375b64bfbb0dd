"""Token exchange for token-choice expert parallelism, on 4 simulated devices (vmap axes).

The padded form runs as is. The CPU has no ragged_all_to_all, so the ragged form runs with
an emulation of that collective's documented contract (built from all_gather) in its place:
what is tested is the offset bookkeeping around it. Both must deliver every row to the
device of its destination, grouped by source device in source order, and bring the results
back in the senders' order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from sdlm_jax.defaults import get_base_config
from sdlm_jax.parallel import expert
from sdlm_jax.parallel.mesh import make_mesh, sharding_context

EP, M, D = 4, 12, 3


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
  """Device j's output: for every source i, operand_i[in_i[j] : in_i[j] + size_i[j]] at out_i[j]."""
  del recv_sizes
  me = jax.lax.axis_index(axis_name)
  ops, ins, sizes, outs = (jax.lax.all_gather(x, axis_name) for x in (operand, input_offsets, send_sizes,
                                                                        output_offsets))
  pos = jnp.arange(output.shape[0])
  for i in range(ops.shape[0]):
    start, size, src = outs[i, me], sizes[i, me], ins[i, me]
    hit = (pos >= start) & (pos < start + size)
    rows = ops[i][jnp.clip(src + pos - start, 0, ops.shape[1] - 1)]
    output = jnp.where(hit.reshape((-1,) + (1,) * (output.ndim - 1)), rows, output)
  return output


def _case(seed):
  rng = np.random.default_rng(seed)
  dest = np.sort(rng.integers(0, EP, (EP, M)), axis=1)  # each device's rows, sorted by destination
  dest[0] = 2  # one device sends everything to one device (the worst case the buffers allow)
  rows = rng.normal(size=(EP, M, D)).astype(np.float32)
  return jnp.asarray(rows), jnp.asarray(dest, jnp.int32)


@pytest.mark.parametrize("method", ["padded", "ragged"])
@pytest.mark.parametrize("seed", [0, 1])
def test_exchange_delivers_rows_and_brings_results_back(method, seed, monkeypatch):
  if method == "ragged":
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  rows, dest = _case(seed)
  ids = jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), (EP, M)) + 100 * jnp.arange(EP, dtype=jnp.int32)[:, None]

  def device(rows_MxD, ids_M, dest_M):
    (recv_RxD, recv_ids_R), valid_R, back = expert.exchange([rows_MxD, ids_M], dest_M, "e", EP, method)
    return recv_RxD, recv_ids_R, valid_R, back(recv_RxD * 2.0 + 1.0)

  recv, recv_ids, valid, returned = jax.vmap(device, axis_name="e")(rows, ids, dest)
  rows, dest, ids = np.asarray(rows), np.asarray(dest), np.asarray(ids)
  for j in range(EP):
    got = np.asarray(recv_ids[j])[np.asarray(valid[j])]
    want = np.concatenate([ids[i][dest[i] == j] for i in range(EP)])  # grouped by source, in order
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(np.asarray(recv[j])[np.asarray(valid[j])],
                               np.concatenate([rows[i][dest[i] == j] for i in range(EP)]))
  np.testing.assert_allclose(np.asarray(returned), rows * 2.0 + 1.0, rtol=1e-6)


def test_unknown_exchange_is_named():
  with pytest.raises(ValueError, match="exchange='dense'"):
    expert.exchange([jnp.zeros((2, 1))], jnp.zeros((2,), jnp.int32), "e", 1, "dense")


def test_no_mesh_means_no_expert_parallelism():
  assert expert.expert_axes() == () and expert.expert_parallelism() == 1
  x = jnp.ones((2, 4, 3, 5))
  assert expert.to_experts(x) is x and expert.from_experts(x) is x


@pytest.mark.tpu_aot
@pytest.mark.parametrize("data, fsdp, ep", [(1, 4, 2), (2, 2, 2)])
def test_expert_choice_buffers_move_with_one_all_to_all_each_way(data, fsdp, ep):
  """On a real TPU compile the [G, E, C, D] buffer changes hands with one all-to-all and no
  all-gather: the shard_map takes G's layout over every batch axis as it is (a shard_map
  manual over the expert axis alone made XLA gather the buffer and re-split it)."""
  cfg = get_base_config().mesh
  cfg.update(data=data, fsdp=fsdp, expert=ep)
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
  mesh = make_mesh(cfg, devices)
  groups, num_experts = 2 * data * fsdp * ep, 4 * ep
  batch_spec = P(("data", "fsdp", "expert"))
  x = jax.ShapeDtypeStruct((groups, num_experts, 16, 256), jnp.bfloat16, sharding=NamedSharding(mesh, batch_spec))
  with sharding_context(mesh):
    there = jax.jit(expert.to_experts).lower(x).compile()
    back = jax.jit(lambda t: expert.from_experts(expert.to_experts(t))).lower(x).compile()
  assert there.output_shardings.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "expert")), 4)
  assert back.output_shardings.is_equivalent_to(x.sharding, 4)
  for compiled, moves in ((there, 1), (back, 2)):
    hlo = compiled.as_text()
    assert hlo.count(" all-to-all(") == moves
    assert " all-gather" not in hlo and " all-reduce" not in hlo and " collective-permute" not in hlo
