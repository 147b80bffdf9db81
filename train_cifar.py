"""
train_cifar.py: self-supervised pre-training with the CW-RGP whitening loss, then evaluation.

Follows the CIFAR recipe of "An Investigation into Whitening Loss for Self-supervised Learning"
(Weng et al., NeurIPS 2022) as released by the authors: ResNet-18 (CIFAR variant), projector
512 -> 1024 -> 512, channel whitening with random group partition (g = 4, sub-batch 64, ZCA,
eps = 0), Adam lr 3e-3 / wd 1e-6, batch 256, 500-step warm-up, lr x 0.2 at epochs E-50 and E-25;
evaluated by 5-NN (Euclidean) and a linear probe on the frozen encoder features. The loss itself
lives in cwrgp.py; everything about devices, precision, compilation and data is here. The training
loop follows the shape of nanoGPT's train.py: one flat loop over a step counter, and the step, the
epoch's evaluation, the checkpoint and the learning rate as named functions.

    python train_cifar.py --groups 4                                  # CIFAR-10, GPU
    python train_cifar.py --dataset fashion-mnist --arch convnet --crop-scale 0.5 1   # CPU, no download
    python train_cifar.py --method wmse | --method plain              # W-MSE / no whitening
    python train_cifar.py --dataset stl10 | --dataset tiny-imagenet   # 64x64 views, README's datasets table
    torchrun --nproc_per_node 4 train_cifar.py --groups 4             # data parallel on 4 GPUs

The images stay on the device as uint8 and all views of a batch are made there in one batched call,
so no DataLoader runs in the hot loop. Everything random in a step (data order, augmentation, group
partitions) is drawn from the run's generator outside the step and passed in as tensors: the step
itself is a pure tensor function, which is what --compile compiles (off by default: not yet verified
on a GPU) and what makes --resume continue a run exactly. Departures from the released augmentation
(torchvision's, image by image), for batching: colour jitter applies its four parts in a fixed order
(brightness, contrast, saturation, hue) and after the crop rather than before it; the hue shift is a
rotation of the chroma plane in YIQ space rather than a shift of H in HSV, which moves pixels about
30% further for the same hue strength; the crop's boxes are continuous rather than whole pixels and
resampled bilinearly rather than bicubically. test_train_cifar.py compares the views with
torchvision's; docs/results.md gives the sizes of these departures.

Under torchrun each process takes batch-size / N images of every step from one shared data order
and whitens them on its own, with its own views and group partitions, as the released code and
W-MSE do: the sub-batches are drawn within a process's share. DistributedDataParallel averages the
gradients; BatchNorm statistics stay per process (and per view). Rank 0 evaluates, logs and saves;
Ctrl-C or SIGTERM stops all processes at the same step, within --check-every steps, and saves once.

Ctrl-C and SIGTERM are requests that the loop acts on between steps (StopSignals), so a checkpoint
always holds the weights, optimiser, BatchNorm statistics and step counter of one step; the one
before it is kept as ckpt-prev.pt, for a resume to fall back on should the last be damaged. A
resume keeps the flags that define the run (DEFINING) and refuses another value for them before
anything is written; every numeric flag is checked against its range in FLAG_RANGES.

The loss is read back every --check-every steps rather than every step, so the device is not made to
wait for the host; a non-finite loss still stops the run within that many steps, before any
checkpoint holds the corrupted weights. images/s counts source images (not views) per second of
training, excluding evaluation. Measured speeds and accuracies are in docs/results.md.
"""

import argparse, datetime, gzip, itertools, json, math, os, pathlib, shlex, signal, struct, sys, time

# OpenMP threads that spin while they wait slowed a CPU run 3x, and a loss loop 80x, on cores other
# processes shared (docs/results.md); passive waiting costs nothing measurable on idle cores. Read
# when torch loads its OpenMP runtime, so it must come before `import torch`; a policy the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel

from cwrgp import batch_whiten, channel_whiten, random_group_partition, stable_rank, whitening_loss


DEFAULT_DATA_DIR = "./data"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other refusal of the trainer
        sys.exit(f"error: {message} (python train_cifar.py --help lists the flags)")


