"""launch/tpu/tpu.sh: the exact gcloud commands (dry run), and real runs against a fake gcloud."""

import os
import subprocess
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu", "tpu.sh")
SETTINGS = {"PROJECT": "proj", "ZONE": "us-east5-a", "TPU_NAME": "sdlm", "ACCELERATOR_TYPE": "v5p-64",
            "RUNTIME_VERSION": "v2-alpha-tpuv5", "WORKDIR": "/mnt/shared/run1"}


def _run(command, tmp_path, **env):
  full = {**os.environ, **SETTINGS, **env}
  return subprocess.run(["bash", SCRIPT, command], cwd=REPO, env=full, capture_output=True, text=True, timeout=60)


def test_dry_run_prints_the_two_slice_job(tmp_path):
  proc = _run("up", tmp_path, DRY_RUN="1", NUM_SLICES="2", CAPACITY="spot")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == ("gcloud compute tpus queued-resources create sdlm --project=proj --zone=us-east5-a "
                      "--node-count=2 --node-prefix=sdlm --accelerator-type=v5p-64 "
                      "--runtime-version=v2-alpha-tpuv5 --spot")
  assert sum("tpu-vm scp" in x for x in lines) == 2  # code to both slices
  runs = [x for x in lines if "sdlm-train" in x]
  assert [("sdlm-0" in r, "sdlm-1" in r) for r in runs] == [(True, False), (False, True)]
  assert all("--worker=all" in r and "--distributed" in r and "MEGASCALE_NUM_SLICES=2" in r for r in runs)
  assert "MEGASCALE_SLICE_ID=0" in runs[0] and "MEGASCALE_SLICE_ID=1" in runs[1]


def _fake_gcloud(tmp_path, script: str) -> dict:
  """Writes `script` as a bash `gcloud` into tmp_path/bin; returns the PATH that puts it first."""
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text("#!/usr/bin/env bash\n" + script)
  fake.chmod(0o755)
  return {"PATH": f"{fake.parent}:{os.environ['PATH']}"}


def test_a_fake_gcloud_on_path_receives_create_and_delete(tmp_path):
  log = tmp_path / "calls"
  env = _fake_gcloud(tmp_path, f"""echo "$*" >> {log}
""")
  for command in ("create", "delete"):
    assert _run(command, tmp_path, **env).returncode == 0
  calls = log.read_text().splitlines()
  assert calls[0].startswith("compute tpus queued-resources create sdlm") and "--node-id=sdlm" in calls[0]
  assert calls[1] == "compute tpus queued-resources delete sdlm --project=proj --zone=us-east5-a --force --quiet"


def test_missing_setting_and_bad_capacity_are_named(tmp_path):
  proc = _run("create", tmp_path, PROJECT="")
  assert proc.returncode == 2 and "set PROJECT" in proc.stderr
  proc = _run("create", tmp_path, DRY_RUN="1", CAPACITY="cheap")
  assert proc.returncode == 2 and "CAPACITY=cheap" in proc.stderr and "on-demand, spot, reserved" in proc.stderr


# ---------------------------------------------------------------- run and stop on a fake worker

def _fake_worker(tmp_path):
  """A fake `gcloud` that runs each ssh --command in a bash on this machine, as a worker's shell
  would (HOME = tmp_path/home), and a fake `sdlm-train` that records its argv and environment,
  then waits for SIGTERM and exits 75 like a preempted run."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "sdlm_jax").mkdir(parents=True)
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {tmp_path}/calls
for a in "$@"; do case "$a" in --command=*) cmd="${{a#--command=}}" ;; esac; done
if [ -n "${{cmd:-}}" ]; then cd {home} && HOME={home} bash -c "$cmd"; fi
""")
  (bin_dir / "sdlm-train").write_text("""#!/usr/bin/env bash
printf '%s\\n' "$@" > "$HOME/argv"
echo "$JAX_COMPILATION_CACHE_DIR" > "$HOME/cache_dir"
sleep 60 & sleeper=$!
trap 'kill $sleeper; exit 75' TERM
wait $sleeper
""")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  return home, {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _wait_for(path, timeout=20):
  deadline = time.time() + timeout
  while not (path.exists() and path.read_text().endswith("\n")):
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)
  return path.read_text()


