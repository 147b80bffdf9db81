"""
Figures from the trainer's logs (runs/<name>/log.jsonl and config.json).

  training.png  kNN top-1 and normalised stable rank per epoch, one line per run
  spectrum.png  one panel per run: eigenvalues of the channel covariance of the embedding (first,
                middle and last epoch) and of the whitened output (last epoch), on the epoch's
                last batch
  claims.png    what CW-RGP's random group partition and channel whitening are for: the 5-NN and
                the embedding's stable rank against the batch size (CW-RGP, BW with ZCA, W-MSE;
                docs/logs/small-*; CW-RGP's and W-MSE's at batch 256: claims-*), against the
                number of groups g (CW-RGP), and CW with one group, fixed groups and random groups
                beside W-MSE (docs/logs/claims-*); 10 epochs on 10,000 images, three seeds
and one from cwrgp.py itself:
  whitening.png a 2-D embedding batch-whitened by ZCA, Cholesky and PCA, and how far each output
                moves when the embedding moves by δ near a repeated eigenvalue (derivations 1, 2, 6)

    pip install -r docs/requirements.txt
    python docs/figures.py runs/A                        # training.png, spectrum.png into runs/A
    python docs/figures.py runs/A runs/B --out figures/  # both runs in each figure, into figures/
    python docs/figures.py --docs                        # docs/*.png from the runs in docs/logs/

Several runs are written into the current directory unless --out says where: never into one of
the runs. The stable-rank axis is logarithmic where the ranks span ten times or more, linear
otherwise (a short run's small changes would look flat on a log axis).

--docs reads the kept runs by name from docs/logs/: <name>.jsonl (a run's log.jsonl) beside
<name>.config.json (its config.json); training.png from fmnist-cwrgp, fmnist-wmse and
fmnist-plain, spectrum.png from spectrum-wmse and spectrum-cwrgp. To put a new run there, copy its
two files under those names. Runs whose configs would get the same legend label are labelled by
their directory (or log) name instead.

Redraws are byte-identical on one machine with the same library versions (the data are the logs
or seeded, and the PNGs carry no version or date). With another matplotlib, or another LAPACK, a
few pixels can differ: the PCA curve of whitening.png sits where the eigenvectors' signs are
decided by rounding.
"""

import argparse
import functools
import json
import pathlib
import sys

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = pathlib.Path(__file__).parent
sys.path.insert(0, str(DOCS.parent))
from cwrgp import batch_whiten  # noqa: E402
LOGS = DOCS / "logs"
RAW_PIXEL_KNN5 = 0.855  # 5-NN Euclidean on raw pixels in [0, 1], docs/results.md
# the same with the first 10,000 training images as the bank (the claims runs'), docs/results.md
RAW_PIXEL_KNN5_10K = 0.818


# No "Software" entry: the bytes of a redraw then depend on the pixels alone, not on matplotlib's
# version.
SAVE = {"dpi": 120, "metadata": {"Software": None}}


def load_run(log, config, name):
    rows = [json.loads(line) for line in pathlib.Path(log).read_text().splitlines() if line.strip()]
    return {"epochs": [row for row in rows if "loss" in row],
            "config": json.loads(pathlib.Path(config).read_text()), "name": name}


def label(config):
    if config["method"] == "plain":
        return "no whitening"
    name, axis = ("CW-RGP", "CW") if config["method"] == "cwrgp" else ("W-MSE", "BW")
    return (f"{name} ({axis}, {config['whiten']}, d={config['emb']}, g={config['groups']}, "
            f"sub-batch {config['sub_batch']})")


def labels(runs):
    """One legend label per run: its config's, or its name where two configs would read the same."""
    by_config = [label(run["config"]) for run in runs]
    return [run["name"] if by_config.count(text) > 1 else text
            for run, text in zip(runs, by_config)]


def rank_scale(ranks):
    """"log" where the stable ranks span ten times or more, else "linear": a short run's small
    changes would look flat on a log axis."""
    if not ranks or min(ranks) <= 0:  # nothing drawn, or a zero rank, which a log axis cannot show
        return "linear"
    return "log" if max(ranks) >= 10 * min(ranks) else "linear"


