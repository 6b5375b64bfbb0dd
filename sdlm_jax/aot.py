"""Ahead-of-time fit check: compile the real train step for a TPU slice on a CPU host.

libtpu compiles for a topology description (jax.experimental.topologies) without a TPU, so
the program a pod slice would run is built here: the same config, mesh, logical-axis rules,
sharded params and optimizer state, and the same jitted step as sdlm-train. From it come
  - HBM per chip: arguments (params, optimizer state, batch), temporaries and their sum,
    against the chip's capacity (the check fails when it does not fit);
  - XLA's FLOPs per chip against the analytic model FLOPs (sdlm_jax.scaling.flops);
  - XLA's cost-model step time (per chip, roofline-like), the MFU and tokens/s/chip it implies;
  - the collectives in the compiled program.

Two things about the cost model shape what is compiled. It counts a `scan` body once, so the
time is read off compiles with the layers unrolled (`model.scan_layers=False`, the same math)
at one and two layers of each kind, extrapolated linearly to the full depth (an unrolled
28-layer compile takes ~10 CPU minutes); the memory is the full scanned program's, which is
what training runs. It prices two things at -1 s each, scatters offloaded to the SparseCore
and sliced VMEM prefetches (v5e, v6e), so the timing compiles turn both off
(ESTIMATE_OPTIONS): scatters are then priced on the TensorCore. And as a loop body counts
once, they also turn off windowed einsums (libtpu's loops over a gathered weight's shards).
"""

import dataclasses
import math
import re

from pallas_kernels import target
from pallas_kernels.aot import cost_analysis as cost
from sdlm_jax import config as config_lib
from sdlm_jax.model.stacks import layer_stacks
from sdlm_jax.parallel.mesh import make_mesh, mesh_shape, num_slices_of
from sdlm_jax.parallel.rules import MESH_AXES
from sdlm_jax.scaling.flops import flops_per_token, param_counts
from sdlm_jax.train import program as program_lib

