"""sdlm-eval: ELBO perplexity bound on the validation split, written to WORKDIR/eval.json.

  sdlm-eval --workdir runs/demo [--num_batches 8] [--num_t_samples 4]
"""

import json

from absl import app, flags

from sdlm_jax.cli import common

PROG = "sdlm-eval"

_WORKDIR = common.define_workdir(required=True)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None, "Validation batches (default: the run's eval.num_batches).")
_NUM_T = flags.DEFINE_integer("num_t_samples", None, "Antithetic t samples per sequence (default: eval.num_t_samples).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from sdlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from sdlm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from sdlm_jax.train import evaluate, restore  # pylint: disable=import-outside-toplevel
  cfg = workdir_lib.load_config(_WORKDIR.value)
  common.apply_flags(cfg.eval, num_batches=_NUM_BATCHES.value, num_t_samples=_NUM_T.value)
  config_lib.validate_eval(cfg.eval, prefix="--")  # before the checkpoint is read
  _, tokenizer, model, step = restore.load_trained_model(_WORKDIR.value)
  result = {"step": step, **evaluate.evaluate(cfg, model, tokenizer, progress=True)}
  path = workdir_lib.write_json(_WORKDIR.value, "eval.json", result)
  print(json.dumps(result, indent=2))
  print(f"written to {path}")


def run():
  common.run_main(main, PROG)


if __name__ == "__main__":
  run()
