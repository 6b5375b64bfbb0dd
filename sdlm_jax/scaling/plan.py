"""Planning: hardware time as compute, and IsoFLOP sweeps written as config files.

Hardware: C = chips x peak bf16 FLOP/s (pallas_kernels.target.CHIPS) x MFU x seconds, with the
slice named as sdlm-aot names it (sdlm_jax.aot.parse_slice).

IsoFLOP sweep: one config per (budget, size) from a base config. Sizes come from one family
(the depth/width rule): with the base's head_dim, `layers` layers have `layers` heads, so
d_model = layers x head_dim (aspect ratio d_model / num_layers = head_dim); the kv-head group,
the FFN width ratios (mlp_dim / d_model, expert_mlp_dim / d_model), the experts, top_k, the
vocabulary, the sequence length and the batch are the base's. The demo config (4 layers of 4
heads x 64 = 256, FFN 768 = 3 x 256, experts 256 = 1 x 256) is on its family. Per budget, the K
depths whose active parameter counts are nearest to K targets spread log-evenly over a factor
`span` around a published law's N_opt(C) (Quokka for a diffusion base, Chinchilla for a causal
one) are chosen. Steps are set so the exact FLOPs count of `sdlm_jax.scaling.flops` (matmuls
incl. the LM head and the attention scores, x3 for training) hits the budget:
steps = round(C / (flops_per_token x batch x seq_len)); not 6ND, which leaves out attention.

The configs are Python config files (what `sdlm-train --config FILE` loads, `--config.a.b=v`
overrides included): each starts from `get_base_config()` and sets the fields that differ
from it, so a file reads as the sweep point's whole difference from the defaults. A
`sweep.json` manifest lists every point (file, budget, size, N, D, steps, FLOPs).
"""

import dataclasses
import json
import math
import os

import numpy as np

from sdlm_jax import config_files
from sdlm_jax.defaults import get_base_config
from sdlm_jax.scaling import laws
from sdlm_jax.scaling.flops import flops_per_token, param_counts

SECONDS_PER_DAY = 86_400
MAX_LAYERS = 96
MIN_STEPS = 10           # a shorter run is mostly warmup and says nothing about its size
MANIFEST = "sweep.json"


def hardware_compute(accelerator: str, days: int | float, mfu: float, num_slices: int = 1) -> dict:
  """Training FLOPs of `days` on a TPU slice (e.g. v5p-256) at model FLOPs utilisation `mfu`."""
  if not days > 0:
    raise ValueError(f"--days={days}; allowed values: a number of days > 0")
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu={mfu}; allowed values: 0 < mfu <= 1")
  from pallas_kernels.target import CHIPS  # pylint: disable=import-outside-toplevel
  from sdlm_jax.aot import parse_slice  # pylint: disable=import-outside-toplevel  (imports jax)
  tpu_slice = parse_slice(accelerator, num_slices)
  chips = tpu_slice.chips * tpu_slice.num_slices
  peak = CHIPS[tpu_slice.chip].bf16_flops
  return {"slice": tpu_slice.name, "chip": tpu_slice.chip, "chips": chips, "peak_flops_per_chip": peak, "mfu": mfu,
          "days": days, "compute": chips * peak * mfu * days * SECONDS_PER_DAY}


# ---------------------------------------------------------------- configs

def load_config_file(spec: str):
  """A config from 'FILE[:ARG]' the way sdlm-train's --config reads it: get_config(ARG)."""
  try:
    return config_files.load(spec)
  except FileNotFoundError:
    raise ValueError(f"--base={spec!r}: no such file; allowed values: a config file[:arg], "
                     "e.g. configs/demo.py:dense") from None


