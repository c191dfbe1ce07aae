"""Rank-evolution heatmap (layers x steps) from a run's ranks.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_ranks(path: str | Path) -> tuple[list[int], list[str], np.ndarray]:
    """steps, layer names and the (layers x steps) rank matrix of a ranks.csv."""
    rows = list(csv.DictReader(open(path, encoding="utf-8")))
    steps = sorted({int(r["step"]) for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    matrix = np.full((len(layers), len(steps)), np.nan)
    col, row = {s: i for i, s in enumerate(steps)}, {n: i for i, n in enumerate(layers)}
    for r in rows:
        matrix[row[r["layer"]], col[int(r["step"])]] = int(r["rank"])
    return steps, layers, matrix


def rank_heatmap(ranks_csv: str | Path, out_png: str | Path, title: str = "") -> Path:
    steps, layers, matrix = read_ranks(ranks_csv)
    fig, ax = plt.subplots(figsize=(10, max(3, 0.16 * len(layers) + 1.5)))
    image = ax.imshow(
        matrix,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=[steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5],
    )
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([_short(n) for n in layers], fontsize=5 if len(layers) > 30 else 7)
    ax.set_xlabel("optimizer step")
    ax.set_title(title or "rank per adapted layer")
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def _short(name: str) -> str:
    for prefix in ("base_model.model.", "deberta.encoder.", "vit.encoder.", "bert.encoder.", "encoder."):
        name = name.replace(prefix, "")
    return name


def sample_grid(rows: dict[str, np.ndarray], prompts: list[str], out_png: str | Path) -> Path:
    """Images side by side: one row per (label, seed), one column per prompt (arrays seeds x prompts x H x W x 3)."""
    labelled = [
        (f"{label}, seed {i}" if len(images) > 1 else label, row)
        for label, images in rows.items()
        for i, row in enumerate(images)
    ]
    fig, axes = plt.subplots(
        len(labelled), len(prompts), figsize=(2.2 * len(prompts), 2.3 * len(labelled)), squeeze=False
    )
    for r, (label, row) in enumerate(labelled):
        for c, image in enumerate(row):
            ax = axes[r, c]
            ax.imshow(np.clip(image, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(prompts[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