def test_values_reach_the_worker_as_one_argument_each_and_stop_kills_only_the_recorded_job(tmp_path):
  home, env = _fake_worker(tmp_path)
  workdir = "/mnt/shared/my run;touch pwned"
  proc = _run("run", tmp_path, **env, WORKDIR=workdir, CONFIG="configs/demo.py:ec,smoke",
              EXTRA_ARGS="--config.train.num_steps=5  --config.train.log_every=1")
  assert proc.returncode == 0, proc.stderr
  argv = _wait_for(home / "argv").splitlines()
  assert argv == ["--distributed", "--config=configs/demo.py:ec,smoke", f"--workdir={workdir}",
                  "--config.train.num_steps=5", "--config.train.log_every=1"]
  assert _wait_for(home / "cache_dir").strip() == f"{home}/jax_cache"  # ~/ is the worker's home
  assert not list(tmp_path.rglob("pwned"))
  job_pid = int(_wait_for(home / "sdlm_train.pid"))

  # Another process whose command line also says sdlm-train: a name match would kill it too.
  decoy = subprocess.Popen(["bash", "-c", "exec -a sdlm-train sleep 60"])
  try:
    proc = _run("stop", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert _wait_for(home / "sdlm_train.status").strip() == "75"  # the job's own exit status, recorded
    with pytest.raises(ProcessLookupError):
      os.kill(job_pid, 0)
    assert decoy.poll() is None
    assert not any("pkill" in line for line in (tmp_path / "calls").read_text().splitlines())
  finally:
    decoy.kill()
    decoy.wait()


def test_stop_without_a_recorded_job_does_nothing(tmp_path):
  home, env = _fake_worker(tmp_path)
  proc = _run("stop", tmp_path, **env)
  assert proc.returncode == 0, proc.stderr
  assert not (home / "sdlm_train.status").exists()


def test_setup_copies_only_tracked_files(tmp_path):
  log = tmp_path / "calls"
  # scp SOURCE DEST: keep a copy of the tarball it is given
  env = _fake_gcloud(tmp_path, f"""echo "$*" >> {log}
if [ "$4" = scp ]; then
  for a in "$@"; do case "$a" in *.tar.gz) [ -f "$a" ] && cp "$a" {tmp_path}/sent.tar.gz ;; esac; done
fi
exit 0
""")
  proc = _run("setup", tmp_path, **env)
  assert proc.returncode == 0, proc.stderr
  with tarfile.open(tmp_path / "sent.tar.gz") as tar:
    names = set(tar.getnames())
  tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split())
  assert names == {n for n in tracked if os.path.exists(os.path.join(REPO, n))}
  assert not any(n.startswith((".git/", "runs/")) or "__pycache__" in n for n in names)
  install = [line for line in log.read_text().splitlines() if "tpu-vm ssh" in line][0]
  assert "bash scripts/check_python.sh" in install


def test_the_python_check_names_the_fix(tmp_path):
  fake_python = tmp_path / "python3"
  fake_python.write_text("#!/usr/bin/env bash\n[ \"$1\" = -V ] && echo 'Python 3.10.12'; exit 1\n")
  fake_python.chmod(0o755)
  proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "check_python.sh")], capture_output=True, text=True,
                        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}, check=False)
  assert proc.returncode == 1
  assert "needs Python >= 3.11 but python3 is Python 3.10.12" in proc.stderr and "python3.11 -m venv" in proc.stderr


def test_supervise_recreates_a_preempted_slice_and_reruns_a_preempted_job(tmp_path):
  """A fake gcloud plays a spot slice: SUSPENDED (preempted), then ACTIVE on a bare VM, a job that
  is preempted (exit 75), then one that finishes."""
  (tmp_path / "states").write_text("SUSPENDED\nWAITING_FOR_RESOURCES\nACTIVE\n")
  (tmp_path / "jobs").write_text("bare\nrunning\n75\n0\n")
  env = _fake_gcloud(tmp_path, f"""pop() {{ head -n 1 "$1"; [ "$(wc -l < "$1")" -gt 1 ] && sed -i 1d "$1"; true; }}
case "$*" in
  *"queued-resources describe"*) pop {tmp_path}/states ;;
  *"echo running"*) echo "job-state" >> {tmp_path}/calls; pop {tmp_path}/jobs ;;
  *) echo "$*" >> {tmp_path}/calls ;;
esac
""")
  proc = _run("supervise", tmp_path, **env, SUPERVISE_INTERVAL="0")
  assert proc.returncode == 0, proc.stderr
  assert "the job finished" in proc.stdout
  kinds = []
  for line in (tmp_path / "calls").read_text().splitlines():
    kind = next((k for k in ("delete", "create", "scp", "sdlm-train", "job-state") if k in line), "other")
    kinds.append(kind)
  assert kinds == ["delete", "create", "job-state", "scp", "other", "sdlm-train", "job-state", "job-state",
                   "sdlm-train", "job-state"], kinds


def test_supervise_stops_on_a_failed_job(tmp_path):
  env = _fake_gcloud(tmp_path, """case "$*" in
  *"queued-resources describe"*) echo ACTIVE ;;
  *"echo running"*) echo 1 ;;
esac
""")
  proc = _run("supervise", tmp_path, **env, SUPERVISE_INTERVAL="0")
  assert proc.returncode == 2 and "the job exited with status 1" in proc.stderr
