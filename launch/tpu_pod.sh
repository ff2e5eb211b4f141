#!/usr/bin/env bash
# Runs md4 training on every worker of a Cloud TPU VM slice (created if missing),
# again after a preemption, until it ends.
# Walk-through: launch/README.md. Options: launch/tpu_pod.sh --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --config=configs/NAME.py --workdir=gs://BUCKET/DIR [options] [-- md4.main flags]

Creates the Cloud TPU VM slice if it does not exist (reuses it if it does),
through a queued resource by default, copies this checkout to every worker,
installs it into ~/md4-venv (with md4's [gcs] extra), then runs
  python -m md4.main --config=CONFIG --workdir=WORKDIR [md4.main flags]
on all workers at once (gcloud compute tpus tpu-vm ssh --worker=all).
md4.main finds the other workers by itself (jax.distributed on Cloud TPU).
When the run is preempted (md4.main exits with 75, or the slice goes away),
the slice is recreated if need be and the run resumed, up to --max-restarts
times. Re-running the same command also resumes from the latest checkpoint.

Required:
  --config=PATH            experiment config, relative to the repository root
  --workdir=DIR            checkpoints, metrics.jsonl, TensorBoard events. Use a
                           gs:// path: every worker must see the same directory.

Slice (option / environment variable / default):
  --name=NAME              MD4_TPU_NAME     md4-$USER
  --zone=ZONE              MD4_TPU_ZONE     us-west4-a
  --project=PROJECT        MD4_TPU_PROJECT  the project gcloud is configured with
  --accelerator-type=TYPE  MD4_TPU_TYPE     v5litepod-256 (v5e, 256 chips, 32 workers)
  --runtime-version=VER    MD4_TPU_VERSION  v2-alpha-tpuv5-lite (the v5e runtime)
  --spot                   create the slice as a Spot VM (cheaper; may be preempted)
  --create-with=HOW        MD4_TPU_CREATE_WITH  queued-resources (default: queues the
                           request until capacity is free, the path Google recommends)
                           or tpu-vm (gcloud compute tpus tpu-vm create: now or never)

Code and install:
  --repo-dir=DIR           checkout to copy as a tarball (default: the one holding this script)
  --git-url=URL            git clone URL on every worker instead of copying a tarball
  --git-ref=REF            branch or tag to clone (default: main)
  --python-version=X.Y     Python of the worker venv ~/md4-venv (default 3.12; md4 needs >= 3.11)
  --skip-setup             do not create, copy or install: only run

Run:
  --env=KEY=VALUE          export KEY=VALUE on every worker before md4.main (repeatable)
  --prepare-data           run python -m md4.data.prepare (same config and --config.* flags)
                           on every worker first: each worker reads its own data_dir
  --detach                 start md4.main under nohup and return at once (no restarts)
  --max-restarts=N         resume after at most N preemptions (default 10)
  --log-dir=DIR            local copy of all workers' output (default: REPO/logs/tpu)
  --dry-run                print every command instead of running it (gcloud is not called)
  -h, --help               show this help

Everything after "--" goes to md4.main unchanged, e.g. -- --config.batch_size=1024.
Each worker appends its output to ~/md4-logs/worker-<id>.log on that worker.
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  echo "Run launch/tpu_pod.sh --help for usage." >&2
  exit 2
}

# Quotes one word for a POSIX shell; words made only of safe characters stay bare.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out=() word
  for word in "$@"; do
    out+=("$(quote "$word")")
  done
  printf '%s' "${out[*]}"
}

# Prints the command (stdout under --dry-run, stderr with a "+ " otherwise) and runs it unless --dry-run.
run() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR

default_name="md4-${USER:-user}"
default_name=${default_name,,}
CONFIG=""
WORKDIR=""
TPU_NAME=${MD4_TPU_NAME:-${default_name//[^a-z0-9-]/-}}
ZONE=${MD4_TPU_ZONE:-us-west4-a}
PROJECT=${MD4_TPU_PROJECT:-}
ACCELERATOR_TYPE=${MD4_TPU_TYPE:-v5litepod-256}
RUNTIME_VERSION=${MD4_TPU_VERSION:-v2-alpha-tpuv5-lite}
SPOT=0
CREATE_WITH=${MD4_TPU_CREATE_WITH:-queued-resources}
MAX_RESTARTS=10
REPO_DIR=$(dirname "$SCRIPT_DIR")
GIT_URL=""
GIT_REF="main"
PYTHON_VERSION="3.12"
SKIP_SETUP=0
PREPARE_DATA=0
ENV_VARS=()
DETACH=0
LOG_DIR=""
DRY_RUN=0
EXTRA_ARGS=()

set_option() {
  case $1 in
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --name) TPU_NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --runtime-version) RUNTIME_VERSION=$2 ;;
    --create-with) CREATE_WITH=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
    --repo-dir) REPO_DIR=$2 ;;
    --git-url) GIT_URL=$2 ;;
    --git-ref) GIT_REF=$2 ;;
    --python-version) PYTHON_VERSION=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --env)
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$2'"
      ENV_VARS+=("$2")
      ;;
    *) die "unknown option '$1'" ;;
  esac
}

