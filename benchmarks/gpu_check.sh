#!/bin/sh
# GPU smoke test: prints PASS / FAIL per item and exits non-zero if any failed.
#
#   sh benchmarks/gpu_check.sh                 # on a CUDA machine
#   ALLOW_CPU=1 sh benchmarks/gpu_check.sh     # the same items on the CPU (checks the script)
#
# Items: a bf16 + torch.compile training run; no host sync in the training step of eight checks
# (fp32 and bf16, CUDA's sync debug mode set to "error"); a NCCL all-reduce through torchrun; a
# run through run.sh (every visible GPU, NCCL when there are several); sampling from its
# checkpoint; an exact resume (3 + 3 steps against 6 in one go, every tensor of the two
# checkpoints compared). Work goes to a temporary folder that is removed at the end.
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FAILED=0

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ -z "$ALLOW_CPU" ]; then
    echo "no CUDA device: nothing checked (ALLOW_CPU=1 runs the items on the CPU)"
    exit 1
  fi
  echo "no CUDA device: running the items on the CPU (ALLOW_CPU=1)"
fi
$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() \
  if torch.cuda.is_available() else 'cpu')"

check() {  # check NAME COMMAND...: run COMMAND, log to $WORK/NAME.log, print PASS / FAIL
  name=$1
  shift
  start=$(date +%s)
  if "$@" > "$WORK/$name.log" 2>&1; then
    echo "PASS  $name ($(( $(date +%s) - start )) s)"
  else
    echo "FAIL  $name ($(( $(date +%s) - start )) s); last lines:"
    tail -n 15 "$WORK/$name.log" | sed 's/^/      /'
    FAILED=1
  fi
}

TINY="--config.logging.wandb=disabled --config.workdir=$WORK --config.train.log_every=1
  --config.train.sample_every=0 --config.sample.num=20 --config.sample.steps=4
  --config.train.warmup_steps=0 --config.train.lr_schedule=constant"

# shellcheck disable=SC2086
check bf16_compile_train $PY main.py $TINY --config.name=bf16 --config.train.steps=20 \
  --config.train.precision=bf16 --config.train.compile=True

check no_host_sync_fp32 $PY benchmarks/sync_check.py --precision fp32
check no_host_sync_bf16 $PY benchmarks/sync_check.py --precision bf16

nccl_allreduce() {
  $PY -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/nccl_check.py
}
check nccl_allreduce nccl_allreduce

# shellcheck disable=SC2086
check run_sh_train sh run.sh $TINY --config.name=runsh --config.train.steps=10

check sample $PY main.py --mode=sample --ckpt="$WORK/runsh" --out="$WORK/samples" \
  --config.sample.num=20
check samples_written test -s "$WORK/samples/samples.npz"

# shellcheck disable=SC2086
resume() {
  $PY main.py $TINY --config.name=whole --config.train.steps=6 --config.train.save_every=3 &&
    $PY main.py $TINY --config.name=split --config.train.steps=3 --config.train.save_every=3 &&
    $PY main.py $TINY --config.name=split --config.train.steps=6 --config.train.save_every=3 &&
    $PY benchmarks/compare_checkpoints.py "$WORK/whole" "$WORK/split"
}
check exact_resume resume

[ $FAILED = 0 ] && echo "all GPU checks passed" || echo "some GPU checks FAILED (logs above)"
exit $FAILED
