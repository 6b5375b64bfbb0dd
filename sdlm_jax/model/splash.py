"""Splash (flash) attention on TPU: jax's maintained Pallas kernel, with segment ids, GQA,
padding to the kernel's 128-row tiles, sharding and a declared cost.

The kernel is `jax.experimental.pallas.ops.tpu.splash_attention` (the one MaxText uses). It
never writes the [L, L] scores to HBM: forward and backward run over (block_q x block_kv)
tiles, and tiles the static mask (causal) zeroes are skipped. Segment ids (packed documents;
0 = padding, which attends to padding) are applied inside the tiles.

- GQA: with fewer kv heads than query heads, the MQA kernel (one kv head shared by a group of
  query heads) is vmapped over the kv heads; with as many, the MHA kernel runs directly.
- Lengths that are not a multiple of 128 are padded with segment id -1 (no real token has
  it, so the padding neither sees nor is seen by real tokens) and sliced off again.
- Under a mesh the kernel runs per shard in a shard_map over the batch and head axes (a
  Pallas call cannot be partitioned by XLA); without one it runs on the whole batch.
- Backward: the fused kernel (`use_fused_bwd_kernel`), one pass over the tiles for dq, dk and
  dv. The split one (a dq kernel and a dkv kernel) recomputes QK^T and its exponentials twice:
  18 against 14 matmul FLOPs per score for the forward and backward together. The fused kernel
  writes dq as one partial sum per kv tile, which XLA adds up. XLA's cost model, one v5p chip,
  16 heads x 2048 x 128 at batch 4: 1.75 ms against 2.00 ms for forward and backward.
- Honest cost: jax's kernel declares no `pl.CostEstimate`, which prices it at zero in XLA's
  cost model (sdlm-aot's MFU would then be inflated). `_declared_costs` supplies each of its
  pallas_calls (forward, fused backward) with the FLOPs, exponentials and HBM bytes it does,
  counting only the tiles the mask leaves; see `kernel_costs`.
- Remat: the forward kernel tags its residuals (output, logsumexp) `context`, as MaxText does,
  so a policy that saves `context` keeps them and the backward pass does not rerun the forward
  kernel to get them back; any other policy reruns it.
- `interpret=True` runs the same kernel in Pallas TPU interpret mode on any platform (tests).
"""

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jaxtyping import Array, Float, Int

from sdlm_jax.parallel.sharding import logical_to_spec

LANES = 128            # the kernel's tiles are multiples of this many rows
MAX_BLOCK = 512        # tile edge (MaxText's default sa_block_* for TPU)
PAD_SEGMENT = -1       # segment id of the rows added to reach a multiple of LANES
# The checkpoint name of the kernel's residuals (its output and logsumexp): a remat policy that
# saves it (`minimal_with_context`) spares the backward pass a rerun of the forward kernel.
RESIDUAL_NAME = "context"
_ACT_BLHK = ("activation_batch", "activation_length", "activation_heads", None)
_ACT_BLGK = ("activation_batch", "activation_length", "activation_kv_heads", None)
_ACT_BL = ("activation_batch", "activation_length")


@dataclasses.dataclass(frozen=True)
class Spec:
  """What one kernel invocation (one batch row, one kv-head group) computes: hashable, so it
  is a static argument."""
  length: int        # padded sequence length
  q_heads: int       # query heads the kernel sees (all of them for MHA; a group's for MQA)
  head_dim: int
  mqa: bool
  causal: bool
  block: int
  itemsize: int
  interpret: bool


def _block(length: int) -> int:
  return next(b for b in (MAX_BLOCK, 256, LANES) if length % b == 0)


def _active_tiles(spec: Spec) -> int:
  """(q tile, kv tile) pairs the static mask leaves (all of them without `causal`)."""
  n = spec.length // spec.block
  return n * (n + 1) // 2 if spec.causal else n * n


def kernel_costs(spec: Spec) -> dict[str, pl.CostEstimate]:
  """The work of the kernel's two pallas_calls per invocation, per tile the mask leaves:
  forward QK^T and PV (4 bq bkv K FLOPs, bq bkv exps); the fused backward ("dkv", which also
  computes dq) recomputes QK^T, then dO V^T, P^T dO, dS^T Q and dS K (10 bq bkv K, bq bkv
  exps). Bytes: each q-row tile reads its q (and writes o) once and re-reads the kv tiles of
  every active (q, kv) pair; the backward reads k, v and writes dk, dv once, re-reads q and dO
  for every active pair, and writes one dq partial per (kv tile, q tile), masked or not."""
  t, b, k, h = _active_tiles(spec), spec.block, spec.head_dim, spec.q_heads
  rows, pairs = spec.length * k * spec.itemsize, t * b * k * spec.itemsize
  kv_heads = 1 if spec.mqa else h
  lse = 4 * spec.length  # float32 logsumexp per query row
  per_pair = b * b
  dq_partials = spec.length // b * rows
  return {
      "fwd": pl.CostEstimate(flops=h * t * 4 * per_pair * k, transcendentals=h * t * per_pair,
                             bytes_accessed=h * (2 * rows + 2 * pairs + lse)),
      "dkv": pl.CostEstimate(flops=h * t * 10 * per_pair * k, transcendentals=h * t * per_pair,
                             bytes_accessed=h * (2 * pairs + 2 * lse + dq_partials) + kv_heads * 4 * rows),
  }


_ACTIVE_COSTS: list[dict[str, pl.CostEstimate]] = []


