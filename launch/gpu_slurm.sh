#!/usr/bin/env bash
# Defaults for `sbatch launch/gpu_slurm.sh ...`; the options of a plain
# `launch/gpu_slurm.sh ...` (which calls sbatch itself) override them.
#SBATCH --job-name=md4
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# Runs md4 training on a multi-node GPU SLURM cluster.
# Walk-through: launch/README.md. Options: launch/gpu_slurm.sh --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh --config=configs/NAME.py --workdir=DIR [options] [-- md4.main flags]

Outside a SLURM allocation it submits itself with sbatch. Inside one (sbatch,
salloc, or a requeued job) it starts md4.main with srun, one process per node
(default) or per GPU, each with explicit distributed flags:
  python -u -m md4.main --config=CONFIG --workdir=WORKDIR [md4.main flags]
      --coordinator_address=FIRST_NODE:PORT --num_processes=N --process_id=$SLURM_PROCID
Re-running the same command resumes from the latest checkpoint in WORKDIR.
When md4.main is preempted (SIGTERM from a preemption or the time limit: it
saves and exits with 75), the job requeues itself (scontrol requeue) and the
requeued job resumes.

Required:
  --config=PATH         experiment config, relative to the repository root
  --workdir=DIR         checkpoints, metrics.jsonl, TensorBoard events, on a file
                        system every node sees (or gs://)

Resources (used when submitting; inside an allocation, its own are used):
  --nodes=N             number of nodes (default 8; MD4_SLURM_NODES)
  --gpus-per-node=G     GPUs per node (default 8, or $SLURM_GPUS_ON_NODE inside an allocation)
  --procs=MODE          per-node: one process per node sees all its GPUs (default)
                        per-gpu:  one process per GPU, CUDA_VISIBLE_DEVICES = its local rank
  --job-name=NAME       SLURM job name (default md4)
  --time=D-HH:MM:SS     time limit passed to sbatch (default: the partition's)
  --sbatch-arg=ARG      extra sbatch option, e.g. --sbatch-arg=--partition=gpu (repeatable)

Run:
  --python=PATH         Python with md4 installed, same path on every node
                        (default: python; MD4_PYTHON)
  --repo-dir=DIR        checkout the tasks run in (default: the one holding this
                        script, or $SLURM_SUBMIT_DIR under a bare sbatch)
  --port=PORT           coordinator port (default 61440 + job id mod 4096)
  --env=KEY=VALUE       export KEY=VALUE to every task (repeatable)
  --log-dir=DIR         logs: DIR/<job id>/task-<rank>.log (default REPO/logs/slurm)
  --dry-run             print every command instead of running it
  -h, --help            show this help

Everything after "--" goes to md4.main unchanged, e.g. -- --config.batch_size=1024.
EOF
}

die() {
  echo "gpu_slurm.sh: error: $*" >&2
  echo "Run launch/gpu_slurm.sh --help for usage." >&2
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

# The md4.main exit code that means "preempted, checkpoint saved: re-run me" (md4.runtime.errors).
PREEMPTED_EXIT_CODE=75
SCRIPT_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
readonly SCRIPT_PATH

CONFIG=""
WORKDIR=""
NODES=""
GPUS_PER_NODE=""
PROCS="per-node"
JOB_NAME="md4"
TIME_LIMIT=""
SBATCH_ARGS=()
PYTHON=${MD4_PYTHON:-python}
REPO_DIR=""
PORT=""
ENV_VARS=()
LOG_DIR=""
DRY_RUN=0
EXTRA_ARGS=()

set_option() {
  case $1 in
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS_PER_NODE=$2 ;;
    --procs) PROCS=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --time) TIME_LIMIT=$2 ;;
    --sbatch-arg) SBATCH_ARGS+=("$2") ;;
    --python) PYTHON=$2 ;;
    --repo-dir) REPO_DIR=$2 ;;
    --port) PORT=$2 ;;
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

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

[[ -n $CONFIG ]] || die "--config is required (e.g. --config=configs/text8.py)"
[[ -n $WORKDIR ]] || die "--workdir is required (e.g. --workdir=/shared/md4/run1)"
[[ $PROCS == per-node || $PROCS == per-gpu ]] || die "--procs must be per-node or per-gpu, got '$PROCS'"
[[ -z $NODES ]] || is_count "$NODES" || die "--nodes must be a positive integer, got '$NODES'"
[[ -z $GPUS_PER_NODE ]] || is_count "$GPUS_PER_NODE" ||
  die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"
[[ -z $PORT ]] || { is_count "$PORT" && ((PORT < 65536)); } || die "--port must be in 1..65535, got '$PORT'"

# The checkout: sbatch runs a copy of this script from its spool directory, so
# fall back to the directory sbatch was called from.
if [[ -z $REPO_DIR ]]; then
  REPO_DIR=$(dirname "$(dirname "$SCRIPT_PATH")")
  if [[ ! -f $REPO_DIR/pyproject.toml ]]; then
    REPO_DIR=${SLURM_SUBMIT_DIR:-}
  fi
fi
[[ -n $REPO_DIR && -f $REPO_DIR/pyproject.toml ]] ||
  die "--repo-dir '$REPO_DIR' is not an md4 checkout (no pyproject.toml)"
