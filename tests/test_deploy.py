"""Deployment: the ONNX export (preprocessing in the graph, parity with torch, dynamic sizes, metadata,
id inputs for LAI models, one-line errors) and the gallery search command (top-k, JSON, index reuse and
rebuild, unreadable images, torch and ONNX agreeing)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reidforge.data.transforms import Normalize
from reidforge.finetune import export_onnx, search
from reidforge.finetune.deploy import OnnxEmbedder, TorchEmbedder, load_pipeline
from reidforge.finetune.models import build_model
from reidforge.shared.weights import export_model

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_export(path: Path, name: str, size: tuple[int, int], **options: Any) -> Path:
    """A seeded random-init model export at input ``size``, written as the engine writes ``model_*.safetensors``."""
    torch.manual_seed(0)
    model = build_model(name, 7, **options)
    if getattr(model, "lai", None) is not None:
        with torch.no_grad():
            model.lai.normal_()  # LAI starts at zero: rows that differ, so that the ids change the feature
    export_model(model, path, {"architecture": name, "options": options, "num_classes": 7,
                               "feature_dim": model.feature_dim, "input_size": list(size), "mean": MEAN,
                               "std": STD, "provenance": {"run": "test"}})
    return path


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """coursework_resnet18 at 64 x 32: the export, its ONNX file and the export's figures."""
    weights = make_export(tmp_path_factory.mktemp("model") / "model_best.safetensors", "coursework_resnet18", (64, 32))
    result = export_onnx.export_onnx(weights)
    return weights, Path(result["out"]), result


def test_onnx_export_parity_metadata_and_dynamic_sizes(resnet18: tuple[Path, Path, dict[str, Any]]) -> None:
    weights, onnx_path, result = resnet18
    assert onnx_path == weights.with_suffix(".onnx") and onnx_path.is_file()
    assert result["max_abs_diff"] <= 1e-4 and len({k.split("x", 1)[1] for k in result["parity"]}) >= 2
    model = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["architecture"] == "coursework_resnet18" and json.loads(meta["input_size"]) == [64, 32]
    assert json.loads(meta["mean"]) == MEAN and json.loads(meta["std"]) == STD
    assert json.loads(meta["feature_dim"]) == 1024 and meta["weights"] == weights.name
    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    (images,), (features,) = model.graph.input, model.graph.output  # no camids/viewids for this model
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    assert features.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # Sizes and a batch size the export never saw.
    torch_side, onnx_side = TorchEmbedder(load_pipeline(weights)[0]), OnnxEmbedder(onnx_path)
    for shape in [(4, 3, 97, 45), (1, 3, 300, 20)]:
        batch = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        got, want = onnx_side(batch), torch_side(batch)
        assert got.shape == (shape[0], 1024) and np.abs(got - want).max() <= 1e-4


def test_pipeline_at_input_size_is_the_evaluation_path(resnet18: tuple[Path, Path, dict[str, Any]]) -> None:
    pipeline, _ = load_pipeline(resnet18[0])
    images = torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(pipeline(images), pipeline.model(Normalize(MEAN, STD)(images)))


def test_dm_osnet_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = make_export(tmp_path / "model_final.safetensors", "dm_osnet", (64, 32))
    assert export_onnx.main(["--weights", str(weights), "--out", str(tmp_path / "dm.onnx")]) == 0
    out = capsys.readouterr().out
    assert "inputs images, features N x 512" in out
    max_abs_diff = float(out.split("max |delta| on the feature: ")[1].split()[0])
    assert max_abs_diff <= 1e-4 and (tmp_path / "dm.onnx").is_file()


