"""Figures for people: a grid of images with true and predicted boxes and the query, and a
recall@k curve. Written as PNG files (MLflow artifacts, evaluate's ``--png``)."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on workers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def prediction_grid(images: Sequence[Image.Image], queries: Sequence[str], true_boxes: Sequence,
                    pred_boxes: Sequence, path: str | Path, cols: int = 4) -> Path:
    """Save a grid: each image with its true box (green, dashed) and predicted box (red) in
    original pixels (x1, y1, x2, y2), titled with the query. Returns ``path``."""
    n = len(images)
    if n == 0:
        raise ValueError("prediction_grid needs at least one image")
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, query, t, p in zip(axes.flat, images, queries, true_boxes, pred_boxes):
        ax.imshow(np.asarray(img))
        for box, colour, style in ((t, "lime", "--"), (p, "red", "-")):
            if box is None or not np.any(np.asarray(box)):
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                                       linestyle=style, linewidth=2))
        ax.set_title("\n".join(textwrap.wrap(query, 32)[:2]), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def recall_plot(curves: Mapping[str, Mapping[int, float]], path: str | Path) -> Path:
    """Save recall@k against k, one line per named curve (e.g. ``{"mall_val": {1: .4, ...}}``)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
