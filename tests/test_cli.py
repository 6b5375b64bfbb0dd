"""The command lines: bad input is one line on stderr and exit status 2, --help lists every flag.

Each case runs the entry point in a subprocess, as a user would. Most need no trained model:
the flags and the run's config are checked before a checkpoint is read, so a run directory
with only config.json and tokenizer.model is enough; the infilling run trains a smoke model.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from sdlm_jax.cli import libtpu_lock
from sdlm_jax.config_files import repo_module
from sdlm_jax.data import tokenizer as tokenizer_lib

demo = repo_module("demo")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {"sdlm-train": "train", "sdlm-generate": "generate", "sdlm-eval": "evaluate", "sdlm-aot": "aot",
                "sdlm-export": "export"}
TEXT = ("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n\n"
        "JULIET. O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name.")


def _run(prog, *args, env=None, timeout=300):
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  full_env.pop("SDLM_DEBUG", None)
  full_env.update(env or {})
  cmd = [sys.executable, "-m", f"sdlm_jax.cli.{ENTRY_POINTS[prog]}", *args]
  return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)


def _one_line_error(proc, prog, *needles):
  """stderr is exactly `PROG: error: ...` naming every needle, and the exit status is 2."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
  """A run directory without a checkpoint: config.json (demo ec,smoke) and a tokenizer."""
  workdir = tmp_path_factory.mktemp("fake_run")
  cfg = demo.get_config("ec,smoke")
  with open(workdir / "config.json", "w") as f:
    json.dump(cfg.to_dict(), f)
  tokenizer_lib.train([TEXT] * 20, cfg.model.vocab_size, 10**6, str(workdir / "tokenizer.model"))
  return str(workdir)


def test_unknown_override_names_the_section_and_its_fields():
  line = _one_line_error(_run("sdlm-train", "--config.model.nonexistent=1"), "sdlm-train",
                         "--config.model.nonexistent", "'model' has no field 'nonexistent'", "num_heads")
  assert "Traceback" not in line
  _one_line_error(_run("sdlm-aot", f"--config={REPO}/configs/demo.py", "--topology=v5p-8",
                       "--config.model.moe.num_experz=2"), "sdlm-aot", "did you mean 'num_experts'?")


def test_missing_config_file():
  _one_line_error(_run("sdlm-train", "--config", "/nonexistent.py"), "sdlm-train", "no such config file",
                  "/nonexistent.py")


@pytest.mark.parametrize("override, needles", [
    ("--config.model.dtype=float16", ("model.dtype='float16'", "GPU", "float32, bfloat16")),
    ("--config.train.optimizer.lr=nan", ("train.optimizer.lr=nan", "a finite number > 0")),
])
def test_bad_field_values(tmp_path, override, needles):
  _one_line_error(_run("sdlm-train", f"--config={REPO}/configs/demo.py:ec,smoke", f"--workdir={tmp_path}/run",
                       f"--config.data.data_dir={tmp_path}/data", override), "sdlm-train", *needles)


def test_array_record_source_that_is_a_text_file_names_the_file(tmp_path):
  text_file = tmp_path / "plays.txt"
  text_file.write_text(TEXT)
  _one_line_error(_run("sdlm-train", f"--config={REPO}/configs/demo.py:ec,smoke", f"--workdir={tmp_path}/run",
                       f"--config.data.data_dir={tmp_path}/data", "--config.data.source=array_record",
                       f"--config.data.paths={text_file}"), "sdlm-train", str(text_file), "not a readable ArrayRecord")


def test_eval_flags_are_checked(fake_run):
  _one_line_error(_run("sdlm-eval", f"--workdir={fake_run}", "--num_t_samples", "0"), "sdlm-eval",
                  "--num_t_samples=0", "an integer > 0")


@pytest.mark.parametrize("flag, needles", [
    ("--temperature=nan", ("--temperature=nan", "a finite number >= 0")),
    ("--cfg_scale=inf", ("--cfg_scale=inf", "a finite number >= 0")),
    ("--length=0", ("--length=0", "[MASK]")),
    ("--top_p=1.5", ("--top_p=1.5", "(0, 1]")),
])
def test_generate_flags_are_checked_by_the_sample_rules(fake_run, flag, needles):
  _one_line_error(_run("sdlm-generate", f"--workdir={fake_run}", "--prompt=ROMEO.", flag), "sdlm-generate",
                  *needles)


@pytest.mark.parametrize("prog", ["sdlm-eval", "sdlm-generate"])
def test_workdir_that_is_not_a_run(tmp_path, prog):
  _one_line_error(_run(prog, f"--workdir={tmp_path}"), prog, str(tmp_path), "sdlm-train")


def test_debug_shows_the_traceback(fake_run):
  proc = _run("sdlm-train", "--debug", "--config.model.nonexistent=1")
  assert proc.returncode not in (0, 2) and "Traceback" in proc.stderr, proc.stderr[-3000:]
  proc = _run("sdlm-generate", f"--workdir={fake_run}", "--temperature=nan", env={"SDLM_DEBUG": "1"})
  assert proc.returncode not in (0, 2), proc.stderr[-3000:]
  assert "Traceback" in proc.stderr and "ConfigError: --temperature=nan" in proc.stderr, proc.stderr[-3000:]


