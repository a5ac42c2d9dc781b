#!/bin/sh
# Train / sample with main.py under torchrun: one process per visible GPU, one on a CPU-only
# machine. Every flag is passed through to main.py, e.g.
#   sh run.sh --config=config.py:checkerboard --config.train.steps=2000
# Launch overrides (multi-node: run the same command on every node with its NODE_RANK):
#   NPROC (processes on this node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT;
#   SHUTDOWN_TIMEOUT: seconds the workers get to checkpoint after a stop signal (default 120).
#   Each must be a whole number in its range, else one `error:` line before anything runs.
# SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 to this script (or its process group) is forwarded to the
# workers: in training they finish the current step, save a checkpoint and exit 0 (rerun to
# resume); in sample / eval / info they stop with one line and 128 + the signal. Workers
# stop the same way when the launcher dies (even by SIGKILL). torchrun runs through utils.py,
# which keeps torchrun's own tracebacks out of the way: a mistake prints one `error:` line.
set -e
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# One line for a launch variable that is not a whole number in its range: NAME VALUE MIN MAX.
check_int() {
  case "$2" in
    '' | *[!0-9]* | ??????????*) ok=no ;;
    *) if [ "$2" -ge "$3" ] && [ "$2" -le "$4" ]; then ok=yes; else ok=no; fi ;;
  esac
  if [ "$ok" = no ]; then
    echo "error: $1=$2 must be a whole number in [$3, $4]" >&2
    exit 1
  fi
}
[ -z "$NPROC" ] || check_int NPROC "$NPROC" 1 1024
check_int NNODES "${NNODES:-1}" 1 100000
check_int NODE_RANK "${NODE_RANK:-0}" 0 $((${NNODES:-1} - 1))
[ -z "$MASTER_PORT" ] || check_int MASTER_PORT "$MASTER_PORT" 1 65535
check_int SHUTDOWN_TIMEOUT "${SHUTDOWN_TIMEOUT:-120}" 0 86400
sh scripts/ensure_requirements.sh
if [ -z "$NPROC" ]; then
  NPROC=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
NNODES=${NNODES:-1}
LAUNCH="--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2 --shutdown-timeout=${SHUTDOWN_TIMEOUT:-120}"
if [ "$NNODES" = 1 ] && [ -z "$MASTER_ADDR" ] && [ -z "$MASTER_PORT" ]; then
  exec $PY utils.py $LAUNCH --standalone --nproc_per_node="$NPROC" main.py "$@"
fi
exec $PY utils.py $LAUNCH --nproc_per_node="$NPROC" --nnodes="$NNODES" \
  --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" main.py "$@"
