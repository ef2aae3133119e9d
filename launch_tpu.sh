#!/usr/bin/env bash
# Run imprint-jax on a Cloud TPU slice (single- or multi-host) with gcloud. docs/tpu.md walks
# through a whole run; this header is the reference.
#
#   ./launch_tpu.sh VERB --name NAME --zone ZONE [options] [-- IMPRINT_JAX_COMMAND ...]
#
# Verbs:
#   create   create the slice unless it exists (a preempted or failed one is deleted and
#            created again), ship this working tree to every worker, install it there
#   run      create, then start `imprint-jax IMPRINT_JAX_COMMAND` on every worker in the
#            background and stream worker 0's log (Ctrl-C stops the streaming, not the job).
#            `train`, `encode-objects` and `encode-latents` get --distributed; `train` gets
#            --resume, so a run continues from its workdir's latest checkpoint (--fresh: not
#            added)
#   logs     stream a worker's log (--worker N, default 0)
#   status   the slice's state and each worker's job (running, or its exit status)
#   stop     SIGTERM the job on every worker: `train` saves at the next step and exits
#   delete   delete the slice (a queued resource with its TPU VM). Checkpoints stay in gs://
#
# Options:
#   --name NAME, --zone ZONE, --project PROJECT      which slice (all verbs)
#   --type TYPE        accelerator type, e.g. v5p-128, v5litepod-64, v6e-64, v4-32 (create/run)
#   --version V        TPU software version (default by TYPE: v5p v2-alpha-tpuv5, v5e
#                      v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e, v4 tpu-ubuntu2204-base)
#   --spot             a Spot slice (cheaper, preemptible)
#   --queued           request it as a queued resource (gcloud compute tpus queued-resources)
#   --bucket BUCKET    mount gs://BUCKET read-only at /gcs/BUCKET on every worker (gcsfuse,
#                      file and metadata caches: prepared data is read there) and keep the JAX
#                      compilation cache in gs://BUCKET/jax-cache
#   --jax-cache URL    JAX_COMPILATION_CACHE_DIR for the job (default gs://BUCKET/jax-cache;
#                      `none`: no persistent cache)
#   --data-cache-mb N  gcsfuse file cache on each worker's boot disk (default 40000; 0: off)
#   --require-clean    refuse to ship a working tree with uncommitted changes (default: ship
#                      it as it is, tracked files and untracked ones git does not ignore, and
#                      record `git status` in ~/imprint-jax/src/.imprint-shipped)
#   --fresh            do not add --resume to `train`
#   --worker W         run: workers to run on (default all); logs: worker to follow (0)
#   --no-follow        run: return once started instead of streaming the log
#   --watch            run: poll every --poll seconds; recreate a preempted slice and resume
#                      the job; exit with the job's exit status when it ends
#   --poll SECONDS     how often to poll a queued resource or --watch (default 60)
#   --dry-run          print every gcloud command instead of running it (assumes no slice
#                      exists yet, so the whole create path is shown)
#
# Example (docs/tpu.md): stage 1 on a v5p-128 spot slice, data and outputs in gs://my-bucket
#   ./launch_tpu.sh run --name imprint --zone us-east5-a --type v5p-128 --spot --watch \
#       --bucket my-bucket -- train --config configs/stage1.py \
#       --workdir gs://my-bucket/imprint/stage1 --set init.checkpoint=gs://my-bucket/imprint/imported \
#       --set data.sources='(("/gcs/my-bucket/pairs/mvimgnet", 1.0),)'
#
# On the workers: ~/imprint-jax/src (the shipped tree; relative paths in the command resolve
# there), ~/imprint-jax/venv (Python 3.11 from uv, `.[tpu]` constrained by requirements.lock),
# ~/imprint-jax/run.log, run.pid, run.rc. Stock TPU images run Ubuntu 22.04 with Python 3.10,
# so uv (from PyPI) provides the 3.11. The workers reach the internet for uv, Python, PyPI and
# gcsfuse's apt repository.
set -euo pipefail

PROG=launch_tpu.sh
die() { echo "$PROG: error: $*" >&2; exit 2; }        # bad arguments or local state: exit 2
fail() { echo "$PROG: error: $*" >&2; exit 1; }       # the slice or a worker failed: exit 1
say() { echo "== $*"; }

# Shell-quotes its arguments for printing and for remote command lines.
q() {
  local a quoted=()
  for a in "$@"; do
    if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then quoted+=("$a")
    else quoted+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${quoted[*]}"
}

# ------------------------------------------------------------------------- worker side
# `launch_tpu.sh _worker ...` runs on each TPU VM worker, from the shipped tree, in $HOME.
ROOT_REMOTE="$HOME/imprint-jax"