# Every flag each command defines, with the default --help must show (None: no default shown).
FLAGS_OF = {
    "sdlm-train": {"config": f"'{REPO}/configs/demo.py'", "workdir": "'runs/demo'", "allow_changed": "''",
                   "distributed": "'false'", "coordinator_address": None, "num_processes": None, "process_id": None,
                   "distributed_timeout": "'300'", "debug": "'false'"},
    "sdlm-generate": {"workdir": None, "model": None, "step": None, "prompt": "\"['']\"", "length": None, "steps": None, "block_size": None,
                      "temperature": None, "top_p": None, "remasking": None, "cfg_scale": None, "seed": "'0'",
                      "debug": "'false'"},
    "sdlm-eval": {"workdir": None, "model": None, "step": None, "num_batches": None, "num_t_samples": None, "debug": "'false'"},
    "sdlm-aot": {"config": None, "topology": None, "num_slices": "'1'", "estimate": "'true'", "debug": "'false'"},
    "sdlm-export": {"workdir": None, "out": None, "step": None, "dtype": None,
                    "formats": "'orbax,safetensors,stablehlo'", "max_shard_bytes": "'5000000000'",
                    "platforms": "'cpu,cuda,tpu'", "debug": "'false'"},
}


def _help_blocks(text: str) -> dict:
  """flag name -> its help text, from absl's --help listing."""
  blocks, name = {}, None
  for line in text.splitlines():
    match = re.match(r"^  --(?:\[no\])?(\w+): ", line)
    if match:
      name = match.group(1)
      blocks[name] = line
    elif name and line.startswith("    "):
      blocks[name] += " " + line.strip()
    else:
      name = None
  return blocks


@pytest.mark.parametrize("prog", sorted(FLAGS_OF))
def test_help_of_the_console_script_lists_every_flag_with_its_default(tmp_path, prog):
  # What pip writes for a console_scripts entry: the flags' module is not the main module.
  script = tmp_path / prog
  script.write_text(f"import re, sys\nfrom sdlm_jax.cli.{ENTRY_POINTS[prog]} import run\n"
                    "if __name__ == '__main__':\n"
                    "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                    "    sys.exit(run())\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  blocks = _help_blocks(proc.stdout)
  assert set(blocks) == set(FLAGS_OF[prog]), proc.stdout
  for name, default in FLAGS_OF[prog].items():
    shown = re.findall(r"\(default: (['\"].*?['\"])\)", blocks[name])  # absl's line, not a help text's words
    assert shown == ([] if default is None else [default]), blocks[name]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_distributed_without_peers_stops_after_the_timeout(tmp_path):
  address = f"127.0.0.1:{_free_port()}"  # nothing listens there
  start = time.time()
  proc = _run("sdlm-train", "--distributed", f"--coordinator_address={address}", "--num_processes=2",
              "--process_id=1", "--distributed_timeout=3", f"--workdir={tmp_path}/run", timeout=60)
  assert 3 <= time.time() - start < 60
  _one_line_error(proc, "sdlm-train", address, "--distributed_timeout=3", "--process_id")


# What libtpu 0.0.42 raises when another process holds its lock.
LIBTPU_LOCK_ERROR = ('ABORTED: Internal error when accessing libtpu multi-process lockfile. '
                     'Run "$ sudo rm /tmp/libtpu_lockfile".')


def test_libtpu_lock_names_the_live_holder_and_never_suggests_deleting_its_file(tmp_path):
  lock = tmp_path / "lockfile"
  lock.write_text("")
  holder = subprocess.Popen([sys.executable, "-c", f"import time; f = open({str(lock)!r}); time.sleep(60)"])
  try:
    deadline = time.time() + 30
    while not libtpu_lock.holders(str(lock)) and time.time() < deadline:
      time.sleep(0.1)
    held_by = libtpu_lock.holders(str(lock))
    assert [pid for pid, _ in held_by] == [holder.pid]
    message = libtpu_lock.explain(str(lock), held_by)
  finally:
    holder.kill()
    holder.wait()
  assert libtpu_lock.is_lock_error(LIBTPU_LOCK_ERROR) and not libtpu_lock.is_lock_error("UNIMPLEMENTED: no TPU")
  assert f"pid {holder.pid}" in message and "must finish first" in message and "rm " not in message
  assert libtpu_lock.holders(str(lock)) == []
  stale = libtpu_lock.explain(str(lock), [])
  assert f"rm {lock}" in stale and "no running process" in stale


@pytest.mark.slow
def test_infilling_fills_every_mask_and_long_outputs_warn(tmp_path):
  workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
  proc = _run("sdlm-train", f"--config={REPO}/configs/demo.py:ec,smoke", f"--workdir={workdir}",
              f"--config.data.data_dir={data_dir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = _run("sdlm-generate", f"--workdir={workdir}", "--prompt=ROMEO. [MASK] [MASK] love", "--length=0")
  assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr[-3000:]
  text = proc.stdout.splitlines()[-1]
  assert text.startswith("ROMEO. ") and text.endswith(" love") and len(text) > len("ROMEO.   love"), text
  # smoke runs train on 32-token rows: any prompt + 40 tokens runs past them
  proc = _run("sdlm-generate", f"--workdir={workdir}", "--prompt=KING.", "--length=40", "--block_size=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  warning = [line for line in proc.stderr.splitlines() if "warning" in line]
  assert len(warning) == 1 and "data.seq_len=32" in warning[0] and "--length 40" in warning[0], proc.stderr
