"""
train_cifar.py: self-supervised pre-training with a whitening loss (cwrgp.py), then evaluation.

The recipe is the CIFAR one of "An Investigation into Whitening Loss for Self-supervised Learning"
(Weng et al., NeurIPS 2022) as the authors released it: ResNet-18 (3x3 stem, no max-pool),
projector 512 -> 1024 -> 512, channel whitening with random group partition (g = 4, sub-batch 64,
ZCA, eps 0), Adam lr 3e-3 / wd 1e-6, batch 256, a 500-step warm-up, lr x 0.2 at epochs E-50 and
E-25. The frozen encoder is evaluated by 5-NN (Euclidean), 200-NN (cosine) and a linear probe.

    python train_cifar.py                             # CIFAR-10 on a GPU: the recipe, 200 epochs
    python train_cifar.py --dataset fashion-mnist     # the CPU recipe: a small convnet, 30 epochs
    python train_cifar.py --method wmse               # W-MSE (BW, Cholesky) through the same loop
    python train_cifar.py --resume runs/NAME          # continue a stopped run exactly
    torchrun --nproc_per_node 4 train_cifar.py        # data parallel: each whitens its share

The images stay on the device as uint8 and all views of a batch are made there in one call. A
step's randomness (views, partitions) is drawn outside it from a generator seeded by (seed, step,
process), so the step is a pure tensor function (what --compile compiles) and a resume repeats
it exactly. The batched augmentation departs from torchvision's in three ways (docs/results.md):
jitter after the crop in a fixed order, hue as a rotation in YIQ space, continuous crop boxes
resampled bilinearly. The run's directory, stop requests and clocks are in bookkeeping.py.
"""

import argparse
import gzip
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import time

# Spinning OpenMP threads slowed a CPU run 3x on shared cores (docs/results.md). Read when torch
# loads OpenMP, so it must come before `import torch`; a policy the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from bookkeeping import (RUN_FILES, RunFiles, StopRequests, Timing, clock,  # noqa: E402
                         git_commit, new_state, read_losses)
from cwrgp import (batch_whiten, channel_whiten, random_group_partition,  # noqa: E402
                   stable_rank, whitening_loss)

# ------------------------------------------------------------------------------------------------
# Config: every flag, its default and its valid range, in one parser

class Range:
    """An argparse type: a number of `kind` within bounds; argparse names the flag."""

    def __init__(self, kind, low, high=None, open_low=False):
        self.kind, self.low, self.high, self.open_low = kind, low, high, open_low
        bound = f"greater than {low}" if open_low else f"at least {low}"
        self.rule = bound if high is None else f"in {'(' if open_low else '['}{low}, {high}]"

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {self.kind.__name__} value: {text!r}")
        too_low = value < self.low or (self.open_low and value == self.low)
        if too_low or (self.high is not None and value > self.high):
            raise argparse.ArgumentTypeError(f"{text}: must be {self.rule}")
        return value

COUNT, AT_LEAST_0, AT_LEAST_2 = Range(int, 1), Range(int, 0), Range(int, 2)
POSITIVE, FRACTION = Range(float, 0, open_low=True), Range(float, 0, 1, open_low=True)
NON_NEGATIVE, PROBABILITY = Range(float, 0), Range(float, 0, 1)

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other refusal of the trainer
        sys.exit(f"error: {message} (python train_cifar.py --help lists the flags)")