def training_figure(runs, path, title):
    fig, (knn, rank) = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn_ranks = []
    for run, text in zip(runs, labels(runs)):
        rows = [row for row in run["epochs"] if row.get("knn5_top1") is not None]
        epochs = [row["epoch"] for row in rows]
        ranks = [row["stable_rank"] / run["config"]["emb"] for row in rows]
        knn.plot(epochs, [row["knn5_top1"] for row in rows], marker="o", label=text)
        rank.plot(epochs, ranks, marker="o")
        drawn_ranks += ranks
    fashion_mnist = [run["config"]["dataset"] == "fashion-mnist" for run in runs]
    if all(fashion_mnist) and not any(run["config"]["limit"] for run in runs):
        knn.axhline(RAW_PIXEL_KNN5, color="gray", linestyle="--", label="raw pixels")
    knn.set(xlabel="epoch", ylabel="5-NN top-1 (test)", title=title)
    rank.set(xlabel="epoch", ylabel="stable rank / d", yscale=rank_scale(drawn_ranks),
             title="embedding stable rank (normalised)")
    knn.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, **SAVE)


def spectrum_figure(runs, path, title):
    runs = [run for run in runs if run["epochs"] and run["epochs"][-1].get("embedding_spectrum")]
    if not runs:  # logs written before the trainer recorded spectra
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, run, text in zip(axes[0], runs, labels(runs)):
        rows = run["epochs"]
        shown = [rows[0], rows[len(rows) // 2], rows[-1]] if len(rows) >= 3 else rows
        for color, row in zip(plt.cm.viridis([0.15, 0.5, 0.85]), shown):
            spectrum = row["embedding_spectrum"]
            ax.plot(range(1, len(spectrum) + 1), [v / spectrum[0] for v in spectrum], color=color,
                    label=f"embedding, epoch {row['epoch']}")
        white = rows[-1]["whitened_spectrum"]
        if white:
            ax.plot(range(1, len(white) + 1), [v / white[0] for v in white], "k--",
                    label=f"whitened output, epoch {rows[-1]['epoch']}")
        # Eigenvalues that are zero up to rounding (beyond the rank) fall below the axis.
        ax.set(xscale="log", yscale="log", ylim=(1e-6, 2), xlabel="eigenvalue index k",
               ylabel="λ_k / λ_1", title=text.replace(" (", "\n("))
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, **SAVE)
    return True


SWEEP_METHODS = {"cwrgp": "CW-RGP (CW, ZCA, d=512, g=4)", "bwzca": "BW, ZCA, d=512, g=4",
                 "wmse": "W-MSE (BW, Cholesky, d=64)"}


def sweep_points(prefix):
    """{seed: last epoch's row} of the kept runs docs/logs/<prefix>-s<seed>.jsonl."""
    points = {}
    for path in sorted(LOGS.glob(f"{prefix}-s*.jsonl")):
        seed = path.stem.rsplit("-s", 1)[1]
        points[seed] = load_run(path, path.with_suffix(".config.json"), path.stem)["epochs"][-1]
    return points


def mean(rows, key):
    return sum(row[key] for row in rows) / len(rows)


def plot_sweep(axes, xs, prefix_of, style, text, dim, refused_at=None):
    """Mean over seeds (line) and each seed (dots) of the 5-NN and the normalised stable rank; an x
    on 5-NN axis at height refused_at where a setting was refused (no log)."""
    knn, rank = axes
    done = [(x, sweep_points(prefix_of(x))) for x in xs]
    done = [(x, list(points.values())) for x, points in done if points]
    if not done:
        return
    xs_done = [x for x, _ in done]
    line, = knn.plot(xs_done, [mean(rows, "knn5_top1") for _, rows in done], style, label=text)
    rank.plot(xs_done, [mean(rows, "stable_rank") / dim for _, rows in done], style,
              color=line.get_color())
    for x, rows in done:
        knn.plot([x] * len(rows), [r["knn5_top1"] for r in rows], ".", color=line.get_color())
        rank.plot([x] * len(rows), [r["stable_rank"] / dim for r in rows], ".",
                  color=line.get_color())
    refused = [x for x in xs if x not in xs_done]
    if refused and refused_at is not None:
        knn.plot(refused, [refused_at] * len(refused), "x", color=line.get_color(), markersize=9,
                 clip_on=False)


# the claims figure marks a refused setting at the 5-NN axis' foot, one row per method
REFUSED_AT = 0.782


# The random-versus-fixed partition experiment: docs/logs/claims-<cell>-s<seed>, one per seed.
PARTITION_CELLS = {"cw-g1": "CW, g = 1", "cw-fixed-g4": "CW, fixed\ngroups, g = 4",
                   "cwrgp-g4": "CW-RGP,\ng = 4", "wmse": "W-MSE"}


def partition_panel(ax, raw_knn5):
    """Each seed's final 5-NN as a dot and the mean over seeds as a bar, per cell."""
    for x, (cell, text) in enumerate(PARTITION_CELLS.items()):
        paths = sorted(LOGS.glob(f"claims-{cell}-s*.jsonl"))
        runs = [load_run(path, path.with_suffix(".config.json"), path.stem) for path in paths]
        knn5 = [run["epochs"][-1]["knn5_top1"] for run in runs]
        if knn5:
            ax.plot([x] * len(knn5), knn5, ".", color="C0")
            ax.plot([x], [sum(knn5) / len(knn5)], "_", color="C0", markersize=24)
    ax.axhline(raw_knn5, color="gray", linestyle=":", label="raw pixels")
    ax.set_xticks(range(len(PARTITION_CELLS)), list(PARTITION_CELLS.values()), fontsize=7)
    ax.set(xlim=(-0.5, len(PARTITION_CELLS) - 0.5), ylabel="5-NN top-1 (test)",
           title="groups fixed or random\n(dot: seed, bar: mean)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.17))


# The small-batch experiment: docs/logs/small-<method>-b<batch>[-eps]-s<seed>; at batch 256 the
# partition experiment's CW-RGP and W-MSE runs are the same settings.
BATCH_256 = {"cwrgp": "claims-cwrgp-g4", "wmse": "claims-wmse"}


def batch_run(method, batch, eps=""):
    """The log name, less its seed, of one method at one batch size; eps="-eps": with shrinkage."""
    name = f"small-{method}-b{batch}{eps}"
    if batch == 256 and not eps:
        return BATCH_256.get(method, name)
    return name


def claims_figure(path, raw_knn5):
    batches, groups = (32, 64, 128, 256), (1, 2, 4, 8)
    fig, axes = plt.subplots(1, 5, figsize=(22, 5.6))
    partition_panel(axes[4], raw_knn5)
    for row, (method, text) in enumerate(SWEEP_METHODS.items()):
        dim = 64 if method == "wmse" else 512
        plot_sweep(axes[:2], batches, functools.partial(batch_run, method), "-o", text, dim,
                   REFUSED_AT + 0.004 * row)
        plot_sweep(axes[:2], batches, functools.partial(batch_run, method, eps="-eps"), "--^",
                   f"{text}, with shrinkage ε = 1e-3", dim)
    # g = 8 cuts 512 channels into c = 64, which cannot whiten sub-batches of 64 (c must exceed b):
    # sub-batch 32 there. The 10-epoch runs of the partition experiment give g = 1 and 4.
    group_runs = {1: "claims-cw-g1", 2: "claims-cwrgp-g2", 4: "claims-cwrgp-g4",
                  8: "claims-cwrgp-g8-sb32"}
    plot_sweep(axes[2:4], groups, group_runs.get, "-o",
               "CW-RGP, batch 256, 10 epochs (sub-batch 32 at g = 8)", 512)
    for ax in (axes[0], axes[2]):
        ax.axhline(raw_knn5, color="gray", linestyle=":", label="raw pixels")
        ax.set_ylim(bottom=0.78, top=0.85)
    axes[0].set(xscale="log", xticks=batches, xticklabels=batches, xlabel="batch size",
                ylabel="5-NN top-1 (test)", title="5-NN by batch size (x: refused)")
    axes[1].set(xscale="log", xticks=batches, xticklabels=batches, yscale="log",
                xlabel="batch size", ylabel="stable rank / d",
                title="embedding stable rank by batch size")
    axes[2].set(xscale="log", xticks=groups, xticklabels=groups, xlabel="groups g",
                ylabel="5-NN top-1 (test)", title="CW-RGP: 5-NN by groups")
    axes[3].set(xscale="log", xticks=groups, xticklabels=groups, yscale="log", xlabel="groups g",
                ylabel="stable rank / d", title="CW-RGP: stable rank by groups")
    # below the panels: inside, they would hide the refusals' x at the axis' foot
    for ax in (axes[0], axes[2]):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.17))
    for ax in axes[:4]:
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    fig.tight_layout()
    fig.savefig(path, **SAVE)


