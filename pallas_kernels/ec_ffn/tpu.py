"""Expert-choice expert FFN of one MoE layer as a Pallas Mosaic TPU kernel (forward).

  ye[g, e, c] = ((silu(x_sel @ w_gate[e]) * (x_sel @ w_up[e])) * gates[g, e, c]) @ w_down[e],
  x_sel = x[g, token_idx[g, e, c]]

Grid (G, E, C/tc, F/tf); G and E "parallel" (megacore splits the experts), C and F "arbitrary".
- **Gather in the kernel.** token_idx is scalar-prefetched into SMEM; at the first F step of a
  C tile the kernel has the tile's tc rows of x copied from HBM into VMEM, one DMA per row.
  Mosaic accepts a single-row DMA only at a tile-aligned offset, so x is viewed as
  [G, N, D/128, 128]: a row is whole (sublane, lane) tiles. The next C tile of the same expert
  is gathered into the other half of a double buffer while this one computes (the first tile of
  each (g, e) is not overlapped: prefetching across experts would break when megacore splits E).
- **Hidden activation stays in VMEM.** Per F tile: gate/up [tc, tf] in float32, h = silu(gate)
  * up * gate-weight, then h @ w_down[tf, D] accumulates into a float32 [tc, D] VMEM scratch,
  written to HBM at the last F step. With tf = F (the default whenever it fits) the weight
  blocks do not change across the C tiles of one expert, so Pallas fetches each expert's weights
  once per group (and prefetches the next expert's while the last tile computes).
- C is padded to a multiple of tc (padded slots: token 0, gate 0, sliced off), D and F to
  multiples of 128 (zero weights: the padding adds nothing).
The scatter-add back to tokens stays XLA (`ec_combine`): several experts write the same token
rows, so an in-kernel scatter would either race or serialise the experts.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import target

LANES = 128
VMEM_BUDGET = 40 << 20  # tilings above this are rejected
VMEM_LIMIT = 48 << 20   # scoped VMEM the kernel requests (v5p has 64 MiB per TensorCore, v5e/v6e 128)
STEP_SECONDS = 0.35e-6  # per grid step overhead in the tile model


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _interpret(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False


@dataclasses.dataclass(frozen=True)
class Plan:
  tc: int
  tf: int
  vmem_bytes: int   # modelled VMEM: buffers, scratch and the float32 temporaries
  hbm_bytes: int    # HBM bytes the grid moves (weights re-fetched per C tile when tf < F)
  seconds: float    # max(flops / peak, bytes / bandwidth) + steps * STEP_SECONDS


def plan(groups: int, experts: int, capacity: int, d: int, f: int, in_bytes: int, out_bytes: int,
         tiles=None, chip=None, residuals: bool = False) -> Plan:
  """Tile sizes (tc, tf) for padded d, f (multiples of 128): the fastest modelled tiling within
  VMEM_BUDGET, or `tiles` if given. `residuals`: the kernel also writes the gathered rows and
  the gate/up projections (for the backward pass)."""
  chip = chip or target.chip()
  cap8 = _round_up(max(capacity, 1), 8)
  if tiles is not None:
    candidates = [tuple(tiles)]
  else:
    tcs = sorted({min(t, cap8) for t in (8, 16, 32, 64, 128, 256, 512)})
    tfs = [t for t in range(LANES, f + 1, LANES) if f % t == 0]
    candidates = [(tc, tf) for tc in tcs for tf in tfs]
  plans = []
  for tc, tf in candidates:
    c_pad = _round_up(capacity, tc)
    c_tiles, f_tiles = c_pad // tc, f // tf
    vmem = (2 * tc * d * in_bytes          # gathered rows, double buffer
            + tc * d * in_bytes            # rows as [tc, d]
            + 2 * 3 * d * tf * in_bytes    # w_gate, w_up, w_down blocks, double buffered
            + 2 * tc * LANES * 4           # gate weights [tc, 1] (lane padded), double buffered
            + 2 * tc * d * out_bytes       # output block, double buffered
            + tc * d * 4                   # float32 accumulator
            + 3 * tc * tf * 4              # gate / up / hidden temporaries
            + (2 * tc * (d + 2 * tf) * in_bytes if residuals else 0))  # residual output blocks
    weight_fetches = groups * experts * (1 if f_tiles == 1 else c_tiles * f_tiles)
    weight_bytes = weight_fetches * 3 * d * (f // f_tiles) * in_bytes
    rows = groups * experts * c_pad
    hbm = weight_bytes + rows * d * (in_bytes + out_bytes) + rows * 8  # + gate weights, indices
    if residuals:
      hbm += rows * (d + 2 * f) * in_bytes
    flops = 6 * rows * d * f
    steps = groups * experts * c_tiles * f_tiles
    seconds = max(flops / chip.bf16_flops, hbm / chip.hbm_bytes_per_s) + steps * STEP_SECONDS
    plans.append(Plan(tc, tf, vmem, hbm, seconds))
  fitting = [p for p in plans if p.vmem_bytes <= VMEM_BUDGET] or [min(plans, key=lambda p: p.vmem_bytes)]
  return min(fitting, key=lambda p: (p.seconds, -p.tc))


def _kernel(idx_ref, x_hbm, gates_ref, wg_ref, wu_ref, wd_ref, *refs, tc, d, precision, residuals):
  if residuals:
    out_ref, xs_out, gate_out, up_out, rows_ref, x_ref, acc_ref, sem = refs
  else:
    out_ref, rows_ref, x_ref, acc_ref, sem = refs
  g, e, ci, fi = (pl.program_id(i) for i in range(4))
  experts, c_tiles, f_tiles = pl.num_programs(1), pl.num_programs(2), pl.num_programs(3)
  c_pad = c_tiles * tc
  base = (g * experts + e) * c_pad

  def copy(row, slot, token):
    return pltpu.make_async_copy(x_hbm.at[g, token], rows_ref.at[slot, row], sem.at[slot])

  def gather(tile, slot):
    def body(row, carry):
      copy(row, slot, idx_ref[base + tile * tc + row]).start()
      return carry
    jax.lax.fori_loop(0, tc, body, 0)

  def wait(slot):
    def body(row, carry):
      copy(row, slot, 0).wait()  # every copy is one row: wait for tc of them
      return carry
    jax.lax.fori_loop(0, tc, body, 0)

  slot = ci % 2

  @pl.when(fi == 0)
  def _():
    @pl.when(ci == 0)
    def _():
      gather(ci, slot)

    @pl.when(ci + 1 < c_tiles)
    def _():
      gather(ci + 1, 1 - slot)

    wait(slot)
    x_ref[...] = rows_ref[slot].reshape(tc, d)
    acc_ref[...] = jnp.zeros_like(acc_ref)
    if residuals:
      xs_out[0, 0] = x_ref[...]

  xs = x_ref[...]
  gate = jnp.dot(xs, wg_ref[0], precision=precision, preferred_element_type=jnp.float32)
  up = jnp.dot(xs, wu_ref[0], precision=precision, preferred_element_type=jnp.float32)
  if residuals:
    gate_out[0, 0] = gate.astype(gate_out.dtype)
    up_out[0, 0] = up.astype(up_out.dtype)
  h = jax.nn.silu(gate) * up * gates_ref[0, 0].astype(jnp.float32)
  acc_ref[...] += jnp.dot(h.astype(wd_ref.dtype), wd_ref[0], precision=precision,
                          preferred_element_type=jnp.float32)

  @pl.when(fi == f_tiles - 1)
  def _():
    out_ref[0, 0] = acc_ref[...].astype(out_ref.dtype)


def _pad(x, axis, size):
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles", "interpret", "residuals"))
def ec_ffn(x_GxNxD, token_idx_GxExC, gates_GxExC, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, out_dtype=None,
           tiles=None, interpret=False, residuals=False):
  """[G, E, C, D]: each expert's SwiGLU over its C gathered tokens, hidden scaled by the gates.

  x, weights: one dtype (the matmul operand dtype); float32 accumulation. token_idx must lie in
  [0, N) (out-of-range rows are not checked in-kernel). With `residuals`, returns (ye, rows
  [G, E, C, D], gate projection [G, E, C, F], up projection [G, E, C, F]) in x's dtype: what the
  backward pass needs, written from VMEM instead of being recomputed.
  """
  groups, tokens, d = x_GxNxD.shape
  _, experts, capacity = token_idx_GxExC.shape
  f = w_gate_ExDxF.shape[2]
  dtype = x_GxNxD.dtype
  out_dtype = jnp.dtype(out_dtype or dtype)
  d_pad, f_pad = _round_up(d, LANES), _round_up(f, LANES)
  p = plan(groups, experts, capacity, d_pad, f_pad, jnp.dtype(dtype).itemsize, out_dtype.itemsize, tiles,
           residuals=residuals)
  tc, tf = p.tc, p.tf
  c_pad = _round_up(capacity, tc)
  x = _pad(x_GxNxD, 2, d_pad).reshape(groups, tokens, d_pad // LANES, LANES)
  idx = _pad(token_idx_GxExC.astype(jnp.int32), 2, c_pad).reshape(-1)
  gates = _pad(gates_GxExC, 2, c_pad)[..., None]
  w_gate = _pad(_pad(w_gate_ExDxF, 1, d_pad), 2, f_pad)
  w_up = _pad(_pad(w_up_ExDxF, 1, d_pad), 2, f_pad)
  w_down = _pad(_pad(w_down_ExFxD, 1, f_pad), 2, d_pad)
  precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
  rows = groups * experts * capacity
  out_shape = [jax.ShapeDtypeStruct((groups, experts, c_pad, d_pad), out_dtype)]
  out_specs = [pl.BlockSpec((1, 1, tc, d_pad), lambda g, e, c, fi, idx: (g, e, c, 0))]
  if residuals:
    out_shape += [jax.ShapeDtypeStruct((groups, experts, c_pad, d_pad), dtype),
                  jax.ShapeDtypeStruct((groups, experts, c_pad, f_pad), dtype),
                  jax.ShapeDtypeStruct((groups, experts, c_pad, f_pad), dtype)]
    out_specs += [pl.BlockSpec((1, 1, tc, d_pad), lambda g, e, c, fi, idx: (g, e, c, 0)),
                  pl.BlockSpec((1, 1, tc, tf), lambda g, e, c, fi, idx: (g, e, c, fi)),
                  pl.BlockSpec((1, 1, tc, tf), lambda g, e, c, fi, idx: (g, e, c, fi))]
  outs = pl.pallas_call(
      functools.partial(_kernel, tc=tc, d=d_pad, precision=precision, residuals=residuals),
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(groups, experts, c_pad // tc, f_pad // tf),
          in_specs=[
              pl.BlockSpec(memory_space=pl.ANY),  # x stays in HBM: rows are gathered by DMA
              pl.BlockSpec((1, 1, tc, 1), lambda g, e, c, fi, idx: (g, e, c, 0)),
              pl.BlockSpec((1, d_pad, tf), lambda g, e, c, fi, idx: (e, 0, fi)),
              pl.BlockSpec((1, d_pad, tf), lambda g, e, c, fi, idx: (e, 0, fi)),
              pl.BlockSpec((1, tf, d_pad), lambda g, e, c, fi, idx: (e, fi, 0)),
          ],
          out_specs=out_specs,
          scratch_shapes=[
              pltpu.VMEM((2, tc, d_pad // LANES, LANES), dtype),
              pltpu.VMEM((tc, d_pad), dtype),
              pltpu.VMEM((tc, d_pad), jnp.float32),
              pltpu.SemaphoreType.DMA((2,)),
          ],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT),
      cost_estimate=pl.CostEstimate(flops=6 * rows * d * f, transcendentals=rows * f, bytes_accessed=p.hbm_bytes),
      interpret=_interpret(interpret),
      name="ec_ffn",
  )(idx, x, gates, w_gate, w_up, w_down)
  ye = outs[0][:, :, :capacity, :d]
  if not residuals:
    return ye
  return ye, outs[1][:, :, :capacity, :d], outs[2][:, :, :capacity, :f], outs[3][:, :, :capacity, :f]
