"""sdlm-upcycle: initialise an MoE run from a trained dense run (sparse upcycling).

  sdlm-upcycle --from runs/dense --config configs/demo.py --out runs/upcycled [--step N]
  sdlm-train --config configs/demo.py --workdir runs/upcycled --config.train.init_from=runs/upcycled/upcycled

Every routed expert starts from the dense FFN: a copy of it, or, for experts narrower than the
dense FFN, one shard of its hidden units, with the shared experts taking the first units and
the router taking whole copies at a time (sdlm_jax/upcycle.py), so the upcycled model computes
the dense model's function at step 0 (exactly under token choice; under expert choice for the
tokens some expert picks). Attention, norms and embeddings are copied. The weights are written
as an export directory OUT/upcycled (config.json, tokenizer.model, model.safetensors) that
`--config.train.init_from` starts a new run from. The MoE config must keep the dense run's
backbone (vocab, layers, widths, heads) and data; bad input is one line on stderr, exit 2.
"""

from absl import app, flags

from sdlm_jax.cli import common

PROG = "sdlm-upcycle"
UPCYCLED_DIR = "upcycled"

_CONFIG = common.define_config()
_FROM = flags.DEFINE_string("from", None, "Run directory of the trained dense model (local or gs://).",
                            required=True)
_OUT = flags.DEFINE_string("out", None, f"New run directory; the weights go to OUT/{UPCYCLED_DIR}.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of the dense run (default: the latest).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the router's initial weights.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  # pylint: disable=import-outside-toplevel
  import json

  import jax
  from flax import nnx

  from sdlm_jax import config as config_lib
  from sdlm_jax import storage, upcycle
  from sdlm_jax.export import directory, safetensors_io, tensor_names
  from sdlm_jax.train import restore
  from sdlm_jax.train.state import init_model
  # pylint: enable=import-outside-toplevel
  moe_cfg = config_lib.validate(_CONFIG.value.copy_and_resolve_references())
  directory.check_workdir(_FROM.value)
  out = storage.path(_OUT.value) / UPCYCLED_DIR
  if out.exists() and any(out.iterdir()):
    raise upcycle.UpcycleError(f"--out={_OUT.value}: {out} exists and is not empty; choose a new --out")
  mesh = restore.single_device_mesh()
  dense_cfg, tokenizer, _, dense_params, _, step = restore.restore_run(_FROM.value, _STEP.value, mesh)
  upcycle.check_backbone(dense_cfg.model, moe_cfg.model)
  dense_flat = tensor_names.flatten(jax.device_get(nnx.to_pure_dict(dense_params)), dense_cfg.model)
  moe_params = nnx.state(init_model(moe_cfg, mesh), nnx.Param)
  moe_flat = tensor_names.flatten(jax.device_get(nnx.to_pure_dict(moe_params)), moe_cfg.model)
  flat = upcycle.upcycle(dense_flat, dense_cfg.model, moe_flat, moe_cfg.model, seed=_SEED.value)

  out.mkdir(parents=True, exist_ok=True)
  files = safetensors_io.write(flat, out, metadata={"format_name": directory.FORMAT_NAME, "step": str(step),
                                                    "upcycled_from": storage.location(_FROM.value)})
  storage.copy_file(tokenizer.model_path, out / directory.TOKENIZER_FILE)
  config = directory.export_config(moe_cfg, tokenizer, workdir=_FROM.value, step=step,
                                   dtype=moe_cfg.model.param_dtype, files={"safetensors": files})
  (out / directory.CONFIG_FILE).write_text(json.dumps(config, indent=2))
  shards = upcycle.shard_count(dense_cfg.model, moe_cfg.model)
  print(f"upcycled step {step} of {_FROM.value} into {out}: {moe_cfg.model.moe.num_experts} experts "
        f"({'copies of' if shards == 1 else f'{shards} shards per copy of'} the dense FFN), "
        f"{moe_cfg.model.moe.num_shared_experts} shared")
  caveat = upcycle.breaks_equality(moe_cfg.model)
  if caveat:
    print(f"note: the upcycled model's function differs from the dense model's where {caveat}")
  print(f"train it with: sdlm-train --config <the same --config> --workdir {_OUT.value} "
        f"--config.train.init_from={out}")


def run():
  common.run_main(main, PROG)


if __name__ == "__main__":
  run()