while (($#)); do
  case $1 in
    --)
      shift
      EXTRA_ARGS=("$@")
      break
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --prepare-data) PREPARE_DATA=1 ;;
    --detach) DETACH=1 ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --*)
      (($# >= 2)) || die "option '$1' needs a value"
      set_option "$1" "$2"
      shift
      ;;
    *) die "unexpected argument '$1' (md4.main flags go after --)" ;;
  esac
  shift
done

[[ -n $CONFIG ]] || die "--config is required (e.g. --config=configs/text8.py)"
[[ -n $WORKDIR ]] || die "--workdir is required (e.g. --workdir=gs://my-bucket/md4/run1)"
[[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$TPU_NAME' is not a valid TPU name (lowercase letters, digits, '-'; starts with a letter)"
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version expects X.Y, got '$PYTHON_VERSION'"
[[ $CREATE_WITH == queued-resources || $CREATE_WITH == tpu-vm ]] ||
  die "--create-with must be queued-resources or tpu-vm, got '$CREATE_WITH'"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts expects a number >= 0, got '$MAX_RESTARTS'"
if [[ -z $GIT_URL ]]; then
  [[ -f $REPO_DIR/pyproject.toml ]] || die "--repo-dir '$REPO_DIR' is not an md4 checkout (no pyproject.toml)"
  REPO_DIR=$(cd "$REPO_DIR" && pwd)
  # ml_collections allows "path:argument"; only the path must exist.
  [[ -f $REPO_DIR/${CONFIG%%:*} ]] || die "--config '${CONFIG%%:*}' not found under $REPO_DIR"
fi
[[ $WORKDIR == gs://* ]] ||
  echo "tpu_pod.sh: warning: --workdir '$WORKDIR' is not gs://; every worker must see the same directory" >&2
LOG_DIR=${LOG_DIR:-$REPO_DIR/logs/tpu}

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT")
fi
TPU_VM=(gcloud compute tpus tpu-vm)
QUEUED=(gcloud compute tpus queued-resources)
# The md4.main exit code that means "preempted, checkpoint saved: re-run me" (md4.runtime.errors).
PREEMPTED_EXIT_CODE=75

if [[ $CREATE_WITH == queued-resources ]]; then
  # The queued resource and its one node share the name.
  CREATE=("${QUEUED[@]}" create "$TPU_NAME" --node-id="$TPU_NAME" "${GCLOUD_FLAGS[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" --quiet)
  DESCRIBE=("${QUEUED[@]}" describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --format='value(state.state)')
  DELETE=("${QUEUED[@]}" delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --force --quiet)
else
  CREATE=("${TPU_VM[@]}" create "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" --quiet)
  DESCRIBE=("${TPU_VM[@]}" describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)')
  DELETE=("${TPU_VM[@]}" delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet)
fi
if ((SPOT)); then
  CREATE+=(--spot)
fi

# The slice's state, MISSING when it does not exist.
slice_state() {
  echo "+ $(quote_all "${DESCRIBE[@]}")" >&2
  "${DESCRIBE[@]}" 2>/dev/null || echo MISSING
}

# Creates the slice, or reuses it; sets CREATED=1 when it had to be (re)created.
# Ready (READY, ACTIVE) is used as is; a stopped TPU VM is started; a preempted or
# failed one (PREEMPTED, TERMINATED, SUSPENDED, FAILED) is deleted and created again;
# a request in the queue or a slice in transition is awaited.
ensure_slice() {
  CREATED=0
  if ((DRY_RUN)); then
    run "${DESCRIBE[@]}"
    echo "# if the slice does not exist (or was preempted), create it:"
    run "${CREATE[@]}"
    return
  fi
  local state
  while true; do
    state=$(slice_state)
    case $state in
      READY | ACTIVE) return ;;
      MISSING)
        run "${CREATE[@]}"
        CREATED=1
        ;;
      STOPPED) run "${TPU_VM[@]}" start "$TPU_NAME" "${GCLOUD_FLAGS[@]}" ;;
      PREEMPTED | TERMINATED | SUSPENDED | FAILED) run "${DELETE[@]}" ;;
      CREATING | STARTING | RESTARTING | REPAIRING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | SUSPENDING | DELETING)
        echo "tpu_pod.sh: slice $TPU_NAME is $state; waiting" >&2
        sleep 30
        ;;
      *) die "slice $TPU_NAME is in state '$state'; fix or delete it, or choose another --name" ;;
    esac
  done
}

# Runs the given steps as one bash script on every worker of the slice; under
# --dry-run the steps are also listed one per line, for reading.
on_all_workers() {
  if ((DRY_RUN)); then
    echo "# on every worker, bash runs:"
    printf '#   %s\n' "$@"
  fi
  local script
  script=$(printf '%s; ' "$@")
  run "${TPU_VM[@]}" ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="bash -c $(quote "${script%; }")"
}

