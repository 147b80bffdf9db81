"""Second device check: where the host decomposition pays, and what it buys the loss."""
import time
import torch
import cwrgp
from cwrgp import whitening_loss

def timed(fn, repeats):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e3

print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {torch.get_num_threads()} host threads", flush=True)
print(f"{'batch x n':>12} {'cuSOLVER ms':>12} {'host ms':>9}", flush=True)
for n, batches in [(16, (64,)), (32, (64,)), (64, (1, 16, 64)), (128, (1, 16, 64)), (256, (1, 16, 64)), (512, (1, 8)), (1024, (1, 4))]:
    for B in batches:
        x = torch.randn(B, n, 2 * n, dtype=torch.float64, device="cuda")
        cov = x @ x.mT / (2 * n)
        reps = 10 if n <= 256 else 3
        dev = timed(lambda: torch.linalg.eigh(cov), reps)
        host = timed(lambda: [t.cuda() for t in torch.linalg.eigh(cov.cpu())], reps)
        print(f"{B:>5} x {n:<5} {dev:>12.2f} {host:>9.2f}", flush=True)

for views in (4, 2):
    zs = [torch.randn(256, 512, device="cuda", requires_grad=True) for _ in range(views)]
    def step():
        whitening_loss(*zs, axis="channel", groups=4, sub_batch=64, generator=torch.Generator("cuda").manual_seed(0)).backward()
    row = []
    for host_max_n in (0, 256):
        cwrgp._HOST_EIGH_MAX_N = host_max_n
        row.append(timed(step, 20))
    print(f"CW-RGP {views} views 256x512 g4 sub64 fwd+bwd: cuSOLVER {row[0]:.2f} ms, host {row[1]:.2f} ms", flush=True)
cwrgp._HOST_EIGH_MAX_N = 256