def _leaves(d: dict, prefix=()) -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_leaves(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


_HEADER = '''"""{doc}"""

from sdlm_jax.defaults import get_base_config


def get_config(arg=None):
  del arg  # a sweep point has no variants
  c = get_base_config()
'''


def config_source(cfg, doc: str) -> str:
  """Python config-file text that rebuilds `cfg` as get_base_config() plus assignments."""
  defaults = _leaves(get_base_config().to_dict())
  lines = [f"  c.{'.'.join(path)} = {value!r}" for path, value in _leaves(cfg.to_dict()).items()
           if path not in defaults or defaults[path] != value or type(defaults[path]) is not type(value)]
  return _HEADER.format(doc=doc) + "\n".join(lines) + ("\n" if lines else "") + "  return c\n"


# ---------------------------------------------------------------- the size family

def kv_group(base_model) -> int:
  return base_model.num_heads // base_model.num_kv_heads


def family_model(base_model, layers: int):
  """The base's model scaled to `layers` layers by the depth/width rule (module docstring)."""
  group = kv_group(base_model)
  if layers < 1 or layers % group:
    raise ValueError(f"layers={layers}; allowed values: multiples of the base's kv-head group {group}")
  m = base_model.copy_and_resolve_references()
  d_model = layers * base_model.head_dim
  m.num_layers = layers
  m.num_heads = layers
  m.num_kv_heads = layers // group
  m.d_model = d_model
  m.mlp_dim = round(d_model * base_model.mlp_dim / base_model.d_model)
  m.moe.expert_mlp_dim = round(d_model * base_model.moe.expert_mlp_dim / base_model.d_model)
  m.moe.first_k_dense = min(base_model.moe.first_k_dense, layers)
  return m


def family(base_model) -> list[tuple[int, int]]:
  """(layers, active parameters) of every family member up to MAX_LAYERS layers."""
  group = kv_group(base_model)
  return [(layers, param_counts(family_model(base_model, layers))["active"])
          for layers in range(group, MAX_LAYERS + 1, group)]


def choose_depths(members, prior_params: float, count: int, span: float) -> list[int]:
  """`count` distinct depths nearest (in ln N) to targets log-spread over `span` around the prior."""
  if count > len(members):
    raise ValueError(f"--sizes={count}; allowed values: 1..{len(members)} (the family's members)")
  targets = prior_params * np.power(span, np.linspace(-0.5, 0.5, count)) if count > 1 else [prior_params]
  chosen = []
  for target in targets:
    free = [(abs(math.log(n / target)), layers) for layers, n in members if layers not in chosen]
    chosen.append(min(free)[1])
  return sorted(chosen)


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  budget: float
  layers: int
  d_model: int
  params: int              # active parameters (what a token uses; includes the embedding)
  flops_per_token: float   # exact training FLOPs per token (sdlm_jax.scaling.flops)
  steps: int
  tokens: int
  flops: float             # steps x batch x seq_len x flops_per_token (the budget up to rounding)

  @property
  def name(self) -> str:
    return f"C{budget_tag(self.budget)}_L{self.layers:02d}"


def budget_tag(budget: float) -> str:
  return f"{budget:.3g}".replace("+", "")


def plan_sweep(base_cfg, budgets, sizes: int, span: float = 10.0):
  """The sweep points (budget-major, then by size) and the (budget, layers, why) left out."""
  if sizes < 1:
    raise ValueError(f"--sizes={sizes}; allowed values: an integer >= 1")
  if not span > 1:
    raise ValueError(f"--span={span}; allowed values: a ratio > 1")
  law = laws.LAWS[laws.FAMILY_LAW["ar" if base_cfg.model.causal else "dlm"]]
  members = family(base_cfg.model)
  seq_len, batch = base_cfg.data.seq_len, base_cfg.train.batch_size
  points, skipped = [], []
  for budget in budgets:
    prior, _ = law.frontier.at_compute(budget)
    for layers in choose_depths(members, float(prior), sizes, span):
      m = family_model(base_cfg.model, layers)
      per_token = flops_per_token(m, seq_len, training=True)
      steps = round(budget / (per_token * batch * seq_len))
      if steps < MIN_STEPS:
        skipped.append((budget, layers, f"{steps} steps < {MIN_STEPS}"))
        continue
      tokens = steps * batch * seq_len
      points.append(SweepPoint(budget, layers, m.d_model, param_counts(m)["active"], per_token, steps, tokens,
                               tokens * per_token))
  return points, skipped


def point_config(base_cfg, point: SweepPoint):
  cfg = base_cfg.copy_and_resolve_references()
  cfg.model = family_model(base_cfg.model, point.layers)
  cfg.train.num_steps = point.steps
  cfg.train.optimizer.warmup_steps = min(base_cfg.train.optimizer.warmup_steps, point.steps // 10)
  return cfg


def write_sweep(base_cfg, points, out_dir: str, base_name: str) -> str:
  """Writes one config file per point and the manifest; returns the manifest's path."""
  from sdlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel  (imports jax)
  os.makedirs(out_dir, exist_ok=True)
  batch, seq_len = base_cfg.train.batch_size, base_cfg.data.seq_len
  entries = []
  for p in points:
    cfg = config_lib.validate(point_config(base_cfg, p))
    doc = (f"IsoFLOP sweep point: C = {p.budget:.3g} FLOPs, {p.layers} layers x {p.d_model} wide "
           f"(N = {p.params:,} active parameters),\nD = {p.tokens:,} tokens in {p.steps:,} steps of {batch} x "
           f"{seq_len} tokens; exact FLOPs {p.flops:.4g} (sdlm_jax.scaling.flops).\n"
           f"Written by `sdlm-scaling isoflop` from {base_name}; train with\n"
           f"  sdlm-train --config {p.name}.py --workdir runs/{p.name}\n")
    path = os.path.join(out_dir, f"{p.name}.py")
    with open(path, "w") as f:
      f.write(config_source(cfg, doc))
    entries.append({"name": p.name, "config": f"{p.name}.py", **dataclasses.asdict(p),
                    "flops_6nd": laws.FLOPS_PER_PARAM_TOKEN * p.params * p.tokens})
  manifest = os.path.join(out_dir, MANIFEST)
  with open(manifest, "w") as f:
    json.dump({"base": base_name, "rule": "layers = heads, d_model = layers x head_dim; FFN ratios of the base",
               "points": entries}, f, indent=2)
  return manifest