def test_parity_failure_writes_nothing(resnet18: tuple[Path, Path, dict[str, Any]], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "strict.onnx"
    assert export_onnx.main(["--weights", str(resnet18[0]), "--out", str(out), "--tolerance", "1e-12"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {resnet18[0]}: ONNX features differ")
    assert not out.exists()


@pytest.mark.slow  # draft_export of a ResNet50-IBN trunk with four branches: about a minute on one CPU thread
@pytest.mark.parametrize(("name", "options", "inputs"), [
    ("lka_reid", {"n_cams": 3, "n_views": 2}, ["images", "camids", "viewids"]),
    ("mbr_4b", {"n_cams": 3}, ["images", "camids"]),
])
def test_lai_models_take_their_ids(tmp_path: Path, name: str, options: dict[str, int], inputs: list[str]) -> None:
    weights = make_export(tmp_path / "model_best.safetensors", name, (64, 64), input_size=(64, 64), **options)
    result = export_onnx.export_onnx(weights)
    assert result["inputs"] == inputs and result["max_abs_diff"] <= 1e-4
    session = OnnxEmbedder(result["out"])
    assert [i.name for i in session.session.get_inputs()] == inputs
    batch = np.random.default_rng(2).integers(0, 256, (2, 3, 80, 70), dtype=np.uint8)
    first = session(batch, {k: np.zeros(2, dtype=np.int64) for k in inputs[1:]})
    second = session(batch, {k: np.ones(2, dtype=np.int64) for k in inputs[1:]})
    assert np.abs(first - second).max() > 1e-3


@pytest.mark.parametrize("content", [None, b"not a safetensors file", "no metadata"])
def test_bad_weights_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any) -> None:
    weights = tmp_path / "model_best.safetensors"
    if content == "no metadata":
        save_file({"w": torch.zeros(2)}, str(weights))
    elif content is not None:
        weights.write_bytes(content)
    assert export_onnx.main(["--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {weights}")
    assert not weights.with_suffix(".onnx").exists()


# ---------------------------------------------------------------------------------------------- search
def _pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A coloured block pattern with noise: every call a clearly different image."""
    blocks = rng.integers(0, 256, (4, 2, 3)).astype(np.float64)
    image = np.kron(blocks, np.ones((height // 4 + 1, width // 2 + 1, 1)))[:height, :width]
    return (0.6 * image + 0.4 * rng.integers(0, 256, 3) + rng.normal(0, 12, image.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """12 gallery PNGs of three sizes (half in a subfolder) and copies of three of them as queries."""
    gallery, query = tmp_path / "gallery", tmp_path / "query"
    (gallery / "cam2").mkdir(parents=True)
    query.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        path = gallery / ("cam2" if i % 2 else "") / f"g{i:02d}.png"
        Image.fromarray(_pattern(rng, *[(64, 32), (90, 40), (50, 30)][i % 3])).save(path)
        if i in (1, 4, 8):
            shutil.copy(path, query / f"q{i:02d}.png")
    return gallery, query


def run_search(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = search.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_search_finds_copies_and_reuses_its_index(resnet18: tuple[Path, Path, dict[str, Any]],
                                                  folders: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    weights, onnx_path, _ = resnet18
    gallery, query = folders
    index = tmp_path / "gallery.faiss"
    common = ("--gallery", gallery, "--query", query, "--topk", 4, "--index", index, "--batch-size", 5)
    rc, out, err = run_search(capsys, "--weights", weights, *common, "--json")
    assert rc == 0 and "index: built" in err
    results = json.loads(out)
    expected = {"q01.png": "cam2/g01.png", "q04.png": "g04.png", "q08.png": "g08.png"}
    assert [r["query"] for r in results] == sorted(expected)
    for r in results:
        assert [m["rank"] for m in r["matches"]] == [1, 2, 3, 4]
        assert r["matches"][0]["path"] == expected[r["query"]] and r["matches"][0]["similarity"] > 0.999
        assert r["matches"][1]["similarity"] < 0.999

    rc, out2, err = run_search(capsys, "--weights", weights, *common, "--json")
    assert rc == 0 and "index: reused" in err and json.loads(out2) == results

    # The ONNX model: another fingerprint (rebuilt), the same ranking.
    rc, out3, err = run_search(capsys, "--weights", onnx_path, *common, "--json")
    assert rc == 0 and "index: built" in err
    onnx_results = json.loads(out3)
    assert [[m["path"] for m in r["matches"]] for r in onnx_results] == [[m["path"] for m in r["matches"]]
                                                                          for r in results]
    torch_sims, onnx_sims = (np.array([[m["similarity"] for m in r["matches"]] for r in rs])
                             for rs in (results, onnx_results))
    assert np.abs(onnx_sims - torch_sims).max() < 1e-4

    # A new gallery image and a corrupt one: rebuilt, the bad file skipped with a warning, the new one found.
    shutil.copy(query / "q04.png", gallery / "cam2" / "new.png")
    (gallery / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    rc, out4, err = run_search(capsys, "--weights", onnx_path, *common, "--json")
    assert rc == 0 and "index: built" in err and f"warning: {gallery / 'broken.jpg'}: unreadable image" in err
    top2 = {r["query"]: {m["path"] for m in r["matches"][:2]} for r in json.loads(out4)}
    assert top2["q04.png"] == {"g04.png", "cam2/new.png"}
    rc, _, err = run_search(capsys, "--weights", onnx_path, *common, "--json")
    assert rc == 0 and "index: reused" in err and "broken.jpg: unreadable image" in err


def _forge(index_path: Path, change) -> None:
    """Edit a saved index and/or its description, then recompute the hash that ties them together."""
    description_path = index_path.with_name(index_path.name + ".json")
    description = json.loads(description_path.read_text())
    index = search.faiss.read_index(str(index_path))
    index, description = change(index, description)
    data = search.faiss.serialize_index(index).tobytes()
    index_path.write_bytes(data)
    description["index_sha256"] = hashlib.sha256(data).hexdigest()
    description_path.write_text(json.dumps(description))


def test_search_never_trusts_a_forged_index(resnet18: tuple[Path, Path, dict[str, Any]],
                                            folders: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    weights = resnet18[0]
    gallery, query = folders
    index_path = tmp_path / "g.faiss"
    common = ("--weights", weights, "--gallery", gallery, "--query", query / "q04.png", "--topk", 2,
              "--index", index_path, "--json")
    rc, out, err = run_search(capsys, *common)
    assert rc == 0 and "index: built" in err
    honest = json.loads(out)

    def plant(index: Any, description: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        # Every stored row becomes the query's own feature: any gallery image would rank first.
        target = index.reconstruct(description["files"].index("g04.png"))
        forged = search.faiss.IndexFlatIP(index.d)
        forged.add(np.tile(target, (index.ntotal, 1)))
        return forged, description

    _forge(index_path, plant)
    rc, out, err = run_search(capsys, *common)
    assert rc == 0 and "its stored feature is not the image's); rebuilding it" in err and "index: built" in err
    assert json.loads(out) == honest

    def rename(index: Any, description: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        files = description["files"]
        files[0], files[1] = files[1], files[0]  # the ranking would name the wrong image
        return index, description

    _forge(index_path, rename)
    rc, out, err = run_search(capsys, *common)
    assert rc == 0 and "index: built" in err and json.loads(out) == honest
    rc, _, err = run_search(capsys, *common)
    assert rc == 0 and "index: reused" in err


def test_search_prints_names_with_control_characters_escaped(resnet18: tuple[Path, Path, dict[str, Any]],
                                                             folders: tuple[Path, Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    gallery, query = folders
    (gallery / "g04.png").rename(gallery / "evil\x1b[2J.png")
    (gallery / "bad\x07.jpg").write_bytes(b"")
    rc, out, err = run_search(capsys, "--weights", resnet18[0], "--gallery", gallery, "--query", query / "q04.png",
                              "--topk", 1)
    assert rc == 0 and "\x1b" not in out + err and "\x07" not in err
    assert "evil\\x1b[2J.png" in out and "bad\\x07.jpg: unreadable image, skipped (empty image (0 bytes))" in err


def test_search_table_single_query_and_errors(resnet18: tuple[Path, Path, dict[str, Any]],
                                              folders: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    weights = resnet18[0]
    gallery, query = folders
    rc, out, err = run_search(capsys, "--weights", weights, "--gallery", gallery, "--query", query / "q08.png",
                              "--topk", 3)
    lines = out.splitlines()
    assert rc == 0 and err == "" and len(lines) == 2 + 3
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["query", "rank", "match", "similarity"]
    assert "g08.png" in lines[2] and lines[2].rstrip(" |").endswith("1")

    empty = tmp_path / "empty"
    empty.mkdir()
    for args, culprit in [(("--weights", weights, "--gallery", gallery, "--query", empty), empty),
                          (("--weights", weights, "--gallery", empty, "--query", query), empty),
                          (("--weights", tmp_path / "missing.onnx", "--gallery", gallery, "--query", query),
                           tmp_path / "missing.onnx")]:
        rc, out, err = run_search(capsys, *args)
        assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith(f"error: {culprit}: ")


def test_our_exports_run_only_at_the_input_size_they_record(resnet18: tuple[Path, Path, dict[str, Any]],
                                                             folders: tuple[Path, Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    weights, onnx_path, _ = resnet18
    gallery, query = folders
    for path, what in ((weights, "model export"), (onnx_path, "ONNX export")):
        rc, out, err = run_search(capsys, "--weights", path, "--gallery", gallery, "--query", query,
                                  "--input-size", 64, 32)
        assert rc == 0 and out  # repeating the recorded size changes nothing
        rc, out, err = run_search(capsys, "--weights", path, "--gallery", gallery, "--query", query,
                                  "--input-size", 128, 64)
        assert rc == 2 and out == "" and err == (f"error: --input-size 128 64: {path} is a reidforge {what} trained "
                                                 "at 64 32, which it records: drop --input-size\n")
