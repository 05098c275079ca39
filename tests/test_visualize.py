"""Pictures: Grad-CAM works on every registered model (its ``cam_layer`` is really run by its forward),
the plotting helpers write real PNG files, and the pictures do not mislead: one labelled panel per
scale, percentages on full axes, markers for sparse series, grids shaped like their crops, titled and
explained tiles, and flat Grad-CAM maps reported instead of drawn blank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from reidforge.finetune.models import MODELS, build_model
from reidforge.shared.visualize import (FlatMapWarning, cam_overlay, cmc_curve, epoch_curves, flat_maps, grad_cam,
                              layer_name, ranked_grid)

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


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure the pictures save, kept for inspecting its matplotlib objects."""
    kept: list[Figure] = []
    save = Figure.savefig

    def keep(fig: Figure, *args, **kwargs) -> None:
        kept.append(fig)
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return kept


def _image_cover(fig: Figure) -> float:
    """The share of the figure covered by image tiles (1 - white space)."""
    return sum(ax.get_position().width * ax.get_position().height for ax in fig.axes if ax.images)


HISTORY = [{"epoch": e, "ARI": 0.1 * e, "NMI": 0.2 + 0.1 * e, "clusters": 3 + 8 * e, "outliers": 230 + 130 * e,
            **({"mAP": 0.214, "R1": 0.5} if e == 5 else {})} for e in range(1, 6)]


def test_epoch_curves_one_labelled_panel_per_scale(tmp_path: Path, figures: list[Figure]) -> None:
    epoch_curves(HISTORY, [("ARI", "NMI"), ("clusters",), ("outliers",), ("mAP", "R1")], tmp_path / "e.png",
                 ylabels=["ARI, NMI", "clusters", "outliers", "retrieval (%)"])
    (fig,) = figures
    assert len(fig.axes) == 4
    assert [ax.get_ylabel() for ax in fig.axes] == ["ARI, NMI", "clusters", "outliers", "retrieval (%)"]
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    counts, percent = fig.axes[1], fig.axes[3]
    assert counts.get_ylim()[0] <= 0 < counts.get_ylim()[1]  # counts drawn from zero, not zoomed in
    # Fractions in %, on the whole 0-100 axis with one decimal, as markers: one evaluation is one point.
    assert percent.get_ylim() == (-2, 102)
    mAP = percent.lines[0]
    assert list(mAP.get_xdata()) == [5] and mAP.get_ydata()[0] == pytest.approx(21.4)
    assert mAP.get_linestyle() == "None" and mAP.get_marker() == "o"
    assert percent.yaxis.get_major_formatter()(20.0) == "20.0"
    assert counts.lines[0].get_linestyle() == "-"  # five epochs in a row: a line joins them
    default = epoch_curves(HISTORY, [("mAP", "R1"), ("clusters",)], tmp_path / "d.png")
    assert default.read_bytes()[:8] == PNG
    assert [ax.get_ylabel() for ax in figures[1].axes] == ["mAP, R1 (%)", "clusters"]


def test_epoch_curves_markers_only_for_sparse_series(tmp_path: Path, figures: list[Figure]) -> None:
    every_other = [{"epoch": e, **({"ARI": 0.1 * e} if e % 2 else {})} for e in range(1, 12)]
    epoch_curves(every_other, [("ARI",)], tmp_path / "e.png")
    assert figures[0].axes[0].lines[0].get_linestyle() == "None"  # six points, but epochs skipped between


