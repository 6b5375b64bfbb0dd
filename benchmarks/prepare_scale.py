"""sdlm-prepare and training start-up at two corpus sizes: memory and start-up must not grow with the corpus.

Generates two synthetic corpora as `.jsonl` files (~30 MB and ~300 MB of
text: Zipf-distributed words from a fixed 20k-word lexicon, documents of 1-8 KB), prepares
each with `sdlm-prepare` (a tokenizer trained on the same bounded sample size, all cores), and
reports for each
  peak RSS     the largest summed RSS of the prepare process tree (parent + workers), sampled
               every 50 ms with psutil, and the largest single process
  MB/s         input megabytes over the prepare's wall time
  start-up     process start to the first logged step of a smoke training run
               (configs/demo.py:ec,smoke on the prepared set, log_every=1), and the trainer's
               RSS at that moment
  data set-up  in a fresh process, after the imports: open the prepared set and draw the
               first batch (the part of start-up that could depend on the corpus)
The start-up runs alternate small, large, small, large, ... (--rounds) so machine load hits
both alike; the median is reported. The checks: peak RSS(large) <= 1.5 x peak RSS(small), and
start-up(large) <= 1.5 x start-up(small).

  python benchmarks/prepare_scale.py [--small_mb 30] [--large_mb 300] [--rounds 2] [--workdir DIR] [--keep]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE_MB = 10


def generate(folder: str, megabytes: int, seed: int = 0) -> int:
  """Writes ~megabytes of synthetic documents as FILE_MB-sized .jsonl files; returns the bytes written."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
  lexicon = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20_000)]
  target, written, index = megabytes << 20, 0, 0
  while written < target:
    path = os.path.join(folder, f"part-{index:04d}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      size = 0
      while size < FILE_MB << 20 and written + size < target:
        words = rng.zipf(1.2, size=int(rng.integers(150, 1200))) % len(lexicon)
        text = " ".join(lexicon[w] for w in words)
        line = json.dumps({"text": text}) + "\n"
        f.write(line)
        size += len(line)
    written += os.path.getsize(path)
    index += 1
  return written


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
  """(summed RSS, largest single RSS) of a process and its descendants."""
  total = largest = 0
  for p in [proc, *proc.children(recursive=True)]:
    try:
      rss = p.memory_info().rss
    except psutil.Error:
      continue
    total += rss
    largest = max(largest, rss)
  return total, largest


def prepare(inp: str, out: str) -> dict:
  cmd = [sys.executable, "-m", "sdlm_jax.cli.prepare", f"--input={inp}/*.jsonl", f"--out={out}",
         "--vocab_size=512", "--sample_chars=2000000"]
  start = time.perf_counter()
  child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  proc = psutil.Process(child.pid)
  peak = peak_one = 0
  while child.poll() is None:
    total, largest = _tree_rss(proc)
    peak, peak_one = max(peak, total), max(peak_one, largest)
    time.sleep(0.05)
  seconds = time.perf_counter() - start
  output = child.stdout.read()
  if child.returncode:
    raise RuntimeError(f"sdlm-prepare failed:\n{output[-3000:]}")
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  return {"seconds": seconds, "peak_rss": peak, "peak_rss_one": peak_one,
          "tokens": manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]}


