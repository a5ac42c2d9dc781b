#!/bin/sh
# Train / sample with main.py under torchrun: one process per visible GPU, one on a CPU-only
# machine. Every flag is passed through to main.py, e.g.
#   sh run.sh --config=config.py:checkerboard --config.train.steps=2000
# Launch overrides (multi-node: run the same command on every node with its NODE_RANK):
#   NPROC (processes on this node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
set -e
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
sh scripts/ensure_requirements.sh
if [ -z "$NPROC" ]; then
  NPROC=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
NNODES=${NNODES:-1}
if [ "$NNODES" = 1 ] && [ -z "$MASTER_ADDR" ] && [ -z "$MASTER_PORT" ]; then
  exec $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" main.py "$@"
fi
exec $PY -m torch.distributed.run --nproc_per_node="$NPROC" --nnodes="$NNODES" \
  --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" main.py "$@"