def build_parser():
    parser = Parser(description="CW-RGP self-supervised pre-training; defaults: the CIFAR recipe",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_recipe_flags(parser.add_argument)
    add_view_flags(parser.add_argument)
    add_run_flags(parser.add_argument)
    return parser

def add_recipe_flags(add):
    """The data, the networks, the loss and the optimiser."""
    datasets = ["cifar10", "cifar100", "stl10", "tiny-imagenet", "fashion-mnist", "fake"]
    add("--dataset", choices=datasets, default="cifar10",
        help="fashion-mnist brings the CPU recipe's defaults; fake: random images, for tests")
    add("--data-dir", default=DEFAULT_DATA_DIR, help="where the dataset is, or is downloaded to")
    add("--limit", type=COUNT, help="use only the first N train (and test) images")
    add("--arch", choices=["resnet18", "convnet"], default="resnet18",
        help="fashion-mnist: convnet")
    add("--width", type=AT_LEAST_2, default=48, help="convnet width (its second block)")
    add("--pool", type=COUNT, default=1, help="convnet features: the last map pooled to k x k "
        "(fashion-mnist: 3)")
    add("--hidden", type=COUNT, default=1024, help="projector hidden width")
    add("--emb", type=COUNT, default=512, help="embedding width d (wmse: 64)")
    add("--method", choices=["cwrgp", "wmse", "plain"], default="cwrgp",
        help="cwrgp: CW, ZCA; wmse: BW, Cholesky; plain: 2-2cos with no whitening")
    add("--views", type=AT_LEAST_2, default=2, help="augmented views of each image")
    add("--groups", type=COUNT, default=4, help="g (wmse: 1)")
    add("--fixed-groups", action="store_true",
        help="groups of consecutive channels, no random partition (the released --no_rg)")
    add("--sub-batch", type=AT_LEAST_2, default=64, help="samples whitened together (wmse: 128)")
    add("--whiten", choices=["zca", "cholesky", "pca"], default="zca", help="wmse: cholesky")
    add("--eps", type=NON_NEGATIVE, default=0.0, help="covariance shrinkage")
    add("--iters", type=COUNT, default=1, help="w_iter: whitening repetitions per step")
    add("--epochs", type=COUNT, default=200, help="fashion-mnist: 30")
    add("--batch-size", type=AT_LEAST_2, default=256, help="images a step, all processes")
    add("--lr", type=POSITIVE, default=3e-3, help="Adam's learning rate")
    add("--wd", type=NON_NEGATIVE, default=1e-6, help="weight decay")
    add("--warmup", type=AT_LEAST_0, default=500, help="steps of linear warm-up")
    add("--drop-at", type=COUNT, nargs="*", default=[50, 25],
        help="lr drops this many epochs before the end (fashion-mnist: 3 1)")
    add("--drop-factor", type=FRACTION, default=0.2, help="lr factor at each drop")

def add_view_flags(add):
    """The augmentation of each view."""
    add("--view-size", type=COUNT, help="side of the views (stl10, tiny-imagenet: 64; else the "
        "images' own)")
    add("--crop-scale", type=FRACTION, nargs=2, default=[0.2, 1.0], help="fashion-mnist: 0.5 1")
    add("--crop-ratio", type=POSITIVE, nargs=2, default=[3 / 4, 4 / 3], help="aspect ratios")
    add("--flip-p", type=PROBABILITY, default=0.5, help="probability of a flip")
    add("--jitter", type=NON_NEGATIVE, nargs=4, default=[0.4, 0.4, 0.4, 0.1],
        help="brightness contrast saturation hue")
    add("--jitter-p", type=PROBABILITY, default=0.8, help="probability of colour jitter")
    add("--gray-p", type=PROBABILITY, default=0.1, help="probability of grayscale")

def add_run_flags(add):
    """Evaluation, device, checkpoints."""
    add("--eval-every", type=COUNT, default=10, help="kNN every N epochs (fashion-mnist: 5)")
    add("--knn-k", type=COUNT, default=200, help="k of the cosine-weighted kNN")
    add("--knn-t", type=POSITIVE, default=0.1, help="its temperature")
    add("--probe-epochs", type=AT_LEAST_0, default=500, help="linear probe at the end (0: none)")
    add("--probe-lr", type=POSITIVE, default=1e-2, help="its Adam lr, decayed to 1e-6")
    add("--probe-wd", type=NON_NEGATIVE, default=5e-6, help="its weight decay")
    add("--probe-batch", type=COUNT, default=1000, help="its batch")
    add("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:N or mps")
    add("--threads", type=COUNT, help="CPU threads for torch")
    add("--compile", action="store_true", help="compile the step (CUDA: with CUDA graphs)")
    add("--compile-backend", default="inductor", help="aot_eager needs no C compiler")
    add("--check-every", type=COUNT, default=50, help="read the loss back every N steps")
    add("--seed", type=AT_LEAST_0, default=0, help="of the network and every step")
    add("--out", help="directory of a new run (default runs/DATASET-METHOD-TIME)")
    add("--save-every", type=COUNT, default=10, help="checkpoint every N epochs")
    add("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")

DEFAULT_DATA_DIR = "./data"
WMSE = {"emb": 64, "groups": 1, "sub_batch": 128, "whiten": "cholesky"}
# The CPU recipe: a convnet whose features keep a 3x3 layout of the centred, aligned images.
FASHION_MNIST = {"arch": "convnet", "pool": 3, "crop_scale": [0.5, 1.0], "epochs": 30,
                 "drop_at": [3, 1], "eval_every": 5}
# What the released data code does beyond CIFAR: 64x64 views, the stem's max-pool kept, fixed
# normalisation. Other datasets: views at the images' size, no max-pool, their own statistics.
DATASETS = {"stl10": {"view_size": 64, "maxpool": True, "mean": (0.43, 0.42, 0.39),
                      "std": (0.27, 0.26, 0.27)},
            "tiny-imagenet": {"view_size": 64, "maxpool": True, "mean": (0.480, 0.448, 0.398),
                              "std": (0.277, 0.269, 0.282)}}
# The flags that define a run: a resume keeps them, since its checkpoint, its randomness and its
# log only make sense with them. RESCHEDULING flags may change on resume, each said; others freely.
DEFINING = ("dataset", "limit", "arch", "width", "pool", "hidden", "emb", "method", "views",
            "groups", "fixed_groups", "sub_batch", "whiten", "iters", "batch_size", "view_size",
            "crop_scale", "crop_ratio", "flip_p", "jitter", "jitter_p", "gray_p", "seed")
RESCHEDULING = ("lr", "wd", "warmup", "drop_at", "drop_factor", "eps")

def flag(key):
    return "--" + key.replace("_", "-")

def shown(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)

def note(text):
    print(f"note: {text}", file=sys.stderr)

def parse_flags(argv):
    """A new run's flags: the recipe's defaults, then the method's and the dataset's, then argv."""
    parser = build_parser()
    first = parser.parse_args(argv)
    parser.set_defaults(**(WMSE if first.method == "wmse" else {}),
                        **(FASHION_MNIST if first.dataset == "fashion-mnist" else {}),
                        view_size=DATASETS.get(first.dataset, {}).get("view_size"))
    return parser.parse_args(argv)

def resume_flags(argv, run_dir):
    """The run's saved flags with argv's over them; exits, before anything is written, if argv
    changes a flag that defines the run."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --resume {run_dir}: cannot read the run's config.json ({e}); give the "
                 f"directory of a started run, or start a new run with --out DIR")
    parser = build_parser()
    parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    if os.path.abspath(args.out) != os.path.abspath(saved["out"]):
        sys.exit(f"error: --resume {run_dir} continues the run in its own directory: drop --out "
                 f"(or drop --resume to start a new run in {args.out})")
    changed = [f"{flag(key)} {shown(getattr(args, key))} (the run has {shown(saved[key])})"
               for key in DEFINING if getattr(args, key) != saved[key]]
    if changed:
        sys.exit(f"error: {'; '.join(changed)}: a resume keeps the flags that define the run; "
                 f"drop them to continue {run_dir}, or start a new run with --out DIR")
    for key in [key for key in RESCHEDULING if getattr(args, key) != saved[key]]:
        note(f"{flag(key)} {shown(getattr(args, key))} (the run had {shown(saved[key])}) applies "
             f"from the checkpoint on; config.json records the new value")
    before, after = drop_epochs(saved["epochs"], saved["drop_at"]), drop_epochs(args.epochs,
                                                                                 args.drop_at)
    if before != after:
        note(f"the lr drops (--drop-at {shown(args.drop_at)} epochs before the end of "
             f"{args.epochs}) move from epochs {shown(before) or 'none'} to {shown(after)}")
    return args

def check_flags(args):
    """What argparse's types cannot see: pairs in order, the hue's bound, the device, --out."""
    for key in ("crop_scale", "crop_ratio"):
        if getattr(args, key)[0] > getattr(args, key)[1]:
            sys.exit(f"error: {flag(key)} {shown(getattr(args, key))}: give the low end first")
    if args.jitter[3] > 0.5:  # a hue shift of more than half a turn would wrap around
        sys.exit(f"error: --jitter {shown(args.jitter)}: the hue strength (the fourth value) must "
                 f"be at most 0.5")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        sys.exit(f"error: --device {args.device}: use auto, cpu, cuda, cuda:N or mps")
    index = int(args.device.partition(":")[2] or 0)
    if args.device.startswith("cuda") and index >= torch.cuda.device_count():
        sys.exit(f"error: --device {args.device}: this machine has no such CUDA device "
                 f"({torch.cuda.device_count()} found); use --device cpu")
    if args.device == "mps" and not torch.backends.mps.is_available():
        sys.exit("error: --device mps: MPS is not available here; use --device cpu")
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out or "", name))]
    if args.out and not args.resume and held:
        sys.exit(f"error: --out {args.out} already holds a run ({', '.join(held)}): continue it "
                 f"with --resume {args.out}, or choose another --out")

def resolve_config(argv):
    """The run's flags from the command line and, on --resume, the run's config.json."""
    resume = build_parser().parse_args(argv).resume
    args = resume_flags(argv, resume) if resume else parse_flags(argv)
    check_flags(args)
    args.out = args.out or f"runs/{args.dataset}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args

# ------------------------------------------------------------------------------------------------
# Data: whole splits as uint8 (n, c, h, w) tensors

SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

def read_idx(path):
    # Debian's Fashion-MNIST is gzipped idx files, which torchvision's reader does not open as is.
    with gzip.open(path, "rb") as f:
        raw = f.read()
    shape = [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(raw[3])]
    return torch.frombuffer(bytearray(raw[4 + 4 * raw[3]:]), dtype=torch.uint8).reshape(shape)

def load_fashion_mnist(data_dir):
    """(splits, the folder read); the system copy stands in only for the default --data-dir."""
    folders = [data_dir, os.path.join(data_dir, "FashionMNIST", "raw")]
    folders += [SYSTEM_FASHION_MNIST] if data_dir == DEFAULT_DATA_DIR else []
    for folder in folders:
        files = [os.path.join(folder, f"{split}-{kind}-ubyte.gz")
                 for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
        if all(map(os.path.exists, files)):
            x, y, test_x, test_y = map(read_idx, files)
            return [x.unsqueeze(1), y.long(), test_x.unsqueeze(1), test_y.long()], folder
    if data_dir != DEFAULT_DATA_DIR:
        sys.exit(f"error: --data-dir {data_dir} does not hold Fashion-MNIST (the four *-ubyte.gz "
                 f"files, there or in FashionMNIST/raw); leave it out to use "
                 f"{SYSTEM_FASHION_MNIST}")
    sys.exit(f"error: Fashion-MNIST is not in {data_dir} or {SYSTEM_FASHION_MNIST}: install "
             f"Debian's dataset-fashion-mnist, or put the four *-ubyte.gz files in {data_dir}")

def download(reader, data_dir, manual, **kw):
    """torchvision's `reader`, downloading what is missing; one line saying what to do if it
    cannot, and no empty --data-dir left behind."""
    existed = os.path.isdir(data_dir)
    try:
        return reader(data_dir, download=True, **kw)
    except Exception as e:  # no network, a proxy, a partial file: the fix is the same
        if not existed:
            shutil.rmtree(data_dir, ignore_errors=True)
        sys.exit(f"error: could not read or download {reader.__name__} into {data_dir} "
                 f"({type(e).__name__}: {e}). {manual}")

def load_cifar(name, data_dir):
    reader = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    manual = ("Unpack the python version from https://www.cs.toronto.edu/~kriz/cifar.html into "
              "--data-dir, or train on the CPU: python train_cifar.py --dataset fashion-mnist")
    splits = [download(reader, data_dir, manual, train=train) for train in (True, False)]
    return [t for s in splits for t in (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                                         torch.tensor(s.targets))]

def load_stl10(data_dir):
    """(train+unlabeled at 96x96, for pre-training; train and test at the evaluation transform)."""
    manual = ("Unpack stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ into "
              "--data-dir, so that stl10_binary/train_X.bin is there")
    read = [download(torchvision.datasets.STL10, data_dir, manual, split=split)
            for split in ("train+unlabeled", "train", "test")]
    evaluated = [(stl10_eval_images(torch.from_numpy(s.data)), torch.from_numpy(s.labels).long())
                 for s in read[1:]]
    return torch.from_numpy(read[0].data), [t for pair in evaluated for t in pair]

def stl10_eval_images(x, chunk=1000):
    """The released evaluation transform, uint8 to uint8: resize to 70 (bicubic, antialiased as
    PIL's), centre crop 64."""
    parts = [F.interpolate(part.float(), size=(70, 70), mode="bicubic", antialias=True)
             for part in x.split(chunk)]
    return torch.cat(parts)[:, :, 3:67, 3:67].round().clamp(0, 255).to(torch.uint8)

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

def load_tiny_imagenet(data_dir, limit=None):
    """Train (200 classes, ImageFolder's labels, taken one of each class in turn so that --limit
    spans them) and val (labelled by val_annotations.txt), decoded at 64x64 RGB."""
    root = os.path.join(data_dir, "tiny-imagenet-200")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.exists(annotations):
        sys.exit(f"error: {root} has no train/ and val/val_annotations.txt: unzip "
                 f"{TINY_IMAGENET_URL} into --data-dir")
    train = torchvision.datasets.ImageFolder(os.path.join(root, "train"))
    per_class = [[s for s in train.samples if s[1] == k] for k in range(len(train.classes))]
    train_files = [s for row in itertools.zip_longest(*per_class) for s in row if s]
    with open(annotations) as f:
        rows = [line.split("\t")[:2] for line in f if line.strip()]
    unknown = [wnid for _, wnid in rows if wnid not in train.class_to_idx]
    if unknown:
        sys.exit(f"error: {annotations} names class {unknown[0]}, which has no folder in train/")
    val_files = [(os.path.join(root, "val", "images", name), train.class_to_idx[wnid])
                 for name, wnid in rows]
    return [t for files in (train_files, val_files) for t in decode_jpegs(files[:limit])]

def decode_jpegs(files):
    """[(JPEG path, label)] -> (uint8 (n, 3, 64, 64) images, labels), read as ImageFolder does
    (grayscale becomes RGB)."""
    images = torch.empty(len(files), 3, 64, 64, dtype=torch.uint8)  # filled, never held twice
    for i, (path, _) in enumerate(files):
        rgb = torchvision.datasets.folder.pil_loader(path)
        image = torchvision.transforms.functional.pil_to_tensor(rgb)
        if image.shape != images.shape[1:]:
            sys.exit(f"error: {path} is not 64x64 RGB: unzip {TINY_IMAGENET_URL} again")
        images[i] = image
    return images, torch.tensor([label for _, label in files], dtype=torch.long)

def load_data(args, device):
    """(pre-training images, [bank images, bank labels, test images, test labels], the path
    read), on the device. Pre-training uses the bank's images, on STL-10 its unlabeled ones too."""
    pretrain, where = None, os.path.abspath(args.data_dir)
    if args.dataset == "fake":  # blocky random images: pooled white noise has no features
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randint(0, 256, ((args.limit or 512) + 256, 3, 4, 4), generator=g,
                          dtype=torch.uint8).repeat_interleave(8, 2).repeat_interleave(8, 3)
        y = torch.randint(0, 10, (len(x),), generator=g)
        splits, where = [x[:-256], y[:-256], x[-256:], y[-256:]], "random images"
    elif args.dataset == "fashion-mnist":
        splits, where = load_fashion_mnist(args.data_dir)
    elif args.dataset == "stl10":
        pretrain, splits = load_stl10(args.data_dir)
    elif args.dataset == "tiny-imagenet":
        splits = load_tiny_imagenet(args.data_dir, args.limit)
    else:
        splits = load_cifar(args.dataset, args.data_dir)
    splits = [t[:args.limit].to(device) for t in splits]
    return (splits[0] if pretrain is None else pretrain[:args.limit].to(device)), splits, where

# ------------------------------------------------------------------------------------------------
# Views: uint8 images and uniform noise -> float views in [0, 1], on the device

# Uniforms per view: 10 crop areas and 10 log-ratios (the crop sampler's tries), flip, the crop's
# x and y offsets, jitter on/off, its four strengths, grayscale.
AUGMENT_DRAWS = 29

def augmentation_noise(n, gen):
    return torch.rand(n, AUGMENT_DRAWS, generator=gen, device=gen.device)

def gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x

def augment(x, noise, cfg):
    """(n, c, h, w) uint8, (n, AUGMENT_DRAWS) uniforms -> (n, c, s, s) float views, s =
    cfg.view_size (None: the images' own): crop and flip in one warp, then colour jitter."""
    n, c, h, w = x.shape
    size = (cfg.view_size, cfg.view_size) if cfg.view_size else (h, w)
    grid = F.affine_grid(crop_and_flip(noise, cfg), (n, c, *size), align_corners=False)
    x = F.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="border",
                      align_corners=False)
    return jitter(x, noise[:, 23:].unbind(1), cfg)

def crop_and_flip(noise, cfg):
    """(n, 2, 3) affine maps of random resized crops, sampled as torchvision's (10 tries of area
    and log-ratio, the first box that fits, else the whole image) but with continuous boxes."""
    area = cfg.crop_scale[0] + (cfg.crop_scale[1] - cfg.crop_scale[0]) * noise[:, :10]
    log_low, log_high = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    ratio = torch.exp(log_low + (log_high - log_low) * noise[:, 10:20])
    box_w, box_h = (area * ratio).sqrt(), (area / ratio).sqrt()
    fits = (box_w <= 1) & (box_h <= 1)
    first = fits.int().argmax(1, keepdim=True)
    box_w = torch.where(fits.any(1), box_w.gather(1, first).squeeze(1), 1.0)
    box_h = torch.where(fits.any(1), box_h.gather(1, first).squeeze(1), 1.0)
    flip_u, dx_u, dy_u = noise[:, 20:23].unbind(1)
    flip, zero = torch.where(flip_u < cfg.flip_p, -1.0, 1.0), torch.zeros_like(box_w)
    theta = [box_w * flip, zero, (2 * dx_u - 1) * (1 - box_w),
             zero, box_h, (2 * dy_u - 1) * (1 - box_h)]
    return torch.stack(theta, 1).view(-1, 2, 3)

def jitter(x, uniforms, cfg):
    """Colour jitter with probability jitter_p (brightness, contrast, saturation, hue), then
    grayscale with probability gray_p; a skipped image gets the identity factors."""
    on_u, bright_u, contrast_u, saturation_u, hue_u, gray_u = uniforms
    on = (on_u < cfg.jitter_p).float()
    brightness, contrast, saturation, hue = cfg.jitter
    x = (x * jitter_factor(on, brightness, bright_u)).clamp(0, 1)
    mean = gray(x).mean((1, 2, 3), keepdim=True)
    x = (mean + jitter_factor(on, contrast, contrast_u) * (x - mean)).clamp(0, 1)
    if x.shape[1] == 1:
        return x
    x = (gray(x) + jitter_factor(on, saturation, saturation_u) * (x - gray(x))).clamp(0, 1)
    x = rotate_hue(x, 2 * math.pi * on * hue * (2 * hue_u - 1)).clamp(0, 1)
    return torch.where((gray_u < cfg.gray_p).view(-1, 1, 1, 1), gray(x).expand_as(x), x)

def jitter_factor(on, strength, u):
    return (1 + on * strength * (2 * u - 1)).view(-1, 1, 1, 1)

YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

def rotate_hue(x, angle):
    """Rotate each image's chroma plane in YIQ space by its angle; luma is kept."""
    cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones_like(angle), torch.zeros_like(angle)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(-1, 3, 3)
    yiq = YIQ.to(x.device)
    return torch.einsum("nij,njhw->nihw", torch.linalg.inv(yiq) @ rotation @ yiq, x)

# ------------------------------------------------------------------------------------------------
# Networks: the encoder (its features are evaluated) and the projector (its embedding whitened)

class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std

def resnet18(channels, maxpool=False):
    net = torchvision.models.resnet18(zero_init_residual=True)
    # A 3x3 stride-1 stem keeps small images from shrinking early; the released code keeps the
    # max-pool for 64x64 views only, so that both reach layer4 at 4x4.
    net.conv1, net.fc = nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.Identity()
    if not maxpool:
        net.maxpool = nn.Identity()
    return net, 512

def conv_block(inputs, outputs):
    return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
            nn.ReLU(inplace=True)]

