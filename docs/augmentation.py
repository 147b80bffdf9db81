"""
The trainer's batched augmentation against torchvision.transforms.v2 applied image by image: how
far each statistic of the views moves from its image under each pipeline, and the difference.

    python docs/augmentation.py [N]      # N images per comparison (default 6000)

Uses the comparisons of test_train_cifar.py (the same images, statistics and released pipeline)
with more images, to measure the departures that the tests allow for. Rows: each colour-jitter
part alone (crop the whole image, on every view), then the whole recipe on synthetic colour
images and on Fashion-MNIST (if installed), with bicubic (the released code) and bilinear
(the trainer's) resampling in torchvision's crop, and the crop alone on Fashion-MNIST with
torchvision's whole-pixel boxes on the 28-pixel images and on the images upsampled 10x.
"""

import math
import os
import sys

import torch
from torchvision.transforms import v2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import test_train_cifar as t  # noqa: E402
import train_cifar  # noqa: E402


def row(label, ours, reference, images):
    a, b = t.view_statistics(ours, images), t.view_statistics(reference, images)
    cells = []
    for name in a:
        difference = a[name] - b[name]
        se = difference.std().item() / math.sqrt(len(difference))
        cells.append(f"{a[name].mean():+.4f} / {b[name].mean():+.4f} "
                     f"({difference.mean():+.4f} ± {se:.4f})")
    print(f"| {label} | " + " | ".join(cells) + " |")


def jitter_part(part, n):
    strengths = t.COLOUR_PARTS[part]
    args = t.recipe("--crop-scale", "1", "1", "--crop-ratio", "1", "1", "--flip-p", "0",
                    "--gray-p", "0", "--jitter-p", "1", "--jitter", *map(str, strengths))
    x = t.colour_images(n, 32, 2)
    images = x.float() / 255
    ours = train_cifar.augment(x, t.noise_for(n, 3), args)
    torch.manual_seed(3)
    jitter = v2.ColorJitter(*strengths)
    return ours, torch.stack([jitter(image) for image in images]), images


def whole_recipe(x, interpolation):
    args, images = t.recipe(), x.float() / 255
    pipeline = t.released_pipeline(args, x.shape[-1])
    pipeline.transforms[2].interpolation = interpolation
    torch.manual_seed(5)
    return (train_cifar.augment(x, t.noise_for(len(x), 5), args),
            torch.stack([pipeline(i) for i in images]), images)


def crop_only(x, upsample):
    """The crop and flip alone, torchvision's on the images upsampled (nearest) by an integer
    factor, so that its whole-pixel boxes come closer to the trainer's continuous ones."""
    args, images = t.recipe("--jitter-p", "0", "--gray-p", "0"), x.float() / 255
    big = images.repeat_interleave(upsample, 2).repeat_interleave(upsample, 3)
    pipeline = v2.Compose([v2.RandomResizedCrop(x.shape[-1], scale=args.crop_scale,
                                                ratio=args.crop_ratio, antialias=False),
                           v2.RandomHorizontalFlip(args.flip_p)])
    torch.manual_seed(5)
    return (train_cifar.augment(x, t.noise_for(len(x), 5), args),
            torch.stack([pipeline(i) for i in big]), images)


def main(n):
    torch.set_num_threads(1)
    print("| views | mean change | std change | mean abs change | colourfulness change |")
    print("|---|---|---|---|---|")
    for part in t.COLOUR_PARTS:
        row(f"{part} alone, colour", *jitter_part(part, n))
    datasets = {"colour": t.colour_images(n, 32, 4)}
    if os.path.isdir(t.FASHION_DIR):
        datasets["Fashion-MNIST"] = train_cifar.load_fashion_mnist(t.FASHION_DIR)[0][0][:n]
    for name, x in datasets.items():
        for mode in (v2.InterpolationMode.BICUBIC, v2.InterpolationMode.BILINEAR):
            row(f"recipe, {name}, torchvision {mode.value}", *whole_recipe(x, mode))
    if "Fashion-MNIST" in datasets:
        for upsample in (1, 10):
            row(f"crop and flip alone, Fashion-MNIST, torchvision bilinear on "
                f"{28 * upsample}x{28 * upsample}",
                *crop_only(datasets["Fashion-MNIST"], upsample))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6000)