def whitening_figure(path):
    gen = torch.Generator().manual_seed(0)
    angle = torch.tensor(0.5)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()]),
                            torch.stack([angle.sin(), angle.cos()])])
    z = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    z = z * torch.tensor([2.0, 0.5], dtype=torch.float64)
    z = z @ rotation.double().T
    # each point keeps its colour, so the panels show where it went
    hue = torch.atan2(z[:, 1], z[:, 0])
    panels = {"embedding Z̄": z - z.mean(0)}
    names = {"zca": "ZCA", "cholesky": "Cholesky", "pca": "PCA"}
    panels.update({f"{names[m]}-whitened (BW)": batch_whiten(z, method=m) for m in names})
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
    for ax, (title, points) in zip(axes, panels.items()):
        ax.scatter(points[:, 0], points[:, 1], c=hue, cmap="hsv", s=6)
        ax.set(title=title, aspect="equal", xlim=(-5, 5), ylim=(-5, 5))

    # Near a repeated eigenvalue (gap 1e-6 of λ), move the embedding by δ in a fixed direction.
    z = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    z = batch_whiten(z) * torch.tensor([1 + 1e-6, 1.0], dtype=torch.float64)
    direction = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    deltas = torch.logspace(-10, -1, 28, dtype=torch.float64)
    for method, style in (("zca", "-"), ("cholesky", "--"), ("pca", "-o")):
        before = batch_whiten(z, method=method)
        moved = [(batch_whiten(z + d * direction, method=method) - before).norm() / before.norm()
                 for d in deltas]
        axes[4].plot(deltas, torch.stack(moved), style, markersize=3, label=names[method])
    axes[4].set(xscale="log", yscale="log", xlabel="δ (size of the move of Z)",
                ylabel="relative change of the output", title="near-equal eigenvalues (gap 2e-6)")
    axes[4].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, **SAVE)