def convnet(channels, width, pool=1):
    """Four conv blocks, for a CPU; pool > 1 keeps a coarse layout of the last map (3x3 cells of
    7x7 for 28x28 images)."""
    layers = conv_block(channels, width // 2) + [nn.MaxPool2d(2)] + conv_block(width // 2, width)
    layers += [nn.MaxPool2d(2)] + conv_block(width, 2 * width) + conv_block(2 * width, 4 * width)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool), nn.Flatten()), 4 * width * pool ** 2

class Pretrainer(nn.ModuleDict):
    def forward(self, views, n_views):
        # The encoder per view (BatchNorm statistics per view, as released), the projector on
        # all, in one call so that DistributedDataParallel sees the whole forward.
        return self["projector"](torch.cat([self["encoder"](v) for v in views.chunk(n_views)]))

def build_model(args, mean, std):
    if args.arch == "resnet18":
        backbone, width = resnet18(len(mean), DATASETS.get(args.dataset, {}).get("maxpool", False))
    else:
        backbone, width = convnet(len(mean), args.width, args.pool)
    projector = nn.Sequential(nn.Linear(width, args.hidden), nn.BatchNorm1d(args.hidden),
                              nn.ReLU(inplace=True), nn.Linear(args.hidden, args.emb))
    encoder = nn.Sequential(Normalize(mean, std), backbone)
    return Pretrainer({"encoder": encoder, "projector": projector})

