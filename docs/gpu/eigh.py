"""Where the whitening loss's time goes on this device: batched eigh per device/dtype, and a profile."""
import sys, time
import torch
from cwrgp import whitening_loss

def timed(fn, sync, repeats=20):
    fn(); sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats * 1e3

dev = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {dev}")
for n_mat, n in [(64, 64), (32, 64), (2, 64)]:
    cov = torch.randn(n_mat, n, 2 * n, dtype=torch.float64, device=dev)
    cov = cov @ cov.mT / (2 * n)
    row = [f"eigh {n_mat:>3} x {n}x{n}:"]
    for dtype in (torch.float64, torch.float32):
        c = cov.to(dtype)
        row.append(f"{dev} {str(dtype)[6:]} {timed(lambda: torch.linalg.eigh(c), sync):8.2f} ms")
        row.append(f"via cpu {str(dtype)[6:]} {timed(lambda: [t.to(dev) for t in torch.linalg.eigh(c.cpu())], sync):8.2f} ms")
    print("  ".join(row), flush=True)

views = [torch.randn(256, 512, device=dev, requires_grad=True) for _ in range(4)]
def step():
    whitening_loss(*views, axis="channel", groups=4, sub_batch=64, generator=torch.Generator(dev).manual_seed(0)).backward()
print(f"CW-RGP 4 loss fwd+bwd: {timed(step, sync):.2f} ms", flush=True)
acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
with torch.profiler.profile(activities=acts) as prof:
    for _ in range(5):
        step()
    sync()
key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=40))
