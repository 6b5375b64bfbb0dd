"""sdlm-plot: the figures and the summary row of one run directory.

  sdlm-plot --workdir runs/demo                 # PNGs into runs/demo/plots/
  sdlm-plot --workdir gs://bucket/run --out plots/run

Writes loss_vs_tokens.png, val_ppl.png (validation perplexity, a bound for diffusion, against tokens and
epochs) and, for an MoE model, router_load_NAME.png (each expert's share of routed slots per
layer), and prints the run's row of the table sdlm-sweep writes.
"""

import sys

from sdlm_jax import storage
from sdlm_jax.cli import common
from sdlm_jax.sweep import plots, run_dir, summary

PROG = "sdlm-plot"


def main(argv=None) -> int:
  parser = common.OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="run directory written by sdlm-train (local or gs://)")
  parser.add_argument("--out", help="folder for the PNGs (default: WORKDIR/plots)")
  args = parser.parse_args(argv)
  records = run_dir.read(args.workdir)
  if records is None:
    common.fail(PROG, f"--workdir {args.workdir}: no config.json there; is it a directory written by sdlm-train?")
  if not records.train:
    common.fail(PROG, f"--workdir {args.workdir}: metrics.jsonl has no training steps yet")
  name = storage.path(args.workdir).name
  out = args.out or f"{storage.location(args.workdir)}/plots"
  for path in plots.plot_runs({name: records}, out):
    print(path)
  print(summary.markdown([run_dir.summary_row(name, storage.location(args.workdir), records)]))
  return 0


def run():
  sys.exit(main())


if __name__ == "__main__":
  run()