def normalization(args, images):
    """The released constants where the dataset has them, else its training images' statistics."""
    if args.dataset in DATASETS:
        constants = DATASETS[args.dataset]
        return [torch.tensor(constants[key]).to(images.device) for key in ("mean", "std")]
    pixels = images.float() / 255
    return pixels.mean((0, 2, 3)), pixels.std((0, 2, 3))

# ------------------------------------------------------------------------------------------------
# The loss and the step

def plain_loss(*views):
    """2 - 2cos between views, averaged over pairs: nothing prevents collapse."""
    pairs = list(itertools.combinations([F.normalize(z.float(), dim=1) for z in views], 2))
    return sum((2 - 2 * (a * b).sum(1)).mean() for a, b in pairs) / len(pairs)

def compute_loss(zs, args, partition):
    if args.method == "plain":
        return plain_loss(*zs)
    return whitening_loss(*zs, axis="channel" if args.method == "cwrgp" else "batch",
                          groups=args.groups, sub_batch=args.sub_batch, iters=args.iters,
                          method=args.whiten, eps=args.eps, partition=partition)

def draw_partition(batch, args, gen):
    """The step's sub-batches and channel groups; --fixed-groups keeps the channels in order."""
    if args.method == "plain":
        return None
    groups = 1 if args.fixed_groups else args.groups  # one group: the identity, nothing drawn
    return random_group_partition(args.views, batch, args.emb, groups, args.sub_batch,
                                  args.iters, gen, gen.device)

