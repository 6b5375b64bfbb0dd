"""sdlm-eval: ELBO perplexity bound on the validation split, written to WORKDIR/eval.json.

  sdlm-eval --workdir runs/demo [--step N] [--num_batches 8] [--num_t_samples 4]
  sdlm-eval --model exports/demo     (a directory written by sdlm-export: writes exports/demo/eval.json)

An export's config.json keeps the run's data, diffusion and eval sections, so --model rebuilds
the same validation split (from the same data.data_dir / data.paths) and scores it the same way.
"""

import json

from absl import app, flags

from sdlm_jax.cli import common, model_source

flags.adopt_module_key_flags(model_source)  # --workdir, --model, --step in --help

PROG = "sdlm-eval"

_NUM_BATCHES = flags.DEFINE_integer("num_batches", None, "Validation batches (default: the run's eval.num_batches).")
_NUM_T = flags.DEFINE_integer("num_t_samples", None, "Antithetic t samples per sequence (default: eval.num_t_samples).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from sdlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from sdlm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from sdlm_jax.train import evaluate  # pylint: disable=import-outside-toplevel
  cfg, tokenizer = model_source.load_config()
  common.apply_flags(cfg.eval, num_batches=_NUM_BATCHES.value, num_t_samples=_NUM_T.value)
  config_lib.validate_eval(cfg.eval, prefix="--")  # before the checkpoint is read
  _, _, model, step = model_source.load()
  result = {"step": step, **evaluate.evaluate(cfg, model, tokenizer, progress=True)}
  path = workdir_lib.write_json(model_source.directory(), "eval.json", result)
  print(json.dumps(result, indent=2))
  print(f"written to {path}")


def run():
  common.run_main(main, PROG)


if __name__ == "__main__":
  run()
