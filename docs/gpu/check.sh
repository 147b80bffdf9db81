# Device checks for docs/results.md: card, bench.py, eigh placement, trainer throughput, a Fashion-MNIST run.
export PYTHONUNBUFFERED=1
S=${SMALL:-0}   # SMALL=1: a tiny dry run of the same steps (for checking the script on a CPU)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, einops, platform; print('torch', torch.__version__, 'einops', einops.__version__, 'python', platform.python_version(), 'cuda', torch.version.cuda)"
timeout 150 python3 bench.py
PYTHONPATH=. timeout 90 python3 docs/gpu/eigh.py
N=$([ $S = 1 ] && echo 512 || echo 50000)
for m in cwrgp wmse plain; do
  echo "== throughput: resnet18, fake CIFAR-shaped data ($N images), --method $m, 3 epochs"
  timeout 120 python3 train_cifar.py --dataset fake --limit $N --method $m --epochs 3 --eval-every 100 --probe-epochs 0 --save-every 100 --out runs/fake-$m
done
E=$([ $S = 1 ] && echo 1 || echo 20)
L=$([ $S = 1 ] && echo "--limit 2048" || echo "")
echo "== Fashion-MNIST CW-RGP convnet $E epochs"
timeout 240 python3 train_cifar.py --dataset fashion-mnist $L --arch convnet --crop-scale 0.5 1 --epochs $E --eval-every 5 --out runs/gpu-fmnist-cwrgp
cp runs/gpu-fmnist-cwrgp/log.jsonl $OUT/gpu-fmnist-cwrgp.jsonl; cp runs/gpu-fmnist-cwrgp/config.json $OUT/gpu-fmnist-cwrgp.config.json
for m in cwrgp wmse plain; do cp runs/fake-$m/log.jsonl $OUT/fake-$m.jsonl; done
