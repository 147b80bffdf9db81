"""
Speed of the batched whitening loss against a straightforward loop, forward + backward.

Two baselines compute the same loss from the same partitions (the largest difference is printed):
"loop", one SVD per repetition, sub-batch, view and group, with autograd through the SVD; and
"released", the structure of the authors' code: one batched SVD over the groups per sub-batch and
view, the channel order restored through a Python list. Run: python bench.py  (CUDA rows are added
when a GPU is present)
"""

import platform
import time

import torch
import torch.nn.functional as F

from cwrgp import random_group_partition, whitening_loss

SHAPES = {  # name: (views, batch, dim, loss arguments)
    "CW-RGP 4 (CIFAR recipe)": (4, 256, 512, dict(axis="channel", method="zca", groups=4, sub_batch=64)),
    "CW-RGP 2 (CIFAR recipe)": (2, 256, 512, dict(axis="channel", method="zca", groups=4, sub_batch=64)),
    "W-MSE 2": (2, 256, 64, dict(axis="batch", method="cholesky", groups=1, sub_batch=128)),
}


def svd_zca(cov):
    U, S, _ = torch.linalg.svd(cov)
    return U @ torch.diag(S.rsqrt()) @ U.T


def loop_loss(views, samples, channels, axis, method, groups, sub_batch):
    """One decomposition per (repetition, sub-batch, view, group), as the released code."""
    views_total, b, d = len(views), *views[0].shape
    c = d // groups
    loss = 0.0
    for i in range(samples.shape[0]):
        whitened = [torch.empty_like(z) for z in views]
        for k, rows in enumerate(samples[i].view(-1, sub_batch)):
            for v, z in enumerate(views):
                perm = channels[i, v, k]
                x = z[rows][:, perm]
                x = x - (x.mean(1, keepdim=True) if axis == "channel" else x.mean(0, keepdim=True))
                out = torch.empty_like(x)
                for j in range(groups):
                    xg = x[:, j * c:(j + 1) * c]
                    if axis == "channel":
                        cov = xg @ xg.T / (c - 1)
                    else:
                        cov = xg.T @ xg / (sub_batch - 1)
                    if method == "zca":
                        W = svd_zca(cov)
                    else:
                        W = torch.linalg.inv(torch.linalg.cholesky(cov))
                    out[:, j * c:(j + 1) * c] = W @ xg if axis == "channel" else xg @ W.T
                unpermuted = torch.empty_like(out)
                unpermuted[:, perm] = out
                whitened[v][rows] = unpermuted
        for v in range(views_total):
            for w in range(v + 1, views_total):
                x0, x1 = F.normalize(whitened[v], dim=1), F.normalize(whitened[w], dim=1)
                loss = loss + (x0 - x1).pow(2).sum(1).mean()
    return loss / (samples.shape[0] * views_total * (views_total - 1) // 2)


def released_style_loss(views, samples, channels, axis, method, groups, sub_batch):
    """The released code's structure: a loop over repetitions, sub-batches and views, one batched
    SVD over the groups per call, and the channel order restored through a Python list."""
    views_total, (b, d) = len(views), views[0].shape
    c = d // groups
    loss = 0.0
    for i in range(samples.shape[0]):
        whitened = [torch.empty_like(z) for z in views]
        for k, rows in enumerate(samples[i].view(-1, sub_batch)):
            for v, z in enumerate(views):
                shuffle = channels[i, v, k].tolist()
                x = z[rows]
                x = x - (x.mean(1, keepdim=True) if axis == "channel" else x.mean(0, keepdim=True))
                x = x[:, shuffle].reshape(sub_batch, groups, c).transpose(0, 1)  # (g, b, c)
                if axis == "channel":
                    cov = x @ x.mT / (c - 1)
                else:
                    cov = x.mT @ x / (sub_batch - 1)
                if method == "zca":
                    U, S, _ = torch.linalg.svd(cov)
                    W = U @ torch.diag_embed(S.rsqrt()) @ U.mT
                else:
                    W = torch.linalg.inv(torch.linalg.cholesky(cov))
                out = W @ x if axis == "channel" else x @ W.mT
                restore = [shuffle.index(j) for j in range(d)]
                whitened[v][rows] = out.transpose(0, 1).reshape(sub_batch, d)[:, restore]
        for v in range(views_total):
            for w in range(v + 1, views_total):
                x0, x1 = F.normalize(whitened[v], dim=1), F.normalize(whitened[w], dim=1)
                loss = loss + (x0 - x1).pow(2).sum(1).mean()
    return loss / (samples.shape[0] * views_total * (views_total - 1) // 2)


def timed(fn, device, repeats):
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"{'shape':<26}{'device':>7}{'batched ms':>12}{'loop ms':>10}{'speed-up':>10}"
          f"{'released ms':>13}{'speed-up':>10}{'|Δloss|':>10}")
    for device in devices:
        for name, (V, b, d, kw) in SHAPES.items():
            views = [torch.randn(b, d, device=device, requires_grad=True) for _ in range(V)]
            seed = 0

            def batched():
                loss = whitening_loss(*views, generator=torch.Generator(device).manual_seed(seed), **kw)
                loss.backward()
                return loss

            def baseline(loss_fn):
                def run():
                    samples, channels = random_group_partition(
                        V, b, d, kw["groups"], kw["sub_batch"], 1, torch.Generator(device).manual_seed(seed), device)
                    loss = loss_fn(views, samples, channels, kw["axis"], kw["method"], kw["groups"], kw["sub_batch"])
                    loss.backward()
                    return loss
                return run

            looped, released = baseline(loop_loss), baseline(released_style_loss)
            reference = batched()
            difference = max((reference - looped()).abs().item(), (reference - released()).abs().item())
            repeats = 20 if device == "cuda" else 5
            fast, slow, old = (timed(fn, device, repeats) for fn in (batched, looped, released))
            print(f"{name:<26}{device:>7}{fast:>12.2f}{slow:>10.2f}{slow / fast:>9.1f}x"
                  f"{old:>13.2f}{old / fast:>9.1f}x{difference:>10.1e}")


if __name__ == "__main__":
    main()
