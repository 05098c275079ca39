"""Packaging: everything installs under ``reidforge``, a user's own ``data``/``shared`` packages keep working
beside it, the console scripts run, and the three-line API of the package docstring does what it says."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reidforge
from reidforge.finetune.deploy import TorchEmbedder, load_pipeline
from test_deploy import make_export

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()
BIN = Path(sys.executable).parent


def _listed_packages() -> set[str]:
    block = re.search(r"^packages = \[(.*?)\]", PYPROJECT, re.MULTILINE | re.DOTALL).group(1)
    return set(re.findall(r'"([\w.]+)"', block))


def test_pyproject_lists_every_package_folder() -> None:
    folders = {"reidforge"} | {"reidforge." + ".".join(p.parent.relative_to(ROOT).parts)
                               for stage in ("data", "shared", "pretrain", "finetune")
                               for p in (ROOT / stage).rglob("__init__.py")}
    assert _listed_packages() == folders


def test_only_reidforge_lands_on_the_path(tmp_path: Path) -> None:
    probe = ("import importlib.util, sys, reidforge.data, reidforge.finetune.engine; "
             "print([n for n in ('data', 'shared', 'pretrain', 'finetune') if importlib.util.find_spec(n)]); "
             "print(sys.modules['reidforge'].__file__, sys.modules['reidforge.data'].__file__)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names, files = done.stdout.splitlines()
    assert names == "[]"
    assert files.split() == [str(ROOT / "reidforge" / "__init__.py"), str(ROOT / "data" / "__init__.py")]


def _photos(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"p{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    """A researcher's project with its own ``data`` and ``shared`` packages (the names of our folders)."""
    project = tmp_path / "project"
    for package in ("data", "shared"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text("")
    (project / "data" / "transforms.py").write_text('OWNER = "user"\n')
    return project


def test_a_users_data_package_and_the_three_line_api_side_by_side(user_project: Path, tmp_path: Path) -> None:
    weights = make_export(tmp_path / "model_final.safetensors", "coursework_resnet18", (64, 32))
    paths = _photos(user_project / "photos", [(64, 32), (90, 40), (50, 30), (128, 64), (64, 32)])
    script = user_project / "extract.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from data.transforms import OWNER   # the user's own package, first on sys.path
        import reidforge
        from reidforge.data.transforms import build_transforms   # ours, under its own name
        assert OWNER == "user" and callable(build_transforms)
        features = reidforge.FeatureExtractor({str(weights)!r}, device="cpu", batch_size=2, note=lambda _: None)("photos")
        import torch
        torch.save(features, sys.argv[1])
    """))
    out = tmp_path / "features.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script), str(out)], cwd=user_project, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    features = torch.load(out, weights_only=True)
    # The rows are the folder's images in sorted order, each as the deployed pipeline embeds it alone.
    pipeline, _ = load_pipeline(weights)
    embedder = TorchEmbedder(pipeline)
    extractor = reidforge.FeatureExtractor(weights, device="cpu", note=lambda _: None)
    expected = torch.cat([extractor([p]) for p in paths])
    assert features.shape == (5, embedder.pipeline.model.feature_dim) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    assert extractor.paths == paths[-1:]
    # A list keeps its order; the same image gives the same row.
    torch.testing.assert_close(extractor([paths[3], paths[0]]), expected[[3, 0]], rtol=0, atol=1e-5)


def test_feature_extractor_refuses_what_it_cannot_embed(tmp_path: Path) -> None:
    weights = make_export(tmp_path / "model_final.safetensors", "coursework_resnet18", (64, 32))
    paths = _photos(tmp_path / "photos", [(64, 32), (64, 32)])
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    extract = reidforge.FeatureExtractor(weights, device="cpu", note=lambda _: None)
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image"):
        extract(tmp_path / "photos")
    with pytest.raises(reidforge.ConfigError, match=r"missing\.png: no such image file"):
        extract([paths[0], tmp_path / "missing.png"])
    with pytest.raises(reidforge.WeightsError, match=r"nothing\.safetensors: no such file"):
        reidforge.FeatureExtractor(tmp_path / "nothing.safetensors")


def test_console_scripts_run_from_a_users_project(user_project: Path) -> None:
    scripts = re.findall(r'^(reidforge-[\w-]+) = "([\w.]+):main"$', PYPROJECT, re.MULTILINE)
    assert len(scripts) == 8
    for name, module in scripts:
        assert importlib.util.find_spec(module) is not None, module
    for name in ("reidforge-train", "reidforge-build-shards"):
        done = subprocess.run([str(BIN / name), "--help"], cwd=user_project, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert "usage:" in done.stdout
    done = subprocess.run([str(BIN / "reidforge-train"), "--print-config", "epochs=3"], cwd=user_project,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "epochs: 3" in done.stdout, done.stderr


def test_train_from_a_recipe_with_overrides(tiny_shards: Path, tmp_path: Path) -> None:
    person = tiny_shards / "synthetic_person"
    summary = reidforge.train(ROOT / "launch" / "configs" / "bot_tiny.yaml", "epochs=1", "iters_per_epoch=1",
                              f"output_dir={tmp_path}", "run_name=api", f"data.train=[{person / 'train'}]",
                              f"data.query={person / 'query'}", f"data.gallery={person / 'gallery'}", "data.workers=0",
                              "data.p=4", "data.k=2", "model.name=coursework_resnet18", "data.transform.height=64",
                              "data.transform.width=32", "eval_every=1")
    assert [row["epoch"] for row in summary["history"]] == [1]
    assert (tmp_path / "api" / "model_final.safetensors").is_file()
    assert "| split" in (tmp_path / "api" / "log.txt").read_text()  # the run keeps its log, results table included


def test_pretrain_stays_callable_after_its_package_is_imported(tmp_path: Path) -> None:
    import reidforge.pretrain.clustering  # noqa: F401  (binds the package over the API function)

    missing = tmp_path / "missing.yaml"
    for _ in range(2):  # the first call imports reidforge.pretrain.spcl itself
        with pytest.raises(reidforge.ConfigError, match="missing.yaml"):
            reidforge.pretrain(missing, "epochs=1")
    assert isinstance(reidforge.pretrain, type(reidforge)) and reidforge.pretrain.clustering.jaccard_distance
