"""evaluate.py, export_onnx.py and search.py take every model file a re-ID user has (reidforge.finetune.deploy.load_model).

Each file is built here with random values in the layout its source writes: our training checkpoint
(``<run>/checkpoints/epoch-N/model.safetensors`` under the run's ``config.yaml``), the SpCL stage's backbone
export (``pretrain/spcl.py`` ``_export``: the backbone's state dict, ``kind: backbone`` metadata), torchreid's
``save_checkpoint`` (``{'state_dict', 'epoch', 'optimizer'}`` of a DataParallel model), FastReID's
``{'model', 'iteration', ...}`` with ``EmbeddingHead`` keys (``heads.bottleneck.0``, ``heads.weight``) and a
timm state dict. Every tensor of the file is checked to reach the model by value, and the metrics to equal
those of the equivalent export of ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import reidforge.finetune.evaluate as evaluate
from reidforge.data.readers import IndexedShards, split_keys
from reidforge.data.transforms import Normalize, TransformConfig, build_transforms
from reidforge.finetune import export_onnx, search
from reidforge.finetune.deploy import ModelSource, OnnxEmbedder, TorchEmbedder, load_model, load_pipeline
from reidforge.finetune.engine import TrainConfig
from reidforge.finetune.extractor import FeatureExtractor
from reidforge.finetune.models import build_model, load_exported_model
from reidforge.shared.backbones import PooledBackbone, build_backbone
from reidforge.shared.backbones.timm_any import build_timm_pooled
from reidforge.shared.config import ConfigError, save_config
from reidforge.shared.visualize import flat_maps
from reidforge.shared.weights import WeightsError, export_model, read_header

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OSNET = {"variant": "osnet_x0_25"}
METRICS = ("mAP", "mINP", "cmc")


def _randomise(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``module`` moved off its init (BN variances kept positive, counters integers); returned."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for key, value in module.state_dict().items():
        if not value.is_floating_point():
            state[key] = torch.randint(1, 100, value.shape, generator=g)
        elif key.endswith("running_var"):
            state[key] = value + torch.rand(value.shape, generator=g)
        else:
            state[key] = value + 0.05 * torch.randn(value.shape, generator=g)
    module.load_state_dict(state)
    return state


def _export(model: torch.nn.Module, path: Path, name: str, options: dict[str, Any], classes: int,
            size: tuple[int, int]) -> Path:
    """``model`` as finetune/engine.py exports it."""
    export_model(model, path, {"architecture": name, "options": options, "num_classes": classes,
                               "feature_dim": model.feature_dim, "input_size": list(size), "mean": MEAN, "std": STD,
                               "provenance": {"run": "test"}})
    return path


def _run(shards: Path, weights: Path | str, out: Path, *extra: str) -> dict[str, Any]:
    """evaluate.py on the tiny query/gallery, features saved to ``out/features.safetensors``; results.json."""
    person = shards / "synthetic_person"
    assert evaluate.main(["--weights", str(weights), "--query", str(person / "query"), "--gallery",
                          str(person / "gallery"), "--workers", "0", "--device", "cpu", "--out", str(out),
                          "--save-features", str(out / "features.safetensors"), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def _same_metrics(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


def _same_features(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "features.safetensors")), load_file(str(b / "features.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """The model's state is ``expected`` by value, key for key."""
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert [k for k in state if not torch.equal(state[k], expected[k])] == []


def _training_run(root: Path, name: str, options: dict[str, Any], classes: int, size: tuple[int, int]
                  ) -> tuple[Path, torch.nn.Module, dict[str, torch.Tensor]]:
    """A run directory as finetune/engine.py leaves it: config.yaml and checkpoints/epoch-0001/model.safetensors."""
    cfg = TrainConfig(run_name="run", output_dir=str(root))
    cfg.model.name, cfg.model.options = name, options
    cfg.data.transform.height, cfg.data.transform.width = size
    run = root / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    model = build_model(name, classes, **options)
    state = _randomise(model)
    save_file(state, str(run / "checkpoints" / "epoch-0001" / "model.safetensors"))
    (run / "checkpoints" / "latest").write_text("epoch-0001")
    return run / "checkpoints" / "epoch-0001", model, state


