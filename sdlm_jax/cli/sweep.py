"""sdlm-sweep: train several configs one after another, then compare them in a table and plots.

  sdlm-sweep --config configs/demo.py:smoke --config configs/demo.py:tc,smoke --workdir runs/sweep
  sdlm-sweep --config 'runs/isoflop_configs/*.py' --workdir runs/isoflop --set train.log_every=10
  sdlm-sweep ... --dry_run          # the runs, their directories and what would happen to each

Each config (FILE[:ARG]; a quoted glob expands to its files, sorted) trains in DIR/NAME, NAME
made from the file's name and argument (`demo-tc-smoke`); `--set key=value` (repeatable) is
given to every run as --config.key=value. Runs go one at a time. Run it again after a crash
or a Ctrl-C: finished runs are skipped, an interrupted one resumes from its last checkpoint.
After each run DIR/summary.csv and DIR/summary.md (one row per run: config, parameters total
and active, tokens, epochs, final training loss, validation perplexity (bound), tokens/s,
wall time) and the plots in DIR/plots/ are rewritten. Exit status 1 if a run failed.
"""

import glob
import sys

from sdlm_jax.cli import common
from sdlm_jax.errors import UserInputError
from sdlm_jax.sweep import plots, run_dir, runner, summary

PROG = "sdlm-sweep"


def build_parser():
  parser = common.OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", action="append", default=[], required=True,
                      help="config FILE[:ARG] or a quoted glob of files; repeat for each run")
  parser.add_argument("--workdir", required=True, help="sweep directory (local or gs://): one run directory per config")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every run, e.g. --set train.num_steps=200 (repeatable)")
  parser.add_argument("--dry_run", action="store_true", help="list the runs and their state, train nothing")
  parser.add_argument("--noplots", action="store_true", help="write the tables only")
  return parser


def expand(specs: list[str]) -> list[str]:
  """Config specs with globs in their file part replaced by the matching files, sorted."""
  out = []
  for spec in specs:
    path, sep, arg = spec.partition(":")
    if any(ch in path for ch in "*?["):
      matches = sorted(glob.glob(path))
      if not matches:
        raise UserInputError(f"--config {spec}: no file matches {path!r}")
      out += [m + sep + arg for m in matches]
    else:
      out.append(spec)
  return out


def report(runs, out_dir: str) -> tuple[str, dict]:
  """Rewrites the summary tables; returns the Markdown table and the runs' records."""
  records = runner.collect(runs)
  rows = [run_dir.summary_row(run.name, run.spec, records[run.name]) for run in runs if run.name in records]
  summary.write(rows, out_dir)
  return summary.markdown(rows), records


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    runs = runner.plan(expand(args.config), args.workdir, args.set)
  except UserInputError as err:
    common.fail(PROG, str(err))
  if args.dry_run:
    for run in runs:
      records = run_dir.read(run.workdir)
      state = ("new" if records is None else "finished: skipped" if records.finished
               else f"resumes at step {records.last_step}/{records.num_steps}")
      print(f"{run.name:32s} {state:32s} {run.spec}  ->  {run.workdir}")
    return 0
  failed, table, records = [], "", {}
  for i, run in enumerate(runs, 1):
    print(f"[{i}/{len(runs)}] {run.name}: {run.spec} -> {run.workdir}", flush=True)
    status = runner.execute(run)
    print(f"[{i}/{len(runs)}] {run.name}: {status}", flush=True)
    if status.startswith("failed"):
      failed.append(run.name)
    table, records = report(runs, args.workdir)
  if records and not args.noplots:
    plots.plot_runs(records, f"{args.workdir}/plots")
  print(table)
  print(f"tables: {args.workdir}/summary.csv, {args.workdir}/summary.md" +
        ("" if args.noplots else f"; plots: {args.workdir}/plots/"))
  if failed:
    print(f"{PROG}: {len(failed)} run(s) failed: {', '.join(failed)} (run the same command again to retry)",
          file=sys.stderr)
    return 1
  return 0


def run():
  try:
    sys.exit(main())
  except KeyboardInterrupt:
    print(f"\n{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  run()
