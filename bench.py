"""
Speed of the batched whitening loss against a straightforward loop, forward + backward; on CUDA,
also the speed of the whole training step.

Two baselines compute the same loss from the same partitions (the largest difference is printed):
"loop", one SVD per repetition, sub-batch, view and group, with autograd through the SVD; and
"released", the structure of the authors' code: one batched SVD over the groups per sub-batch and
view, the channel order restored through a Python list.

The training-step table runs train_cifar.py's own step (one augmentation call, encoder per view,
projector, loss, backward, Adam) on CIFAR-shaped fake data with the recipe's ResNet-18 and batch
256, eager and under --compile, for no whitening, W-MSE and CW-RGP with 2 and 4 views; the
encoder's forward + backward alone is the ceiling the step can approach.

    python bench.py                 # the loss table (CPU, and CUDA if any), the step table on CUDA
    python bench.py --steps-on cpu  # the step table alone, small, on the CPU: checks its code
"""

import argparse
import platform
import time

import torch
import torch.nn.functional as F

import train_cifar
from cwrgp import random_group_partition, whitening_loss

SHAPES = {  # name: (views, batch, dim, loss arguments)
    "CW-RGP 4 (CIFAR recipe)": (4, 256, 512,
                                dict(axis="channel", method="zca", groups=4, sub_batch=64)),
    "CW-RGP 2 (CIFAR recipe)": (2, 256, 512,
                                dict(axis="channel", method="zca", groups=4, sub_batch=64)),
    "W-MSE 2": (2, 256, 64, dict(axis="batch", method="cholesky", groups=1, sub_batch=128)),
}


def svd_zca(cov):
    U, S, _ = torch.linalg.svd(cov)
    return U @ torch.diag(S.rsqrt()) @ U.T


def per_group_whiten(x, perm, axis, method, groups):
    """One decomposition per group, with autograd through each SVD."""
    b, d = x.shape
    c = d // groups
    x = x[:, perm]
    x = x - (x.mean(1, keepdim=True) if axis == "channel" else x.mean(0, keepdim=True))
    out = torch.empty_like(x)
    for j in range(groups):
        xg = x[:, j * c:(j + 1) * c]
        cov = xg @ xg.T / (c - 1) if axis == "channel" else xg.T @ xg / (b - 1)
        W = svd_zca(cov) if method == "zca" else torch.linalg.inv(torch.linalg.cholesky(cov))
        out[:, j * c:(j + 1) * c] = W @ xg if axis == "channel" else xg @ W.T
    unpermuted = torch.empty_like(out)
    unpermuted[:, perm] = out
    return unpermuted


def released_style_whiten(x, perm, axis, method, groups):
    """The authors' structure: one batched SVD over the groups, the channel order restored through
    a Python list."""
    b, d = x.shape
    c = d // groups
    shuffle = perm.tolist()
    x = x - (x.mean(1, keepdim=True) if axis == "channel" else x.mean(0, keepdim=True))
    x = x[:, shuffle].reshape(b, groups, c).transpose(0, 1)  # (g, b, c)
    cov = x @ x.mT / (c - 1) if axis == "channel" else x.mT @ x / (b - 1)
    if method == "zca":
        U, S, _ = torch.linalg.svd(cov)
        W = U @ torch.diag_embed(S.rsqrt()) @ U.mT
    else:
        W = torch.linalg.inv(torch.linalg.cholesky(cov))
    out = W @ x if axis == "channel" else x @ W.mT
    restore = [shuffle.index(j) for j in range(d)]
    return out.transpose(0, 1).reshape(b, d)[:, restore]


def looped_loss(whiten, views, samples, channels, axis, method, groups, sub_batch):
    """A loop over repetitions, sub-batches and views, one `whiten` call each; 2 − 2·cos between
    matching rows, mean over rows, pairs and repetitions."""
    loss, pairs = 0.0, len(views) * (len(views) - 1) // 2
    for i in range(samples.shape[0]):
        whitened = [torch.empty_like(z) for z in views]
        for k, rows in enumerate(samples[i].view(-1, sub_batch)):
            for v, z in enumerate(views):
                whitened[v][rows] = whiten(z[rows], channels[i, v, k], axis, method, groups)
        unit = [F.normalize(w, dim=1) for w in whitened]
        loss = loss + sum((unit[v] - unit[w]).pow(2).sum(1).mean()
                          for v in range(len(unit)) for w in range(v + 1, len(unit)))
    return loss / (samples.shape[0] * pairs)


def timed(fn, device, repeats, warmup=1):
    # first calls: allocation, cuDNN autotuning, compilation, CUDA-graph recording
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


STEP_ROWS = {  # name: train_cifar.py flags
    "no whitening": ["--method", "plain"],
    "W-MSE 2": ["--method", "wmse"],
    "CW-RGP 2": ["--method", "cwrgp"],
    "CW-RGP 4": ["--method", "cwrgp", "--views", "4"],
}
RECIPE = ["--arch", "resnet18", "--batch-size", "256"]
# the small shape of --steps-on cpu
SMALL = ["--arch", "convnet", "--width", "8", "--hidden", "64", "--batch-size", "128"]