class _PallasDeclaringCost:
  """Stands in for `jax.experimental.pallas` inside jax's splash kernel module: forwards every
  attribute, and gives each `pallas_call` made while `_declared_costs` is active the cost of its
  phase (read from the kernel name splash gives it: splash_{mha|mqa}_{fwd|dkv}...)."""

  def __getattr__(self, name):
    return getattr(pl, name)

  @staticmethod
  def pallas_call(*args, name=None, cost_estimate=None, **kwargs):
    if cost_estimate is None and _ACTIVE_COSTS and name:
      phase = name.split("_")[2]
      cost_estimate = _ACTIVE_COSTS[-1][phase]  # a phase without a declared cost fails here
    return pl.pallas_call(*args, name=name, cost_estimate=cost_estimate, **kwargs)


splash_kernel.pl = _PallasDeclaringCost()


@contextlib.contextmanager
def _declared_costs(spec: Spec):
  _ACTIVE_COSTS.append(kernel_costs(spec))
  try:
    yield
  finally:
    _ACTIVE_COSTS.pop()


def _kernel(spec: Spec):
  """The kernel for `spec`, built inside the trace that uses it (its mask tables become that
  trace's constants; a kernel cached across traces would leak them)."""
  shape = (spec.length, spec.length)
  mask = splash.CausalMask(shape) if spec.causal else splash.FullMask(shape)
  b = spec.block
  blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                             block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
  make = splash.make_splash_mqa_single_device if spec.mqa else splash.make_splash_mha_single_device
  return make(splash.MultiHeadMask([mask] * spec.q_heads), block_sizes=blocks, interpret=spec.interpret,
              residual_checkpoint_name=RESIDUAL_NAME)


def _run(spec: Spec, q, k, v, segment_ids_BxL):
  """The kernel over a batch: q [B, G, H/G, L, K] (MQA) or [B, H, L, K], k/v [B, G, L, K]."""
  kernel = _kernel(spec)

  def one_row(q_row, k_row, v_row, seg_L):
    ids = splash.SegmentIds(q=seg_L, kv=seg_L)
    if spec.mqa:
      return jax.vmap(lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=ids))(q_row, k_row, v_row)
    return kernel(q_row, k_row, v_row, segment_ids=ids)

  return jax.vmap(one_row)(q, k, v, segment_ids_BxL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec: Spec, q, k, v, segment_ids_BxL):
  with _declared_costs(spec):
    return _run(spec, q, k, v, segment_ids_BxL)


def _attend_fwd(spec, q, k, v, segment_ids_BxL):
  # The splash backward kernels are traced when the pullback runs, after this function has
  # returned: the pullback is the residual, and `_attend_bwd` runs it with the costs declared.
  with _declared_costs(spec):
    out, pullback = jax.vjp(lambda q_, k_, v_: _run(spec, q_, k_, v_, segment_ids_BxL), q, k, v)
  return out, pullback


def _attend_bwd(spec, pullback, grad):
  with _declared_costs(spec):
    dq, dk, dv = pullback(grad)
  return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, *, causal: bool, interpret: bool):
  """Splash attention on local (unsharded) arrays, in the model's [B, L, heads, K] layout."""
  batch, length, heads, head_dim = q_BxLxHxK.shape
  groups = k_BxLxGxK.shape[2]
  padded = -(-length // LANES) * LANES
  if segment_ids_BxL is None:
    segment_ids_BxL = jnp.ones((batch, length), jnp.int32)
  if padded != length:
    pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
    q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = (jnp.pad(x, pad) for x in (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK))
    segment_ids_BxL = jnp.pad(segment_ids_BxL, [(0, 0), (0, padded - length)], constant_values=PAD_SEGMENT)
  mqa = groups != heads
  spec = Spec(length=padded, q_heads=heads // groups if mqa else heads, head_dim=head_dim, mqa=mqa, causal=causal,
              block=_block(padded), itemsize=jnp.dtype(q_BxLxHxK.dtype).itemsize, interpret=interpret)
  # The kernel's layout: heads before length, head_dim minor.
  k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3)
  q_BxHxLxK = q_BxLxHxK.transpose(0, 2, 1, 3)
  if mqa:
    q = q_BxHxLxK.reshape(batch, groups, heads // groups, padded, head_dim)
    out = _attend(spec, q, k_BxGxLxK, v_BxGxLxK, segment_ids_BxL.astype(jnp.int32))
    out_BxHxLxK = out.reshape(batch, heads, padded, head_dim)
  else:
    out_BxHxLxK = _attend(spec, q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, segment_ids_BxL.astype(jnp.int32))
  return out_BxHxLxK.transpose(0, 2, 1, 3)[:, :length]


def splash_attention(q_BxLxHxK: Float[Array, "B L H K"], k_BxLxGxK: Float[Array, "B L G K"],
                     v_BxLxGxK: Float[Array, "B L G K"], segment_ids_BxL: Int[Array, "B L"] | None, *,
                     causal: bool, interpret: bool = False) -> Float[Array, "B L H K"]:
  """softmax(q k^T / sqrt(K) + mask) v within each segment (and causal if asked), like
  `jax.nn.dot_product_attention` with `attention.attention_mask`; H a multiple of G."""
  q_BxLxHxK = q_BxLxHxK * jnp.asarray(1 / math.sqrt(q_BxLxHxK.shape[-1]), q_BxLxHxK.dtype)
  body = functools.partial(_local, causal=causal, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not core_spmd.get_logical_axis_rules():
    return body(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  q_spec, kv_spec, seg_spec = logical_to_spec(_ACT_BLHK), logical_to_spec(_ACT_BLGK), logical_to_spec(_ACT_BL)
  if segment_ids_BxL is None:
    return jax.shard_map(lambda q, k, v: body(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
  return jax.shard_map(body, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                       check_vma=False)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)