def build_parser():
    p = Parser(description="CW-RGP self-supervised pre-training")
    arg = p.add_argument
    # data
    arg("--dataset", choices=["cifar10", "cifar100", "stl10", "tiny-imagenet", "fashion-mnist", "fake"], default="cifar10")
    arg("--data-dir", default=DEFAULT_DATA_DIR, help="holds cifar-*-batches-py/, stl10_binary/ or tiny-imagenet-200/ "
        "(Fashion-MNIST: its idx files; the system copy is used if this is left at its default)")
    arg("--limit", type=int, help="use only the first N train (and test) images")
    # model
    arg("--arch", choices=["resnet18", "convnet"], default="resnet18")
    arg("--width", type=int, help="convnet width (channels of its second block)", default=48)
    arg("--pool", type=int, default=1, help="convnet: its features are the last map average-pooled to pool x pool "
        "cells (1: one global average)")
    arg("--hidden", type=int, help="projector hidden width", default=1024)
    arg("--emb", type=int, help="embedding width (default 512; 64 for wmse)")
    # loss
    arg("--method", choices=["cwrgp", "wmse", "plain"], help="plain: 2-2cos with no whitening", default="cwrgp")
    arg("--views", type=int, default=2)
    arg("--groups", type=int, help="default 4 (cwrgp), 1 (wmse)")
    arg("--sub-batch", type=int, help="default 64 (cwrgp), 128 (wmse)")
    arg("--whiten", choices=["zca", "cholesky", "pca"], help="default zca (cwrgp), cholesky (wmse)")
    arg("--eps", type=float, help="covariance shrinkage", default=0.0)
    arg("--iters", type=int, help="w_iter: whitening repetitions per step", default=1)
    # optimisation
    arg("--epochs", type=int, default=200)
    arg("--batch-size", type=int, default=256)
    arg("--lr", type=float, default=3e-3)
    arg("--wd", type=float, default=1e-6)
    arg("--warmup", type=int, help="linear warm-up steps (0: none)", default=500)
    arg("--drop-at", type=int, nargs="*", help="lr drops this many epochs before the end", default=[50, 25])
    arg("--drop-factor", type=float, default=0.2)
    # augmentation (per view)
    arg("--view-size", type=int, help="side of the training views, the crop's output (default 64 for stl10, "
        "else the images' own side)")
    arg("--crop-scale", type=float, nargs=2, default=[0.2, 1.0])
    arg("--crop-ratio", type=float, nargs=2, default=[3 / 4, 4 / 3])
    arg("--flip-p", type=float, default=0.5)
    arg("--jitter", type=float, nargs=4, help="brightness contrast saturation hue", default=[0.4, 0.4, 0.4, 0.1])
    arg("--jitter-p", type=float, default=0.8)
    arg("--gray-p", type=float, default=0.1)
    # evaluation
    arg("--eval-every", type=int, help="kNN monitor every N epochs (and at the end)", default=10)
    arg("--knn-k", type=int, help="k of the cosine-weighted kNN", default=200)
    arg("--knn-t", type=float, help="temperature of the cosine-weighted kNN", default=0.1)
    arg("--probe-epochs", type=int, help="linear probe epochs at the end (0: skip)", default=500)
    arg("--probe-lr", type=float, default=1e-2)
    arg("--probe-wd", type=float, default=5e-6)
    arg("--probe-batch", type=int, default=1000)
    # run
    arg("--device", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N or mps", default="auto")
    arg("--threads", type=int, help="CPU threads for torch")
    arg("--compile", action="store_true",
        help="compile the step (augmentation, encoder, projector, loss and their backward) with torch.compile; "
             "on CUDA with mode reduce-overhead (CUDA graphs). Off by default: not yet verified on a GPU")
    arg("--compile-backend", default="inductor", help="torch.compile backend; aot_eager needs no C compiler")
    arg("--check-every", type=int, default=50, help="read the loss back (and stop on a non-finite one, and "
        "refresh the progress line) every N steps and at each epoch's end; under torchrun, also when "
        "Ctrl-C / SIGTERM takes effect")
    arg("--seed", type=int, default=0)
    arg("--out", help="run directory of a new run (default runs/<dataset>-<method>-<time>)")
    arg("--save-every", type=int, help="checkpoint every N epochs (and at the end)", default=10)
    arg("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    return p


METHOD_DEFAULTS = {  # emb, groups, sub_batch, whitening
    "cwrgp": (512, 4, 64, "zca"), "wmse": (64, 1, 128, "cholesky"), "plain": (512, None, None, None)}

# What the released data code (W-MSE's datasets/stl10.py and tiny_in.py, followed by CW-RGP's base/)
# does beyond the CIFAR recipe: views cropped to 64x64, the ResNet-18 stem's max-pool kept (only
# CIFAR drops it), and fixed normalisation constants. A dataset not listed here takes its views at
# the images' own size, no max-pool, and the mean and std of its training images.
DATASETS = {
    "stl10": {"view_size": 64, "maxpool": True, "mean": (0.43, 0.42, 0.39), "std": (0.27, 0.26, 0.27)},
    "tiny-imagenet": {"view_size": 64, "maxpool": True, "mean": (0.480, 0.448, 0.398), "std": (0.277, 0.269, 0.282)},
}

# The flags that define a run: its data, network, loss and its whitening's shape, batch,
# augmentation and randomness. A resume keeps them, since its checkpoint, its data order and its
# log only make sense with them. Every other flag may change: those of RESCHEDULING change how the
# run goes on from its checkpoint (a lower --lr or an --eps after a non-finite loss, an lr drop),
# and a resume says so; the rest (epochs, evaluation, saving, device, threads, compilation, checks)
# change nothing but the schedule's length and what is measured.
DEFINING = ("dataset", "limit", "arch", "width", "pool", "hidden", "emb", "method", "views", "groups", "sub_batch", "whiten",
            "iters", "batch_size", "view_size", "crop_scale", "crop_ratio", "flip_p", "jitter", "jitter_p", "gray_p", "seed")
RESCHEDULING = ("lr", "wd", "warmup", "drop_at", "drop_factor", "eps")

# The valid range of every numeric flag, each value of a multi-value flag checked alike:
# (lowest, highest, whether the lowest itself is refused); None is unbounded.
AT_LEAST_1, AT_LEAST_0, POSITIVE, PROBABILITY = (1, None, False), (0, None, False), (0, None, True), (0, 1, False)
FLAG_RANGES = {
    "limit": AT_LEAST_1, "width": (2, None, False), "pool": AT_LEAST_1, "hidden": AT_LEAST_1, "emb": AT_LEAST_1, "views": (2, None, False),
    "groups": AT_LEAST_1, "sub_batch": (2, None, False), "eps": AT_LEAST_0, "iters": AT_LEAST_1,
    "epochs": AT_LEAST_1, "batch_size": (2, None, False), "lr": POSITIVE, "wd": AT_LEAST_0, "warmup": AT_LEAST_0,
    "drop_at": AT_LEAST_1, "drop_factor": (0, 1, True),
    "view_size": AT_LEAST_1, "crop_scale": (0, 1, True), "crop_ratio": POSITIVE, "flip_p": PROBABILITY, "jitter": AT_LEAST_0,
    "jitter_p": PROBABILITY, "gray_p": PROBABILITY,
    "eval_every": AT_LEAST_1, "knn_k": AT_LEAST_1, "knn_t": POSITIVE, "probe_epochs": AT_LEAST_0,
    "probe_lr": POSITIVE, "probe_wd": AT_LEAST_0, "probe_batch": AT_LEAST_1,
    "threads": AT_LEAST_1, "check_every": AT_LEAST_1, "seed": AT_LEAST_0, "save_every": AT_LEAST_1,
}
ORDERED = ("crop_scale", "crop_ratio")  # (low, high) pairs
HUE_MAX = 0.5  # a hue shift of more than half a turn would wrap around


def describe_range(lowest, highest, open_low):
    if highest is None:
        return f"greater than {lowest}" if open_low else f"at least {lowest}"
    return f"in {'(' if open_low else '['}{lowest}, {highest}]"


def check_flags(args):
    """Exit with one line naming the first flag whose value is out of its range."""
    for key, (lowest, highest, open_low) in FLAG_RANGES.items():
        value = args[key]
        values = value if isinstance(value, list) else [] if value is None else [value]
        if any(v < lowest or (open_low and v == lowest) or (highest is not None and v > highest) for v in values):
            given, each = " ".join(map(str, values)), "each value " if isinstance(value, list) else ""
            sys.exit(f"error: --{key.replace('_', '-')} {given}: {each}must be {describe_range(lowest, highest, open_low)}")
    for key in ORDERED:
        if args[key][0] > args[key][1]:
            sys.exit(f"error: --{key.replace('_', '-')} {args[key][0]} {args[key][1]}: give the low end first")
    if args["jitter"][3] > HUE_MAX:
        sys.exit(f"error: --jitter ... {args['jitter'][3]}: the hue strength (the fourth value) must be at most {HUE_MAX}")
    check_device(args["device"])


def check_device(name):
    """Exit with one line unless `name` is auto or a device that this machine has."""
    valid = "auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name if name != "auto" else "cpu")
    except RuntimeError:
        sys.exit(f"error: --device {name}: not a device; use {valid}")
    if device.type not in ("cpu", "cuda", "mps"):
        sys.exit(f"error: --device {name}: not a device the trainer runs on; use {valid}")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        sys.exit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA devices, cuda:0 to "
                 f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {name}: MPS is not available here; use --device cpu")


def given_flags(argv):
    """The flags argv gives, as {dest: value}, without the defaults."""
    parser, absent = build_parser(), object()  # not a string, so argparse does not convert it
    parser.set_defaults(**{action.dest: absent for action in parser._actions if action.dest != "help"})
    return {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not absent}


def resume_config(argv, given):
    """The saved run's config with the flags given now; exits, before anything is written, if a
    given flag would change what the run is."""
    run_dir = given["resume"]
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        sys.exit(f"error: {path} does not exist: --resume takes the directory of a run that has started")
    if "out" in given and os.path.abspath(given["out"]) != os.path.abspath(run_dir):
        sys.exit(f"error: --resume {run_dir} continues the run in its own directory: drop --out (or drop "
                 f"--resume to start a new run in {given['out']})")
    try:
        saved = json.loads(pathlib.Path(path).read_text())
    except ValueError as e:
        sys.exit(f"error: {path} is not the JSON config.json the trainer writes ({e}); restore it, or start a new run with --out DIR")
    parser = build_parser()
    parser.set_defaults(**saved)  # a key the run predates keeps the parser's default
    args = vars(parser.parse_args(argv))
    kept = {key: parser.get_default(key) for key in DEFINING}
    changed = [key for key in DEFINING if key in given and given[key] != kept[key]]
    if changed:
        flags = "; ".join(f"--{k.replace('_', '-')} {show_value(given[k])} (the run has {show_value(kept[k])})"
                          for k in changed)
        sys.exit(f"error: {flags}: a resume keeps the flags that define the run; drop them to continue "
                 f"{run_dir}, or start a new run with --out DIR")
    note_schedule_change(saved, args)
    return {**args, "out": run_dir}


def show_value(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def drop_epochs(args):
    return sorted(args["epochs"] - before for before in args["drop_at"] if args["epochs"] - before > 0)


def note_schedule_change(saved, args):
    """Say, on a resume, what changes how the run goes on from its checkpoint."""
    for key in RESCHEDULING:
        if key in saved and saved[key] != args[key]:
            print(f"note: --{key.replace('_', '-')} {show_value(args[key])} (the run had {show_value(saved[key])}) "
                  f"applies from the checkpoint on; config.json records the new value", file=sys.stderr)
    if "epochs" in saved and drop_epochs(saved) != drop_epochs(args):
        show = lambda epochs: ", ".join(map(str, epochs)) or "none"
        print(f"note: the lr drops (--drop-at {show_value(args['drop_at'])} epochs before the end of "
              f"{args['epochs']}) move from epochs {show(drop_epochs(saved))} to {show(drop_epochs(args))}", file=sys.stderr)


def resolve_config(argv):
    given = given_flags(argv)
    if given.get("resume"):
        args = resume_config(argv, given)
    else:
        args = vars(build_parser().parse_args(argv))
    for key, value in zip(("emb", "groups", "sub_batch", "whiten"), METHOD_DEFAULTS[args["method"]]):
        args[key] = value if args[key] is None else args[key]
    # the dataset's view size (None: the images' own)
    if args["view_size"] is None:
        args["view_size"] = DATASETS.get(args["dataset"], {}).get("view_size")
    check_flags(args)
    if args["out"] and not args["resume"]:
        check_new_directory(args["out"])
    args["out"] = args["out"] or os.path.join(
        "runs", f"{args['dataset']}-{args['method']}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    return argparse.Namespace(**args)


def check_new_directory(out):
    """A new run never writes over another run's log or checkpoints (a config.json alone is no run)."""
    held = [name for name in RUN_FILES[1:] if os.path.exists(os.path.join(out, name))]
    if held:
        sys.exit(f"error: --out {out} already holds a run ({', '.join(held)}): continue it with --resume {out}, "
                 f"or choose another --out")


# ----------------------------------------------------------------------------------------------
# Data: whole splits as uint8 (n, c, h, w) tensors

def read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def load_fashion_mnist(data_dir):
    # The system copy stands in only for the default --data-dir: a folder the user names must hold the data.
    folders = [data_dir, os.path.join(data_dir, "FashionMNIST", "raw")]
    folders += [SYSTEM_FASHION_MNIST] if data_dir == DEFAULT_DATA_DIR else []
    for folder in folders:
        files = [os.path.join(folder, f"{split}-{kind}-ubyte.gz")
                 for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
        if all(map(os.path.exists, files)):
            xs = [read_idx(f) for f in files]
            return xs[0].unsqueeze(1), xs[1].long(), xs[2].unsqueeze(1), xs[3].long()
    if data_dir != DEFAULT_DATA_DIR:
        sys.exit(f"error: --data-dir {data_dir} does not hold Fashion-MNIST (train- and t10k-images-idx3-ubyte.gz, "
                 f"-labels-idx1-ubyte.gz, there or in FashionMNIST/raw); point --data-dir at them, or leave it out "
                 f"to use {SYSTEM_FASHION_MNIST}")
    sys.exit(f"error: Fashion-MNIST idx files not found in {data_dir} or {SYSTEM_FASHION_MNIST}; install the "
             f"Debian package dataset-fashion-mnist or put the four *-ubyte.gz files in {data_dir}")


def load_cifar(name, data_dir):
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        splits = [cls(data_dir, train=train, download=True) for train in (True, False)]
    except Exception as e:  # no network, proxy, partial file: the fix is the same, so say it once
        sys.exit(f"error: could not get {name} into {data_dir} ({type(e).__name__}: {e}). Download the "
                 f"python version of the dataset from https://www.cs.toronto.edu/~kriz/cifar.html, unpack "
                 f"it into {data_dir}, and rerun; or use --dataset fashion-mnist, which needs no download.")
    out = []
    for s in splits:
        out += [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)]
    return out


STL10_URL = "https://cs.stanford.edu/~acoates/stl10/"
STL10_SIDE = 96


def read_stl10_images(path, out):
    """Fill the uint8 (n, 3, 96, 96) tensor `out` with the first n images of an STL-10 *_X.bin file,
    which stores each image as 3 planes of 96x96 written column by column: h and w are swapped back.
    Read in chunks, so the file is never in memory twice."""
    per_image = 3 * STL10_SIDE * STL10_SIDE
    if os.path.getsize(path) % per_image or os.path.getsize(path) < len(out) * per_image:
        sys.exit(f"error: {path} is not {len(out)} or more STL-10 images of {per_image} bytes: "
                 f"download and unpack stl10_binary.tar.gz again ({STL10_URL})")
    if not len(out):
        return out
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(len(out), 3, STL10_SIDE, STL10_SIDE))
    for i in range(0, len(out), 4096):
        out[i:i + 4096] = torch.from_numpy(np.array(raw[i:i + 4096])).transpose(2, 3)
    return out


def stl10_count(path):
    return os.path.getsize(path) // (3 * STL10_SIDE * STL10_SIDE)


def read_stl10_labels(path, n):
    labels = torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=n)).long() - 1  # 1..10 on disk
    if len(labels) != n:
        sys.exit(f"error: {path} holds {len(labels)} labels for {n} images: download and unpack "
                 f"stl10_binary.tar.gz again ({STL10_URL})")
    return labels


def stl10_eval_images(x, chunk=1000):
    """The released evaluation transform, once at load time: 96x96 -> resize to 70 (bicubic, with
    PIL's antialiasing) -> centre crop 64, uint8 in and out."""
    out = []
    for part in x.split(chunk):
        small = F.interpolate(part.float(), size=(70, 70), mode="bicubic", antialias=True, align_corners=False)
        out.append(small[:, :, 3:67, 3:67].round().clamp(0, 255).to(torch.uint8))  # CenterCrop's top-left is round(6 / 2)
    return torch.cat(out)


def load_stl10(data_dir, limit=None):
    """(pre-training images, bank images, bank labels, test images, test labels). Pre-training takes
    train+unlabeled at 96x96 (105k images: 2.9 GB as uint8); the kNN bank and the linear probe take
    the 5k labelled train images, and the test split its 8k, both at 64x64 (the evaluation
    transform). The binary files are read directly: torchvision's STL10 only downloads them."""
    folder = os.path.join(data_dir, "stl10_binary")
    files = {name: os.path.join(folder, f"{name}.bin") for name in ("train_X", "train_y", "unlabeled_X", "test_X", "test_y")}
    if not all(map(os.path.exists, files.values())):
        try:
            torchvision.datasets.STL10(data_dir, split="train", download=True)
        except Exception as e:  # no network, proxy, partial file: the fix is the same, so say it once
            sys.exit(f"error: could not get stl10 into {data_dir} ({type(e).__name__}: {e}). Download "
                     f"stl10_binary.tar.gz from {STL10_URL}, unpack it into {data_dir} (so that {files['train_X']} "
                     f"exists), and rerun.")
    n_train, n_unlabeled, n_test = (min(stl10_count(files[f"{split}_X"]), limit or math.inf)
                                    for split in ("train", "unlabeled", "test"))
    images = lambda n: torch.empty(n, 3, STL10_SIDE, STL10_SIDE, dtype=torch.uint8)
    pretrain = images(min(n_train + n_unlabeled, limit or math.inf))  # train first, as torchvision's train+unlabeled
    read_stl10_images(files["train_X"], pretrain[:n_train])
    read_stl10_images(files["unlabeled_X"], pretrain[n_train:])
    test = read_stl10_images(files["test_X"], images(n_test))
    return (pretrain, stl10_eval_images(pretrain[:n_train]), read_stl10_labels(files["train_y"], n_train),
            stl10_eval_images(test), read_stl10_labels(files["test_y"], n_test))


TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def decode_jpegs(paths, side=64):
    """One uint8 (n, 3, side, side) tensor, filled in place (1.2 GB for Tiny-ImageNet's 100k train
    images, never held twice); grayscale JPEGs become RGB, as PIL's convert("RGB") in the released code."""
    out = torch.empty(len(paths), 3, side, side, dtype=torch.uint8)
    for i, path in enumerate(paths):
        with PIL.Image.open(path) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        if pixels.shape != out.shape[1:]:
            sys.exit(f"error: {path} is {tuple(pixels.shape[1:])}, not {side}x{side}: Tiny-ImageNet's images are "
                     f"all {side}x{side}; unzip {TINY_IMAGENET_URL} again")
        out[i] = pixels
    return out


def tiny_imagenet_files(root):
    """([(train JPEG, label)], [(val JPEG, label)]). Classes are the train/ folders in sorted order
    (ImageFolder's labels); val/ is the archive's images/ folder and val_annotations.txt, whose
    lines name each file's class. Train images are taken one of every class in turn, so that the
    first --limit N images span the classes."""
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    label = {wnid: k for k, wnid in enumerate(classes)}
    per_class = [sorted(pathlib.Path(train_dir, wnid).rglob("*.JPEG")) for wnid in classes]
    train = [(str(path), k) for row in itertools.zip_longest(*per_class) for k, path in enumerate(row) if path]
    annotations = os.path.join(val_dir, "val_annotations.txt")
    val = []
    for number, line in enumerate(pathlib.Path(annotations).read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, wnid = line.split("\t")[:2]
        if wnid not in label:
            sys.exit(f"error: {annotations}:{number} names class {wnid}, which has no folder in {train_dir}")
        val.append((os.path.join(val_dir, "images", name), label[wnid]))
    return train, val


def load_tiny_imagenet(data_dir, limit=None):
    """(train images, train labels, val images, val labels): pre-training, the kNN bank and the
    linear probe all take train (100k, 64x64, 200 classes), the test is val (10k)."""
    root = os.path.join(data_dir, "tiny-imagenet-200")
    if not (os.path.isdir(os.path.join(root, "train")) and os.path.exists(os.path.join(root, "val", "val_annotations.txt"))):
        sys.exit(f"error: {root} has no train/ and val/val_annotations.txt: download {TINY_IMAGENET_URL} and "
                 f"unzip it into {data_dir}, or give the folder that holds tiny-imagenet-200/ as --data-dir")
    out = []
    for split in tiny_imagenet_files(root):
        split = split[:limit]
        out += [decode_jpegs([path for path, _ in split]), torch.tensor([k for _, k in split])]
    return out


def load_data(args, device):
    """(pre-training images, (bank images, bank labels, test images, test labels)) on the device, all
    uint8 (n, c, h, w) and int64. The pre-training images are the bank's own tensor except for STL-10,
    which pre-trains on its unlabeled images too, at full size."""
    if args.dataset == "fake":
        g = torch.Generator().manual_seed(args.seed)
        n = args.limit or 512
        # Smooth random images: pooled white noise would give every image the same features.
        x = torch.randint(0, 256, (n + 256, 3, 4, 4), generator=g, dtype=torch.uint8).repeat_interleave(8, 2).repeat_interleave(8, 3)
        y = torch.randint(0, 10, (n + 256,), generator=g)
        splits = x[:n], y[:n], x[n:], y[n:]
    elif args.dataset == "fashion-mnist":
        splits = load_fashion_mnist(args.data_dir)
    elif args.dataset == "stl10":
        pretrain, *splits = load_stl10(args.data_dir, args.limit)
    elif args.dataset == "tiny-imagenet":
        splits = load_tiny_imagenet(args.data_dir, args.limit)
    else:
        splits = load_cifar(args.dataset, args.data_dir)
    if args.limit:
        splits = [t[:args.limit] for t in splits]
    splits = [t.to(device) for t in splits]
    return (pretrain.to(device) if args.dataset == "stl10" else splits[0]), splits


# ----------------------------------------------------------------------------------------------
# Augmentation: uint8 images and uniform noise -> float views in [0, 1], all on the device

# Uniforms per view, drawn in one call outside the step: 10 crop areas and 10 log-ratios (the crop
# sampler's tries), flip, the crop's x and y offsets, jitter on/off, brightness, contrast,
# saturation, hue, grayscale.
AUGMENT_DRAWS = 29


def augmentation_noise(n, gen):
    return torch.rand(n, AUGMENT_DRAWS, generator=gen, device=gen.device)


def gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


def augment(x, noise, cfg):
    """(n, c, h, w) uint8 images and (n, AUGMENT_DRAWS) uniforms -> (n, c, s, s) float views, s =
    cfg.view_size (None: (n, c, h, w), the images' own size)."""
    n, c, h, w = x.shape
    area_u, ratio_u = noise[:, :10], noise[:, 10:20]
    flip_u, dx_u, dy_u, on_u, bright_u, contrast_u, sat_u, hue_u, gray_u = noise[:, 20:].unbind(1)
    x = x.float() / 255
    # Random resized crop sampled as torchvision does (10 tries of area and log-ratio, the first box
    # that fits wins, else the whole image) but with continuous boxes; flip folds into the same warp.
    area = cfg.crop_scale[0] + (cfg.crop_scale[1] - cfg.crop_scale[0]) * area_u
    log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * ratio_u)
    cw, ch = (area * ratio).sqrt(), (area / ratio).sqrt()
    fits = (cw <= 1) & (ch <= 1)
    first = fits.int().argmax(1, keepdim=True)
    cw = torch.where(fits.any(1), cw.gather(1, first).squeeze(1), 1.0)
    ch = torch.where(fits.any(1), ch.gather(1, first).squeeze(1), 1.0)
    flip = torch.where(flip_u < cfg.flip_p, -1.0, 1.0)
    zero = torch.zeros_like(cw)
    theta = torch.stack([cw * flip, zero, (2 * dx_u - 1) * (1 - cw), zero, ch, (2 * dy_u - 1) * (1 - ch)], 1)
    # The grid's size is the view's: the crop box is resampled onto view_size x view_size points.
    size = (cfg.view_size, cfg.view_size) if cfg.view_size else (h, w)
    grid = F.affine_grid(theta.view(n, 2, 3), (n, c, *size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Colour jitter with probability jitter_p; skipped images get the identity factors.
    on = (on_u < cfg.jitter_p).float()
    factor = lambda strength, u: (1 + on * strength * (2 * u - 1)).view(n, 1, 1, 1)
    brightness, contrast, saturation, hue = cfg.jitter
    x = (x * factor(brightness, bright_u)).clamp(0, 1)
    mean = gray(x).mean((1, 2, 3), keepdim=True)
    x = (mean + factor(contrast, contrast_u) * (x - mean)).clamp(0, 1)
    if c == 3:
        x = (gray(x) + factor(saturation, sat_u) * (x - gray(x))).clamp(0, 1)
        x = rotate_hue(x, 2 * math.pi * on * hue * (2 * hue_u - 1)).clamp(0, 1)
        x = torch.where((gray_u < cfg.gray_p).view(n, 1, 1, 1), gray(x).expand_as(x), x)
    return x


YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_INV = torch.linalg.inv(YIQ)


def rotate_hue(x, angle):
    cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones_like(angle), torch.zeros_like(angle)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(-1, 3, 3)
    m = YIQ_INV.to(x.device) @ rot @ YIQ.to(x.device)  # (n, 3, 3): luma kept, chroma rotated
    return torch.einsum("nij,njhw->nihw", m, x)


# ----------------------------------------------------------------------------------------------
# Networks: encoder (features used for evaluation) and projector (embedding fed to the loss)

class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def resnet18(channels, maxpool=False):
    net = torchvision.models.resnet18(zero_init_residual=True)
    # A 3x3 stride-1 stem keeps small inputs from shrinking too early. The released code drops the
    # max-pool too for CIFAR's 32x32 images and keeps it for 64x64 ones (STL-10, Tiny-ImageNet):
    # both reach layer4 at 4x4.
    net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
    net.fc = nn.Identity()
    if not maxpool:
        net.maxpool = nn.Identity()
    return net, 512


def convnet(channels, width, pool=1):
    # Sized so that a Fashion-MNIST epoch (2 x 60k views) trains in about a minute and a half on 2 idle
    # CPU cores (docs/results.md). pool > 1 keeps a coarse layout of the last map (3 x 3 cells of 7 x 7
    # for 28 x 28 inputs), which centred, aligned images such as Fashion-MNIST's carry.
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
    layers = block(channels, width // 2) + [nn.MaxPool2d(2)] + block(width // 2, width) + [nn.MaxPool2d(2)]
    layers += block(width, 2 * width) + block(2 * width, 4 * width) + [nn.AdaptiveAvgPool2d(pool), nn.Flatten()]
    return nn.Sequential(*layers), 4 * width * pool * pool


class Pretrainer(nn.ModuleDict):
    """The encoder (features used for evaluation) and the projector (embedding fed to the loss)."""

    def forward(self, views, n_views):
        # Encoder per view (BatchNorm statistics per view, as the released code), projector on all;
        # one call, so that DistributedDataParallel sees the whole forward.
        return self["projector"](torch.cat([self["encoder"](v) for v in views.chunk(n_views)]))


def build_model(args, mean, std):
    maxpool = DATASETS.get(args.dataset, {}).get("maxpool", False)
    backbone, features = resnet18(len(mean), maxpool) if args.arch == "resnet18" else convnet(len(mean), args.width, args.pool)
    encoder = nn.Sequential(Normalize(mean, std), backbone)
    projector = nn.Sequential(nn.Linear(features, args.hidden), nn.BatchNorm1d(args.hidden),
                              nn.ReLU(inplace=True), nn.Linear(args.hidden, args.emb))
    return Pretrainer({"encoder": encoder, "projector": projector})


def plain_loss(*views):
    """2 - 2cos between views, averaged over pairs: nothing prevents collapse."""
    zs = [F.normalize(z.float(), dim=1) for z in views]
    pairs = [(i, j) for i in range(len(zs)) for j in range(i + 1, len(zs))]
    return sum((2 - 2 * (zs[i] * zs[j]).sum(1)).mean() for i, j in pairs) / len(pairs)


def compute_loss(zs, args, partition):
    if args.method == "plain":
        return plain_loss(*zs)
    axis = "channel" if args.method == "cwrgp" else "batch"
    return whitening_loss(*zs, axis=axis, groups=args.groups, sub_batch=args.sub_batch, iters=args.iters,
                          method=args.whiten, eps=args.eps, partition=partition)


def draw_partition(batch, args, gen):
    if args.method == "plain":
        return None
    return random_group_partition(args.views, batch, args.emb, args.groups, args.sub_batch, args.iters, gen, gen.device)


def check_loss_shapes(args, world):
    """Refuse flags the loss cannot whiten before anything is loaded or created, with the loss's own
    message: one evaluation on random embeddings, which are full rank whenever the shapes allow. Each
    of the `world` processes whitens its own batch_size / world images."""
    flags = (f"--batch-size {args.batch_size} --sub-batch {args.sub_batch} --groups {args.groups} --emb {args.emb} "
             f"--eps {args.eps}" + (f" on {world} processes" if world > 1 else ""))
    if args.batch_size % world:
        sys.exit(f"error: {flags}: each process takes batch-size / processes images: use a --batch-size divisible by {world}")
    batch = args.batch_size // world
    gen = torch.Generator().manual_seed(0)
    zs = torch.randn(args.views, batch, args.emb, generator=gen).unbind(0)
    try:
        compute_loss(zs, args, draw_partition(batch, args, gen))
    except ValueError as e:
        each = f" (each process whitens its own {batch} images: --sub-batch must divide {batch})" if world > 1 else ""
        sys.exit(f"error: {flags}: {e}{each}")


# ----------------------------------------------------------------------------------------------
# The training step

def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def forward_loss(model, x, noise, partition, args):
    """uint8 batch (n, c, h, w) -> (loss, first view's embedding): augmentation, encoder, projector and
    loss. A pure tensor function (the randomness comes in as noise and partition): what --compile compiles."""
    views = augment(x.repeat(args.views, 1, 1, 1), noise, args)
    if views.is_cuda:
        views = views.contiguous(memory_format=torch.channels_last)
    with autocast(views.device):
        z = model(views, args.views)
    zs = z.float().chunk(args.views)
    return compute_loss(zs, args, partition), zs[0].detach()


def compile_step(args, device):
    if not args.compile:
        return forward_loss
    if device.type != "cuda" or args.compile_backend != "inductor":
        return torch.compile(forward_loss, backend=args.compile_backend)
    # CUDA graphs (mode reduce-overhead) replay the step without a launch per kernel.
    graphed = torch.compile(forward_loss, backend="inductor", mode="reduce-overhead")

    def forward(*inputs):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are done with
        return graphed(*inputs)
    return forward


def train_step(forward, model, opt, x, lr, gen, args):
    """One optimiser step on a uint8 batch; returns the loss (on the device, not read back) and the
    first view's embedding. The loss raises ValueError, before any update, for a whitening it refuses."""
    noise = augmentation_noise(args.views * len(x), gen)
    partition = draw_partition(len(x), args, gen)
    loss, z = forward(model, x, noise, partition, args)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), z


def lr_at(step, steps_per_epoch, args):
    # A drop at epoch E - k <= 0 is skipped: runs of 25 epochs or fewer keep the base rate after
    # warm-up. Scaling the drops into a 10-epoch Fashion-MNIST run gave no kNN gain (docs/results.md).
    epoch = step // steps_per_epoch
    drops = sum(1 for before in args.drop_at if 0 < args.epochs - before <= epoch)
    warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
    return args.lr * warm * args.drop_factor ** drops


def channel_spectrum(z):
    """Eigenvalues, largest first, of the (d, d) channel covariance of a (b, d) batch; 4 digits
    each, to keep the JSON log readable."""
    z = z - z.mean(0)
    eigenvalues = torch.linalg.eigvalsh(z.T @ z / (len(z) - 1)).flip(0)
    return [float(f"{v:.4g}") for v in eigenvalues.tolist()]


@torch.no_grad()
def spectra(z, args):
    """The spectrum of one view's embedding and of its whitened output as the loss sees it
    (sub-batch by sub-batch; channels in their own order, one draw of the random partition)."""
    z = z.detach().double()
    logged = {"embedding_spectrum": channel_spectrum(z), "whitened_spectrum": None}
    if args.method != "plain":
        try:
            white = whitened_by_sub_batch(z, args)
        except ValueError:  # a refused partition here is no reason to stop a run the loss let through
            return logged
        logged["whitened_spectrum"] = channel_spectrum(white)
    return logged


def whitened_by_sub_batch(z, args):
    """(n, d) embeddings -> their whitening as the loss sees it: consecutive sub-batches of
    --sub-batch rows, each whitened by the run's axis (CW or BW) in its groups of consecutive channels."""
    whiten = channel_whiten if args.method == "cwrgp" else batch_whiten
    return torch.cat([whiten(part, args.groups, args.whiten, args.eps) for part in z.split(args.sub_batch)])


# ----------------------------------------------------------------------------------------------
# Evaluation on frozen encoder features

@torch.no_grad()
def features(encoder, x, batch=1024):
    was_training = encoder.training
    encoder.eval()
    with autocast(x.device):
        out = torch.cat([encoder(x[i:i + batch].float() / 255).float() for i in range(0, len(x), batch)])
    encoder.train(was_training)
    return out


@torch.no_grad()
def knn_top1(bank, bank_y, query, query_y, k, metric, temperature=0.1, chunk=512):
    """k-NN top-1: 'euclidean' = majority vote (ties to the lowest class, as W-MSE's code);
    'cosine' = votes weighted by exp(cos / T)."""
    classes = int(bank_y.max()) + 1
    if metric == "cosine":
        bank, query = F.normalize(bank, dim=1), F.normalize(query, dim=1)
    bank_sq = bank.pow(2).sum(1)
    correct = 0
    for i in range(0, len(query), chunk):
        q = query[i:i + chunk]
        # -|b|^2 + 2 q.b orders neighbours as -|q - b|^2 does (|q|^2 is the same for the row)
        score = q @ bank.T if metric == "cosine" else 2 * q @ bank.T - bank_sq
        top, idx = score.topk(k, dim=1)
        weight = (top / temperature).exp() if metric == "cosine" else torch.ones_like(top)
        votes = torch.zeros(len(q), classes, device=q.device).scatter_add_(1, bank_y[idx], weight)
        correct += (votes.argmax(1) == query_y[i:i + chunk]).sum().item()
    return correct / len(query)


def linear_probe(train_f, train_y, test_f, test_y, args):
    gen = torch.Generator(device=train_f.device).manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the probe's init must not depend on how long training ran
    clf = nn.Linear(train_f.shape[1], int(train_y.max()) + 1).to(train_f.device)
    opt = torch.optim.Adam(clf.parameters(), lr=args.probe_lr, weight_decay=args.probe_wd)
    # Geometric decay from probe_lr to 1e-6 over the epochs, as W-MSE's evaluation code does.
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(1e-6 / args.probe_lr) ** (1 / args.probe_epochs))
    for _ in range(args.probe_epochs):
        perm = torch.randperm(len(train_f), generator=gen, device=train_f.device)
        for i in range(0, len(perm), args.probe_batch):
            idx = perm[i:i + args.probe_batch]
            loss = F.cross_entropy(clf(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return (clf(test_f).argmax(1) == test_y).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Bookkeeping: state, checkpoints, the log, clocks

def new_state():
    # Everything a checkpoint needs besides the weights, optimiser and generators.
    return {"step": 0, "epochs_logged": 0, "perm": None, "acc": None, "log": [], "elapsed": 0.0, "train_s": 0.0}


def new_epoch(steps_per_epoch, device):
    # The epoch's losses stay on the device until read back (every --check-every steps).
    return {"losses": torch.zeros(steps_per_epoch, device=device), "checked": 0, "train_s": 0.0,
            "timed_steps": 0, "stable_rank": None, "lr": None, "spectra": {}}


RUN_FILES = ("config.json", "log.jsonl", "ckpt.pt", "ckpt-prev.pt")  # config.json first: alone, it is no run yet
# 2 adds this key to format 1 (one generator state per process, "gens"); format 0 had one, "gen".
CHECKPOINT_FORMAT, READABLE_FORMATS = 2, (1, 2)


def save_atomic(path, write):
    # A kill mid-write leaves the temp file, never a truncated checkpoint or log.
    write(path + ".tmp")
    sync(path + ".tmp")
    os.replace(path + ".tmp", path)


def sync(path):
    # On disk before the rename that makes it current, should the machine itself go down.
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text(path, text):
    save_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def write_log(out, log):
    write_text(os.path.join(out, "log.jsonl"), "".join(json.dumps(row) + "\n" for row in log))


def gather_states(run, states):
    """Every process's generator states, in rank order (collective under torchrun)."""
    if run.world == 1:
        return [states]
    gathered = [None] * run.world
    dist.all_gather_object(gathered, states)
    return gathered


def save_checkpoint(run, gen_states, elapsed):
    """Rank 0 saves the weights, optimiser, state and every process's generators; called by every
    process. The last checkpoint, if it is a whole one, becomes ckpt-prev.pt only once the new one
    is whole on disk, so a kill at any point leaves at least one checkpoint that loads."""
    all_gen_states = gather_states(run, gen_states)
    if run.rank:
        run.saved_step = run.st["step"]  # as rank 0's, so that all processes skip or repeat a save alike
        return
    run.st["elapsed"] = elapsed
    ck = {"format": CHECKPOINT_FORMAT, "model": run.model.state_dict(), "opt": run.opt.state_dict(),
          "gens": all_gen_states, "cpu_rng": torch.get_rng_state(), "state": run.st}
    tmp = run.ckpt_path + ".tmp"
    torch.save(ck, tmp)
    sync(tmp)
    if run.ckpt_whole:
        os.replace(run.ckpt_path, run.prev_path)
    os.replace(tmp, run.ckpt_path)
    run.ckpt_whole, run.saved_step = True, run.st["step"]


def load_checkpoint(run):
    """The state of the last checkpoint that loads whole (weights, optimiser, generators and state),
    ckpt.pt or else ckpt-prev.pt, saying which; exits with one line if none does."""
    paths = [path for path in (run.ckpt_path, run.prev_path) if os.path.exists(path)]
    if not paths:
        sys.exit(f"error: {run.ckpt_path} does not exist: the run stopped before its first checkpoint")
    # No ckpt.pt beside a ckpt-prev.pt: the process was killed between the two renames of a save.
    failures = [] if paths[0] == run.ckpt_path else [f"{run.ckpt_path} is missing"]
    for path in paths:
        try:
            st = restore_checkpoint(run, torch.load(path, map_location=run.device, weights_only=True), path)
        except Exception as e:  # a truncated or corrupted file fails in the unpickler, the zip reader or a state dict
            failures.append(f"{path} is damaged ({type(e).__name__}: {first_sentence(str(e))})")
            continue
        if failures and run.rank == 0:
            print(f"warning: {failures[0]}; resuming from {path} at step {st['step']} "
                  f"(epoch {st['step'] / run.steps_per_epoch:.2f})", file=sys.stderr)
        run.ckpt_whole, run.saved_step = path == run.ckpt_path, st["step"]
        return st
    if len(paths) == 1 and paths[0] == run.ckpt_path:
        failures.append(f"there is no {os.path.basename(run.prev_path)} to fall back to")
    sys.exit("error: " + "; ".join(failures) + ": the run cannot be resumed; start a new one with --out DIR")


def first_sentence(text):
    return (text.strip().splitlines() or [""])[0].split(". ")[0]


def restore_checkpoint(run, ck, path):
    """Load a checkpoint's weights, optimiser and generators into the run; returns its state."""
    found = ck.get("format", 1 if "gens" in ck else 0) if isinstance(ck, dict) else None
    if found not in READABLE_FORMATS:
        sys.exit(f"error: {path} is a checkpoint of format {found}, which this train_cifar.py does not read (it reads "
                 f"formats {', '.join(map(str, READABLE_FORMATS))}): continue it with the train_cifar.py that wrote "
                 f"it, or start a new run with --out DIR")
    if len(ck["gens"]) != run.world:
        sys.exit(f"error: {path} was saved by {len(ck['gens'])} processes; resume it with as many "
                 f"(torchrun --nproc_per_node {len(ck['gens'])}, or plain python for 1)")
    if missing := set(new_state()) - set(ck["state"]):
        raise KeyError(f"its state lacks {', '.join(sorted(missing))}")
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["opt"])
    for gen, state in zip((run.order_gen, run.gen), ck["gens"][run.rank]):
        gen.set_state(state.cpu())
    torch.set_rng_state(ck["cpu_rng"].cpu())
    return ck["state"]


def gen_states(run):
    return run.order_gen.get_state(), run.gen.get_state()


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (kill, job schedulers) as requests to stop, acted on between
    steps, where weights, optimiser, BatchNorm statistics and step counter agree; a step is never
    cut in two. A request during evaluation, which changes none of them, stops at once, and in a
    plain run a second request stops at once too, without saving. Under torchrun the processes
    learn of a request at the next --check-every read, so that all stop after the same step."""

    def __init__(self, world):
        self.got, self.world, self.evaluating = [], world, False

    def __call__(self, signum, frame):
        self.got.append(signum)
        if self.world > 1:
            return
        if self.evaluating or len(self.got) > 1:
            raise KeyboardInterrupt
        print("\nstopping after this step (Ctrl-C again stops at once, without saving)", file=sys.stderr, flush=True)

    def install(self):
        """Handle both signals; returns the handlers to put back."""
        return {signum: signal.signal(signum, self) for signum in (signal.SIGINT, signal.SIGTERM)}


def read_losses(run, acc, upto):
    """Read the epoch's losses not yet checked, up to its step `upto`, back to the host (one sync).
    Returns (the epoch's index and value of the first non-finite one, or None; whether to stop now).
    Under torchrun the losses are averaged over the processes and a stop asked of any process is
    one for all, so every process decides alike."""
    start, acc["checked"] = acc["checked"], upto
    stop = False
    if run.world > 1:
        both = torch.cat([acc["losses"][start:upto], torch.tensor([float(bool(run.signals.got))], device=run.device)])
        dist.all_reduce(both)
        acc["losses"][start:upto] = both[:-1] / run.world
        stop = both[-1].item() > 0
    values = acc["losses"][start:upto].tolist()
    return next(((start + k, value) for k, value in enumerate(values) if not math.isfinite(value)), None), stop


def stop_nonfinite(run, args, step, reason, alone=False):
    """The message and result of a run stopped by a non-finite loss at `step` (counted from 0); the
    weights, possibly updated from that loss, are not saved. Printed by rank 0, or by this process
    if it stops `alone`."""
    run.progress.clear()
    if args.method == "plain":
        cause = "the network diverged; try a lower --lr (a resume may lower it)"
    else:
        fewer = "a smaller --sub-batch or fewer --groups" if args.method == "cwrgp" else "a larger --sub-batch or more --groups"
        cause = (f"rank-deficient whitening; try --eps 1e-4 (a resume may add it), or in a new run {fewer} "
                 f"(or a lower --lr, if the network diverged)")
    kept = f"Kept the last checkpoint in {args.out}" if os.path.exists(run.ckpt_path) else "No checkpoint was saved yet"
    msg = (f"stopped: non-finite loss at step {step + 1} (epoch {step // run.steps_per_epoch + 1}): {reason}. "
           f"Likely cause: {cause}. {kept}.")
    if run.rank == 0 or alone:
        print(msg, file=sys.stderr)
    return {"status": "nonfinite", "out": args.out, "log": run.st["log"], "message": msg}


class Timer:
    """Training time, paused for evaluation: CUDA events on GPU (no sync per step), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda, self.begin = device.type == "cuda", None

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, step):
        self.begin, self.begin_step = self.now(), step

    def stop(self, acc, step):
        """Add the time and steps since start() to the epoch's totals in acc."""
        if self.begin is None:
            return
        end = self.now()
        if self.cuda:
            end.synchronize()
        acc["train_s"] += end - self.begin if not self.cuda else self.begin.elapsed_time(end) / 1000
        acc["timed_steps"] += step - self.begin_step
        self.begin = None


class Clock:
    """Wall time of the run across resumes, and the remaining time from this session's epochs."""

    def __init__(self, elapsed_before):
        self.elapsed_before, self.start, self.epochs = elapsed_before, time.perf_counter(), 0

    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.start

    def eta(self, epochs_left):
        return (time.perf_counter() - self.start) / max(self.epochs, 1) * epochs_left


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


class Progress:
    """The step of an epoch that takes more than PROGRESS_AFTER_S seconds, its images/s and the
    epoch's remaining time, shown at the loss reads that already happen every --check-every steps,
    so the device waits for nothing more. On a terminal one line rewritten in place (and cleared
    before the epoch's row); otherwise a plain line at most every PLAIN_EVERY_S seconds. Nothing
    of it goes to log.jsonl."""

    def __init__(self, stream):
        self.stream, self.tty, self.shown, self.begin = stream, stream.isatty(), 0, None

    def start(self, i):
        self.begin, self.begin_i, self.last_plain = time.perf_counter(), i, 0.0

    def show(self, epoch, i, steps_per_epoch, batch_size):
        """After step i (counted from 1) of the epoch, when the host has just read the losses back."""
        seconds = time.perf_counter() - self.begin
        if seconds < PROGRESS_AFTER_S or i == steps_per_epoch or (not self.tty and seconds - self.last_plain < PLAIN_EVERY_S):
            return
        per_step = seconds / (i - self.begin_i)
        text = (f"epoch {epoch} step {i}/{steps_per_epoch}: {batch_size / per_step:.0f} img/s, "
                f"{fmt_time(per_step * (steps_per_epoch - i))} left in the epoch")
        if self.tty:
            print("\r" + text.ljust(self.shown), end="", file=self.stream, flush=True)
            self.shown = len(text)
        else:
            print(text, file=self.stream, flush=True)
            self.last_plain = seconds

    def clear(self):
        if self.shown:
            print("\r" + " " * self.shown + "\r", end="", file=self.stream, flush=True)
            self.shown = 0


PROGRESS_AFTER_S, PLAIN_EVERY_S = 5.0, 60.0


# ----------------------------------------------------------------------------------------------
# The epoch's evaluation and log row

HEADER = f"{'epoch':>5} {'loss':>7} {'knn200':>7} {'knn5':>7} {'knn5l2':>7} {'srank':>7} {'lr':>8} {'img/s':>7} {'elapsed':>8} {'eta':>8}"


def evaluate(encoder, data, args, epoch):
    """kNN every --eval-every epochs and at the end, the linear probe at the end; None where not run."""
    train_x, train_y, test_x, test_y = data
    scores = {"knn_top1": None, "knn5_top1": None, "knn5_l2_top1": None, "linear_top1": None}
    last = epoch == args.epochs
    if epoch % args.eval_every and not last:
        return scores
    bank, query = features(encoder, train_x), features(encoder, test_x)
    scores["knn_top1"] = knn_top1(bank, train_y, query, test_y, min(args.knn_k, len(bank)), "cosine", args.knn_t)
    scores["knn5_top1"] = knn_top1(bank, train_y, query, test_y, 5, "euclidean")
    # The same vote on the unit sphere: a feature's length no longer decides its neighbours.
    scores["knn5_l2_top1"] = knn_top1(F.normalize(bank, dim=1), train_y, F.normalize(query, dim=1), test_y, 5, "euclidean")
    if last and args.probe_epochs:
        scores["linear_top1"] = linear_probe(bank, train_y, query, test_y, args)
    return scores


def end_epoch(run, args, epoch, clock, states):
    """Evaluate, log and print the epoch that just ended (rank 0); checkpoint every --save-every
    epochs and at the end. Returns False, with nothing of the epoch's end done, if a stop request
    came during the evaluation."""
    st, acc, scores = run.st, run.st["acc"], None
    run.progress.clear()
    if run.rank == 0:
        try:
            run.signals.evaluating = True
            scores = evaluate(run.model["encoder"], run.data, args, epoch)
        except KeyboardInterrupt:
            return False
        finally:
            run.signals.evaluating = False
    st["train_s"] += acc["train_s"]
    st["epochs_logged"] = epoch
    clock.epochs += 1
    if run.rank == 0:
        log_epoch(run, args, epoch, clock, scores)
    if epoch % args.save_every == 0 or epoch == args.epochs:
        save_checkpoint(run, states, clock.elapsed())
    return True


def log_epoch(run, args, epoch, clock, scores):
    st, acc = run.st, run.st["acc"]
    row = {"epoch": epoch, "loss": acc["losses"].double().sum().item() / run.steps_per_epoch,
           **scores, "stable_rank": acc["stable_rank"], "lr": acc["lr"],
           # the global batch: images of all processes
           "images_per_s": acc["timed_steps"] * args.batch_size / acc["train_s"] if acc["train_s"] else None,
           "train_s": st["train_s"], "elapsed_s": clock.elapsed(), **acc["spectra"]}
    st["log"].append(row)
    show = lambda v, f: format(v, f) if v is not None else "-"
    print(f"{epoch:>5} {row['loss']:>7.4f} {show(row['knn_top1'], '>7.4f'):>7} {show(row['knn5_top1'], '>7.4f'):>7} "
          f"{show(row['knn5_l2_top1'], '>7.4f'):>7} "
          f"{row['stable_rank']:>7.1f} {row['lr']:>8.2e} {show(row['images_per_s'], '>7.0f'):>7} "
          f"{fmt_time(row['elapsed_s']):>8} {fmt_time(clock.eta(args.epochs - epoch)):>8}", flush=True)
    if row["linear_top1"] is not None:
        print(f"linear probe top-1 {row['linear_top1']:.4f} ({args.probe_epochs} epochs on frozen features)")
    write_log(args.out, st["log"])


# ----------------------------------------------------------------------------------------------
# The run

def init_distributed(args):
    """(rank, processes, device). Under torchrun: this process's place in a new process group (NCCL
    on CUDA, gloo on the CPU). A plain run is (0, 1)."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def normalization(args, train_x):
    """The encoder's input mean and std per channel: the released constants where the dataset has
    them, else those of the training images."""
    if args.dataset in DATASETS:
        return [torch.tensor(DATASETS[args.dataset][key], device=train_x.device) for key in ("mean", "std")]
    pixels = train_x.float() / 255
    return pixels.mean((0, 2, 3)), pixels.std((0, 2, 3))


def start_run(args):
    """Everything before the first step. A run that cannot start exits here with a message, before
    its directory is created."""
    rank, world, device = init_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    check_loss_shapes(args, world)
    torch.manual_seed(args.seed)
    pretrain_x, data = load_data(args, device)
    steps_per_epoch = len(pretrain_x) // args.batch_size
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(pretrain_x)} training images is less than one batch of {args.batch_size}: "
                 f"lower --batch-size or raise --limit")
    model = build_model(args, *normalization(args, pretrain_x)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # Fused Adam: one kernel for all parameters on CUDA; on the CPU, too, it is several times faster
    # than the default (foreach) one.
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wd, fused=True)
    # The data order is shared by all processes; the views and group partitions are each process's own.
    order_gen = torch.Generator(device=device).manual_seed(args.seed)
    gen = order_gen if world == 1 else torch.Generator(device=device).manual_seed(args.seed + 1 + rank)
    # BatchNorm stays per process (and per view): DDP averages the gradients, nothing else.
    net = model if world == 1 else DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    run = argparse.Namespace(rank=rank, world=world, device=device, pretrain_x=pretrain_x, data=data, model=model,
                             net=net, opt=opt, order_gen=order_gen, gen=gen, steps_per_epoch=steps_per_epoch,
                             ckpt_path=os.path.join(args.out, "ckpt.pt"), prev_path=os.path.join(args.out, "ckpt-prev.pt"),
                             ckpt_whole=False, saved_step=None, forward=compile_step(args, device),
                             signals=StopSignals(world), progress=Progress(sys.stdout))
    run.st = load_checkpoint(run) if args.resume else new_state()
    return run


def train(run, args):
    """The training loop, from run.st["step"] to the last epoch's evaluation, with SIGINT / SIGTERM
    as stop requests (StopSignals) while it runs."""
    timer, clock = Timer(run.device), Clock(run.st["elapsed"])
    if run.rank == 0:
        print(HEADER)
    previous = run.signals.install()
    try:
        return train_loop(run, args, timer, clock)
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: what the step changed cannot be saved
        run.progress.clear()
        kept = f"the last checkpoint, at step {run.saved_step}, is kept" if run.saved_step is not None else "nothing was saved"
        if run.rank == 0:
            print(f"\nstopped at once: {kept}", file=sys.stderr)
        return {"status": "interrupted", "out": args.out, "log": run.st["log"]}
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def train_loop(run, args, timer, clock):
    st, steps_per_epoch, train_x, share = run.st, run.steps_per_epoch, run.pretrain_x, args.batch_size // run.world
    if st["epochs_logged"] < st["step"] // steps_per_epoch:  # stopped during that epoch's evaluation
        if not end_epoch(run, args, st["step"] // steps_per_epoch, clock, gen_states(run)):
            return interrupted(run, args, timer, clock, gen_states(run))
    while st["step"] < args.epochs * steps_per_epoch:
        epoch, i = divmod(st["step"], steps_per_epoch)
        if i == 0:
            st["perm"] = torch.randperm(len(train_x), generator=run.order_gen, device=run.device)
            st["acc"] = new_epoch(steps_per_epoch, run.device)
        acc = st["acc"]
        if timer.begin is None:
            timer.start(st["step"])
            run.progress.start(i)
        first = i * args.batch_size + run.rank * share  # this process's share of the global batch
        x = train_x[st["perm"][first:first + share]]
        lr = lr_at(st["step"], steps_per_epoch, args)
        try:
            acc["losses"][i], z = train_step(run.forward, run.net, run.opt, x, lr, run.gen, args)
        except ValueError as e:
            return refused_step(run, args, acc, i, e)
        acc["lr"] = lr
        st["step"] += 1
        check = (i + 1) % args.check_every == 0 or i + 1 == steps_per_epoch
        bad, stop = read_losses(run, acc, i + 1) if check else (None, False)
        if bad is not None:
            return stop_nonfinite(run, args, st["step"] - 1 - i + bad[0], f"loss {bad[1]}")
        if check and run.rank == 0:
            run.progress.show(epoch + 1, i + 1, steps_per_epoch, args.batch_size)
        if i + 1 == steps_per_epoch:  # the epoch's end
            if run.rank == 0:  # the paper's indicator and spectra, on the epoch's last batch
                acc["stable_rank"], acc["spectra"] = stable_rank(z).item(), spectra(z, args)
            timer.stop(acc, st["step"])
            if not end_epoch(run, args, epoch + 1, clock, gen_states(run)):
                return interrupted(run, args, timer, clock, gen_states(run))
        # Under torchrun a request counts once all processes know it, at a check; in a plain run at once.
        if stop or (run.world == 1 and run.signals.got):
            return interrupted(run, args, timer, clock, gen_states(run))
    if run.rank == 0:
        print(f"done in {fmt_time(clock.elapsed())}: {args.out}")
    return {"status": "done", "out": args.out, "log": st["log"], "model": run.model}


def refused_step(run, args, acc, i, e):
    """The eager loss refused a non-finite or singular whitening at the epoch's step i, before the update."""
    step = run.st["step"]
    if run.world > 1:  # only this process knows: it stops alone, and torchrun then stops the others
        return stop_nonfinite(run, args, step, f"process {run.rank}: {e}", alone=True)
    if (bad := read_losses(run, acc, i)[0]) is not None:  # an earlier unchecked step caused it
        return stop_nonfinite(run, args, step - i + bad[0], f"loss {bad[1]}")
    return stop_nonfinite(run, args, step, e)


def interrupted(run, args, timer, clock, states):
    """A stop request, between steps: checkpoint there, unless its unchecked losses are not finite."""
    st = run.st
    run.progress.clear()
    if st["acc"] is not None:
        timer.stop(st["acc"], st["step"])
        done = st["step"] % run.steps_per_epoch  # the epoch's steps; a finished epoch was checked at its end
        if done and (bad := read_losses(run, st["acc"], done)[0]) is not None:
            return stop_nonfinite(run, args, st["step"] - done + bad[0], f"loss {bad[1]}")
    if run.saved_step != st["step"]:
        save_checkpoint(run, states, clock.elapsed())
    if run.rank == 0:
        print(f"\ninterrupted: saved {run.ckpt_path} at step {st['step']}; continue with --resume {args.out}", file=sys.stderr)
    return {"status": "interrupted", "out": args.out, "log": st["log"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = resolve_config(argv)
    run = start_run(args)
    try:
        if run.st["step"] >= args.epochs * run.steps_per_epoch and run.st["epochs_logged"] >= args.epochs:
            done = run.st["epochs_logged"]
            if run.rank == 0:
                print(f"{args.out} is finished at epoch {done}: nothing to do. Continue it with "
                      f"--resume {args.out} --epochs N for N > {done}", file=sys.stderr)
            return {"status": "finished", "out": args.out, "log": run.st["log"], "model": run.model}
        made = run.rank == 0 and start_directory(run, args, argv)
        try:
            result = train(run, args)
        finally:
            if made:
                remove_if_unstarted(args.out)
        return result
    finally:
        if run.world > 1:
            dist.destroy_process_group()


def start_directory(run, args, argv):
    """Print the command and config and write config.json, once every check has passed; on a
    resume, also the log as its checkpoint has it. Returns whether the directory is new."""
    made = not os.path.isdir(args.out)
    os.makedirs(args.out, exist_ok=True)
    command = "python train_cifar.py" if run.world == 1 else f"torchrun --nproc_per_node {run.world} train_cifar.py"
    print(f"command: {command} " + shlex.join(argv))
    print("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items()) + f" (device {run.device}, torch {torch.__version__})")
    if args.resume:
        print(f"resumed from {run.ckpt_path if run.ckpt_whole else run.prev_path} at step {run.st['step']} "
              f"(epoch {run.st['step'] / run.steps_per_epoch:.2f})")
        write_log(args.out, run.st["log"])  # rows logged after the checkpoint are logged again, once
    write_text(os.path.join(args.out, "config.json"), json.dumps(vars(args), indent=1) + "\n")
    return made and not args.resume


def remove_if_unstarted(out):
    """A new run that stopped before its first logged epoch or checkpoint leaves no directory."""
    if any(os.path.exists(os.path.join(out, name)) for name in RUN_FILES[1:]):
        return
    for name in ("config.json", "config.json.tmp", "ckpt.pt.tmp"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    if not os.listdir(out):
        os.rmdir(out)
        print(f"removed {out}: the run stopped before anything of it was saved", file=sys.stderr)


if __name__ == "__main__":
    try:
        result = main()
    except KeyboardInterrupt:  # before training started: nothing to save
        print("\ninterrupted before training started: nothing was saved", file=sys.stderr)
        sys.exit(130)
    sys.exit({"done": 0, "finished": 0, "interrupted": 130}.get(result["status"], 1))
