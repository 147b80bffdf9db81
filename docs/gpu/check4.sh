# One GPU check of the Newton–Schulz loss, the compiled step and torchrun (about 8 minutes on one
# GPU; not yet run): the CUDA tests, bench.py's loss and step tables, and 3-epoch runs on
# CIFAR-shaped fake data whose images/s are read from epochs 2-3 of each log.jsonl.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider test_whitening.py -k cuda 2>&1 | tail -15
timeout 240 python3 bench.py
run() {  # name, then train_cifar.py flags
  name=$1; shift
  timeout 90 "$@" --dataset fake --limit 25600 --epochs 3 --eval-every 100 --probe-epochs 0 --out "$OUT/runs/$name" 2>&1 | tail -3
  python3 -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; print(sys.argv[2], 'images/s epochs 2-3:', [round(r['images_per_s']) for r in rows[1:3]])" "$OUT/runs/$name/log.jsonl" "$name"
}
run plain python3 train_cifar.py --method plain
run wmse python3 train_cifar.py --method wmse
run cwrgp python3 train_cifar.py --method cwrgp
run cwrgp-compile python3 train_cifar.py --method cwrgp --compile
run cwrgp-torchrun1 torchrun --standalone --nproc_per_node 1 train_cifar.py --method cwrgp