def test_epoch_curves_rejects_what_a_percent_axis_cannot_show(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixes percentages"):
        epoch_curves(HISTORY, [("mAP", "clusters")], tmp_path / "e.png")
    with pytest.raises(ValueError, match="mAP is drawn in % from fractions"):
        epoch_curves([{"epoch": 1, "mAP": 21.4}], [("mAP",)], tmp_path / "e.png")
    with pytest.raises(ValueError, match="1 ylabels for 2 panels"):
        epoch_curves(HISTORY, [("ARI",), ("NMI",)], tmp_path / "e.png", ylabels=["ARI"])


@pytest.mark.parametrize("shape", [(32, 64, 3), (64, 64, 3), (64, 32, 3)])  # wide vehicle, square, person
def test_ranked_grid_fits_the_crops(tmp_path: Path, figures: list[Figure], shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(6)]
    ranked = np.array([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1]])
    pids, cams = np.array([1, 1, 2, 2, 3, 3]), np.array([0, 1, 0, 1, 0, 1])
    distances = np.arange(12, dtype=float).reshape(2, 6) / 8
    ranked_grid(images[:2], images, ranked, np.array([1, 2]), pids, np.array([0, 0]), cams, tmp_path / "r.png",
                distances=distances, distance_name="cosine distance")
    (fig,) = figures
    tiles = [ax for ax in fig.axes if ax.images]
    assert len(tiles) == 12
    assert _image_cover(fig) > 0.6  # the old fixed person-shaped figure left wide crops at about 0.4
    width, height = tiles[0].get_position().width, tiles[0].get_position().height
    fig_w, fig_h = fig.get_size_inches()
    assert (height * fig_h) / (width * fig_w) == pytest.approx(shape[0] / shape[1])  # tiles in the crop's shape
    assert tiles[0].get_title() == "query: id 1\ncam 0"
    assert tiles[1].get_title() == "1: id 1\ncam 0 \u00b7 d 0.000"  # same identity and camera: junk
    assert tiles[7].get_title() == "1: id 3\ncam 1 \u00b7 d 1.375"
    frames = [ax.spines["top"].get_edgecolor() for ax in tiles[:3]]
    assert [matplotlib.colors.to_hex(c) for c in frames] == ["#2c7bb6", "#999999", "#1a9850"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "query", "same identity", "another identity", "junk: same identity, same camera",
        "d: cosine distance to the query"]


def test_ranked_grid_without_distances_and_with_wrong_ones(tmp_path: Path, figures: list[Figure]) -> None:
    images = [np.zeros((16, 16, 3), dtype=np.uint8)] * 3
    args = (images[:1], images, np.array([[2, 1]]), np.array([4]), np.array([4, 5, 4]), np.array([0]),
            np.array([1, 1, 2]))
    ranked_grid(*args, tmp_path / "r.png")
    assert [ax.get_title() for ax in figures[0].axes[1:]] == ["1: id 4\ncam 2", "2: id 5\ncam 1"]
    assert len(figures[0].legends[0].get_texts()) == 4
    with pytest.raises(ValueError, match=r"distances has shape \(1, 2\), expected \(1, 3\)"):
        ranked_grid(*args, tmp_path / "r.png", distances=np.zeros((1, 2)))


def test_cam_overlay_reports_a_flat_map(tmp_path: Path, figures: list[Figure]) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 64, 3), dtype=np.uint8) for _ in range(3)]
    maps = torch.rand(3, 32, 64)
    maps[1] = 0.0
    maps[2] = 0.5
    assert flat_maps(maps) == [1, 2]
    with pytest.warns(FlatMapWarning, match=r"Grad-CAM at backbone.layer4: the maps of images \[1, 2\] are all "
                                            r"zero or constant"):
        cam_overlay(images, maps, tmp_path / "g.png", layer="backbone.layer4")
    (fig,) = figures
    assert fig._suptitle.get_text() == "Grad-CAM at backbone.layer4: 2 of 3 maps all zero or constant"
    tiles = [ax for ax in fig.axes if ax.images]
    assert len(tiles) == 6 and _image_cover(fig) > 0.6
    assert [t.get_text() for ax in tiles for t in ax.texts] == ["map is\nall zero", "map is\nconstant"]
    colour_bar = [ax for ax in fig.axes if not ax.images]
    assert len(colour_bar) == 1 and colour_bar[0].get_ylim() == (0.0, 1.0)
    assert colour_bar[0].get_ylabel().startswith("activation")


def test_cam_overlay_of_good_maps_warns_nothing(tmp_path: Path, figures: list[Figure],
                                                recwarn: pytest.WarningsRecorder) -> None:
    images = [np.zeros((32, 16, 3), dtype=np.uint8)] * 2
    cam_overlay(images, torch.rand(2, 32, 16), tmp_path / "g.png")
    assert not [w for w in recwarn if issubclass(w.category, FlatMapWarning)]
    assert figures[0]._suptitle.get_text() == "Grad-CAM"
    with pytest.raises(ValueError, match=r"maps of shape \(16, 16\) do not match images of shape \(32, 16\)"):
        cam_overlay(images, torch.rand(2, 16, 16), tmp_path / "g.png")


