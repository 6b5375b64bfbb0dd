"""Running a set of configs one after another, resumably: DIR/NAME per config.

A run whose directory shows it trained to num_steps and was evaluated is skipped; one that
was interrupted is resumed (sdlm-train continues from its last checkpoint); the others start.
Each run is its own `sdlm-train` process, so runs cannot leak state into each other, and its
progress bar shows on the console. DIR/NAME/sweep_run.json records the command, the outcome
and the wall time (accumulated over resumed attempts).
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import ml_collections

from sdlm_jax import config_files, storage
from sdlm_jax.errors import UserInputError
from sdlm_jax.sweep import run_dir


@dataclasses.dataclass(frozen=True)
class SweepRun:
  name: str
  spec: str             # config file[:arg]
  workdir: str
  overrides: tuple[str, ...]  # key=value, applied as --config.key=value

  def command(self) -> list[str]:
    return ([sys.executable, "-m", "sdlm_jax.cli.train", "--config", self.spec, "--workdir", self.workdir]
            + [f"--config.{override}" for override in self.overrides])


def run_name(spec: str) -> str:
  """`configs/demo.py:tc,smoke` -> `demo-tc-smoke`: the file's stem and the argument's words."""
  path, _, arg = spec.partition(":")
  words = [os.path.splitext(os.path.basename(path))[0]] + [w for w in re.split(r"[,\s]+", arg) if w]
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(words))


def _check_override(override: str, cfg: ml_collections.ConfigDict):
  key, sep, _ = override.partition("=")
  if not sep or not key:
    raise UserInputError(f"--set {override!r}: expected key=value, e.g. --set train.num_steps=100")
  error = config_files.field_error(cfg, key)
  if error:
    raise UserInputError(f"--set {override!r}: {error}")


def plan(specs: list[str], out_dir: str, overrides: list[str]) -> list[SweepRun]:
  """One SweepRun per config spec; each spec must load and take every override."""
  if not specs:
    raise UserInputError("--config: give at least one config file, e.g. --config configs/demo.py:smoke")
  runs, seen = [], {}
  for spec in specs:
    try:
      cfg = config_files.load(spec)
    except Exception as err:  # pylint: disable=broad-except  # the config file's own error, as one line
      raise UserInputError(f"--config {spec}: {type(err).__name__}: {err}") from err
    for override in overrides:
      _check_override(override, cfg)
    name = run_name(spec)
    if name in seen:
      raise UserInputError(f"--config {spec}: gives the run name {name!r} that {seen[name]} already has")
    seen[name] = spec
    runs.append(SweepRun(name, spec, storage.location(storage.path(out_dir) / name), tuple(overrides)))
  return runs


def _record(run: SweepRun, **fields):
  path = storage.path(run.workdir) / run_dir.RUN_RECORD
  previous = json.loads(path.read_text()) if path.exists() else {}
  storage.write_text(path, json.dumps({**previous, **fields}, indent=2))
  return {**previous, **fields}


def execute(run: SweepRun, log=print) -> str:
  """Brings one run to its end; returns "skipped", "finished" or "failed (exit N)"."""
  records = run_dir.read(run.workdir)
  if records is not None and records.finished:
    return "skipped"
  if records is not None:
    log(f"{run.name}: resuming (last logged step {records.last_step}/{records.num_steps})")
  storage.path(run.workdir).mkdir(parents=True, exist_ok=True)
  previous_wall = float(((records and records.sweep) or {}).get("wall_s", 0.0))
  start, status = time.time(), "interrupted"
  try:
    returncode = subprocess.run(run.command(), check=False).returncode
    status = "finished" if returncode == 0 else f"failed (exit {returncode})"
  finally:
    _record(run, spec=run.spec, overrides=list(run.overrides), status=status,
            wall_s=previous_wall + time.time() - start)
  return status


def collect(runs: list[SweepRun]) -> dict[str, run_dir.RunRecords]:
  """The records of every run that has started."""
  return {run.name: records for run in runs if (records := run_dir.read(run.workdir)) is not None}