worker_job_pid() {  # pid of a running job, or nothing
  local pid
  [[ -f "$ROOT_REMOTE/run.pid" ]] || return 0
  pid=$(cat "$ROOT_REMOTE/run.pid")
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

worker_setup() {  # _worker setup BUCKET DATA_CACHE_MB  (run from ~/imprint-jax/incoming)
  local bucket="$1" cache_mb="$2" pid
  pid=$(worker_job_pid)
  if [[ -n "$pid" ]]; then
    echo "$PROG: error: $HOSTNAME: a job is running (pid $pid); stop it first" \
         "(launch_tpu.sh stop)" >&2
    exit 3
  fi
  rm -rf "$ROOT_REMOTE/src"
  mv "$ROOT_REMOTE/incoming" "$ROOT_REMOTE/src"
  cd "$ROOT_REMOTE"
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v uv >/dev/null; then
    python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  uv python install 3.11
  [[ -x venv/bin/python ]] || uv venv -q --python 3.11 venv
  (cd src && uv pip install -q --python ../venv/bin/python -c requirements.lock '.[tpu]')
  if [[ -n "$bucket" ]]; then
    if ! command -v gcsfuse >/dev/null; then
      # gcsfuse's own apt repository and key (the image's archive does not carry it).
      local codename
      codename=$(lsb_release -cs)
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
        | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc]" \
           "https://packages.cloud.google.com/apt gcsfuse-$codename main" \
        | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      sudo apt-get update -qq
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse
    fi
    local mnt="/gcs/$bucket"
    if ! mountpoint -q "$mnt"; then
      sudo mkdir -p "$mnt"
      sudo chown "$(id -u):$(id -g)" "$mnt"
      # Read-only, and the data does not change during a run: cache metadata forever and
      # whole shards on local disk (grain reads records at random offsets in each shard).
      local flags=(-o ro --implicit-dirs --metadata-cache-ttl-secs=-1
                   --stat-cache-max-size-mb=-1 --type-cache-max-size-mb=-1
                   --kernel-list-cache-ttl-secs=-1)
      if [[ "$cache_mb" != 0 ]]; then
        mkdir -p "$ROOT_REMOTE/gcsfuse-cache"
        flags+=(--cache-dir="$ROOT_REMOTE/gcsfuse-cache" --file-cache-max-size-mb="$cache_mb"
                --file-cache-cache-file-for-range-read=true)
      fi
      gcsfuse "${flags[@]}" "$bucket" "$mnt"
    fi
  fi
  local pyv jaxv   # (separate assignments, so that a failure stops the setup)
  pyv=$(venv/bin/python --version)
  jaxv=$(venv/bin/python -c 'import jax; print("jax", jax.__version__)')
  echo "$HOSTNAME: ready ($pyv, $jaxv)"
}

worker_start() {  # _worker start JAX_CACHE -- IMPRINT_JAX_ARGS...
  local cache="$1" pid; shift 2
  pid=$(worker_job_pid)
  if [[ -n "$pid" ]]; then
    echo "$PROG: error: $HOSTNAME: a job is already running (pid $pid)" >&2; exit 3
  fi
  cd "$ROOT_REMOTE/src"
  rm -f "$ROOT_REMOTE/run.rc" "$ROOT_REMOTE/run.pid"
  if [[ "$cache" != none ]]; then export JAX_COMPILATION_CACHE_DIR="$cache"; fi
  echo "== $(date -u '+%F %T') imprint-jax $*" >> "$ROOT_REMOTE/run.log"
  # The job's own pid goes to run.pid (`stop` signals it); its exit status to run.rc.
  # shellcheck disable=SC2016  # (single quotes: expanded by the inner bash)
  R="$ROOT_REMOTE" nohup setsid bash -c \
    '"$@" >>"$R/run.log" 2>&1 & echo $! >"$R/run.pid"; wait $!; echo $? >"$R/run.rc"' \
    _ "$ROOT_REMOTE/venv/bin/imprint-jax" "$@" </dev/null >/dev/null 2>&1 &
  echo "$HOSTNAME: started imprint-jax $1"
}

worker_stop() {
  local pid
  pid=$(worker_job_pid)
  if [[ -z "$pid" ]]; then echo "$HOSTNAME: no job running"; return 0; fi
  kill -TERM "$pid"
  echo "$HOSTNAME: sent SIGTERM to $pid (train saves at the next step boundary and exits)"
}

