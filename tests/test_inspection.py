"""imgpipe inspect: filter grids, feature-map grids, Grad-CAM over the object, index.html, for a
backbone's own classifier (EfficientNet-Lite0, offline weights), a train-head head and a finetune export."""

from __future__ import annotations

import io
import json
import os
import re
from functools import lru_cache

import numpy as np
import pytest
import torch
from images import prepare_without_ray, write_imagefolder
from PIL import Image, ImageDraw

from jobs import inspect as inspect_job
from pipeline import inspection, storage
from pipeline.config import InspectConfig, ModelConfig, StorageConfig
from pipeline.models import resolve_weights
from pipeline.transfer import FineTuneModel

pytestmark = pytest.mark.timeout(300)


@lru_cache(maxsize=1)
def lite0() -> inspection.InspectModel:
    return inspection.load_model(ModelConfig(), None, StorageConfig())


def disc_png(cx: int, cy: int, size: int = 256, radius: int = 35) -> bytes:
    """One bright yellow disc on a dark background."""
    img = Image.new("RGB", (size, size), (20, 30, 25))
    ImageDraw.Draw(img).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(250, 220, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tiles_in(grid: np.ndarray, h: int, w: int, pad: int = 1) -> int:
    """Cells of the grid that hold a tile (the padding and empty cells are all 1.0)."""
    rows, cols = (grid.shape[0] - pad) // (h + pad), (grid.shape[1] - pad) // (w + pad)
    cells = [
        grid[pad + r * (h + pad) : (r + 1) * (h + pad), pad + c * (w + pad) : (c + 1) * (w + pad)]
        for r in range(rows)
        for c in range(cols)
    ]
    return sum(not np.all(cell == 1.0) for cell in cells)


def test_filter_grid_has_the_first_convs_shape():
    conv = inspection.first_conv(lite0().model)
    assert tuple(conv.weight.shape) == (32, 3, 3, 3)
    grid = inspection.filter_grid(conv)
    assert grid.shape == (6 * 4 + 1, 6 * 4 + 1, 3) and tiles_in(grid, 3, 3) == 32  # 6 x 6 cells of 3x3 (+1 pad)
    first = conv.weight[0].detach().numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(grid[1:4, 1:4], (first - first.min()) / (first.max() - first.min()), atol=1e-6)
    grey = inspection.filter_grid(torch.nn.Conv2d(1, 10, (5, 7)))
    assert grey.shape == (3 * 6 + 1, 4 * 8 + 1, 3) and tiles_in(grey, 5, 7) == 10
    assert np.array_equal(grey[..., 0], grey[..., 2])


def test_feature_map_grids_have_the_layers_channel_count_and_bad_names_list_the_valid_ones():
    im = lite0()
    net = inspection.extractor(im, ["blocks.3", "head"])
    x = torch.randn(1, 3, 224, 224)
    res = inspection.run_image(net, x, "head", 5)
    assert tuple(res["maps"]["blocks.3"].shape) == (80, 14, 14) and tuple(res["maps"]["head"].shape) == (1280, 7, 7)
    grid = inspection.feature_grid(res["maps"]["blocks.3"])
    assert grid.shape == (9 * 15 + 1, 9 * 15 + 1) and tiles_in(grid, 14, 14) == 80
    assert tiles_in(inspection.feature_grid(res["maps"]["head"]), 7, 7) == 1280
    with pytest.raises(
        ValueError, match=r"unknown stage 'layer4' for efficientnet_lite0; known: stem, blocks.0, .*head"
    ):
        inspection.check_stages(im, ["layer4"])


@pytest.mark.parametrize("centre", [(70, 70), (180, 170), (180, 60)])
def test_grad_cam_of_one_bright_object_peaks_over_the_object(centre):
    im = lite0()
    crop = np.zeros((224, 224, 3), np.uint8)
    inspection.build_eval_transform(im.prep).image(disc_png(*centre), crop)
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255 - torch.tensor(im.prep.mean).view(1, 3, 1, 1)
    x = x / torch.tensor(im.prep.std).view(1, 3, 1, 1)
    res = inspection.run_image(inspection.extractor(im, ["head"]), x, "head", 5)
    cam = res["cam"]
    assert cam.shape == (7, 7) and cam.max() == 1.0 and cam.min() >= 0
    # The 256-px image is centre-cropped to 224 (16 px off each side): the disc's centre, in 32-px cells.
    row, col = np.unravel_index(cam.argmax(), cam.shape)
    want = ((centre[1] - 16) // 32, (centre[0] - 16) // 32)
    assert abs(row - want[0]) <= 1 and abs(col - want[1]) <= 1, (row, col, want)
    # And the CAM is far hotter over the disc than in the opposite corner.
    assert cam[want] > 0.5 and cam[6 - want[0], 6 - want[1]] < 0.2


def test_inspect_job_writes_pngs_and_an_index_that_links_only_to_them(tmp_path, capsys):
    for i, centre in enumerate([(70, 70), (180, 170)]):
        (tmp_path / f"disc{i}.png").write_bytes(disc_png(*centre))
    out = tmp_path / "inspect"
    args = ["--set", f"inspect.images=[{tmp_path}/disc0.png,{tmp_path}/disc1.png]", "--set", f"inspect.output={out}"]
    result = inspect_job.main([*args, "--set", "inspect.layers=[stem,blocks.3]"])
    assert result["cam"] == "Grad-CAM on stage 'head' for the top prediction" and result["layers"] == [
        "stem",
        "blocks.3",
    ]
    assert [r["name"] for r in result["images"]] == ["disc0.png", "disc1.png"]
    assert all(len(r["topk"]) == 5 and r["topk"][0][1] >= r["topk"][1][1] for r in result["images"])
    page = (out / "index.html").read_text()
    links = re.findall(r'src="([^"]+)"', page)
    assert len(links) == 1 + 2 * 4 and all((out / link).is_file() for link in links)  # filters; image, CAM, 2 maps
    assert "Grad-CAM on stage &#x27;head&#x27;" in page and f"{result['images'][0]['topk'][0][1]:.2%}" in page
    assert Image.open(out / "image-0-blocks_3.png").size == Image.open(out / "image-1-blocks_3.png").size
    assert "wrote " + str(out / "index.html") in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"unknown stage 'layer9'.*known: stem, blocks.0"):
        inspect_job.main([*args, "--set", "inspect.layers=[layer9]"])
    assert (out / "config.yaml").is_file()
    elsewhere = tmp_path / "never"
    with pytest.raises(SystemExit, match=r"unknown backbone 'resnet5'"):
        inspect_job.main([*args[:2], "--set", f"inspect.output={elsewhere}", "--set", "model.backbone=resnet5"])
    assert not elsewhere.exists()  # a failed inspect writes nothing


def test_inspect_a_train_head_head_and_a_finetune_export(tmp_path):
    (tmp_path / "disc.png").write_bytes(disc_png(90, 120))
    weights = resolve_weights("efficientnet_lite0", "DEFAULT")
    head_dir = tmp_path / "head"
    head_dir.mkdir()
    spec = {"kind": "linear", "in_dim": 1280, "num_classes": 2, "hidden": 0, "dropout": 0.0}
    torch.manual_seed(0)
    state = {
        "0.mean": torch.zeros(1280),
        "0.std": torch.ones(1280),
        "1.weight": torch.randn(2, 1280),
        "1.bias": torch.zeros(2),
    }
    torch.save(state, head_dir / "head.pt")
    info = {
        "format": "imgpipe.head/1",
        "architecture": spec,
        "classes": ["ball", "not ball"],
        "backbone": "efficientnet_lite0",
        "weights": "DEFAULT",
        "weights_digest": weights.digest,
        "preprocessing": weights.preprocessing.to_dict(),
    }
    (head_dir / "head.json").write_text(json.dumps(info))
    cfg = InspectConfig(images=[str(tmp_path / "disc.png")], head=str(head_dir), output=str(tmp_path / "h"))
    result = inspection.run(ModelConfig(), cfg, StorageConfig())
    assert {c for c, _ in result["images"][0]["topk"]} == {"ball", "not ball"}
    assert abs(sum(p for _, p in result["images"][0]["topk"]) - 1) < 1e-5 and "+ head" in result["model"]

    # A finetune export: simple_cnn's state dict in its own names + the sidecar.
    model = FineTuneModel(resolve_weights("simple_cnn", "none"), 3)
    torch.save(model.export_state(), tmp_path / "model.pt")
    sidecar = {
        "backbone": "simple_cnn",
        "classes": ["r", "g", "b"],
        "preprocessing": resolve_weights("simple_cnn", "none").preprocessing.to_dict(),
    }
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    cfg = InspectConfig(images=[str(tmp_path / "disc.png")], output=str(tmp_path / "f"))
    result = inspection.run(
        ModelConfig(backbone="simple_cnn", weights=str(tmp_path / "model.pt")), cfg, StorageConfig()
    )
    assert result["cam"] == "Grad-CAM on stage 'block3' for the top prediction"
    assert result["stages"] == ["block1", "block2", "block3", "dense"] and result["filters"][1] == 3
    assert {c for c, _ in result["images"][0]["topk"]} == {"r", "g", "b"}
    assert os.path.isfile(storage.resolve(str(tmp_path / "f")).join("image-0-gradcam.png").path)


def test_images_come_from_a_prepared_split_or_a_prefix_with_their_true_classes(tmp_path):
    write_imagefolder(tmp_path / "raw", {"blue": 4, "red": 4})
    prepare_without_ray(str(tmp_path / "raw"), str(tmp_path / "prepared"), shard_max_samples=2)
    taken = inspection.take_images([str(tmp_path / "prepared")], "train", 3, None)
    assert len(taken) == 3 and all(k.split("/")[0] == truth for k, _, truth in taken)
    assert all(Image.open(io.BytesIO(data)).size == (48, 32) for _, data, _ in taken)
    raw = inspection.take_images([str(tmp_path / "raw")], None, 5, None)
    assert [truth for _, _, truth in raw] == ["blue"] * 4 + ["red"] and raw[0][0] == "blue/blue_0000"
    one = inspection.take_images([str(tmp_path / "raw" / "red" / "red_0001.jpg")], None, 5, None)
    assert [(n, t) for n, _, t in one] == [("red_0001.jpg", "")]
