"""Real photographs that installed packages ship (scikit-learn's temple and flower, matplotlib's
Grace Hopper), cut into eval-size crops, and how two embedders compare on them."""

from __future__ import annotations

import numpy as np
import torch
from images import gradient_array
from matplotlib import cbook
from PIL import Image
from sklearn.datasets import load_sample_image


def photo_crops(size: int = 224) -> np.ndarray:
    """57 eval-size crops: 40 of the two scikit-learn photographs at several places and scales, 9 of
    Grace Hopper's portrait, and 8 generated pictures last: (N, size, size, 3) uint8."""
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        photo = Image.fromarray(load_sample_image(name))  # 640 x 427
        for scale in (1.0, 0.8, 0.6, 0.45):
            w, h = int(photo.width * scale), int(photo.height * scale)
            for left, top in ((0, 0), (photo.width - w, photo.height - h), ((photo.width - w) // 2, 0)):
                crops.append(photo.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC))
            crops.append(photo.crop((0, 0, w, h)).transpose(Image.FLIP_LEFT_RIGHT).resize((size, size)))
            crops.append(photo.resize((size, size)).rotate(20 * scale))
    hopper = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")  # 512 x 600
    for scale in (1.0, 0.8, 0.6):
        w, h = int(hopper.width * scale), int(hopper.height * scale)
        for left, top in ((0, 0), (hopper.width - w, hopper.height - h), ((hopper.width - w) // 2, 0)):
            crops.append(hopper.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC))
    crops += [Image.fromarray(gradient_array(size, size, seed=s)) for s in range(8)]
    return np.stack([np.asarray(c.convert("RGB")) for c in crops])


def compare(reference, other, pixels: np.ndarray) -> dict:
    """Top-1 agreement (through `reference`'s own classifier) and embedding cosine of two
    `features.Embedder`s over `pixels`, with how many distinct classes the reference predicts."""
    a, b = reference.embed(pixels), other.embed(pixels)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    with torch.inference_mode():
        top_a, top_b = reference.classifier(a).argmax(1), reference.classifier(b).argmax(1)
    return {
        "images": len(pixels),
        "top1_agreement": float((top_a == top_b).float().mean()),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "classes": len(set(top_a.tolist())),
    }


def describe(result: dict) -> str:
    return (
        f"{result['images']} images: top-1 agreement {result['top1_agreement']:.1%}, "
        f"embedding cosine min {result['cosine_min']:.4f} mean {result['cosine_mean']:.4f}"
    )
