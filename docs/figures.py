"""
Make the figures of docs/ from the trainer's logs in docs/logs/ (copied from runs/<name>/log.jsonl):

  training.png  kNN top-1 and normalised stable rank per epoch: CW-RGP, W-MSE and the loss without
                whitening, on Fashion-MNIST (docs/logs/fmnist-{cwrgp,wmse,plain}.jsonl, with the
                runs' config.json beside them as fmnist-<name>.config.json)
  spectrum.png  eigenvalues of the embedding's channel covariance during training, and of the
                whitened output's, for BW (W-MSE) and CW (CW-RGP) (docs/logs/spectrum-{wmse,cwrgp}.jsonl)

    pip install -r docs/requirements.txt && python docs/figures.py
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = pathlib.Path(__file__).parent
LOGS = DOCS / "logs"
RUNS = {"cwrgp": "CW-RGP (CW, ZCA, g=4)", "wmse": "W-MSE (BW, Cholesky)", "plain": "no whitening"}
RAW_PIXEL_KNN5 = 0.855  # 5-NN Euclidean on raw pixels in [0, 1], docs/results.md


def epochs_of(path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("knn5_top1") is not None]


def training_figure():
    fig, (knn, rank) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, label in RUNS.items():
        rows = epochs_of(LOGS / f"fmnist-{name}.jsonl")
        epochs = [row["epoch"] for row in rows]
        knn.plot(epochs, [row["knn5_top1"] for row in rows], marker="o", label=label)
        dim = json.loads((LOGS / f"fmnist-{name}.config.json").read_text())["emb"]
        rank.plot(epochs, [row["stable_rank"] / dim for row in rows], marker="o", label=label)
    knn.axhline(RAW_PIXEL_KNN5, color="gray", linestyle="--", label="raw pixels")
    knn.set(xlabel="epoch", ylabel="5-NN top-1 (test)", title="Fashion-MNIST, convnet, 2-core CPU")
    rank.set(xlabel="epoch", ylabel="stable rank / d", yscale="log", title="embedding stable rank (normalised)")
    knn.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "training.png", dpi=120)


def spectrum_figure():
    panels = {"wmse": "BW (W-MSE: Cholesky, d = 64, sub-batch 128)", "cwrgp": "CW (CW-RGP: ZCA, d = 512, g = 4, sub-batch 64)"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (name, title) in zip(axes, panels.items()):
        rows = [json.loads(line) for line in (LOGS / f"spectrum-{name}.jsonl").read_text().splitlines()]
        rows = [row for row in rows if row.get("embedding_spectrum")]
        shown = sorted({rows[0]["epoch"], rows[len(rows) // 2]["epoch"], rows[-1]["epoch"]})
        colors = plt.cm.viridis([0.15, 0.5, 0.85])
        for color, row in zip(colors, (row for row in rows if row["epoch"] in shown)):
            spectrum = row["embedding_spectrum"]
            ax.plot(range(1, len(spectrum) + 1), [v / spectrum[0] for v in spectrum], color=color,
                    label=f"embedding Z, epoch {row['epoch']}")
        white = rows[-1]["whitened_spectrum"]
        ax.plot(range(1, len(white) + 1), [v / white[0] for v in white], "k--",
                label=f"whitened output, epoch {rows[-1]['epoch']}")
        ax.set(xscale="log", yscale="log", ylim=(1e-6, 2), xlabel="eigenvalue index k",
               ylabel="λ_k / λ_1 of the channel covariance", title=title)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Fashion-MNIST, convnet, 2-core CPU: channel covariance of one view's batch of 256", fontsize=10)
    fig.tight_layout()
    fig.savefig(DOCS / "spectrum.png", dpi=120)


if __name__ == "__main__":
    training_figure()
    spectrum_figure()
