"""launch/tpu/tpu.sh: the exact gcloud commands (dry run), and real runs against a fake gcloud."""

import os
import subprocess

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


def test_a_fake_gcloud_on_path_receives_create_and_delete(tmp_path):
  log = tmp_path / "calls"
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
""")
  fake.chmod(0o755)
  env = {"PATH": f"{fake.parent}:{os.environ['PATH']}"}
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