def startup(prepared_dir: str, workdir: str, cache: str) -> tuple[float, int]:
  """Seconds from process start to the first logged step, and the trainer's RSS then."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "sdlm_jax.cli.train", f"--config={REPO}/configs/demo.py:ec,smoke",
         f"--workdir={workdir}", "--config.data.source=prepared", f"--config.data.paths={prepared_dir}",
         f"--config.data.data_dir={cache}", "--config.train.num_steps=50", "--config.train.log_every=1"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  start = time.perf_counter()
  child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = os.path.join(workdir, "metrics.jsonl")
  try:
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
      if child.poll() is not None:
        raise RuntimeError(f"training exited with {child.returncode} before its first step")
      time.sleep(0.02)
    seconds = time.perf_counter() - start
    rss = psutil.Process(child.pid).memory_info().rss
  finally:
    child.kill()
    child.wait()
  return seconds, rss


def data_setup(prepared_dir: str, cache: str) -> float:
  """Seconds to open a prepared set and draw the first batch, in a fresh process after its imports."""
  code = ("import time\nfrom sdlm_jax.defaults import get_base_config\nfrom sdlm_jax.data import pipeline\n"
          "t = time.perf_counter()\n"
          "c = get_base_config().data; c.source = 'prepared'; c.paths = %r; c.data_dir = %r; c.seq_len = 32\n"
          "tok, _ = pipeline.prepare(c, 512)\n"
          "it = pipeline.make_iterator(c, tok, split='train', batch_size=8, seed=0); next(it)\n"
          "print(time.perf_counter() - t)" % (prepared_dir, cache))
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
  return float(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small_mb", type=int, default=30)
  parser.add_argument("--large_mb", type=int, default=300)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--workdir", default=None, help="Where corpora and outputs go (default: a temp dir).")
  parser.add_argument("--keep", action="store_true", help="Keep the corpora and prepared sets.")
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="prepare_scale-")
  sizes = {"small": args.small_mb, "large": args.large_mb}
  results = {}
  try:
    for name, mb in sizes.items():
      inp = os.path.join(root, f"{name}-input")
      if not os.path.isdir(inp):
        generate(inp, mb, seed=len(name))
      in_bytes = sum(os.path.getsize(os.path.join(inp, f)) for f in os.listdir(inp))
      out = os.path.join(root, f"{name}-prepared")
      shutil.rmtree(out, ignore_errors=True)
      results[name] = {"input_mb": in_bytes / 2**20, **prepare(inp, out)}
      print(f"prepared {name}: {results[name]}", flush=True)
    times = {name: [] for name in sizes}
    setup = {name: [] for name in sizes}
    for _ in range(args.rounds):
      for name in sizes:
        setup[name].append(data_setup(os.path.join(root, f"{name}-prepared"), os.path.join(root, "cache")))
        seconds, rss = startup(os.path.join(root, f"{name}-prepared"), os.path.join(root, f"{name}-run"),
                               os.path.join(root, "cache"))
        times[name].append(seconds)
        results[name]["train_rss"] = rss
        print(f"start-up {name}: {seconds:.1f} s, RSS {rss / 2**20:.0f} MiB", flush=True)
    print()
    print(f"{'corpus':8} {'input MB':>9} {'tokens':>12} {'prepare s':>10} {'MB/s':>7} {'peak RSS MiB':>13} "
          f"{'(1 proc)':>9} {'start-up s':>11} {'train RSS MiB':>14} {'data set-up s':>14}")
    for name, r in results.items():
      r["startup"] = statistics.median(times[name])
      print(f"{name:8} {r['input_mb']:9.1f} {r['tokens']:12,d} {r['seconds']:10.1f} "
            f"{r['input_mb'] / r['seconds']:7.2f} {r['peak_rss'] / 2**20:13.0f} {r['peak_rss_one'] / 2**20:9.0f} "
            f"{r['startup']:11.1f} {r['train_rss'] / 2**20:14.0f} {statistics.median(setup[name]):14.2f}")
    rss_ratio = results["large"]["peak_rss"] / results["small"]["peak_rss"]
    start_ratio = results["large"]["startup"] / results["small"]["startup"]
    print(f"\npeak RSS large/small = {rss_ratio:.2f} (<= 1.5: {'ok' if rss_ratio <= 1.5 else 'FAIL'}); "
          f"start-up large/small = {start_ratio:.2f} (<= 1.5: {'ok' if start_ratio <= 1.5 else 'FAIL'}); "
          f"{os.cpu_count()} cores")
    return 0 if rss_ratio <= 1.5 and start_ratio <= 1.5 else 1
  finally:
    if not args.keep and not args.workdir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
