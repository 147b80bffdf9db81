export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
PYTHONPATH=. timeout 100 python3 docs/gpu/check2.py
timeout 60 python3 -m pytest -q -p no:cacheprovider test_whitening.py -k cuda
timeout 60 python3 bench.py
for m in cwrgp plain; do
  echo "== throughput: resnet18, fake CIFAR-shaped data, --method $m, 3 epochs"
  timeout 80 python3 train_cifar.py --dataset fake --limit 50000 --method $m --epochs 3 --eval-every 100 --probe-epochs 0 --save-every 100 --out runs/fake2-$m
done
