"""IsoFLOP sweep of the demo family: plan, train every point with sdlm-train, fit and plot.

  python benchmarks/isoflop_sweep.py [--budgets 1e12,2.5e12,6.25e12] [--sizes 4] [--out runs/isoflop]
  python benchmarks/isoflop_sweep.py --smoke        # 2 tiny budgets x 3 sizes of the smoke model, minutes

1. `sdlm-scaling isoflop` plans the sweep from the demo's dense model (configs/demo.py:dense)
   with --head_dim 8 --kv_group 1 (sdlm_jax/scaling/plan.py: layers = heads = kv heads,
   d_model = layers x 8, the demo's FFN ratio 3; steps from the exact FLOPs count) and writes
   one config per (budget, size) and sweep.json into OUT/configs.
2. `sdlm-sweep` trains every config in OUT/runs/NAME (an interrupted sweep resumes: finished
   runs are kept, a run with checkpoints resumes from them) and writes its summary and plots.
3. OUT/runs.csv gets one row per run: params (active), tokens, loss (the validation ELBO bound
   in nats/token from eval.json), budget; then `sdlm-scaling fit` fits the parametric law and the
   IsoFLOP power laws and writes OUT/isoflop.png and OUT/frontier.png.

The defaults fit a 2-core CPU machine in under two hours (99 minutes, sharing it with other
jobs): budgets 1e12, 2.5e12 and 6.25e12 FLOPs (3.9e13 in all, 62K steps of 16 x 128 tokens),
where Quokka's law puts N_opt at 32K-82K parameters. The demo's own width (head_dim 64)
starts at 1M parameters, so the family here uses head_dim 8 and one query head per kv head,
which makes every depth a member: 1 to 6 layers are 17K to 279K active parameters (the tied
2048-token embedding included, which is most of the smallest), four of them per budget spread
around that prior. This is a toy-scale law: tiny models, a 2M-token corpus repeated up to ~30
times by the smallest model at the largest budget, one seed, one learning rate for every size,
and short runs: every masked-diffusion run starts on a plateau at the unigram loss, and when a
run leaves it depends on the run. It shows the method end to end; its coefficients say nothing
about real scales.
"""

import argparse
import csv
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sdlm_jax.cli import scaling as scaling_cli  # noqa: E402
from sdlm_jax.cli import sweep as sweep_cli  # noqa: E402
from sdlm_jax.scaling import plan  # noqa: E402

SMOKE = {"base": "configs/demo.py:ec,smoke", "head_dim": 32, "budgets": "1e11,3e11", "sizes": 3, "bootstrap": 20}


def _train_tokens(config_path):
  """Tokens in the training split of the config's corpus (for the epochs column)."""
  from sdlm_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  cfg = plan.load_config_file(config_path)
  tokenizer, _ = pipeline.prepare(cfg.data, cfg.model.vocab_size)
  return int(sum(pipeline.token_counts(cfg.data, tokenizer, "train")))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", default="configs/demo.py:dense")
  parser.add_argument("--head_dim", type=int, default=8, help="the family's d_model / layers")
  parser.add_argument("--kv_group", type=int, default=1, help="query heads per kv head: 1 makes every depth a member")
  parser.add_argument("--budgets", default="1e12,2.5e12,6.25e12")
  parser.add_argument("--sizes", type=int, default=4)
  parser.add_argument("--out", default="runs/isoflop")
  parser.add_argument("--bootstrap", type=int, default=200)
  parser.add_argument("--data_paths", default="", help="train on these text files (data.source=text_files)")
  parser.add_argument("--smoke", action="store_true", help=f"a minutes-long check: {SMOKE}")
  args = parser.parse_args()
  if args.smoke:
    args.base, args.head_dim, args.budgets = SMOKE["base"], SMOKE["head_dim"], SMOKE["budgets"]
    args.sizes, args.bootstrap = SMOKE["sizes"], SMOKE["bootstrap"]
    args.out = args.out if args.out != "runs/isoflop" else "runs/isoflop_smoke"
  os.chdir(REPO)  # the configs' data.data_dir is relative to the repository
  out = os.path.abspath(args.out)
  config_dir = os.path.join(out, "configs")
  scaling_cli.main(["isoflop", "--budgets", args.budgets, "--sizes", str(args.sizes), "--base", args.base,
                    "--head_dim", str(args.head_dim), "--kv_group", str(args.kv_group), "--out", config_dir])
  with open(os.path.join(config_dir, plan.MANIFEST)) as f:
    points = json.load(f)["points"]
  sets = ["data.source=text_files", f"data.paths={args.data_paths}"] if args.data_paths else []
  sweep_args = ["--workdir", os.path.join(out, "runs")]
  for p in points:
    sweep_args += ["--config", os.path.join(config_dir, p["config"])]
  for value in sets:
    sweep_args += ["--set", value]
  if sweep_cli.main(sweep_args):
    sys.exit("a sweep run failed: run the same command again to retry it")
  rows = []
  for p in points:
    with open(os.path.join(out, "runs", p["name"], "eval.json")) as f:
      rows.append({**p, "loss": json.load(f)["val/nll_per_token"]})

  corpus = None if args.data_paths else _train_tokens(os.path.join(config_dir, points[0]["config"]))
  print(f"\n{'config':<14}{'params':>11}{'tokens':>12}{'epochs':>8}{'budget':>10}{'FLOPs':>11}{'loss':>8}")
  for r in rows:
    epochs = f"{r['tokens'] / corpus:.1f}" if corpus else "-"
    print(f"{r['name']:<14}{r['params']:>11,}{r['tokens']:>12,}{epochs:>8}{r['budget']:>10.3g}{r['flops']:>11.4g}"
          f"{r['loss']:>8.4f}")
  runs_csv = os.path.join(out, "runs.csv")
  with open(runs_csv, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["params", "tokens", "loss", "budget"])
    w.writerows([r["params"], r["tokens"], r["loss"], r["budget"]] for r in rows)
  print(f"wrote {runs_csv}\n")
  try:
    scaling_cli.main(["fit", "--runs", runs_csv, "--out", out, "--bootstrap", str(args.bootstrap)])
  except SystemExit as err:  # too few or too flat runs for a fit: the table above still stands
    print(f"fit not possible on these runs (exit {err.code})")


if __name__ == "__main__":
  main()
