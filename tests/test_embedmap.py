"""The embedding map: PCA (and t-SNE) of a bounded sample, coloured by class."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline import embedmap


def test_pca_separates_two_blobs_along_its_first_axis():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (100, 32)), rng.normal(0, 1, (100, 32)) + 6.0])
    points = embedmap.pca_2d(x)
    assert points.shape == (200, 2)
    first = points[:, 0]
    assert first[:100].max() < first[100:].min() or first[100:].max() < first[:100].min()
    assert abs(points.mean(axis=0)).max() < 1e-9  # centred


def test_the_map_samples_a_bounded_number_of_points():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 5000)
    x = rng.normal(0, 1, (5000, 16)).astype(np.float16) + y[:, None]
    rows = embedmap.sample_rows(5000, 2000, seed=0)
    assert len(rows) == 2000 == len(np.unique(rows)) and np.array_equal(rows, embedmap.sample_rows(5000, 2000, 0))
    png, caption = embedmap.embedding_map(x, y, ["a", "b", "c"])
    assert caption.startswith("PCA of 2,000 and t-SNE of 1,000 of the 5,000 cached embeddings")
    assert Image.open(io.BytesIO(png)).size == (1160, 480)