def trainer_run(device, shape, flags):
    """A train_cifar.py run built as for training (model, optimiser, compiled step) on fake
    CIFAR-shaped data, without its directory; one batch of its images and a generator."""
    args = train_cifar.resolve_config(
        ["--dataset", "fake", "--device", device, "--out", "unused", *shape, *flags])
    model, _, opt, images, _, _ = train_cifar.build(args, 1, torch.device(device))
    gen = torch.Generator(device).manual_seed(0)
    return args, model, opt, images[:args.batch_size], gen


def step_timer(device, shape, flags):
    args, model, opt, x, gen = trainer_run(device, shape, flags)
    forward = train_cifar.compile_step(args, x.device)
    return lambda: train_cifar.train_step(forward, model, opt, x, args.lr, gen, args)


def encoder_timer(device, shape):
    """The encoder's forward + backward on the views of a 2-view step, called per view as the step
    does."""
    args, model, _, x, gen = trainer_run(device, shape, [])
    views = train_cifar.augment(x.repeat(2, 1, 1, 1),
                                train_cifar.augmentation_noise(2 * len(x), gen), args)
    if device == "cuda":
        views = views.contiguous(memory_format=torch.channels_last)
    encoder = model["encoder"]

    def step():
        with train_cifar.autocast(views.device):
            out = torch.cat([encoder(v) for v in views.chunk(2)])
        out.float().square().mean().backward()
    return step


def step_table(device, shape=RECIPE, backend="inductor", repeats=20,
               compiled_rows=tuple(STEP_ROWS)):
    """ms per training step and source images/s, eager for every row and compiled for compiled_rows,
    printed as measured; returns the rows as (name, mode, ms, images/s)."""
    batch = int(shape[shape.index("--batch-size") + 1])
    print(f"training step on {device}: {' '.join(shape)}, fake CIFAR-shaped data"
          f"{', bf16 autocast' if device == 'cuda' else ''}; "
          f"compiled: torch.compile backend {backend}")
    print(f"{'step':<26}{'mode':>9}{'ms/step':>10}{'images/s':>10}")
    rows = []
    jobs = [(name, "eager", flags) for name, flags in STEP_ROWS.items()]
    jobs += [(name, "compiled", STEP_ROWS[name]) for name in compiled_rows]
    for name, mode, flags in jobs + [("encoder fwd+bwd alone", "eager", None)]:
        if flags is None:
            fn = encoder_timer(device, shape)
        else:
            compiled = ["--compile", "--compile-backend", backend] if mode == "compiled" else []
            fn = step_timer(device, shape, flags + compiled)
        # CUDA graphs are recorded on the third call or so; before that a compiled step runs as
        # warm-up.
        ms = timed(fn, device, repeats, warmup=5 if mode == "compiled" and device == "cuda" else 1)
        rows.append((name, mode, ms, batch / ms * 1e3))
        print(f"{name:<26}{mode:>9}{ms:>10.2f}{batch / ms * 1e3:>10.0f}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--steps-on", choices=["cpu", "cuda"],
                        help="only the training-step table, on this device (cpu: a small "
                             "convnet, 2 steps, CW-RGP 2 alone compiled, with aot_eager)")
    options = parser.parse_args(argv)
    if options.steps_on == "cpu":
        step_table("cpu", SMALL, backend="aot_eager", repeats=2, compiled_rows=["CW-RGP 2"])
        return
    if options.steps_on == "cuda":
        step_table("cuda")
        return
    loss_table()
    if torch.cuda.is_available():
        step_table("cuda")


def loss_table():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"{'shape':<26}{'device':>7}{'batched ms':>12}{'loop ms':>10}{'speed-up':>10}"
          f"{'released ms':>13}{'speed-up':>10}{'|Δloss|':>10}")
    for device in devices:
        for name, (V, b, d, kw) in SHAPES.items():
            views = [torch.randn(b, d, device=device, requires_grad=True) for _ in range(V)]
            seed = 0

            def batched():
                loss = whitening_loss(*views, generator=torch.Generator(device).manual_seed(seed),
                                      **kw)
                loss.backward()
                return loss

            def baseline(whiten):
                def run():
                    samples, channels = random_group_partition(
                        V, b, d, kw["groups"], kw["sub_batch"], 1,
                        torch.Generator(device).manual_seed(seed), device)
                    loss = looped_loss(whiten, views, samples, channels, kw["axis"], kw["method"],
                                       kw["groups"], kw["sub_batch"])
                    loss.backward()
                    return loss
                return run

            looped, released = baseline(per_group_whiten), baseline(released_style_whiten)
            reference = batched()
            difference = max((reference - looped()).abs().item(),
                             (reference - released()).abs().item())
            repeats = 20 if device == "cuda" else 5
            fast, slow, old = (timed(fn, device, repeats) for fn in (batched, looped, released))
            print(f"{name:<26}{device:>7}{fast:>12.2f}{slow:>10.2f}{slow / fast:>9.1f}x"
                  f"{old:>13.2f}{old / fast:>9.1f}x{difference:>10.1e}")


if __name__ == "__main__":
    main()
