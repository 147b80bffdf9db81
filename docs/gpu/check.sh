#!/usr/bin/env bash
# The GPU check, one call of at most 7 minutes on one GPU: the card and versions, the CUDA tests,
# bench.py's loss table (eager), 3-epoch trainer runs on CIFAR-shaped fake data (eager, then
# compiled, then under torchrun; images/s of epochs 2 and 3 in each run's log.jsonl).
# Each step has its own timeout; everything is written under $OUT, each step to its own file.
#   OUT=/tmp/gpu bash docs/gpu/check.sh           # on the GPU machine
#   SMALL=1 OUT=/tmp/gpu bash docs/gpu/check.sh   # a tiny dry run of the same steps, on a CPU
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT/runs"
small=${SMALL:-0}
images=$([ "$small" = 1 ] && echo 512 || echo 25600)
backend=$([ "$small" = 1 ] && echo "--compile-backend aot_eager" || echo "")  # no C compiler needed
shape=$([ "$small" = 1 ] && echo "--arch convnet --width 16 --batch-size 128" || echo "")
step() {  # name, timeout in seconds, command...
  name=$1; limit=$2; shift 2
  echo "== $name (timeout ${limit}s): $*" | tee "$OUT/$name.txt"
  timeout "$limit" "$@" >>"$OUT/$name.txt" 2>&1
  echo "exit $? after ${SECONDS}s in all" | tee -a "$OUT/$name.txt"
  tail -4 "$OUT/$name.txt"
}
trainer() {  # name, timeout, launcher..., then train_cifar.py's flags after --
  name=$1; limit=$2; shift 2
  step "$name" "$limit" "$@" --dataset fake --limit "$images" $shape --epochs 3 --eval-every 3 \
    --probe-epochs 0 --out "$OUT/runs/$name"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
step cuda-tests 60 python3 -m pytest -q -p no:cacheprovider test_whitening.py -k cuda
step loss-table 60 python3 -c "import bench; bench.loss_table()"
trainer eager-cwrgp 50 python3 train_cifar.py --method cwrgp
trainer eager-wmse 40 python3 train_cifar.py --method wmse
trainer eager-plain 30 python3 train_cifar.py --method plain
trainer compiled-cwrgp 110 python3 train_cifar.py --method cwrgp --compile $backend
trainer torchrun-cwrgp 50 torchrun --standalone --nproc_per_node 1 train_cifar.py --method cwrgp
