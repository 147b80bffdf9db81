"""
How ill-conditioned CW-RGP's covariances are, before and during training, and what decomposing them
costs on one CPU core: the numbers quoted in docs/derivations.md (3), docs/paper-to-code.md and the
loss benchmark of docs/results.md.

    python docs/conditioning.py           # two epochs of Fashion-MNIST: about 5 minutes on 2 cores
    python docs/conditioning.py gaussian  # Gaussian blocks on and off the shape rules: seconds

cond(Σ) = λ_max / λ_min of every channel-whitening covariance at the recipe's shape (sub-batches of
64 consecutive samples, 4 groups of 128 consecutive channels; Σ = X Xᵀ/(c − 1), float64).
"""

import pathlib
import sys
import tempfile

import torch
from einops import rearrange

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
import cwrgp  # noqa: E402
from bench import timed  # noqa: E402
import train_cifar  # noqa: E402


def conditions(z, groups=4, sub_batch=64):
    x = z.detach().double()
    x = x - x.mean(1, keepdim=True)  # CW: each sample centred over all its channels
    x = rearrange(x, "(n b) (g c) -> n g b c", b=sub_batch, g=groups)
    eigenvalues = torch.linalg.eigvalsh(cwrgp._covariance(x, eps=0.0))  # the Σ the loss decomposes
    return (eigenvalues[..., -1] / eigenvalues[..., 0]).flatten()


def summary(cond):
    return f"min {cond.min():.3g}  median {cond.median():.3g}  max {cond.max():.3g}"


def gaussian():
    """Derivation 3's numbers: how close to singular a block gets at the edge of the shape rules,
    and which of the code's two tolerances refuses it. Seeded, float32 inputs as in training."""
    torch.manual_seed(0)
    eps32 = torch.finfo(torch.float32).eps
    print(f"torch {torch.__version__}")
    print(f"refusal thresholds for a 64×64 float32 block: whitening and loss (_data_tolerance) "
          f"cond > {1 / cwrgp._data_tolerance(torch.zeros(64, 64)):.3g}; "
          f"whitening_matrix (n·eps) cond > {1 / (64 * eps32):.3g}")

    def refused(whiten, z):
        try:
            whiten(z)
            return 0
        except ValueError:
            return 1

    square = [torch.randn(64, 128) for _ in range(20)]  # CW, 2 groups: 64 samples × c = 64 channels
    cond = torch.cat([conditions(z, groups=2, sub_batch=64) for z in square])
    blocks = [rearrange(z.double() - z.double().mean(1, keepdim=True), "b (g c) -> g b c", g=2)
              for z in square]
    by_matrix = sum(refused(cwrgp.whitening_matrix, cwrgp._covariance(x, 0.0).float())
                    for x in blocks)
    print(f"CW, 20 draws of randn(64, 128), groups=2 (c = sub-batch = 64): cond {summary(cond)}; "
          f"channel_whiten refused "
          f"{sum(refused(lambda z: cwrgp.channel_whiten(z, groups=2), z) for z in square)}/20, "
          f"whitening_matrix of the float32 covariances refused {by_matrix}/20")
    tall = [torch.randn(65, 64) for _ in range(20)]  # BW: b = c + 1
    x = torch.stack([(z.double() - z.double().mean(0)).T for z in tall])
    eigenvalues = torch.linalg.eigvalsh(cwrgp._covariance(x, 0.0))
    print(f"BW, 20 draws of randn(65, 64) (b = c + 1): "
          f"cond {summary(eigenvalues[:, -1] / eigenvalues[:, 0])}; "
          f"batch_whiten refused {sum(refused(cwrgp.batch_whiten, z) for z in tall)}/20")
    s = torch.linalg.svdvals(torch.randn(200, 64, 64, dtype=torch.float64))
    print(f"200 square 64×64 Gaussian matrices: median σ_min / median σ = "
          f"{(s[:, -1] / s.median(-1).values).median():.3g} "
          f"(1/n = {1 / 64:.3g}, 1/√n = {64 ** -0.5:.3g}); "
          f"median σ_min / σ_max = {(s[:, -1] / s[:, 0]).median():.3g}")
    recipe = torch.cat([conditions(torch.randn(64, 512), groups=4, sub_batch=64)
                        for _ in range(20)])
    print(f"the recipe's shape, 20 draws of randn(64, 512), groups=4 (c = 128 = 2·sub-batch): "
          f"cond {summary(recipe)}")


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    train_x = train_cifar.load_fashion_mnist(train_cifar.DEFAULT_DATA_DIR)[0][0][:256]
    pixels = train_x.float() / 255
    for arch in ("resnet18", "convnet"):
        torch.manual_seed(0)
        args = train_cifar.resolve_config(["--dataset", "fashion-mnist", "--arch", arch])
        model = train_cifar.build_model(args, pixels.mean((0, 2, 3)), pixels.std((0, 2, 3)))
        with torch.no_grad():  # train mode, as in the first training step
            z = model["projector"](model["encoder"](pixels))
        print(f"untrained {arch:<8} embedding of 256 Fashion-MNIST images, 16 covariances: "
              f"cond {summary(conditions(z))}")

    # During training: record the largest cond(Σ) that each step's decomposition sees.
    # On the CPU the loss's ZCA goes through cwrgp._zca_eigh; Σ arrives from x scaled to
    # max |x| = 1, which leaves cond(Σ) as it was.
    largest = []
    decompose = cwrgp._zca_eigh

    def recording(cov, x, relative_tolerance, cov_scale=None):
        # The training loss's calls only (2 views × 4 sub-batches × 4 groups, with a gradient):
        # not the spectra's, nor the trainer's no-grad check of the flags on random embeddings
        # before step 1.
        if x.requires_grad and cov[..., 0, 0].numel() == 32:
            eigenvalues = torch.linalg.eigvalsh(cov.detach())
            largest.append((eigenvalues[..., -1] / eigenvalues[..., 0]).max().item())
        return decompose(cov, x, relative_tolerance, cov_scale)

    cwrgp._zca_eigh = recording
    for crop in ("0.2", "0.5"):
        largest.clear()
        with tempfile.TemporaryDirectory() as out:
            train_cifar.main(["--dataset", "fashion-mnist", "--arch", "convnet",
                              "--crop-scale", crop, "1", "--epochs", "1", "--probe-epochs", "0",
                              "--eval-every", "100", "--out", out])
        steps = [1, 25, 50, 100, 150, 200, len(largest)]
        print(f"largest cond(Σ) of each step's 32 covariances, CW-RGP convnet, first epoch, "
              f"--crop-scale {crop} 1:")
        print("  " + "  ".join(f"step {s}: {largest[s - 1]:.2g}" for s in steps))
    cwrgp._zca_eigh = decompose

    torch.set_num_threads(1)
    x = torch.randn(64, 64, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov = x @ x.mT / 127
    print("one thread, the 64 covariances (64×64) of one CW-RGP 4 step:")
    for dtype in (torch.float64, torch.float32):
        c = cov.to(dtype)
        print(f"  batched eigh, {str(dtype)[6:]}: "
              f"{timed(lambda: torch.linalg.eigh(c), 'cpu', 5):.1f} ms;"
              f" one SVD per matrix: "
              f"{timed(lambda: [torch.linalg.svd(m) for m in c], 'cpu', 5):.1f} ms")


if __name__ == "__main__":
    gaussian() if sys.argv[1:] == ["gaussian"] else main()
