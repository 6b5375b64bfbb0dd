"""The seeds' headline effects at CPU scale, on the embedded corpus: a small unique-token budget
trained for many epochs by four demo models with the same active FLOPs per token.

  python benchmarks/science.py [--out runs/science] [--unique_tokens 200000] [--steps 2000]
  python benchmarks/science.py --smoke      # the pipeline in a few minutes (tiny models, 20 steps)

1. The embedded Shakespeare corpus is written as JSONL and prepared once (sdlm-prepare, vocab
   2048, the demo's tokenizer size) into OUT/prep.
2. sdlm-sweep trains configs/demo.py's `ec` (expert-choice MoE), `tc` (token-choice MoE with
   the same experts), `dense` (FLOPs-matched dense FFN) and `ar` (the dense model, causal, next-
   token loss) on the same seed-chosen `--unique_tokens` of the train split, repeated for as
   many epochs as `--steps` need, evaluating the validation split every epoch
   (eval.every_epochs=1). The sweep resumes if interrupted: run the same command again.
3. The table: per run, the best validation bound and the epoch it was reached at, the final one,
   and how far the final one has turned up from the best (overfitting to the repeated data).
   The seeds' claims it probes: AR's validation loss turns up after a few epochs while the
   diffusion model's keeps falling (Super Data Learners' crossover, OpenMoE 2's double win);
   expert choice against token choice at equal active FLOPs; MoE against the FLOPs-matched
   dense model. The AR number is an exact per-token NLL, the diffusion ones an ELBO bound (an
   upper bound on the NLL): compare the shapes of the curves (OUT/plots/val_ppl.png), not the
   levels across the two families.

Defaults: 4 runs x 2000 steps x 16 x 128 tokens (4.1M tokens each, ~20 epochs of 200K unique
tokens); at the demo's ~2,700 tokens/s on 2 CPU cores about 25 minutes per run plus the
per-epoch evaluations, under 2 hours in all.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sdlm_jax.data import corpus as corpus_lib  # noqa: E402
from sdlm_jax.sweep import run_dir, runner  # noqa: E402

VARIANTS = ("ec", "tc", "dense", "ar")
SMOKE = {"unique_tokens": 3000, "steps": 20, "vocab_size": 512, "arg": ",smoke"}


def _write_corpus(path: str):
  """The embedded plays as one JSONL of documents (the demo's document split)."""
  docs = []
  for name in sorted(os.listdir(corpus_lib.shakespeare_dir())):
    if name.endswith(".txt"):
      with open(os.path.join(corpus_lib.shakespeare_dir(), name), encoding="utf-8", errors="replace") as f:
        docs += corpus_lib.split_work(f.read())
  with open(path, "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({"text": doc}) + "\n")
  return len(docs)


def _run(cmd):
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)


def _curve(records):
  """(epoch, val ppl) at every evaluation: the ELBO bound for diffusion models, exact for AR."""
  return [(records.epoch_at(m["step"]), run_dir.val_ppl(m)) for m in records.val if run_dir.val_ppl(m)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/science")
  parser.add_argument("--unique_tokens", type=int, default=200_000)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--smoke", action="store_true", help=f"a minutes-long check: {SMOKE}")
  args = parser.parse_args()
  vocab, arg = 2048, ""
  if args.smoke:
    args.unique_tokens, args.steps, vocab, arg = (SMOKE[k] for k in ("unique_tokens", "steps", "vocab_size", "arg"))
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  prep = os.path.join(out, "prep")
  if not os.path.exists(os.path.join(prep, "manifest.json")):
    corpus_jsonl = os.path.join(out, "shakespeare.jsonl")
    print(f"{_write_corpus(corpus_jsonl)} documents -> {corpus_jsonl}")
    _run([sys.executable, "-m", "sdlm_jax.cli.prepare", "--input", corpus_jsonl, "--out", prep,
          "--vocab_size", str(vocab), "--num_shards", "4"])
  specs = [f"configs/demo.py:{v}{arg}" for v in VARIANTS]
  overrides = ["data.source=prepared", f"data.paths={prep}", f"data.unique_tokens={args.unique_tokens}",
               f"train.num_steps={args.steps}", "eval.every_epochs=1", "eval.num_batches=4",
               f"train.checkpoint_every={max(1, args.steps // 4)}", f"train.log_every={max(1, args.steps // 100)}"]
  sweep = [sys.executable, "-m", "sdlm_jax.cli.sweep", "--workdir", os.path.join(out, "sweep")]
  for spec in specs:
    sweep += ["--config", spec]
  for o in overrides:
    sweep += ["--set", o]
  _run(sweep)

  print(f"\n{args.unique_tokens:,} unique tokens, {args.steps} steps per run\n")
  print("| run | epochs | best val ppl (epoch) | final val ppl | final / best | wall time |")
  print("|---|---|---|---|---|---|")
  for run in runner.plan(specs, os.path.join(out, "sweep"), overrides):
    records = run_dir.read(run.workdir)
    curve = [(e, p) for e, p in _curve(records) if e is not None]
    if not curve:
      continue
    best_epoch, best = min(curve, key=lambda point: point[1])
    final_epoch, final = curve[-1]
    wall = (records.sweep or {}).get("wall_s", 0.0)
    print(f"| {run.name} | {final_epoch:.1f} | {best:.1f} ({best_epoch:.1f}) | {final:.1f} | {final / best:.3f} "
          f"| {wall / 60:.1f} min |")
  print(f"\nplots: {out}/sweep/plots/ (val_ppl.png: the curves against epochs)")


if __name__ == "__main__":
  main()