def test_training_checkpoint_file_or_directory_is_its_export(tiny_shards: Path, tmp_path: Path) -> None:
    checkpoint, model, state = _training_run(tmp_path, "osnet", OSNET, 5, (32, 16))
    loaded, meta = load_model(checkpoint / "model.safetensors")
    _assert_state(loaded, state)
    assert (meta["architecture"], meta["options"], meta["input_size"]) == ("osnet", OSNET, [32, 16])
    export = _export(model, tmp_path / "model_final.safetensors", "osnet", OSNET, 5, (32, 16))
    reference = _run(tiny_shards, export, tmp_path / "export")
    for name, weights in (("file", checkpoint / "model.safetensors"), ("dir", checkpoint)):
        results = _run(tiny_shards, weights, tmp_path / name)
        _same_metrics(results, reference)
        _same_features(tmp_path / name, tmp_path / "export")
        assert results["model_source"] == "reidforge training checkpoint"
    # the saved features rank back into the same metrics, their keys in the splits' order
    saved = evaluate.evaluate_features(tmp_path / "dir" / "features.safetensors")
    _same_metrics(saved, reference)
    person = tiny_shards / "synthetic_person"
    assert saved["query_keys"] == split_keys(person / "query") and saved["gallery_keys"] == split_keys(
        person / "gallery")
    tensors = load_file(str(tmp_path / "dir" / "features.safetensors"))
    query = IndexedShards(person / "query")
    assert torch.equal(tensors["query_pids"], torch.from_numpy(query.pids.astype(np.int64)))
    assert tensors["query_features"].shape == (len(query), 512)