def check_loss_shapes(args, world):
    """Refuse what the loss cannot whiten before anything is loaded, in the loss's words (with
    flags for its arguments): one evaluation on random embeddings, full rank where possible."""
    shape = (f"--batch-size {args.batch_size} --sub-batch {args.sub_batch} --groups "
             f"{args.groups} --emb {args.emb} --eps {args.eps}")
    if args.batch_size % world:
        sys.exit(f"error: {shape}: each of {world} processes takes an equal share: use a "
                 f"--batch-size divisible by {world}")
    batch, gen = args.batch_size // world, torch.Generator().manual_seed(0)
    try:
        compute_loss(torch.randn(args.views, batch, args.emb, generator=gen).unbind(0), args,
                     draw_partition(batch, args, gen))
    except ValueError as e:
        why = re.sub(r"\b(sub_batch|groups|eps)[ =]", lambda m: flag(m[1]) + " ", str(e))
        why = why.replace("--sub-batch None", "--sub-batch equal to the batch")
        each = f" (each of {world} processes whitens {batch}: --sub-batch must divide {batch})"
        sys.exit(f"error: {shape}: {why}{each if world > 1 else ''}")

def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

def forward_loss(model, x, noise, partition, args):
    """uint8 batch -> (loss, first view's embedding): views, encoder, projector and loss, its
    randomness passed in. What --compile compiles."""
    views = augment(x.repeat(args.views, 1, 1, 1), noise, args)
    if views.is_cuda:
        views = views.contiguous(memory_format=torch.channels_last)
    with autocast(views.device):
        zs = model(views, args.views).float().chunk(args.views)
    return compute_loss(zs, args, partition), zs[0].detach()