REPO_DIR=$(cd "$REPO_DIR" && pwd)
# ml_collections allows "path:argument"; only the path must exist.
[[ -f $REPO_DIR/${CONFIG%%:*} ]] || die "--config '${CONFIG%%:*}' not found under $REPO_DIR"
LOG_DIR=${LOG_DIR:-$REPO_DIR/logs/slurm}
[[ $LOG_DIR == /* ]] || LOG_DIR=$PWD/$LOG_DIR

submit() {
  local nodes=${NODES:-${MD4_SLURM_NODES:-8}} gpus=${GPUS_PER_NODE:-8} tasks_per_node=1
  is_count "$nodes" || die "MD4_SLURM_NODES must be a positive integer, got '$nodes'"
  if [[ $PROCS == per-gpu ]]; then
    tasks_per_node=$gpus
  fi
  local sbatch=(sbatch --job-name="$JOB_NAME" --nodes="$nodes" --gpus-per-node="$gpus"
    --ntasks-per-node="$tasks_per_node" --exclusive --requeue --signal=TERM@120
    --open-mode=append --output="$LOG_DIR/%x-%j.out")
  if [[ -n $TIME_LIMIT ]]; then
    sbatch+=(--time="$TIME_LIMIT")
  fi
  sbatch+=("${SBATCH_ARGS[@]}" "$SCRIPT_PATH" --config="$CONFIG" --workdir="$WORKDIR"
    --gpus-per-node="$gpus" --procs="$PROCS" --python="$PYTHON" --repo-dir="$REPO_DIR"
    --log-dir="$LOG_DIR")
  if [[ -n $PORT ]]; then
    sbatch+=(--port="$PORT")
  fi
  local kv
  for kv in "${ENV_VARS[@]}"; do
    sbatch+=(--env="$kv")
  done
  run mkdir -p "$LOG_DIR"
  run "${sbatch[@]}" -- "${EXTRA_ARGS[@]}"
}

# Per task: the rank comes from SLURM_PROCID. Under --procs=per-gpu each task
# keeps the GPU of its local rank (picked from the node's CUDA_VISIBLE_DEVICES
# when SLURM set one) and JAX uses it as local device 0.
# Arguments: the number of words before the per-task flag, then the command.
# shellcheck disable=SC2016  # the task's bash expands these, not this one
task_script() {
  local pick_gpu=""
  if [[ $PROCS == per-gpu ]]; then
    pick_gpu='IFS=, read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-}"; '
    pick_gpu+='if (( ${#gpus[@]} != 1 )); then export CUDA_VISIBLE_DEVICES="${gpus[SLURM_LOCALID]:-$SLURM_LOCALID}"; fi; '
    pick_gpu+='export JAX_LOCAL_DEVICE_IDS=0; '
  fi
  printf '%s' "${pick_gpu}"'n=$1; shift; exec "${@:1:n}" --process_id="$SLURM_PROCID" "${@:n+1}"'
}

launch() {
  local hosts=()
  mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-}")
  ((${#hosts[@]})) || die "scontrol show hostnames '${SLURM_JOB_NODELIST:-}' listed no nodes"
  local num_nodes=${#hosts[@]}
  [[ -z $NODES || $NODES == "$num_nodes" ]] || die "--nodes=$NODES but the allocation has $num_nodes nodes"
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  is_count "$gpus" || die "--gpus-per-node is needed: SLURM_GPUS_ON_NODE is not set in this allocation"
  local port=${PORT:-$((61440 + SLURM_JOB_ID % 4096))}
  local tasks_per_node=1
  if [[ $PROCS == per-gpu ]]; then
    tasks_per_node=$gpus
  fi
  local num_procs=$((num_nodes * tasks_per_node))
  local coordinator="${hosts[0]}:$port"

  local kv
  for kv in "${ENV_VARS[@]}"; do
    export "${kv?}"
  done
  local device_ids
  if [[ $PROCS == per-node ]]; then
    # JAX would otherwise take SLURM_LOCALID (0) as the only local GPU.
    device_ids=$(seq -s, 0 $((gpus - 1)))
    export JAX_LOCAL_DEVICE_IDS="$device_ids"
  fi

  local main=("$PYTHON" -u -m md4.main --config="$CONFIG" --workdir="$WORKDIR"
    --coordinator_address="$coordinator" --num_processes="$num_procs")
  local task_log_dir="$LOG_DIR/$SLURM_JOB_ID"
  if ((DRY_RUN)); then
    echo "# job $SLURM_JOB_ID: $num_nodes nodes x $tasks_per_node process(es) per node, coordinator $coordinator"
    local rank env_text
    for ((rank = 0; rank < num_procs; rank++)); do
      if [[ $PROCS == per-gpu ]]; then
        env_text="CUDA_VISIBLE_DEVICES=$((rank % tasks_per_node)) JAX_LOCAL_DEVICE_IDS=0"
      else
        env_text="JAX_LOCAL_DEVICE_IDS=$device_ids"
      fi
      echo "# task $rank on ${hosts[rank / tasks_per_node]} (local rank $((rank % tasks_per_node))):" \
        "$env_text $(quote_all "${main[@]}" --process_id="$rank" "${EXTRA_ARGS[@]}")"
    done
  fi
  run mkdir -p "$task_log_dir"
  local rc=0
  run srun --nodes="$num_nodes" --ntasks="$num_procs" --ntasks-per-node="$tasks_per_node" \
    --distribution=block --kill-on-bad-exit=1 --chdir="$REPO_DIR" \
    --open-mode=append --output="$task_log_dir/task-%t.log" \
    bash -c "$(task_script)" md4-task "${#main[@]}" "${main[@]}" "${EXTRA_ARGS[@]}" || rc=$?
  if ((DRY_RUN)); then
    echo "# if md4.main exits with $PREEMPTED_EXIT_CODE (preempted, checkpoint saved), requeue the job:"
  fi
  if ((DRY_RUN || rc == PREEMPTED_EXIT_CODE)); then
    run scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  launch
else
  submit
fi
