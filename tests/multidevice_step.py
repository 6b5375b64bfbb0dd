"""One train-step forward/backward on a mesh of fake CPU devices, printed as JSON.

Run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (which must be set before jax starts).
  python tests/multidevice_step.py VARIANT DATA,FSDP,EXPERT,MODEL,RULES [...]
prints one JSON line per mesh.
"""

import json
import sys

import jax
import numpy as np

from sdlm_jax.config_files import repo_module
from sdlm_jax.parallel.mesh import make_mesh
from sdlm_jax.train import program as program_lib

demo = repo_module("demo")


def main(variant, data, fsdp, expert, model, rules):
  cfg = demo.get_config(f"{variant},smoke")
  cfg.model.dtype = "float32"
  cfg.model.num_kv_heads = 2  # shardable over a model axis of 2
  cfg.train.batch_size = 16
  cfg.mesh.update(data=int(data), fsdp=int(fsdp), expert=int(expert), model=int(model), rules=rules)
  num = int(data) * int(fsdp) * int(expert) * int(model)
  program = program_lib.build(cfg, make_mesh(cfg.mesh, jax.devices()[:num]))
  rng = np.random.default_rng(0)
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  seg = np.ones(shape, np.int32)
  seg[3, 20:] = 0
  batch = program.global_batch({"tokens": rng.integers(5, cfg.model.vocab_size, shape, dtype=np.int32),
                                "segment_ids": seg,
                                "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()})
  with program.context():
    (loss, _), grads = program.grads(program.params, batch, program.step_rng(0))
    hlo = program.grads.lower(program.params, batch, program.step_rng(0)).compile().as_text()
  flat = {"/".join(map(str, path)): np.asarray(jax.device_get(g)).ravel()[:64].tolist()
          for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  shardings = sorted({str(p.sharding.spec) for p in jax.tree.leaves(program.params)})
  print(json.dumps({"loss": float(loss), "grads": flat, "param_specs": shardings,
                    "all_to_all": hlo.count(" all-to-all(")}))


if __name__ == "__main__":
  for spec in sys.argv[2:]:
    main(sys.argv[1], *spec.split(","))
