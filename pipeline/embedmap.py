"""The embedding map: cached features projected to 2-D, coloured by class, as a PNG.

PCA always (numpy's SVD, deterministic); t-SNE beside it when scikit-learn is installed. Points
are a seeded random sample of at most `MAX_POINTS`, so the picture and its cost stay bounded
whatever the dataset's size. It shows whether frozen features already separate the classes.
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
from PIL import Image

from pipeline import report

log = logging.getLogger("imgpipe")

MAX_POINTS = 2000
TSNE_POINTS = 1000  # t-SNE costs ~15 s for 1,000 points on a busy 2-core machine (PCA: milliseconds)
TSNE_ITERATIONS = 500
LEGEND_CLASSES = 20  # more classes: colours only, no legend


def sample_rows(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random sample of min(n, max_points) rows."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components (N, 2), signs fixed so the largest loading is positive."""
    centred = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2] * np.sign(vt[:2, np.abs(vt[:2]).argmax(axis=1)].diagonal())[:, None]
    return centred @ axes.T


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """t-SNE of the first 50 principal components, or None when scikit-learn is not installed."""
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError:
        return None
    reduced = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x.astype(np.float32))
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=TSNE_ITERATIONS)
    return tsne.fit_transform(reduced)


def one_blas_thread():
    """BLAS and OpenMP on one thread: these matrices are small, and on a busy machine more threads
    only contend (measured on 2 busy cores: t-SNE of 1,000 points 7.9 s on all threads, 1.5 s on one)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # comes with scikit-learn; without it, the default threads
        return contextlib.nullcontext()
    return threadpool_limits(1)


def embedding_map(x: np.ndarray, y: np.ndarray, classes: list[str], max_points: int = MAX_POINTS, seed: int = 0):
    """(PNG bytes, caption): PCA (and t-SNE where available) of a sample of `x`, coloured by `y`."""
    rows = sample_rows(len(x), max_points, seed)
    xs, ys = x[rows].astype(np.float32), y[rows]
    few = sample_rows(len(xs), TSNE_POINTS, seed)  # a sub-sample of the same rows
    with one_blas_thread():
        panels = [("PCA", pca_2d(xs), ys)]
        tsne = tsne_2d(xs[few], seed) if len(few) > 5 else None
    if tsne is not None:
        panels.append(("t-SNE", tsne, ys[few]))
    from matplotlib.lines import Line2D

    fig = report.figure(figsize=(6.5 * len(panels) + 1.5, 6), dpi=80)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "hsv"
    for ax, (name, points, colours) in zip(axes, panels):
        top = max(len(classes) - 1, 1)
        scatter = ax.scatter(points[:, 0], points[:, 1], c=colours, cmap=cmap, vmin=0, vmax=top, s=6)
        ax.set_title(f"{name} of {len(points):,} embeddings")
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= LEGEND_CLASSES:
        present = sorted(set(int(c) for c in ys))
        handles = [
            Line2D([], [], marker="o", linestyle="", color=scatter.cmap(scatter.norm(c)), markersize=6) for c in present
        ]
        fig.legend(handles, [classes[c] for c in present], loc="center right", title="class")
    fig.tight_layout(rect=(0, 0, 0.9 if len(classes) <= LEGEND_CLASSES else 1, 1))
    raw = io.BytesIO()
    fig.savefig(raw, format="png")
    # A 256-colour palette holds a scatter plot exactly enough, at a third of the bytes.
    buf = io.BytesIO()
    Image.open(raw).convert("RGB").quantize(256).save(buf, format="PNG", optimize=True)
    shown = " and ".join(f"{name} of {len(points):,}" for name, points, _ in panels)
    caption = f"{shown} of the {len(x):,} cached embeddings (seeded samples), coloured by true class"
    return buf.getvalue(), caption
