"""sdlm-export: a trained run as a self-contained model directory (no optimizer state, no run dir).

  sdlm-export --workdir runs/demo --out exports/demo [--step 1000] [--dtype bfloat16|float32]
              [--formats orbax,safetensors,stablehlo] [--max_shard_bytes 5000000000]
              [--platforms cpu,cuda,tpu]

Writes config.json, tokenizer.model, params/ (orbax), model.safetensors (sharded with an index
above --max_shard_bytes) and forward.jax_export (the jax.export'ed forward pass); see
sdlm_jax/export/directory.py and the README's export section. Load it with
`sdlm_jax.load_pretrained(DIR)`, `sdlm-generate --model DIR` or `sdlm-eval --model DIR`.
Runs on one CPU host whatever mesh trained the run. Bad input is one line on stderr, exit 2.
"""

from absl import app, flags

from sdlm_jax.cli import common

PROG = "sdlm-export"

_WORKDIR = common.define_workdir(required=True)
flags.declare_key_flag("workdir")  # defined in common: listed in --help with the flags below
_OUT = flags.DEFINE_string("out", None, "Export directory to create (new or empty).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_DTYPE = flags.DEFINE_string("dtype", None, "Param dtype of the export: bfloat16 | float32 (default: the "
                             "trained model.param_dtype).")
_FORMATS = flags.DEFINE_string("formats", "orbax,safetensors,stablehlo", "Comma-separated formats to write: "
                               "orbax (params/), safetensors (model.safetensors), stablehlo (forward.jax_export).")
_MAX_SHARD = flags.DEFINE_integer("max_shard_bytes", 5 * 10**9, "Largest safetensors file; above it the "
                                  "tensors are sharded with model.safetensors.index.json.")
_PLATFORMS = flags.DEFINE_string("platforms", "cpu,cuda,tpu", "Platforms forward.jax_export is lowered for: "
                                 "cpu, cuda, rocm, tpu, comma-separated.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from sdlm_jax.export import directory  # pylint: disable=import-outside-toplevel
  config = directory.export_run(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
                                formats=_FORMATS.value, max_shard_bytes=_MAX_SHARD.value, platforms=_PLATFORMS.value)
  info = config["export"]
  print(f"exported step {info['step']} of {info['workdir']} ({info['dtype']}) to {_OUT.value}: "
        + ", ".join(f for files in info["files"].values() for f in files) + ", config.json, tokenizer.model")


def run():
  common.run_main(main, PROG)


if __name__ == "__main__":
  run()