# Compiler options of the timing compiles. The TPU cost model prices a scatter offloaded to the
# SparseCore, and each sliced prefetch into VMEM (v5e, v6e), at -1 s; without either the
# program is the TensorCore-only one it can price (v5p: identical estimates, no slicing there).
# It also counts a loop body once, and libtpu turns a matmul whose weights are gathered or whose
# output is reduce-scattered (FSDP beside expert or tensor parallelism) into a windowed einsum:
# a loop over the shards, overlapping each step's transfer with the previous step's matmul. The
# timing compiles keep those matmuls whole, so every FLOP is counted (with mesh.expert=8 on
# v5p-128 the loops hid 22% of the step's FLOPs).
ESTIMATE_OPTIONS = {"xla_tpu_enable_offloading_scatter_to_sparsecore": "false",
                    "xla_tpu_sliced_prefetch_max_slices": "0",
                    "xla_tpu_enable_windowed_einsum_for_all_gather": "false",
                    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": "false"}
# Accelerator types count TensorCores on v4/v5p (2 per chip) and chips on v5e/v6e.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TORUS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                "collective-permute")
# A synchronous collective or the -done half of an async one (the -start half is skipped so
# each transfer counts once); group 1 is the result type (an array or a tuple of arrays).
_COLLECTIVE_RE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(_COLLECTIVES) + r")(?:-done)?\(")
# libtpu overlaps a collective with compute by copying it into a chain of fusions (its start,
# the continuations that run beside other work, its done), each copy tagged with the chain's id:
# one transfer, counted once.
_CHAIN_RE = re.compile(r'chain_id="(\d+)"')
_CHANNEL_RE = re.compile(r"channel_id=(\d+)")
_SHAPE_RE = re.compile(r"(bf16|f32|f16|s32|u32|s8|u8|pred|f64|s64)\[([\d,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice to compile for: libtpu's topology name, chip kind, chip count, slices."""
  topology: str
  chip: str
  chips: int
  num_slices: int = 1

  @property
  def name(self) -> str:
    cores = self.chips * _CORES_PER_CHIP[self.chip]
    base = f"{self.chip}-{cores}"
    return base if self.num_slices == 1 else f"{self.num_slices}x{base}"

  @property
  def hosts(self) -> int:
    """Worker VMs (jax processes): 4 chips each, 8 on single-host v5e/v6e boards."""
    per_host = 8 if self.chip in ("v5e", "v6e") and self.chips == 8 else min(4, self.chips)
    return self.num_slices * max(1, self.chips // per_host)


def parse_slice(name: str, num_slices: int = 1) -> Slice:
  """'v5p-128' (accelerator type), 'v6e-64', 'v5litepod-16', or 'v5p:4x4x4' (topology)."""
  allowed = "an accelerator type such as v5p-128, v6e-64, v5litepod-16, v4-32, or a topology such as v5p:4x4x4"
  if num_slices < 1:
    raise ValueError(f"num_slices={num_slices}; allowed values: >= 1")
  if ":" in name:
    chip, dims = name.split(":", 1)
    chip = _ALIASES.get(chip, chip)
    if chip not in _CORES_PER_CHIP or not re.fullmatch(r"\d+(x\d+)+", dims):
      raise ValueError(f"topology={name!r}; allowed values: {allowed}")
    return Slice(f"{chip}:{dims}", chip, math.prod(int(d) for d in dims.split("x")), num_slices)
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
  chip = _ALIASES.get(match.group(1), match.group(1)) if match else None
  if chip not in _CORES_PER_CHIP:
    raise ValueError(f"topology={name!r}; allowed values: {allowed}")
  cores = int(match.group(2))
  chips = cores // _CORES_PER_CHIP[chip]
  shapes = _TORUS_3D if chip in ("v4", "v5p") else _TORUS_2D
  if cores % _CORES_PER_CHIP[chip] or chips not in shapes:
    sizes = sorted(n * _CORES_PER_CHIP[chip] for n in shapes)
    raise ValueError(f"topology={name!r}: no {chip} slice of that size; allowed sizes: {sizes}")
  return Slice(f"{chip}:{shapes[chips]}", chip, chips, num_slices)


def slice_devices(tpu_slice: Slice) -> list:
  """Compile-only TPU devices of the slice(s), from libtpu's topology description."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {"num_slices": tpu_slice.num_slices} if tpu_slice.num_slices > 1 else {}
  return list(topologies.get_topology_desc(platform="tpu", topology_name=tpu_slice.topology, **kwargs).devices)


def compile_train_step(cfg, devices, chip: str, compiler_options=None):
  """The compiled train step of `cfg` on `devices` (a mesh is built from cfg.mesh)."""
  with target.compile_for("tpu", chip):
    program = program_lib.build(cfg, make_mesh(cfg.mesh, devices), abstract=True)
    return program.lower().compile(compiler_options=compiler_options)


def hbm(compiled) -> dict:
  """Per-chip bytes: arguments, outputs not aliased to arguments, temporaries, total."""
  mem = compiled.memory_analysis()
  outputs = mem.output_size_in_bytes - mem.alias_size_in_bytes
  return {"arguments": mem.argument_size_in_bytes, "outputs": outputs, "temporaries": mem.temp_size_in_bytes,
          "total": mem.argument_size_in_bytes + outputs + mem.temp_size_in_bytes}


def collectives(compiled) -> dict[str, tuple[int, int]]:
  """{collective: (count, bytes of their results)} in the compiled per-chip program's text, each
  transfer once (the copies of one in an async chain are one); a loop body (the scanned layers)
  counts once, not once per iteration."""
  out, chains = {}, set()
  for line in compiled.as_text().splitlines():
    match = _COLLECTIVE_RE.search(line)
    if not match:
      continue
    chain, channel = _CHAIN_RE.search(line), _CHANNEL_RE.search(line)
    if chain:
      key = (match.group(2), match.group(1), chain.group(1), channel and channel.group(1))
      if key in chains:
        continue
      chains.add(key)
    size = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in _SHAPE_RE.findall(match.group(1)))
    count, total = out.get(match.group(2), (0, 0))
    out[match.group(2)] = (count + 1, total + size)
  return out


def _with_depth(cfg, num_dense: int, num_moe: int):
  """cfg with its layers unrolled and `num_dense` dense then `num_moe` MoE layers."""
  cfg = cfg.copy_and_resolve_references()
  cfg.model.scan_layers = False
  cfg.model.num_layers = num_dense + num_moe
  if cfg.model.moe.num_experts:
    cfg.model.moe.first_k_dense = num_dense
  return cfg


def depth_probes(cfg) -> list[tuple[int, int]]:
  """(dense, MoE) layer counts to compile so that the cost is linear in each: a base of one
  layer of each kind the model has, plus one more layer of each kind."""
  stacks = dict((moe, n) for n, moe in layer_stacks(cfg.model))
  base = (min(stacks.get(False, 0), 1), min(stacks.get(True, 0), 1))
  probes = [base]
  for moe in sorted(stacks):
    if stacks[moe] > 1:
      probes.append((base[0] + (not moe), base[1] + moe))
  return probes


def estimate_cost(cfg, devices, chip: str) -> dict:
  """XLA's cost-model step time and FLOPs of cfg's full depth, unrolled, and the time of one
  more layer of each kind the model has stacked more than once ({"dense"|"moe": seconds}).

  The cost of an unrolled program is linear in the number of layers of each kind (the
  layers are identical; embedding, head and optimizer are fixed), so it is read off small
  unrolled compiles (see depth_probes) and extrapolated: exact up to XLA's fusion choices at
  layer boundaries (for the 1.7B dense seed: 0.534 s against 0.529 s from a full 28-layer
  unrolled compile, FLOPs identical).
  """
  stacks = dict((moe, n) for n, moe in layer_stacks(cfg.model))
  costs = {probe: cost(compile_train_step(_with_depth(cfg, *probe), devices, chip, ESTIMATE_OPTIONS))
           for probe in depth_probes(cfg)}
  probes = list(costs)
  base = probes[0]
  out = {"layer_seconds": {}}
  for key in ("optimal_seconds", "flops"):
    value = float(costs[base][key])
    for probe in probes[1:]:
      moe = probe[1] > base[1]
      slope = float(costs[probe][key]) - float(costs[base][key])
      value += slope * (stacks[moe] - (base[1] if moe else base[0]))
      if key == "optimal_seconds":
        out["layer_seconds"]["moe" if moe else "dense"] = slope
    out[key] = value
  return out


def fit_report(cfg, tpu_slice: Slice, *, estimate: bool = True, devices=None) -> dict:
  """Compiles cfg's train step for the slice and returns the fit/speed figures (see module doc)."""
  devices = devices if devices is not None else slice_devices(tpu_slice)
  config_lib.validate(cfg, len(devices), tpu_slice.hosts, num_slices_of(devices), platform="tpu")
  chip = target.CHIPS[tpu_slice.chip]
  compiled = compile_train_step(cfg, devices, tpu_slice.chip)
  memory = hbm(compiled)
  counts = param_counts(cfg.model)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  report = {
      "config": cfg, "slice": tpu_slice, "hbm": memory, "hbm_capacity": chip.hbm_bytes,
      "fits": memory["total"] <= chip.hbm_bytes, "params_total": counts["total"], "params_active": counts["active"],
      "tokens_per_step": tokens,
      "analytic_flops_per_chip": flops_per_token(cfg.model, cfg.data.seq_len) * tokens / len(devices),
      "collectives": collectives(compiled),
  }
  if estimate:
    timed = estimate_cost(cfg, devices, tpu_slice.chip)
    seconds = timed["optimal_seconds"]
    report.update(compiled_flops_per_chip=timed["flops"], step_seconds=seconds if seconds > 0 else float("nan"),
                  layer_seconds=timed["layer_seconds"])
    report["mfu"] = report["analytic_flops_per_chip"] / (chip.bf16_flops * report["step_seconds"])
    report["tokens_per_sec_per_chip"] = tokens / len(devices) / report["step_seconds"]
  return report


def _gib(n) -> str:
  return f"{n / 2**30:.2f} GiB"


def format_report(report: dict) -> str:
  """The human-readable report sdlm-aot prints."""
  s, m, mem = report["slice"], report["config"].model, report["hbm"]
  lines = [
      f"slice {s.name} ({s.topology}{f' x {s.num_slices} slices' if s.num_slices > 1 else ''}, "
      f"{s.chips * s.num_slices} chips, {s.hosts} hosts)",
      f"model: {report['params_total'] / 1e9:.2f}B params, {report['params_active'] / 1e9:.2f}B active; "
      f"batch {report['config'].train.batch_size} x {report['config'].data.seq_len} "
      f"= {report['tokens_per_step']:,} tokens/step",
      f"mesh: {_mesh_sizes(report)}, rules {report['config'].mesh.rules!r}, "
      f"scan_layers={m.scan_layers}, remat={m.remat!r}",
      "HBM per chip: " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items())
      + f" of {_gib(report['hbm_capacity'])} ({'fits' if report['fits'] else 'DOES NOT FIT'})",
  ]
  if "step_seconds" in report:
    lines += [
        f"FLOPs per chip: compiled {report['compiled_flops_per_chip'] / 1e12:.2f} T, analytic "
        f"{report['analytic_flops_per_chip'] / 1e12:.2f} T (ratio "
        f"{report['compiled_flops_per_chip'] / report['analytic_flops_per_chip']:.3f})",
        f"estimated step {report['step_seconds']:.3f} s (XLA cost model, per chip): MFU {100 * report['mfu']:.1f}%, "
        f"{report['tokens_per_sec_per_chip']:,.0f} tokens/s/chip" if math.isfinite(report["step_seconds"]) else
        "estimated step: not available (XLA's cost model returned a negative time for this chip)",
    ]
    if report["layer_seconds"]:
      lines.append("per layer: " + ", ".join(f"{kind} {1e3 * t:.1f} ms" for kind, t in report["layer_seconds"].items()))
  lines.append("collectives: " + (", ".join(f"{name} x{n} ({_gib(b)})" for name, (n, b) in
                                            sorted(report["collectives"].items())) or "none"))
  return "\n".join(lines)


def _mesh_sizes(report: dict) -> dict[str, int]:
  s = report["slice"]
  return dict(zip(MESH_AXES, mesh_shape(report["config"].mesh, s.chips * s.num_slices, s.num_slices)))