class _Blind(torch.nn.Module):
    """An embedding that ignores its feature map: Grad-CAM's gradient there is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0 * self.conv(x).mean(dim=(2, 3)) + self.head


def test_grad_cam_of_a_blind_layer_is_flat_and_named() -> None:
    model = _Blind()
    maps = grad_cam(model, model.conv, torch.randn(2, 3, 8, 8))
    assert torch.equal(maps, torch.zeros(2, 8, 8)) and flat_maps(maps) == [0, 1]
    assert layer_name(model, model.conv) == "conv"
    fnc = build_model("fnc", 5, **SMALL["fnc"])
    assert layer_name(fnc, fnc.cam_layer()) == "spatial.trunk"  # its spatial branch makes the last map
    with pytest.raises(ValueError, match="Conv2d is not a submodule of FNC"):
        layer_name(fnc, model.conv)


def test_demo_report_draws_spcl_on_one_panel_per_scale(tmp_path: Path, figures: list[Figure],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("demo", Path(__file__).resolve().parents[1] / "launch" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, demo)  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(demo)
    model = demo.Model("m", "scratch", "synthetic_person", "random init")
    (tmp_path / "eval" / "m").mkdir(parents=True)
    (tmp_path / "eval" / "m" / "results.json").write_text(json.dumps({"mAP": 0.2, "mINP": 0.1,
                                                                      "cmc": [0.3] * 10}))
    (tmp_path / "runs" / "m").mkdir(parents=True)
    save_file({"w": torch.zeros(2, 3)}, str(tmp_path / "runs" / "m" / "model_final.safetensors"))
    (tmp_path / "runs" / "spcl").mkdir()
    (tmp_path / "runs" / "spcl" / "metrics.json").write_text(json.dumps({"history": [
        {"epoch": 1, "clusters": 3, "outliers": 230, "ARI": 0.1, "NMI": 0.3, "loss": 2.0},
        {"epoch": 2, "clusters": 44, "outliers": 885, "ARI": 0.4, "NMI": 0.6, "loss": 1.5, "mAP": 0.214,
         "R1": 0.143}]}))
    for folder, name, text in [("cfs", "cfs_summary.json", json.dumps({"scored": 10, "quantiles": {"q0.5": 0.5}})),
                               ("logs", "onnx.log", "parity max |diff| 1e-6\n"),
                               ("stages", "scratch.json", json.dumps({"command": ["python", "x.py"]}))]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text(text)
    _, report = demo.write_report(tmp_path, (model,), [["scratch", 1.0, False]], 0.5)
    assert "(blue frame)" in report.read_text()
    (spcl,) = [fig for fig in figures if len(fig.axes) > 1]
    assert [ax.get_ylabel() for ax in spcl.axes] == ["ARI, NMI against the identities", "clusters",
                                                     "outliers (images)", "person split: mAP, R1 (%)"]
    assert [list(line.get_ydata()) for line in spcl.axes[3].lines] == [[pytest.approx(21.4)],
                                                                      [pytest.approx(14.3)]]


class _Tokens(torch.nn.Module):
    """A 2 x 3 grid of 4-channel patch tokens after a class token, the embedding their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 4, 2, stride=2)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)
        return self.norm(torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)).sum(dim=1)


def test_grad_cam_of_tokens_needs_their_grid() -> None:
    model = _Tokens()
    images = torch.randn(2, 3, 4, 6)
    with pytest.raises(ValueError, match=r"the layer LayerNorm gives \(2, 7, 4\), not an \(N, C, h, w\) map"):
        grad_cam(model, model.norm, images)
    maps = grad_cam(model, model.norm, images, lambda t: t[:, 1:].reshape(2, 2, 3, 4).permute(0, 3, 1, 2))
    assert maps.shape == (2, 4, 6) and flat_maps(maps) == []