worker_status() {
  local pid
  pid=$(worker_job_pid)
  if [[ -n "$pid" ]]; then echo "$HOSTNAME: running (pid $pid)"
  elif [[ -f "$ROOT_REMOTE/run.rc" ]]; then echo "$HOSTNAME: exited $(cat "$ROOT_REMOTE/run.rc")"
  else echo "$HOSTNAME: no job"; fi
}

if [[ "${1:-}" == _worker ]]; then
  case "${2:-}" in
    setup) worker_setup "${3:-}" "${4:-40000}" ;;
    start) shift 2; worker_start "$@" ;;
    stop) worker_stop ;;
    status) worker_status ;;
    *) die "unknown worker command ${2:-}" ;;
  esac
  exit 0
fi

# --------------------------------------------------------------------------- local side
VERB="${1:-}"
case "$VERB" in
  create|run|logs|status|stop|delete) shift ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") die "give a verb: create, run, logs, status, stop or delete (--help)" ;;
  *) die "unknown verb '$VERB' (create, run, logs, status, stop or delete)" ;;
esac

NAME="" ZONE="" PROJECT="" TYPE="" VERSION="" BUCKET="" JAX_CACHE="" WORKER=""
DATA_CACHE_MB=40000 POLL=60
SPOT=0 QUEUED=0 REQUIRE_CLEAN=0 FRESH=0 FOLLOW=1 WATCH=0 DRY=0
CMD=()
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name|--zone|--project|--type|--version|--bucket|--jax-cache|--data-cache-mb|--poll|--worker)
      need_value "$@"
      case "$1" in
        --name) NAME="$2" ;; --zone) ZONE="$2" ;; --project) PROJECT="$2" ;;
        --type) TYPE="$2" ;; --version) VERSION="$2" ;; --bucket) BUCKET="$2" ;;
        --jax-cache) JAX_CACHE="$2" ;; --data-cache-mb) DATA_CACHE_MB="$2" ;;
        --poll) POLL="$2" ;; --worker) WORKER="$2" ;;
      esac
      shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --require-clean) REQUIRE_CLEAN=1; shift ;;
    --fresh) FRESH=1; shift ;;
    --no-follow) FOLLOW=0; shift ;;
    --watch) WATCH=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; CMD=("$@"); break ;;
    *) die "unknown argument '$1' (--help lists the options)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$POLL" =~ ^[0-9]+$ ]] || die "--poll must be a number of seconds, not '$POLL'"
[[ "$DATA_CACHE_MB" =~ ^-?[0-9]+$ ]] || die "--data-cache-mb must be an integer, not '$DATA_CACHE_MB'"
[[ -z "$BUCKET" || "$BUCKET" =~ ^[a-z0-9][a-z0-9._-]*$ ]] \
  || die "--bucket takes a bucket name (my-bucket), not '$BUCKET'"
if [[ "$VERB" == create || "$VERB" == run ]]; then
  [[ -n "$TYPE" ]] || die "--type is required for $VERB (e.g. v5p-128, v5litepod-64, v6e-64)"
fi
if [[ "$VERB" == run ]]; then
  [[ ${#CMD[@]} -gt 0 ]] || die "run needs the imprint-jax command after --, e.g." \
    "-- train --config stage1 --workdir gs://BUCKET/run"
elif [[ ${#CMD[@]} -gt 0 ]]; then
  die "only run takes a command after --"
fi
if [[ -n "$WORKER" && ! "$WORKER" =~ ^(all|[0-9]+(,[0-9]+)*)$ ]]; then
  die "--worker takes all, N or N,M,..., not '$WORKER'"
fi
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    "") ;;
    *) [[ "$VERB" != create && "$VERB" != run ]] \
         || die "no default --version for --type $TYPE; give --version" ;;
  esac
fi
if [[ -z "$JAX_CACHE" ]]; then
  if [[ -n "$BUCKET" ]]; then JAX_CACHE="gs://$BUCKET/jax-cache"; else JAX_CACHE=none; fi
fi
if [[ $DRY -eq 0 ]]; then
  command -v gcloud >/dev/null || die "gcloud not found on PATH (install the Google Cloud CLI)"
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOC=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project "$PROJECT")
VM=(compute tpus tpu-vm)
QR=(compute tpus queued-resources)
REMOTE_TAR=imprint-jax-src.tar.gz

# Every gcloud call goes through here: printed instead of run under --dry-run.
gc() {
  if [[ $DRY -eq 1 ]]; then q gcloud "$@"; return 0; fi
  gcloud "$@"
}
ssh_on() {  # ssh_on WORKERS COMMAND
  gc "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker="$1" --command "$2"
}

# Sets STATE to the slice's state: a TPU VM's (READY, PREEMPTED, ...) or a queued
# resource's (ACTIVE, SUSPENDED, FAILED, WAITING_FOR_RESOURCES, ...); ABSENT when it does not
# exist. Under --dry-run the describe is printed and the slice taken as absent.
slice_state() {
  local args err rc=0
  if [[ $QUEUED -eq 1 ]]; then args=("${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)')
  else args=("${VM[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'); fi
  if [[ $DRY -eq 1 ]]; then gc "${args[@]}"; STATE=ABSENT; return 0; fi
  err=$(mktemp)
  STATE=$(gcloud "${args[@]}" 2>"$err") || rc=$?
  if [[ $rc -ne 0 ]]; then
    if grep -q -i "not.found" "$err"; then STATE=ABSENT
    else cat "$err" >&2; rm -f "$err"; fail "could not describe $NAME"; fi
  fi
  rm -f "$err"
  STATE="${STATE:-UNKNOWN}"
}

create_slice() {
  local args spot=""
  [[ $SPOT -eq 1 ]] && spot=", spot"
  if [[ $QUEUED -eq 1 ]]; then
    say "requesting queued resource $NAME ($TYPE$spot)"
    args=("${QR[@]}" create "$NAME" "${LOC[@]}" --node-id "$NAME" --accelerator-type "$TYPE"
          --runtime-version "$VERSION")
  else
    say "creating TPU VM $NAME ($TYPE$spot)"
    args=("${VM[@]}" create "$NAME" "${LOC[@]}" --accelerator-type "$TYPE" --version "$VERSION")
  fi
  [[ $SPOT -eq 1 ]] && args+=(--spot)
  gc "${args[@]}"
}

delete_slice() {
  if [[ $QUEUED -eq 1 ]]; then gc "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet
  else gc "${VM[@]}" delete "$NAME" "${LOC[@]}" --quiet; fi
}

# Brings the slice to READY (a TPU VM) or ACTIVE (a queued resource): creates it, reuses it,
# or deletes and recreates a preempted or failed one; then waits until it is up.
ensure_slice() {
  slice_state
  case "$STATE" in
    ABSENT) create_slice ;;
    READY|ACTIVE) say "reusing $NAME ($STATE)"; return 0 ;;
    PREEMPTED|TERMINATED|SUSPENDED|SUSPENDING|FAILED)
      say "$NAME is $STATE: deleting it and creating it again"
      delete_slice; create_slice ;;
    STOPPED) say "starting the stopped TPU VM $NAME"; gc "${VM[@]}" start "$NAME" "${LOC[@]}" ;;
    CREATING|STARTING|RESTARTING|REPAIRING|PROVISIONING|WAITING_FOR_RESOURCES|ACCEPTED) ;;
    *) fail "$NAME is in state $STATE (gcloud describe it to see why)" ;;
  esac
  [[ $DRY -eq 1 ]] && return 0
  while true; do
    slice_state
    case "$STATE" in
      READY|ACTIVE) say "$NAME is $STATE"; return 0 ;;
      ABSENT|FAILED|SUSPENDED|PREEMPTED|TERMINATED)
        fail "$NAME did not come up (state $STATE); \`$PROG delete\` it and try again" ;;
    esac
    say "$NAME is $STATE; checking again in ${POLL}s"
    sleep "$POLL"
  done
}

# What is shipped: the working tree as it is (tracked files and untracked ones git does not
# ignore), with .imprint-shipped recording the commit and `git status`. check_tree runs before
# any gcloud call, so --require-clean refuses a dirty tree before anything is created.
check_tree() {
  git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 \
    || die "$REPO is not a git checkout; launch_tpu.sh ships a git working tree"
  CHANGES=$(git -C "$REPO" status --porcelain)
  NCHANGES=$(grep -c . <<<"$CHANGES" || true)
  if [[ $NCHANGES -gt 0 && $REQUIRE_CLEAN -eq 1 ]]; then
    die "the working tree has $NCHANGES uncommitted change(s) (git status); commit them or drop --require-clean"
  fi
  COMMIT=$(git -C "$REPO" rev-parse --short HEAD)
}

make_tarball() {
  local out="$1" meta
  meta=$(mktemp -d)
  { echo "commit $(git -C "$REPO" rev-parse HEAD)"; echo "uncommitted changes: $NCHANGES"
    if [[ -n "$CHANGES" ]]; then echo "$CHANGES"; fi; } > "$meta/.imprint-shipped"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done) \
     > "$meta/files"
  tar -czf "$out" -C "$REPO" --null -T "$meta/files" -C "$meta" .imprint-shipped
  rm -rf "$meta"
}

ship_and_install() {
  local tarball tmp=""
  if [[ $NCHANGES -gt 0 ]]; then say "shipping the working tree of $COMMIT with $NCHANGES uncommitted change(s)"
  else say "shipping commit $COMMIT"; fi
  if [[ $DRY -eq 1 ]]; then tarball="${TMPDIR:-/tmp}/$REMOTE_TAR"
  else tmp=$(mktemp -d); tarball="$tmp/$REMOTE_TAR"; make_tarball "$tarball"; fi
  gc "${VM[@]}" scp "$tarball" "$NAME:$REMOTE_TAR" "${LOC[@]}" --worker=all
  if [[ -n "$tmp" ]]; then rm -rf "$tmp"; fi
  say "installing on every worker (uv, Python 3.11, .[tpu]${BUCKET:+, read-only gcsfuse mount of gs://$BUCKET at /gcs/$BUCKET})"
  ssh_on all "set -e; mkdir -p imprint-jax; rm -rf imprint-jax/incoming; mkdir imprint-jax/incoming; tar -xzf $REMOTE_TAR -C imprint-jax/incoming; bash imprint-jax/incoming/launch_tpu.sh _worker setup $(q "$BUCKET" "$DATA_CACHE_MB")"
}

job_args() {  # the imprint-jax command as run on the workers
  local a has_dist=0 has_resume=0
  JOB=("${CMD[@]}")
  for a in "${CMD[@]}"; do
    [[ "$a" == --distributed ]] && has_dist=1
    [[ "$a" == --resume ]] && has_resume=1
  done
  case "${CMD[0]}" in
    train)
      [[ $has_dist -eq 0 ]] && JOB+=(--distributed)
      [[ $has_resume -eq 0 && $FRESH -eq 0 ]] && JOB+=(--resume) ;;
    encode-objects|encode-latents) [[ $has_dist -eq 0 ]] && JOB+=(--distributed) ;;
  esac
  return 0
}

start_job() {
  job_args
  say "starting imprint-jax ${JOB[0]} on worker(s) ${WORKER:-all}"
  ssh_on "${WORKER:-all}" "bash imprint-jax/src/launch_tpu.sh _worker start $(q "$JAX_CACHE") -- $(q "${JOB[@]}")"
}

follow_log() {
  say "streaming worker ${1}'s log (Ctrl-C stops the streaming, not the job; \`$PROG logs\` reattaches)"
  ssh_on "$1" "tail -n +1 -F imprint-jax/run.log"
}

# run --watch: polls the slice and the job until the job ends. A preempted slice is
# recreated and the job started again (train resumes from its latest checkpoint); a job that
# vanished without an exit status (the VM restarted under it) is started again.
watch_job() {
  local first="${WORKER:-all}" out rc
  [[ "$first" == all ]] && first=0
  first="${first%%,*}"
  while true; do
    sleep "$POLL"
    slice_state
    case "$STATE" in
      READY|ACTIVE)
        out=$(ssh_on "$first" "bash imprint-jax/src/launch_tpu.sh _worker status") || out="ssh failed"
        if [[ "$out" =~ exited\ ([0-9]+) ]]; then
          rc="${BASH_REMATCH[1]}"; say "the job ended with exit status $rc"; exit "$rc"
        elif [[ "$out" == *"no job"* ]]; then
          say "$(date -u '+%F %T') the job is gone from worker $first without an exit status: starting it again"
          start_job
        else
          say "$(date -u '+%F %T') $NAME $STATE; worker $first: $out"
        fi ;;
      *)
        say "$(date -u '+%F %T') $NAME is $STATE: recreating it and resuming"
        ensure_slice; ship_and_install; start_job ;;
    esac
  done
}

case "$VERB" in
  create)
    check_tree; ensure_slice; ship_and_install ;;
  run)
    check_tree; ensure_slice; ship_and_install; start_job
    if [[ $WATCH -eq 1 && $DRY -eq 1 ]]; then say "--watch would now poll $NAME every ${POLL}s"
    elif [[ $WATCH -eq 1 ]]; then watch_job
    elif [[ $FOLLOW -eq 1 ]]; then w="${WORKER:-0}"; [[ "$w" == all ]] && w=0; follow_log "${w%%,*}"; fi ;;
  logs)
    follow_log "${WORKER:-0}" ;;
  status)
    slice_state; echo "$NAME: $STATE"
    if [[ "$STATE" == READY || "$STATE" == ACTIVE ]]; then
      ssh_on all "bash imprint-jax/src/launch_tpu.sh _worker status"
    fi ;;
  stop)
    ssh_on all "bash imprint-jax/src/launch_tpu.sh _worker stop" ;;
  delete)
    say "deleting $NAME"; delete_slice ;;
esac