setup_workers() {
  local fetch
  if [[ -n $GIT_URL ]]; then
    fetch="git clone --quiet --depth=1 --branch=$(quote "$GIT_REF") $(quote "$GIT_URL") \"\$HOME/md4\""
  else
    local tarball
    if ((DRY_RUN)); then
      tarball="${TMPDIR:-/tmp}/md4-launch/md4.tar.gz"
    else
      tmp_dir=$(mktemp -d)
      trap 'rm -rf "$tmp_dir"' EXIT
      tarball="$tmp_dir/md4.tar.gz"
    fi
    run tar -czf "$tarball" -C "$REPO_DIR" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=./logs .
    run "${TPU_VM[@]}" scp "$tarball" "$TPU_NAME:md4.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
    fetch="mkdir -p \"\$HOME/md4\" && tar -xzf \"\$HOME/md4.tar.gz\" -C \"\$HOME/md4\""
  fi
  local python="\"\$HOME/md4-venv/bin/python\""
  on_all_workers \
    "set -euo pipefail" \
    "rm -rf \"\$HOME/md4\"" \
    "$fetch" \
    "python3 -m pip install --user --quiet --upgrade uv" \
    "[ -x \"\$HOME/md4-venv/bin/python\" ] || python3 -m uv venv --seed --python=$PYTHON_VERSION \"\$HOME/md4-venv\"" \
    "$python -m pip install --quiet --upgrade pip" \
    "$python -m pip install --quiet -e \"\$HOME/md4[gcs]\" \"jax[tpu]\""
}

# The steps each worker runs: its worker id (from the metadata server) names its log file.
run_steps() {
  local main steps
  main="\"\$HOME/md4-venv/bin/python\" -u -m md4.main $(quote_all --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}")"
  steps=(
    "set -euo pipefail"
    "cd \"\$HOME/md4\""
    "wid=\$(curl -sf -m 5 -H \"Metadata-Flavor: Google\" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)"
    "mkdir -p \"\$HOME/md4-logs\""
    "log=\"\$HOME/md4-logs/worker-\$wid.log\""
  )
  local kv
  for kv in "${ENV_VARS[@]}"; do
    steps+=("export $(quote "$kv")")
  done
  if ((PREPARE_DATA)); then
    local config_flags=(--config="$CONFIG") arg
    for arg in "${EXTRA_ARGS[@]}"; do
      if [[ $arg == --config.* ]]; then
        config_flags+=("$arg")
      fi
    done
    steps+=("\"\$HOME/md4-venv/bin/python\" -m md4.data.prepare $(quote_all "${config_flags[@]}") 2>&1 | tee -a \"\$log\" | tail -n 1 | sed \"s/^/[worker \$wid] /\"")
  fi
  steps+=("echo \"=== md4 run started \$(date -u +%FT%TZ) on worker \$wid ===\" >> \"\$log\"")
  if ((DETACH)); then
    steps+=(
      "{ nohup $main >> \"\$log\" 2>&1 < /dev/null & }"
      "echo \"[worker \$wid] md4.main started (pid \$!), log: \$log\""
    )
  else
    steps+=("$main 2>&1 | tee -a \"\$log\" | sed -u \"s/^/[worker \$wid] /\"")
  fi
  RUN_STEPS=("${steps[@]}")
}

local_log="$LOG_DIR/$TPU_NAME-$(date -u +%Y%m%dT%H%M%SZ).log"
run_steps
if ((DRY_RUN)); then
  if ((!SKIP_SETUP)); then
    ensure_slice
    setup_workers
  fi
  run mkdir -p "$LOG_DIR"
  echo "# the output of all workers, each line prefixed [worker N], is also appended to $local_log"
  on_all_workers "${RUN_STEPS[@]}"
  echo "# if md4.main was preempted (exit code $PREEMPTED_EXIT_CODE, or the slice is gone): the same again, up to --max-restarts=$MAX_RESTARTS times"
  exit 0
fi

mkdir -p "$LOG_DIR"
restarts=0
while true; do
  if ((!SKIP_SETUP)); then
    ensure_slice
    if ((CREATED || restarts == 0)); then
      setup_workers
    fi
  fi
  attempt_log=$(mktemp)
  set +e
  on_all_workers "${RUN_STEPS[@]}" 2>&1 | tee -a "$local_log" "$attempt_log"
  rc=${PIPESTATUS[0]}
  set -e
  # gcloud may not pass the workers' exit code on; their last words say it too.
  preempted=0
  if ((rc == PREEMPTED_EXIT_CODE)) || grep -q "md4: Preempted" "$attempt_log"; then
    preempted=1
  elif ((rc != 0 && !SKIP_SETUP)) && [[ ! $(slice_state) =~ ^(READY|ACTIVE)$ ]]; then
    preempted=1 # The slice went away under the run.
  fi
  rm -f "$attempt_log"
  if ((DETACH || !preempted)); then
    exit "$rc"
  fi
  if ((restarts >= MAX_RESTARTS)); then
    echo "tpu_pod.sh: preempted again after $restarts restarts (--max-restarts); re-run this command to resume" >&2
    exit "$PREEMPTED_EXIT_CODE"
  fi
  restarts=$((restarts + 1))
  echo "tpu_pod.sh: the run was preempted; resuming it (restart $restarts of at most $MAX_RESTARTS)" >&2
done
