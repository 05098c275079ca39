"""Pictures: Grad-CAM works on every registered model (its ``cam_layer`` is really run by its forward)
and the plotting helpers write real PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.models import MODELS, build_model
from shared.visualize import cam_overlay, cmc_curve, epoch_curves, grad_cam, ranked_grid

PNG = b"\x89PNG\r\n\x1a\n"
# The multi-branch vehicle models at their CPU size (ResNet-18 trunk); the rest as registered.
SMALL = {"fnc": {"trunk": "resnet18", "input_size": (64, 64)},
         "mbr_4b": {"trunk": "resnet18", "input_size": (64, 64)},
         "lka_reid": {"trunk": "resnet18", "input_size": (64, 64)}}


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_grad_cam_on_every_model(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 5, **SMALL.get(name, {})).train()
    images = torch.randn(2, 3, 64, 64)
    ids = torch.zeros(2, dtype=torch.long)
    maps = grad_cam(model, model.cam_layer(), images, camids=ids, viewids=ids)
    assert maps.shape == (2, 64, 64)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0 and float(maps.max()) > 0.0
    assert model.training  # grad_cam evaluates in eval mode, then restores the caller's mode


def test_grad_cam_names_a_layer_the_forward_never_runs() -> None:
    model = build_model("fnc", 5, **SMALL["fnc"])
    with pytest.raises(ValueError, match="was not run"):
        grad_cam(model, model.backbone, torch.randn(1, 3, 64, 64))


def test_pictures_are_png_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 16, 3), dtype=np.uint8) for _ in range(6)]
    ranked = np.array([[0, 1, 2], [3, 4, 5]])
    pids, cams = np.array([1, 1, 2, 2, 3, 3]), np.array([0, 1, 0, 1, 0, 1])
    paths = [
        ranked_grid(images[:2], images, ranked, np.array([1, 2]), pids, np.array([0, 0]), cams, tmp_path / "r.png"),
        cmc_curve({"a": np.linspace(0.5, 1, 20), "b": np.linspace(0.2, 1, 20)}, tmp_path / "c.png"),
        epoch_curves([{"epoch": 1, "ARI": 0.1, "clusters": 5}, {"epoch": 2, "ARI": 0.2, "clusters": 7, "mAP": 0.3}],
                     [("ARI",), ("clusters",), ("mAP",)], tmp_path / "e.png"),
        cam_overlay(images[:2], torch.rand(2, 32, 16), tmp_path / "g.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG
