"""
How good each representation of a trained run is, measured the same way as the raw pixels: the
numbers behind docs/results.md's "better than the input" and the paper's observation that the
whitened output is a worse representation than what comes before it (its Section 3).

    python docs/representations.py runs/<run>              # all four representations
    python docs/representations.py runs/<run> --probe-epochs 0   # kNN only (seconds)
    python docs/representations.py --pixels fashion-mnist  # raw pixels alone, no run needed

For each representation of the training split (the bank) and the test split (the queries):
  knn5      5-NN majority vote, Euclidean distance on the features as they are (the released code's
            monitor and train_cifar.py's `knn5_top1`);
  knn5_l2   the same vote on L2-normalised features (Euclidean on the unit sphere = cosine);
  knn200    200-NN with votes weighted by exp(cos / 0.1) (train_cifar.py's `knn_top1`);
  linear    train_cifar.py's linear probe (Adam, lr 1e-2 decayed geometrically to 1e-6).
The representations: raw pixels (in [0, 1], flattened), the encoder's features (what the trainer
evaluates), the embedding (the projector's output, the loss's input) and the whitened embedding
(channel or batch whitening of sub-batches of --sub-batch consecutive images, the run's groups of
consecutive channels, as the loss sees one draw of its partition).
"""

import argparse
import json
import os
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
import train_cifar  # noqa: E402

METRICS = ("knn5", "knn5_l2", "knn200", "linear")


def scores(bank, bank_y, query, query_y, args):
    """The four measures of one representation (linear None when --probe-epochs is 0)."""
    knn = lambda b, q, k, metric: train_cifar.knn_top1(b, bank_y, q, query_y, min(k, len(b)),
                                                       metric, args.knn_t)
    return {"knn5": knn(bank, query, 5, "euclidean"),
            "knn5_l2": knn(F.normalize(bank, dim=1), F.normalize(query, dim=1), 5, "euclidean"),
            "knn200": knn(bank, query, args.knn_k, "cosine"),
            "linear": (train_cifar.linear_probe(bank, bank_y, query, query_y, args)
                       if args.probe_epochs else None)}


def pixels(x):
    return x.float().flatten(1) / 255


def load_run(run_dir, device):
    """The run's config (the parser's defaults under it) and its model with the checkpoint's
    weights."""
    args = train_cifar.build_parser().parse_args([])
    with open(os.path.join(run_dir, "config.json")) as f:
        vars(args).update(json.load(f))
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location=device, weights_only=True)
    return args, ckpt["model"]


@torch.no_grad()
def representations(model, x, args, batch=1024):
    """Encoder features, embedding and whitened embedding of uint8 images x, in eval mode."""
    model.eval()
    encoded = train_cifar.features(model["encoder"], x, batch)
    embedded = torch.cat([model["projector"](encoded[i:i + batch])
                          for i in range(0, len(encoded), batch)])
    rep = {"encoder": encoded, "embedding": embedded}
    if args.method != "plain":
        # a last partial sub-batch cannot be whitened alike
        whole = len(x) // args.sub_batch * args.sub_batch
        rep["whitened"] = train_cifar.whitened_by_sub_batch(embedded[:whole].double(), args).float()
    return rep


def table(rows):
    lines = ["| representation | dim | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for name, dim, s in rows:
        lines.append(f"| {name} | {dim} | "
                     + " | ".join("–" if s[m] is None else f"{s[m]:.4f}" for m in METRICS)
                     + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?",
                   help="a train_cifar.py run directory (config.json and ckpt.pt)")
    p.add_argument("--pixels", metavar="DATASET", help="raw pixels of this dataset only")
    p.add_argument("--probe-epochs", type=int, default=500,
                   help="linear probe epochs (0: kNN only)")
    p.add_argument("--limit", type=int,
                   help="bank of the first N training images (default: the run's)")
    p.add_argument("--threads", type=int)
    opts = p.parse_args(argv)
    if bool(opts.run) == bool(opts.pixels):
        p.error("give a run directory or --pixels DATASET")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device("cpu")
    if opts.run:
        args, weights = load_run(opts.run, device)
    else:
        args, weights = train_cifar.build_parser().parse_args(["--dataset", opts.pixels]), None
    args.probe_epochs = opts.probe_epochs
    args.limit = opts.limit if opts.limit is not None else args.limit
    _, (train_x, train_y, test_x, test_y), _ = train_cifar.load_data(args, device)
    rows = [("raw pixels", train_x[0].numel(),
             scores(pixels(train_x), train_y, pixels(test_x), test_y, args))]
    if weights is not None:
        # buffers come from the checkpoint
        mean, std = (torch.zeros(train_x.shape[1]), torch.ones(train_x.shape[1]))
        model = train_cifar.build_model(args, mean, std)
        model.load_state_dict(weights)
        bank, query = representations(model, train_x, args), representations(model, test_x, args)
        for name in bank:
            n_bank, n_query = len(bank[name]), len(query[name])
            rows.append((name, bank[name].shape[1],
                         scores(bank[name], train_y[:n_bank], query[name], test_y[:n_query], args)))
    source = opts.run or opts.pixels
    print(f"{source}: bank {len(train_x)} training images, {len(test_x)} test queries, "
          f"torch {torch.__version__}")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