def compile_step(args, device):
    if not args.compile:
        return forward_loss
    if device.type != "cuda" or args.compile_backend != "inductor":
        return torch.compile(forward_loss, backend=args.compile_backend)
    # CUDA graphs (mode reduce-overhead) replay the step without a launch per kernel
    graphed = torch.compile(forward_loss, mode="reduce-overhead")

    def forward(*inputs):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are done with
        return graphed(*inputs)
    return forward

def step_seed(seed, step, rank):
    # A step's randomness depends on (seed, step, process) alone: a resume draws it again.
    return (seed * 1_000_003 + step) * 1_009 + rank + 1

def train_step(forward, model, opt, x, lr, gen, args):
    """One optimiser step -> (the loss, on the device; the first view's embedding). The eager
    loss raises ValueError, before any update, for a whitening it refuses."""
    noise = augmentation_noise(args.views * len(x), gen)
    loss, z = forward(model, x, noise, draw_partition(len(x), args, gen), args)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), z

def drop_epochs(epochs, drop_at):
    return sorted(epochs - before for before in drop_at if epochs - before > 0)

def lr_at(step, steps_per_epoch, args):
    """Linear warm-up over --warmup steps, then x --drop-factor at each drop."""
    drops = sum(step // steps_per_epoch >= e for e in drop_epochs(args.epochs, args.drop_at))
    warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
    return args.lr * warm * args.drop_factor ** drops

def schedule_notes(args, steps_per_epoch):
    """Say what of the schedule cannot run as asked."""
    steps = args.epochs * steps_per_epoch
    if args.warmup > steps:
        note(f"--warmup {args.warmup} is longer than the run's {steps} steps: the lr reaches "
             f"{lr_at(steps - 1, steps_per_epoch, args):.2g}, not --lr {args.lr}")
    skipped = [before for before in args.drop_at if args.epochs - before <= 0]
    if skipped:
        note(f"--drop-at {shown(skipped)} falls at or before epoch 0 of {args.epochs}: skipped")

# ------------------------------------------------------------------------------------------------
# Evaluation on frozen encoder features, and the spectra the figures draw

@torch.no_grad()
def features(encoder, x, batch=1024):
    was_training = encoder.training
    encoder.eval()
    with autocast(x.device):
        out = [encoder(x[i:i + batch].float() / 255).float() for i in range(0, len(x), batch)]
    encoder.train(was_training)
    return torch.cat(out)

@torch.no_grad()
def knn_top1(bank, bank_y, query, query_y, k, metric, temperature=0.1, chunk=512):
    """k-NN top-1: 'euclidean' a majority vote (ties to the lowest class, as W-MSE's code),
    'cosine' votes weighted by exp(cos / T)."""
    if metric == "cosine":
        bank, query = F.normalize(bank, dim=1), F.normalize(query, dim=1)
    bank_sq, correct = bank.pow(2).sum(1), 0
    for q, q_y in zip(query.split(chunk), query_y.split(chunk)):
        # 2 q.b - |b|^2 orders neighbours as -|q - b|^2 does (|q|^2 is the row's constant)
        top, idx = (q @ bank.T if metric == "cosine" else 2 * q @ bank.T - bank_sq).topk(k, dim=1)
        weight = (top / temperature).exp() if metric == "cosine" else torch.ones_like(top)
        votes = torch.zeros(len(q), int(bank_y.max()) + 1, device=q.device)
        correct += (votes.scatter_add_(1, bank_y[idx], weight).argmax(1) == q_y).sum().item()
    return correct / len(query)

def linear_probe(train_f, train_y, test_f, test_y, args):
    gen = torch.Generator(device=train_f.device).manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the probe's init must not depend on how long training ran
    probe = nn.Linear(train_f.shape[1], int(train_y.max()) + 1).to(train_f.device)
    opt = torch.optim.Adam(probe.parameters(), lr=args.probe_lr, weight_decay=args.probe_wd)
    decay = (1e-6 / args.probe_lr) ** (1 / args.probe_epochs)  # to 1e-6, as W-MSE's evaluation
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay)
    for _ in range(args.probe_epochs):
        order = torch.randperm(len(train_f), generator=gen, device=train_f.device)
        for idx in order.split(args.probe_batch):
            loss = F.cross_entropy(probe(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        schedule.step()
    with torch.no_grad():
        return (probe(test_f).argmax(1) == test_y).float().mean().item()

def evaluate(encoder, data, args, epoch):
    """kNN every --eval-every epochs and at the end, the linear probe at the end; None if not
    run."""
    bank_x, bank_y, test_x, test_y = data
    scores = dict.fromkeys(("knn_top1", "knn5_top1", "knn5_l2_top1", "linear_top1"))
    if epoch % args.eval_every and epoch != args.epochs:
        return scores
    bank, query = features(encoder, bank_x), features(encoder, test_x)
    k = min(args.knn_k, len(bank))
    scores["knn_top1"] = knn_top1(bank, bank_y, query, test_y, k, "cosine", args.knn_t)
    scores["knn5_top1"] = knn_top1(bank, bank_y, query, test_y, 5, "euclidean")
    # The same vote on the unit sphere: a feature's length no longer decides its neighbours.
    scores["knn5_l2_top1"] = knn_top1(F.normalize(bank, dim=1), bank_y,
                                      F.normalize(query, dim=1), test_y, 5, "euclidean")
    if epoch == args.epochs and args.probe_epochs:
        scores["linear_top1"] = linear_probe(bank, bank_y, query, test_y, args)
    return scores

def channel_spectrum(z):
    """Eigenvalues, largest first, of the channel covariance of a (b, d) batch, 4 digits each."""
    eigenvalues = torch.linalg.eigvalsh(torch.cov(z.T)).flip(0)
    return [float(f"{v:.4g}") for v in eigenvalues.tolist()]

def whitened_by_sub_batch(z, args):
    """The whitening as the loss sees it: consecutive sub-batches, groups of consecutive
    channels."""
    whiten = channel_whiten if args.method == "cwrgp" else batch_whiten
    return torch.cat([whiten(part, args.groups, args.whiten, args.eps)
                      for part in z.split(args.sub_batch)])

@torch.no_grad()
def spectra(z, args):
    """The spectra of one view's embedding and of its whitened output, for the figures."""
    logged = {"embedding_spectrum": channel_spectrum(z.double()), "whitened_spectrum": None}
    if args.method != "plain":
        try:
            logged["whitened_spectrum"] = channel_spectrum(whitened_by_sub_batch(z.double(), args))
        except ValueError:  # a refusal here is no reason to stop a run the loss let through
            pass
    return logged

# ------------------------------------------------------------------------------------------------
# What a person reads, and how a run stops

LEGEND = ("loss: the whitening loss (2-2cos, 0 to 4); knn200: cosine-weighted 200-NN top-1; knn5: "
          "Euclidean 5-NN top-1; knn5l2: 5-NN of L2-normalised features; srank/d: the "
          "embedding's stable rank over its width; img/s: images a second of training")
HEADER = (f"{'epoch':>5} {'loss':>7} {'knn200':>7} {'knn5':>7} {'knn5l2':>7} {'srank/d':>7} "
          f"{'lr':>8} {'img/s':>7} {'elapsed':>8} {'eta':>8}")

def print_row(row, emb, eta):
    def score(key):
        return "-" if row[key] is None else f"{row[key]:.4f}"
    print(f"{row['epoch']:>5} {row['loss']:>7.4f} {score('knn_top1'):>7} {score('knn5_top1'):>7} "
          f"{score('knn5_l2_top1'):>7} {row['stable_rank'] / emb:>7.3f} {row['lr']:>8.2e} "
          f"{row['images_per_s']:>7.0f} {clock(row['elapsed_s']):>8} {clock(eta):>8}", flush=True)
    if row["linear_top1"] is not None:
        print(f"linear probe top-1 {row['linear_top1']:.4f} (frozen features)")

def announce(args, argv, where, device, world):
    """Print what runs, on which data and device -> config.json's contents."""
    command = "python" if world == 1 else f"torchrun --nproc_per_node {world}"
    recipe = vars(build_parser().parse_args([]))
    differs = [f"{flag(key)} {shown(value)}" for key, value in vars(args).items()
               if key in recipe and value != recipe[key] and key not in ("out", "resume")]
    print(f"command: {command} train_cifar.py {' '.join(argv)}")
    print(f"data: {where}; device: {device}; torch {torch.__version__}; run: {args.out}")
    print(f"differs from the CIFAR recipe: {' '.join(differs) or 'nothing'}")
    return {**vars(args), "data_path": where, "commit": git_commit(), "torch": torch.__version__}

def stopped(args, state, files, upto, bad=None, error=None):
    """A non-finite loss among the epoch's steps before `upto` (`bad` if already read), or `error`
    from the loss at step `upto` -> the result that stops the run, or None. The weights updated
    from it are never saved."""
    if bad is None and not (error and files.world > 1):  # alone, this process reads nothing
        bad = read_losses(state, upto, False, files.world)[0]
    if bad is None and error is None:
        return None
    epoch_start, steps_per_epoch = state["step"] - upto, len(state["losses"])
    step, reason = (epoch_start + bad[0], f"loss {bad[1]}") if bad else (state["step"], error)
    fix = {"cwrgp": "a smaller --sub-batch or fewer --groups",
           "wmse": "a larger --sub-batch or more --groups"}.get(args.method)
    cause = (f"rank-deficient whitening; try --eps 1e-4 (a resume may add it), or in a new run "
             f"{fix} (or a lower --lr, if the network diverged)" if fix else
             "the network diverged; try a lower --lr (a resume may lower it)")
    kept = (f"Kept the last checkpoint in {args.out}" if os.path.exists(files.ckpt)
            else "No checkpoint was saved yet")
    message = (f"stopped: non-finite loss at step {step + 1} (epoch {step // steps_per_epoch + 1}):"
               f" {reason}. Likely cause: {cause}. {kept}.")
    if files.rank == 0 or error:
        print(message, file=sys.stderr)
    return {"status": "nonfinite", "out": args.out, "log": state["log"], "message": message}

def interrupted(args, state, files, done):
    """A stop request after `done` of the epoch's steps: checkpoint there, unless a loss not yet
    read back is not finite."""
    result = stopped(args, state, files, done) if done else None
    if result:
        return result
    if state["saved_step"] != state["step"]:
        files.save(state)
    if files.rank == 0:
        print(f"\ninterrupted: saved {files.ckpt} at step {state['step']}; continue with "
              f"--resume {args.out}", file=sys.stderr)
    return {"status": "interrupted", "out": args.out, "log": state["log"]}

# ------------------------------------------------------------------------------------------------
# The loop: one flat while over the step counter

def train(args, net, opt, images, data, state, files, stop):
    """Train from state["step"] to the last epoch -> the result; its status says how it ended."""
    steps_per_epoch, share = len(images) // args.batch_size, args.batch_size // files.world
    forward, gen = compile_step(args, images.device), torch.Generator(images.device)
    timing = Timing(state["elapsed_s"], steps_per_epoch, args.batch_size)
    if state["row"] and not end_epoch(args, data, state, files, timing, stop):
        return interrupted(args, state, files, 0)  # stopped in that epoch's evaluation, again
    while state["step"] < args.epochs * steps_per_epoch:
        epoch, i = divmod(state["step"], steps_per_epoch)
        if i == 0:  # the epoch's data order, shared by every process
            gen.manual_seed(step_seed(args.seed, state["step"], -1))
            state["order"] = torch.randperm(len(images), generator=gen, device=images.device)
            state["losses"], state["checked"] = torch.zeros(steps_per_epoch).to(images.device), 0
        if timing.begin is None:
            timing.start_epoch(i)
        first = i * args.batch_size + files.rank * share  # this process's share of the batch
        x = images[state["order"][first:first + share]]
        lr = lr_at(state["step"], steps_per_epoch, args)
        gen.manual_seed(step_seed(args.seed, state["step"], files.rank))
        try:
            state["losses"][i], z = train_step(forward, net, opt, x, lr, gen, args)
        except ValueError as e:  # the eager loss refused this step's whitening: no update
            return stopped(args, state, files, i, error=f"process {files.rank}: {e}"
                           if files.world > 1 else str(e))
        state["step"] += 1
        asked = files.world == 1 and stop.count > 0
        if (i + 1) % args.check_every == 0 or i + 1 == steps_per_epoch:
            bad, asked = read_losses(state, i + 1, stop.count > 0, files.world)
            if bad:
                return stopped(args, state, files, i + 1, bad)
        timing.tick(epoch + 1, i + 1)
        if i + 1 == steps_per_epoch:
            seconds, images_per_s = timing.end_epoch()
            state["train_s"] += seconds
            state["row"] = {"epoch": epoch + 1, "lr": lr, "images_per_s": images_per_s,
                            "loss": state["losses"].double().mean().item(),
                            "stable_rank": stable_rank(z).item(), **spectra(z, args)}
            if not end_epoch(args, data, state, files, timing, stop):
                return interrupted(args, state, files, 0)
        if asked:
            return interrupted(args, state, files, (i + 1) % steps_per_epoch)
    if files.rank == 0:
        print(f"done in {clock(timing.elapsed())}: {args.out}")
    return {"status": "done", "out": args.out, "log": state["log"], "model": files.model}

def end_epoch(args, data, state, files, timing, stop):
    """Evaluate, log and print the epoch's row (rank 0); checkpoint every --save-every epochs and
    at the end. False, with none of it done, if a stop request came during the evaluation."""
    epoch = state["row"]["epoch"]
    if files.rank == 0:
        stop.evaluating = True
        try:
            scores = evaluate(files.model["encoder"], data, args, epoch)
        except KeyboardInterrupt:
            return False
        finally:
            stop.evaluating = False
        row = {**state["row"], **scores, "train_s": state["train_s"], "elapsed_s": timing.elapsed()}
        state["log"].append(row)
        print_row(row, args.emb, timing.eta(args.epochs - epoch))
        files.write_log(state["log"])
    state["row"], state["epochs_logged"], state["elapsed_s"] = None, epoch, timing.elapsed()
    if epoch % args.save_every == 0 or epoch == args.epochs:
        files.save(state)
    return True

# ------------------------------------------------------------------------------------------------
# main

def init_distributed(args):
    """(rank, processes, device); under torchrun a process group (NCCL on CUDA, gloo on the CPU)."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device

def build(args, world, device):
    """-> (model, the network to train, optimiser, images, evaluation data, the path read);
    exits with one line, before any directory exists, if the run cannot start."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    check_loss_shapes(args, world)
    torch.manual_seed(args.seed)
    images, data, where = load_data(args, device)
    if len(images) < args.batch_size:
        sys.exit(f"error: {len(images)} training images is less than one batch of "
                 f"{args.batch_size}: lower --batch-size or raise --limit")
    model = build_model(args, *normalization(args, images)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # Fused Adam: one kernel on CUDA, and several times faster than foreach on the CPU too
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wd, fused=True)
    ids = [device.index] if device.type == "cuda" else None
    net = model if world == 1 else DistributedDataParallel(model, device_ids=ids)
    return model, net, opt, images, data, where

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = resolve_config(argv)
    rank, world, device = init_distributed(args)
    try:
        model, net, opt, images, data, where = build(args, world, device)
        config = announce(args, argv, where, device, world) if rank == 0 else vars(args)
        files = RunFiles(config, model, opt, rank, world)
        state = files.load() if args.resume else new_state()
        if state["epochs_logged"] >= args.epochs:
            done = state["epochs_logged"]
            print(f"{args.out} is finished at epoch {done}: nothing to do. Continue it with "
                  f"--resume {args.out} --epochs N for N > {done}", file=sys.stderr)
            return {"status": "finished", "out": args.out, "log": state["log"], "model": model}
        if rank == 0:
            schedule_notes(args, len(images) // args.batch_size)
            if args.resume:
                files.write_config()
                files.write_log(state["log"])  # rows logged after the checkpoint come again
            print(LEGEND + "\n" + HEADER, flush=True)
        return train_until_stopped(args, net, opt, images, data, state, files)
    finally:
        if world > 1:
            dist.destroy_process_group()

def train_until_stopped(args, net, opt, images, data, state, files):
    """train() with SIGINT and SIGTERM as stop requests (StopRequests) while it runs."""
    stop = StopRequests(files.world)
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train(args, net, opt, images, data, state, files, stop)
    except KeyboardInterrupt:  # a second Ctrl-C mid-step: what the step changed cannot be saved
        saved = state["saved_step"]
        kept = f"the last checkpoint, at step {saved}, is kept" if saved else "nothing was saved"
        print(f"\nstopped at once: {kept}", file=sys.stderr)
        return {"status": "interrupted", "out": args.out, "log": state["log"]}
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

if __name__ == "__main__":
    try:
        result = main()
    except KeyboardInterrupt:  # before training started: nothing to save
        sys.exit("\ninterrupted before training started: nothing was saved")
    sys.exit({"done": 0, "finished": 0, "interrupted": 130}.get(result["status"], 1))
