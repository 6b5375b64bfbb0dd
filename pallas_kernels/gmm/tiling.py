"""Tile sizes for the TPU grouped matmuls, chosen by an analytic roofline model.

There is no TPU to autotune on, so the default tiling minimises a model of the kernel's time:
  time = max(flops / peak, HBM bytes / bandwidth) + grid steps * 0.35 us
where flops include the rows wasted at group boundaries (a row tile shared by two groups is
multiplied once per group), HBM bytes count every block the pipeline re-fetches given the grid
order, and the per-step overhead is the pipeline's fixed cost per grid step. The model also
halves the speed when the "parallel" grid axes cannot be split over a megacore chip's two
TensorCores, and rejects tiles whose double-buffered blocks plus accumulator exceed
`VMEM_BUDGET` (the kernels request `VMEM_LIMIT` of scoped VMEM, within every chip's VMEM).
Callers can always pass `tiling=(tm, tk, tn)` instead.
"""

import dataclasses
import math

from pallas_kernels import target

STEP_SECONDS = 0.35e-6
VMEM_BUDGET = 24 << 20
VMEM_LIMIT = 32 << 20
TM_CHOICES = (128, 256, 512)
MAX_KN_TILE = 2048


@dataclasses.dataclass(frozen=True)
class Plan:
  """A tiling and what the model expects of it (for CostEstimate and the benchmark)."""
  tm: int
  tk: int
  tn: int
  hbm_bytes: int
  vmem_bytes: int
  seconds: float


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def lane_tiles(dim: int) -> list[int]:
  """Multiples of 128 that divide `dim` (already a 128-multiple), up to MAX_KN_TILE."""
  return [t for t in range(128, min(dim, MAX_KN_TILE) + 1, 128) if dim % t == 0]


def row_tiles(m: int, sublane: int) -> list[int]:
  small = -(-m // sublane) * sublane
  return sorted({min(tm, small) for tm in TM_CHOICES})


def expected_visits(m: int, groups: int, tm: int) -> int:
  """Row tiles visited when every group is non-empty and no boundary is tile-aligned."""
  return cdiv(m, tm) + groups - 1


def gmm_plan(m, k, n, groups, in_bytes, out_bytes, tm, tk, tn, chip) -> Plan:
  """Model of the gmm kernel, grid (n/tn, visits, k/tk), rhs block (g, kk, j)."""
  visits = expected_visits(m, groups, tm)
  n_t, k_t = n // tn, k // tk
  lhs = n_t * visits * tm * k * in_bytes
  # rhs is re-fetched each visit when k is split; otherwise only when the group changes.
  rhs = (groups if k_t == 1 else visits) * k * n * in_bytes
  out = m * n * out_bytes
  vmem = 2 * (tm * tk + tk * tn) * in_bytes + 2 * tm * tn * out_bytes + tm * tn * 4
  return _finish(tm, tk, tn, 2 * visits * tm * k * n, lhs + rhs + out, vmem, n_t * visits * k_t, n_t, chip)


def tgmm_plan(m, k, n, groups, in_bytes, out_bytes, tm, tk, tn, chip) -> Plan:
  """Model of the tgmm kernel, grid (k/tk, n/tn, visits), out block (g, kk, j)."""
  visits = expected_visits(m, groups, tm)
  n_t, k_t = n // tn, k // tk
  hbm = n_t * visits * tm * k * in_bytes + k_t * visits * tm * n * in_bytes + groups * k * n * out_bytes
  vmem = 2 * tm * (tk + tn) * in_bytes + 2 * tk * tn * out_bytes + tk * tn * 4
  return _finish(tm, tk, tn, 2 * visits * tm * k * n, hbm, vmem, k_t * n_t * visits, k_t * n_t, chip)


def _finish(tm, tk, tn, flops, hbm, vmem, steps, parallel_blocks, chip) -> Plan:
  seconds = max(flops / chip.bf16_flops, hbm / chip.hbm_bytes_per_s) + steps * STEP_SECONDS
  if chip.cores > 1 and parallel_blocks < chip.cores:
    seconds *= chip.cores / parallel_blocks
  return Plan(tm, tk, tn, int(hbm), int(vmem), seconds)


def choose(kind: str, m: int, k: int, n: int, groups: int, in_bytes: int, out_bytes: int,
           tiling=None) -> Plan:
  """Best modelled tiling for `kind` ("gmm" or "tgmm"); k and n are 128-multiples."""
  model = {"gmm": gmm_plan, "tgmm": tgmm_plan}[kind]
  chip = target.chip()
  sublane = 8 * max(1, 4 // in_bytes)
  if tiling is not None:
    tm, tk, tn = tiling
    tm = min(tm, row_tiles(m, sublane)[-1])
    tk, tn = math.gcd(tk, k), math.gcd(tn, n)
    if tm % sublane or tk % 128 or tn % 128:
      raise ValueError(f"tiling={tiling}: tm must be a multiple of {sublane}, tk and tn of 128")
    return model(m, k, n, groups, in_bytes, out_bytes, tm, tk, tn, chip)
  plans = [model(m, k, n, groups, in_bytes, out_bytes, tm, tk, tn, chip)
           for tm in row_tiles(m, sublane) for tk in lane_tiles(k) for tn in lane_tiles(n)]
  fitting = [p for p in plans if p.vmem_bytes <= VMEM_BUDGET] or [min(plans, key=lambda p: p.vmem_bytes)]
  return min(fitting, key=lambda p: (p.seconds, p.vmem_bytes))
