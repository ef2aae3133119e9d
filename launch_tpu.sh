#!/usr/bin/env bash
# Train imprint-jax on a Cloud TPU VM (single- or multi-host) with gcloud.
#
#   ./launch_tpu.sh --name imprint-v5p --zone us-east5-a --type v5p-64 \
#       --config configs/stage1.py --workdir /gcs/BUCKET/imprint/stage1 \
#       [--queued] [--spot] [--version v2-alpha-tpuv5] [--project P] \
#       [-- --set init.checkpoint=/gcs/BUCKET/imprint/imported --resume]
#
# Creates the TPU VM (or a queued resource with --queued) unless one of that name exists,
# copies this checkout to every worker, installs the pinned dependencies plus jax[tpu] into
# ~/imprint-jax/.venv on all of them, starts `imprint-jax train --distributed` on
# --worker=all under nohup, and streams worker 0's log. JAX finds the other hosts by itself on
# TPU VMs (jax.distributed.initialize() with no arguments). Re-running the same command after a
# preemption resumes from the workdir's latest checkpoint (pass --resume after --).
# The workdir and the prepared data must be visible to every worker at the same path: mount
# the bucket with gcsfuse at /gcs/BUCKET on all workers (done here when --workdir starts with
# /gcs/) or use a shared filesystem.
# Stop streaming with Ctrl-C: training goes on; `--logs-only` reattaches.
set -euo pipefail

NAME="" ZONE="" TYPE="" CONFIG="" WORKDIR="" PROJECT="" VERSION="" QUEUED=0 SPOT=0 LOGS_ONLY=0
EXTRA=()
usage() { sed -n '2,16p' "$0"; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --logs-only) LOGS_ONLY=1; shift ;;
    -h|--help) usage ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "launch_tpu.sh: error: unknown argument $1" >&2; exit 2 ;;
  esac
done
for v in NAME ZONE TYPE; do
  [[ -n "${!v}" ]] || { echo "launch_tpu.sh: error: --${v,,} is required" >&2; exit 2; }
done
if [[ $LOGS_ONLY -eq 0 ]]; then
  for v in CONFIG WORKDIR; do
    [[ -n "${!v}" ]] || { echo "launch_tpu.sh: error: --${v,,} is required" >&2; exit 2; }
  done
fi
command -v gcloud >/dev/null || { echo "launch_tpu.sh: error: gcloud not found" >&2; exit 2; }

if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
GC=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")
LOG=imprint-train.log

ssh_all() { "${GC[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$1"; }

if [[ $LOGS_ONLY -eq 0 ]]; then
  if "${GC[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
    echo "== reusing TPU VM $NAME"
  elif [[ $QUEUED -eq 1 ]]; then
    echo "== requesting queued resource $NAME ($TYPE)"
    args=(gcloud compute tpus queued-resources create "$NAME" "${COMMON[@]}" --node-id "$NAME"
          --accelerator-type "$TYPE" --runtime-version "$VERSION")
    [[ $SPOT -eq 1 ]] && args+=(--spot)
    "${args[@]}"
    until gcloud compute tpus queued-resources describe "$NAME" "${COMMON[@]}" \
        --format='value(state.state)' | grep -q ACTIVE; do
      echo "   waiting for $NAME to become ACTIVE..."; sleep 60
    done
  else
    echo "== creating TPU VM $NAME ($TYPE)"
    args=("${GC[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type "$TYPE" --version "$VERSION")
    [[ $SPOT -eq 1 ]] && args+=(--spot)
    "${args[@]}"
  fi

  echo "== copying the project to every worker"
  tarball=$(mktemp /tmp/imprint-jax.XXXXXX.tar.gz)
  git -C "$(dirname "$0")" archive --format=tar.gz -o "$tarball" HEAD
  "${GC[@]}" scp "$tarball" "$NAME:~/imprint-jax.tar.gz" "${COMMON[@]}" --worker=all
  rm -f "$tarball"

  echo "== installing on every worker"
  ssh_all "set -e; mkdir -p ~/imprint-jax && tar -xzf ~/imprint-jax.tar.gz -C ~/imprint-jax && \
    cd ~/imprint-jax && (test -x .venv/bin/python || python3 -m venv .venv) && \
    .venv/bin/pip install -q --extra-index-url https://download.pytorch.org/whl/cpu \
      -r requirements.lock && \
    .venv/bin/pip install -q 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e ."

  if [[ "$WORKDIR" == /gcs/* ]]; then
    bucket=$(echo "$WORKDIR" | cut -d/ -f3)
    echo "== mounting gs://$bucket at /gcs/$bucket on every worker (gcsfuse)"
    ssh_all "set -e; command -v gcsfuse >/dev/null || (sudo apt-get -qq update && \
      sudo apt-get -qq install -y gcsfuse); sudo mkdir -p /gcs/$bucket && \
      (mountpoint -q /gcs/$bucket || sudo gcsfuse --implicit-dirs -o allow_other $bucket /gcs/$bucket)"
  fi

  echo "== starting training on all workers"
  extra=$(printf ' %q' "${EXTRA[@]}")
  ssh_all "cd ~/imprint-jax && nohup .venv/bin/imprint-jax train --distributed \
    --config $CONFIG --workdir $WORKDIR$extra > ~/$LOG 2>&1 &"
fi

echo "== streaming worker 0's log (Ctrl-C stops streaming, not training)"
"${GC[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 --command "tail -n +1 -F ~/$LOG"
