export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 40 python3 -m pytest -q -p no:cacheprovider test_whitening.py -k cuda 2>&1 | tail -25
timeout 70 python3 bench.py