def draw_runs(run_dirs, out):
    """training.png and spectrum.png of the trainer's runs, into out (None: a single run's own
    directory, the current directory for several)."""
    # A run that has not finished its first epoch has no log yet: there is nothing of it to draw.
    logged = [pathlib.Path(d) for d in run_dirs if (pathlib.Path(d) / "log.jsonl").exists()]
    for d in run_dirs:
        if pathlib.Path(d) not in logged:
            print(f"skipped {d}: no log.jsonl (the run has not logged an epoch)")
    if not logged:
        sys.exit("error: none of these directories holds a log.jsonl: nothing to draw")
    runs = [load_run(d / "log.jsonl", d / "config.json", d.resolve().name) for d in logged]
    if out is None:
        out = logged[0] if len(logged) == 1 else pathlib.Path()
    out.mkdir(parents=True, exist_ok=True)
    training_figure(runs, out / "training.png", f"{runs[0]['config']['dataset']}")
    print(f"wrote {out / 'training.png'}")
    if spectrum_figure(runs, out / "spectrum.png", "channel covariance of one view's batch"):
        print(f"wrote {out / 'spectrum.png'}")
    else:
        print("no spectrum.png: none of these logs records eigenvalue spectra")


def draw_docs(out):
    """docs/*.png from the runs kept in docs/logs/, into out."""
    def kept(name):
        return load_run(LOGS / f"{name}.jsonl", LOGS / f"{name}.config.json", name)

    out.mkdir(parents=True, exist_ok=True)
    training_figure([kept(f"fmnist-{m}") for m in ("cwrgp", "wmse", "plain")],
                    out / "training.png", "Fashion-MNIST, convnet, 2-core CPU")
    spectrum_figure([kept(f"spectrum-{m}") for m in ("wmse", "cwrgp")], out / "spectrum.png",
                    "Fashion-MNIST (20k images), convnet, 2-core CPU: channel covariance of one "
                    "view's batch of 256")
    whitening_figure(out / "whitening.png")
    claims_figure(out / "claims.png", RAW_PIXEL_KNN5_10K)
    for name in ("training", "spectrum", "whitening", "claims"):
        print(f"wrote {out / name}.png")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="docs/figures.py",
        description="Draw training.png and spectrum.png from the trainer's runs, or redraw the "
                    "tracked docs/*.png from the runs kept in docs/logs/.")
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="a run directory holding log.jsonl and config.json; several runs are "
                             "drawn into one figure")
    parser.add_argument("--out", type=pathlib.Path, metavar="DIR",
                        help="write the figures into DIR, created if missing (default: a single "
                             "run's own directory; for several runs the current directory; with "
                             "--docs, docs/)")
    parser.add_argument("--docs", action="store_true",
                        help="redraw docs/training.png, spectrum.png, whitening.png and claims.png "
                             "from docs/logs/ (the only way to rewrite them)")
    args = parser.parse_args(argv)
    if args.docs and args.runs:
        parser.error("--docs draws from docs/logs/: give run directories or --docs, not both")
    if not args.docs and not args.runs:
        parser.error("nothing to draw: give run directories, or --docs to redraw docs/*.png")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.docs:
        draw_docs(args.out or DOCS)
    else:
        draw_runs(args.runs, args.out)


if __name__ == "__main__":
    main()