def test_spcl_backbone_export_is_the_pooled_backbone(tiny_shards: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    backbone = build_backbone("osnet_x0_25")
    state = _randomise(backbone)
    run = tmp_path / "spcl"
    run.mkdir()
    path = run / "backbone_final.safetensors"
    export_model(backbone, path, {"kind": "backbone", "architecture": "osnet_x0_25", "options": {},
                                  "feature_dim": backbone.out_channels, "input_size": [256, 128], "mean": MEAN,
                                  "std": STD, "provenance": {"stage": "spcl", "run": "spcl", "epoch": 1}})
    (run / "config.yaml").write_text("encoder:\n  backbone: osnet_x0_25\n  pooling: avg\n")
    with pytest.raises(WeightsError, match="not a fine-tuned model export .kind 'backbone'"):
        load_exported_model(path)  # was a KeyError traceback
    model, meta = load_model(path)
    assert isinstance(model, PooledBackbone) and meta["feature_dim"] == backbone.out_channels
    _assert_state(model.backbone, state)
    assert [k for k in model.state_dict() if not k.startswith("backbone.")] == []  # no BN head, no classifier
    results = _run(tiny_shards, path, tmp_path / "export")
    assert "pooled backbone output (avg pooling" in capsys.readouterr().out
    # the same backbone as a foreign file under --model <backbone>: the same pooled features
    torch.save(state, tmp_path / "backbone.pth")
    _same_metrics(_run(tiny_shards, tmp_path / "backbone.pth", tmp_path / "foreign", "--model", "osnet_x0_25"),
                  results)
    (run / "config.yaml").write_text("encoder:\n  pooling: gem\n")
    notes = load_model(path)[1]["notes"]
    assert "gem pooling" in notes[0] and "does not carry GeM's trained p" in notes[1]
    # an export that records its pooling and GeM's learnt p is pooled with them, whatever lies beside it
    export_model(backbone, path, {"kind": "backbone", "architecture": "osnet_x0_25", "options": {},
                                  "feature_dim": backbone.out_channels, "pooling": "gem", "gem_p": 4.5,
                                  "input_size": [256, 128], "mean": MEAN, "std": STD})
    (run / "config.yaml").write_text("encoder:\n  pooling: avg\n")
    model, meta = load_model(path)
    assert model.pool.p.detach().item() == 4.5 and meta["notes"] == [
        f"{path}: pooled backbone output (gem pooling, from its metadata), without SpCL's BatchNorm1d head"]


def _torchreid(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """Our OSNet model's ``state`` as torchreid saves its OSNet: the trunk at the top level beside ``fc`` and
    ``classifier`` (``torchreid/models/osnet.py``), DataParallel keys, training state around it."""
    optimizer = {"state": {}, "param_groups": [{"lr": 0.0003, "params": []}]}
    theirs = {f"module.{k.removeprefix('backbone.')}": v for k, v in state.items()}
    torch.save({"state_dict": theirs, "epoch": 60, "rank1": 0.9, "optimizer": optimizer}, path)
    return path


def test_torchreid_osnet_checkpoint_whole_and_partial(tiny_shards: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = build_model("osnet", 751, **OSNET)
    state = _randomise(model)
    file = _torchreid(tmp_path / "model.pth.tar-60", state)
    loaded, meta = load_model(file, ModelSource("osnet", OSNET))
    _assert_state(loaded, state)  # trunk, fc-512 and the 751-way classifier
    assert meta["input_size"] == [256, 128] and meta["source"] == "foreign checkpoint"
    options = ["--model", "osnet", "--model-options", json.dumps(OSNET)]
    results = _run(tiny_shards, file, tmp_path / "foreign", *options)
    assert "features: osnet's own eval feature" in capsys.readouterr().out
    export = _export(model, tmp_path / "model_final.safetensors", "osnet", OSNET, 751, (256, 128))
    _same_metrics(results, _run(tiny_shards, export, tmp_path / "export"))
    _same_features(tmp_path / "foreign", tmp_path / "export")
    # without the fc layer the feature would be noise: one line, unless --allow-partial
    cut = _torchreid(tmp_path / "cut.pth", {k: v for k, v in state.items() if not k.startswith("fc.1.")})
    person = tiny_shards / "synthetic_person"
    args = ["--weights", str(cut), "--query", str(person / "query"), "--gallery", str(person / "gallery"),
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "cut"), *options]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4 of the 6 head tensors osnet's features use are not in the file" in err
    assert err.rstrip().endswith("fc.1.weight, fc.1.bias, fc.1.running_mean); --allow-partial accepts it")
    assert evaluate.main([*args, "--allow-partial"]) == 0


def test_fastreid_bot_checkpoint_loads_its_bnneck_and_classifier(tiny_shards: Path, tmp_path: Path) -> None:
    model = build_model("bot_resnet50", 751)
    state = _randomise(model)
    theirs = {f"backbone.{k[len('backbone.'):]}": v for k, v in state.items() if k.startswith("backbone.")}
    theirs.update({f"heads.bottleneck.0.{k[len('neck.bn.'):]}": v for k, v in state.items()
                   if k.startswith("neck.bn.")})
    theirs["heads.weight"] = state["neck.classifier.weight"]
    torch.save({"model": {f"module.{k}": v for k, v in theirs.items()}, "iteration": 9, "scheduler": {},
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "model_final.pth")
    loaded, meta = load_model(tmp_path / "model_final.pth", ModelSource("bot_resnet50"))
    _assert_state(loaded, state)
    assert meta["notes"][1] == "features: bot_resnet50's own eval feature"
    # the loaded model is the export's, tensor for tensor (the torchreid test compares the two evaluations)
    results = _run(tiny_shards, tmp_path / "model_final.pth", tmp_path / "foreign", "--model", "bot_resnet50")
    assert results["model_source"] == "foreign checkpoint" and results["model"] == "bot_resnet50"
    # an ImageNet file has no BNNeck: the features are the backbone's pooled output, and the note says so
    torch.save({k[len("backbone."):]: v for k, v in theirs.items() if k.startswith("backbone.")},
               tmp_path / "imagenet.pth")
    pooled, meta = load_model(tmp_path / "imagenet.pth", ModelSource("bot_resnet50"))
    assert isinstance(pooled, PooledBackbone) and meta["feature_dim"] == 2048
    _assert_state(pooled.backbone, {k[len("backbone."):]: v for k, v in theirs.items() if k.startswith("backbone.")})
    assert meta["notes"][1].startswith("features: the backbone's pooled output: the file has no BNNeck BN "
                                       "(neck.bn.weight, neck.bn.bias, neck.bn.running_mean, neck.bn.running_var")


def test_any_timm_architecture_from_a_local_state_dict(tiny_shards: Path, tmp_path: Path) -> None:
    network = timm.create_model("resnet18", pretrained=False)  # with its 1000-way fc, as timm saves it
    state = _randomise(network)
    save_file(state, str(tmp_path / "resnet18.safetensors"))
    model, meta = load_model(tmp_path / "resnet18.safetensors", ModelSource("timm:resnet18"))
    _assert_state(model.backbone, {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert meta["input_size"] == [224, 224] and meta["feature_dim"] == 512
    assert "2 file tensors unused" in meta["notes"][0]  # fc.weight and fc.bias: num_classes=0
    _run(tiny_shards, tmp_path / "resnet18.safetensors", tmp_path / "out", "--model", "timm:resnet18")
    # the features are timm's pooled output of the normalised test images
    query = IndexedShards(tiny_shards / "synthetic_person" / "query",
                          build_transforms(TransformConfig(height=224, width=224, mean=meta["mean"],
                                                           std=meta["std"]), train=False))
    images = Normalize(meta["mean"], meta["std"])(torch.stack([query[i]["image"] for i in range(3)]))
    network.reset_classifier(0)
    with torch.no_grad():
        expected = network.eval()(images)
    saved = load_file(str(tmp_path / "out" / "features.safetensors"))["query_features"][:3]
    assert torch.allclose(saved, expected, rtol=1e-4, atol=1e-5)
    # a ViT: the class token after the final norm, from a plain torch file
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    vit_state = _randomise(vit)
    torch.save(vit_state, tmp_path / "vit.pth")
    model, meta = load_model(tmp_path / "vit.pth", ModelSource("timm:vit_tiny_patch16_224"))
    _assert_state(model.backbone, vit_state)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), vit.eval()(x)) and model(x).shape == (2, 192)


@pytest.mark.parametrize("extra, message", [
    (["--model-options", "{}"], "error: --model-options goes with --model"),
    (["--allow-partial"], "error: --allow-partial goes with --model"),
    (["--model", "osnet", "--model-options", "[1]"], "error: --model-options '[1]': expected a JSON object"),
    (["--model", "osnet", "--model-options", "{variant"], "error: --model-options '{variant': not JSON"),
    (["--model", "resnet5"], "error: --model 'resnet5': not a registered model (bot_resnet50"),
    (["--model", "timm:no_such_net"], "error: unknown timm architecture 'no_such_net'"),
    (["--model", "timm:resnet18", "--model-options", '{"pretrained": true}'],
     "error: timm:resnet18: option 'pretrained' is fixed here"),
    (["--model", "osnet_x0_25", "--model-options", '{"pooling": "max"}'],
     "error: --model-options pooling 'max': valid: avg, gem"),
    (["--model", "osnet", "--model-options", '{"width": 2}'],
     "error: model 'osnet': got an unexpected keyword argument 'width'; its options: variant, triplet"),
    (["--save-features", "feats.npy"], "error: --save-features feats.npy: expected a .safetensors file"),
    (["--model", "osnet", "--input-size", "0", "128"], "error: --input-size 0 128: expected two positive integers"),
    (["--model", "osnet", "--input-size", "-256", "128"],
     "error: --input-size -256 128: expected two positive integers"),
    (["--model", "osnet", "--input-size", "256", "12.8"],
     "error: --input-size 256 12.8: expected two positive integers"),
    (["--input-size", "256x128", "64"], "error: --input-size 256x128 64: expected two positive integers"),
    (["--model", "osnet_x0_25", "--input-size", "2", "1"],
     "error: --input-size 2 1: osnet_x0_25 does not run at that size (Given input size: (64x1x1)"),
    (["--model", "timm:vit_tiny_patch16_224", "--model-options", '{"img_size": 224}', "--input-size", "256", "128"],
     "error: --input-size 256 128: timm:vit_tiny_patch16_224 does not run at that size (Input height (256) doesn't "
     "match model (224)"),
])
def test_bad_combinations_fail_in_one_line_before_any_image(tiny_shards: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch, extra: list[str],
                                                            message: str) -> None:
    monkeypatch.setattr(evaluate, "embed_split", lambda *a, **k: pytest.fail("an image was read"))
    weights = _torchreid(tmp_path / "model.pth", build_model("osnet", 3, **OSNET).state_dict())
    person = tiny_shards / "synthetic_person"
    assert evaluate.main(["--weights", str(weights), "--query", str(person / "query"), "--gallery",
                          str(person / "gallery"), "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err


def test_files_that_name_their_model_or_none_fail_in_one_line(tmp_path: Path) -> None:
    model = build_model("osnet", 3, **OSNET)
    export = _export(model, tmp_path / "model_final.safetensors", "osnet", OSNET, 3, (32, 16))
    with pytest.raises(ConfigError, match=r"--model osnet: .* is a reidforge model export of 'osnet', which names its "
                                        r"own model: drop --model"):
        load_model(export, ModelSource("osnet"))
    torch.save(model.state_dict(), tmp_path / "foreign.pth")
    with pytest.raises(WeightsError, match="neither a reidforge export nor a training checkpoint .* name its model "
                                           "with --model NAME"):
        load_model(tmp_path / "foreign.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="a directory without model.safetensors"):
        load_model(tmp_path / "empty")


def test_export_onnx_takes_a_training_checkpoint_directory(tmp_path: Path) -> None:
    checkpoint, model, _ = _training_run(tmp_path, "coursework_resnet18", {}, 4, (64, 32))
    # random weights give features near 100: float32 rounding alone differs by ~1e-4 (export_onnx's docstring)
    result = export_onnx.export_onnx(checkpoint, tmp_path / "ckpt.onnx", tolerance=1e-3)
    assert result["max_abs_diff"] <= 1e-3
    session = OnnxEmbedder(tmp_path / "ckpt.onnx", ["CPUExecutionProvider"])
    assert session.metadata["source"] == "reidforge training checkpoint"
    assert session.metadata["architecture"] == "coursework_resnet18" and session.metadata["input_size"] == [64, 32]
    export = _export(model, tmp_path / "model_final.safetensors", "coursework_resnet18", {}, 4, (64, 32))
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 80, 40), dtype=np.uint8)
    reference = TorchEmbedder(load_pipeline(export)[0])(images)
    assert np.abs(session(images) - reference).max() <= 1e-3


def test_search_takes_a_foreign_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(gallery / f"g{i}.png")
    model = build_model("osnet", 751, **OSNET)
    state = _randomise(model)
    file = _torchreid(tmp_path / "model.pth.tar-60", state)
    export = _export(model, tmp_path / "model_final.safetensors", "osnet", OSNET, 751, (256, 128))
    outputs, errs = [], []
    for weights, extra in ((file, ["--model", "osnet", "--model-options", json.dumps(OSNET)]), (export, [])):
        assert search.main(["--weights", str(weights), "--gallery", str(gallery), "--query", str(gallery / "g2.png"),
                            "--json", "--topk", "3", "--index", str(tmp_path / f"{weights.stem}.index"), *extra]) == 0
        out, err = capsys.readouterr()
        outputs.append(json.loads(out))
        errs.append(err)
    assert outputs[0] == outputs[1] and outputs[0][0]["matches"][0]["path"] == "g2.png"
    assert "note: features: osnet's own eval feature" in errs[0] and "note:" not in errs[1]
    # the index remembers which model read the file: another --model rebuilds it
    assert search.main(["--weights", str(file), "--gallery", str(gallery), "--query", str(gallery / "g2.png"),
                        "--index", str(tmp_path / "model.pth.index"), "--model", "osnet_x0_25"]) == 0
    assert "index: built" in capsys.readouterr().err


def _query_batch(shards: Path, size: tuple[int, int], mean: list[float], std: list[float]) -> torch.Tensor:
    """The normalised query images at ``size``, as evaluate.py feeds them."""
    query = IndexedShards(shards / "synthetic_person" / "query",
                          build_transforms(TransformConfig(height=size[0], width=size[1]), train=False))
    return Normalize(mean, std)(torch.stack([query[i]["image"] for i in range(len(query))]))


def test_input_size_runs_a_foreign_file_at_that_size_and_records_it(tiny_shards: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = build_model("osnet", 751, **OSNET)
    file = _torchreid(tmp_path / "model.pth.tar-60", _randomise(model))
    options = ["--model", "osnet", "--model-options", json.dumps(OSNET)]
    results = _run(tiny_shards, file, tmp_path / "out", *options, "--input-size", "128", "64")
    assert "note: input size 128x64 (--input-size)\n" in capsys.readouterr().out
    assert results["input_size"] == [128, 64]
    assert json.loads(read_header(tmp_path / "out" / "features.safetensors")["settings"])["input_size"] == [128, 64]
    with torch.no_grad():
        expected = model.eval()(_query_batch(tiny_shards, (128, 64), MEAN, STD))
    saved = load_file(str(tmp_path / "out" / "features.safetensors"))["query_features"]
    assert torch.allclose(saved, expected, rtol=1e-4, atol=1e-5)
    # without it, OSNet's own 256 x 128, and the note says how to change it
    assert _run(tiny_shards, file, tmp_path / "default", *options)["input_size"] == [256, 128]
    assert ("note: input size 256x128 (osnet's own; --input-size H W gives the size the file was trained at)"
            in capsys.readouterr().out)
    # the Python API takes it too: images already at that size pass the resize unchanged
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 128, 64, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"p{i}.png")
    extract = FeatureExtractor(file, device="cpu", model="osnet", model_options=OSNET, input_size=(128, 64),
                               note=lambda _: None)
    assert extract.input_size == (128, 64)
    batch = Normalize(MEAN, STD)(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    with torch.no_grad():
        want = torch.nn.functional.normalize(model(batch), dim=1)
    assert torch.allclose(extract(tmp_path), want, atol=1e-5)
    with pytest.raises(ConfigError, match=r"^input_size 0 64: expected two positive integers"):
        FeatureExtractor(file, device="cpu", model="osnet", model_options=OSNET, input_size=(0, 64))
    # search's saved index knows the size: another one rebuilds it
    index = ["--gallery", str(tmp_path), "--query", str(tmp_path / "p0.png"), "--index", str(tmp_path / "i.index")]
    for size, verdict in (("128", "built"), ("128", "reused"), ("96", "built")):
        assert search.main(["--weights", str(file), *options, "--input-size", size, "64", *index]) == 0
        assert f"index: {verdict}" in capsys.readouterr().err


def test_a_timm_vit_is_built_for_the_input_size(tiny_shards: Path, tmp_path: Path) -> None:
    # a ViT trained at 128 x 64: its position embedding holds the 8 x 4 patch grid
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=(128, 64))
    torch.save(_randomise(vit), tmp_path / "vit.pth")
    results = _run(tiny_shards, tmp_path / "vit.pth", tmp_path / "out", "--model", "timm:vit_tiny_patch16_224",
                   "--input-size", "128", "64")
    settings = json.loads(read_header(tmp_path / "out" / "features.safetensors")["settings"])
    assert results["input_size"] == settings["input_size"] == [128, 64]
    assert settings["options"] == {"img_size": [128, 64]}  # what the architecture was built with
    with torch.no_grad():
        expected = vit.eval()(_query_batch(tiny_shards, (128, 64), [0.5] * 3, [0.5] * 3))
    saved = load_file(str(tmp_path / "out" / "features.safetensors"))["query_features"]
    assert torch.allclose(saved, expected, rtol=1e-4, atol=1e-5)
    # a 224 x 224 file does not fit that grid: one line with both ways out ...
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(),
               tmp_path / "vit224.pth")
    with pytest.raises(WeightsError, match=r"pos_embed \(1, 197, 192\) -> backbone.pos_embed \(1, 33, 192\).*built "
                                           r"for --input-size 128 64 with timm's img_size.*dynamic_img_size"):
        load_model(tmp_path / "vit224.pth", ModelSource("timm:vit_tiny_patch16_224", input_size=(128, 64)))
    # ... of which dynamic_img_size resamples its position embedding for the size
    model, meta = load_model(tmp_path / "vit224.pth",
                             ModelSource("timm:vit_tiny_patch16_224", {"dynamic_img_size": True}, input_size=(128, 64)))
    assert meta["input_size"] == [128, 64] and model(torch.zeros(1, 3, 128, 64)).shape == (1, 192)


def test_our_files_keep_the_input_size_they_record(tmp_path: Path) -> None:
    checkpoint, model, _ = _training_run(tmp_path, "osnet", OSNET, 5, (32, 16))
    export = _export(model, tmp_path / "model_final.safetensors", "osnet", OSNET, 5, (32, 16))
    backbone = build_backbone("osnet_x0_25")
    spcl = tmp_path / "backbone_final.safetensors"
    export_model(backbone, spcl, {"kind": "backbone", "architecture": "osnet_x0_25", "options": {},
                                  "feature_dim": backbone.out_channels, "input_size": [32, 16], "mean": MEAN,
                                  "std": STD})
    for path, what in ((export, "reidforge model export"), (checkpoint, "reidforge training checkpoint"),
                       (spcl, "reidforge backbone export")):
        assert load_model(path, ModelSource(input_size=(32, 16)))[1]["input_size"] == [32, 16]  # repeated: fine
        with pytest.raises(ConfigError, match=rf"^--input-size 64 32: .* is a {what}.* trained at 32 16, which it "
                                              r"records: drop --input-size$"):
            load_model(path, ModelSource(input_size=(64, 32)))
    # a backbone export that records no size takes the one given
    export_model(backbone, spcl, {"kind": "backbone", "architecture": "osnet_x0_25", "options": {},
                                  "feature_dim": backbone.out_channels, "mean": MEAN, "std": STD})
    assert load_model(spcl, ModelSource(input_size=(64, 32)))[1]["input_size"] == [64, 32]


def _kind_file(kind: str, root: Path) -> tuple[Path, list[str]]:
    """A file of each kind evaluate.py opens without a head of ours, and the flags that open it."""
    if kind == "spcl":
        backbone = build_backbone("osnet_x0_25")
        _randomise(backbone)
        path = root / "backbone_final.safetensors"
        export_model(backbone, path, {"kind": "backbone", "architecture": "osnet_x0_25", "options": {},
                                      "feature_dim": backbone.out_channels, "input_size": [128, 64], "mean": MEAN,
                                      "std": STD})
        return path, []
    if kind == "osnet_x0_25":
        network = build_backbone(kind)
    else:  # a timm file: the ViT trained at the size it is evaluated at
        options = {"img_size": (128, 64)} if "vit" in kind else {}
        network = timm.create_model(kind.removeprefix("timm:"), pretrained=False, num_classes=0, **options)
    torch.save(_randomise(network), root / "model.pth")
    return root / "model.pth", ["--model", kind, "--input-size", "128", "64"]


@pytest.mark.parametrize("kind, layer", [("spcl", "backbone"), ("osnet_x0_25", "backbone"),
                                         ("timm:resnet18", "backbone.layer4"),
                                         ("timm:vit_tiny_patch16_224", "backbone.blocks.11.norm1")])
def test_gradcam_of_every_model_kind(tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                     layer: str) -> None:
    drawn = []
    overlay = evaluate.cam_overlay

    def keep(images: list[np.ndarray], maps: torch.Tensor, path: Path, **kwargs: Any) -> Path:
        drawn.append((maps, kwargs["layer"]))
        return overlay(images, maps, path, **kwargs)

    monkeypatch.setattr(evaluate, "cam_overlay", keep)
    path, flags = _kind_file(kind, tmp_path)
    _run(tiny_shards, path, tmp_path / "out", *flags, "--pictures", "gradcam")
    ((maps, name),) = drawn
    assert name == layer and maps.shape == (5, 128, 64) and flat_maps(maps) == []
    assert (tmp_path / "out" / "gradcam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vit_tokens_are_laid_out_on_their_patch_grid() -> None:
    model = build_timm_pooled("vit_tiny_patch16_224", (64, 32))  # a 4 x 2 grid of 16-pixel patches
    tokens = torch.arange(9.0)[None, :, None].expand(2, 9, 3)  # the class token (0), then the patches row by row
    grid = model.cam_reshape(tokens)
    assert grid.shape == (2, 3, 4, 2) and grid[1, 2].tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]


def test_gradcam_without_a_feature_map_is_a_note_not_a_blank_picture(tiny_shards: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    levit = timm.create_model("levit_128s", pretrained=False, num_classes=0)  # tokens from a conv stem, no grid
    torch.save(levit.state_dict(), tmp_path / "levit.pth")
    _run(tiny_shards, tmp_path / "levit.pth", tmp_path / "out", "--model", "timm:levit_128s", "--pictures", "gradcam")
    assert ("note: no gradcam.png: LevitDistilled's last features are (1, 16, 384): neither an image-shaped map nor "
            "tokens of a patch embedding that gives their grid, so nothing to lay over the image\n"
            in capsys.readouterr().out)
    assert not (tmp_path / "out" / "gradcam.png").exists()


def test_a_run_of_an_earlier_version_loads_under_todays_key_names(tmp_path: Path) -> None:
    checkpoint, _, state = _training_run(tmp_path, "osnet", OSNET, 5, (32, 16))
    config = tmp_path / "run" / "config.yaml"
    text = config.read_text()
    assert "\niters_per_epoch:" in text and "\n  train:" in text
    config.write_text(text.replace("\niters_per_epoch:", "\nmax_iters_per_epoch:").replace("\n  train:", "\n  splits:"))
    loaded, meta = load_model(checkpoint / "model.safetensors")
    _assert_state(loaded, state)
    assert (meta["architecture"], meta["input_size"]) == ("osnet", [32, 16])
