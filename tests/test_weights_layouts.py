"""Pretrained files in the layouts users really have reach every trunk tensor, through the documented command.

Each file is built here with random values from timm or torchvision (on the meta device where the network
is large: only names and shapes are taken) or from a key list checked against the reference code (IBN-Net
``ibnnet/resnet_ibn.py``, torchreid ``models/osnet.py``, the DM-OSNet authors' ``dmosnet.py``: the same
names as ours except where a rename is written out below), saved the way its source saves it (SpCL,
cluster-contrast-reid and OpenUnReID: ``save_checkpoint({'state_dict', 'epoch', 'best_mAP'})`` of a
DataParallel model, copied to ``model_best.pth.tar`` / ``model_best.pth``), loaded by
``finetune/train.py --config <recipe> model.weights=FILE epochs=0``, and every trunk tensor of the export
is compared by value with the file tensor it must come from (every copy of a duplicated stage).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

from reidforge.data.shards import WriteOptions, write_split
from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.finetune.models import build_model, load_exported_model
from reidforge.finetune.models.base import ReIDModel
from reidforge.finetune.train import main as train_main
from reidforge.pretrain.spcl import main as spcl_main
from reidforge.shared.backbones import build_backbone
from reidforge.shared.weights import WEIGHTS_REPORT, WeightsError, export_model, load_pretrained

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
CLASSES = 16  # identities of the train split below


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    cfg = SyntheticConfig(train_ids=CLASSES, images_per_train_id=6, test_ids=8, images_per_test_id=6, distractors=6)
    for split, source in build_sources(cfg)["synthetic_person"].items():
        write_split(source, root / split, split, relabel=split == "train", options=WriteOptions(progress=False))
    return root


def _random(spec: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random values at the names, shapes and dtypes of ``spec`` (BN counters as integers)."""
    return {k: torch.randn(v.shape) if v.is_floating_point() else torch.randint(0, 1000, v.shape)
            for k, v in spec.items()}


def _timm(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # names and shapes only: no memory, no init cost
        spec = timm.create_model(name, pretrained=False).state_dict()
    return _random(spec)


def _train(shards: Path, out: Path, weights: Path, *extra: str, config: str | None = None) -> tuple[int, Path]:
    args = ["--config", str(CONFIGS / config)] if config else []
    args += [f"model.weights={weights}", "epochs=0", f"output_dir={out}", "run_name=run", "data.workers=0",
             f"data.train=[{shards / 'train'}]", f"data.query={shards / 'query'}", f"data.gallery={shards / 'gallery'}",
             "data.val_query=''", "data.val_gallery=''", *extra]
    return train_main(args), out / "run"


def _assert_trunk_by_value(run: Path, source: dict[str, torch.Tensor], theirs: Callable[[str], str]) -> ReIDModel:
    """Every trunk tensor of the run's export equals the file tensor ``theirs(backbone key)``."""
    model, _ = load_exported_model(run / "model_final.safetensors")
    exported = model.state_dict()
    trunk = model.trunk_keys()
    wrong = [mk for mk, bk in trunk.items() if not torch.equal(exported[mk], source[theirs(bk)])]
    assert not wrong, f"{len(wrong)}/{len(trunk)} trunk tensors not from the file, e.g. {wrong[:3]}"
    report = json.loads((run / WEIGHTS_REPORT).read_text())
    assert report["counts"]["trunk_loaded"] == len(trunk) and not report["trunk_missing"]
    return model


def _same(key: str) -> str:
    return key


def test_torchvision_resnet50_into_bot(shards: Path, tmp_path: Path) -> None:
    sd = _random(torchvision.models.resnet50().state_dict())
    torch.save(sd, tmp_path / "resnet50-0676ba61.pth")
    rc, run = _train(shards, tmp_path, tmp_path / "resnet50-0676ba61.pth", config="bot_market.yaml")
    assert rc == 0
    _assert_trunk_by_value(run, sd, _same)
    report = json.loads((run / WEIGHTS_REPORT).read_text())
    assert "torchvision" in report["layout"] and report["unused"] == ["fc.weight", "fc.bias"]


CADENE = (("conv1.", "layer0.conv1."), ("bn1.", "layer0.bn1."))


def _renamer(pairs: tuple[tuple[str, str], ...], se: tuple[str, str]):
    """A key renaming between the timm and Cadene SE-ResNeXt layouts: stem prefixes, then the SE unit."""
    def rename(key: str) -> str:
        for src, dst in pairs:
            if key.startswith(src):
                return dst + key[len(src):]
        return key.replace(*se)
    return rename


_cadene = _renamer(CADENE, (".se.", ".se_module."))  # our timm-layout key -> its Cadene name
_timm_name = _renamer(tuple((b, a) for a, b in CADENE), (".se_module.", ".se."))  # and back


@pytest.mark.parametrize("legacy", [False, True])
def test_cadene_seresnext50_into_the_coursework_model_either_layout(shards: Path, tmp_path: Path, legacy: bool) -> None:
    # pretrainedmodels' se_resnext50_32x4d-a260b3a4.pth: a plain state dict, key for key timm's legacy model
    sd = _timm("legacy_seresnext50_32x4d")
    assert "layer0.conv1.weight" in sd and "layer1.0.se_module.fc1.weight" in sd
    torch.save(sd, tmp_path / "se_resnext50_32x4d-a260b3a4.pth")
    rc, run = _train(shards, tmp_path, tmp_path / "se_resnext50_32x4d-a260b3a4.pth", f"model.options.legacy={legacy}",
                     config="seresnext50_veri.yaml")
    assert rc == 0
    _assert_trunk_by_value(run, sd, _same if legacy else _cadene)


@pytest.mark.parametrize("legacy", [False, True])
def test_timm_seresnext50_into_the_coursework_model_either_layout(shards: Path, tmp_path: Path, legacy: bool) -> None:
    sd = _timm("seresnext50_32x4d")
    save_file(sd, str(tmp_path / "seresnext50_32x4d.safetensors"))  # timm's hub files are safetensors
    rc, run = _train(shards, tmp_path, tmp_path / "seresnext50_32x4d.safetensors", f"model.options.legacy={legacy}",
                     config="seresnext50_veri.yaml")
    assert rc == 0
    _assert_trunk_by_value(run, sd, _timm_name if legacy else _same)


def test_seresnext101_fills_both_fnc_branches(tmp_path: Path) -> None:
    """The FNC recipe's real trunk: both branches' layer3 tail and layer4 come from the file (the loader
    directly: a 108M-parameter export would cost more than the rest of this file)."""
    sd = _timm("seresnext101_32x4d")
    torch.save(sd, tmp_path / "seresnext101_32x4d.pth")
    model = build_model("fnc", 0)
    report = load_pretrained(model, tmp_path / "seresnext101_32x4d.pth")
    state, trunk = model.state_dict(), model.trunk_keys()
    for branch in ("spatial", "channel"):
        copies = [mk for mk in trunk if mk.startswith(f"{branch}.trunk.layer4.")]
        assert len(copies) == len([k for k in sd if k.startswith("layer4.")])
    assert all(torch.equal(state[mk], sd[bk]) for mk, bk in trunk.items())
    assert len(report.trunk_loaded) == len(trunk) and report.unused == ["fc.weight", "fc.bias"]


def test_ibn_net_resnet50_ibn_a(shards: Path, tmp_path: Path) -> None:
    # XingangPan/IBN-Net resnet50_ibn_a-d9d0bb7b.pth: torchvision names, bn1.IN / bn1.BN in layer1..3, fc
    spec = build_backbone("resnet50_ibn_a").state_dict()
    sd = _random({**spec, "fc.weight": torch.empty(1000, 2048), "fc.bias": torch.empty(1000)})
    assert "layer3.5.bn1.IN.weight" in sd and "layer4.0.bn1.weight" in sd
    torch.save(sd, tmp_path / "resnet50_ibn_a-d9d0bb7b.pth")
    rc, run = _train(shards, tmp_path, tmp_path / "resnet50_ibn_a-d9d0bb7b.pth", "model.name=bot_resnet50_ibn_a",
                     config="bot_market.yaml")
    assert rc == 0
    _assert_trunk_by_value(run, sd, _same)
    assert "IBN-Net" in json.loads((run / WEIGHTS_REPORT).read_text())["layout"]


def test_torchreid_checkpoint_with_its_head_and_training_state(shards: Path, tmp_path: Path) -> None:
    """torchreid's save_checkpoint: {'state_dict', 'epoch', 'rank1', 'optimizer'}, DataParallel keys; the
    fc-512 layer loads, the 751-way classifier is skipped and reported."""
    head = {"fc.0.weight": torch.empty(512, 512), "fc.0.bias": torch.empty(512), "fc.1.weight": torch.empty(512),
            "fc.1.bias": torch.empty(512), "fc.1.running_mean": torch.empty(512), "fc.1.running_var": torch.empty(512),
            "fc.1.num_batches_tracked": torch.zeros((), dtype=torch.long),
            "classifier.weight": torch.empty(751, 512), "classifier.bias": torch.empty(751)}
    sd = _random({**build_backbone("osnet_x1_0").state_dict(), **head})
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.0003, "params": [0]}]}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 150, "rank1": 0.94,
                "optimizer": optimizer}, tmp_path / "model.pth.tar-150")
    rc, run = _train(shards, tmp_path, tmp_path / "model.pth.tar-150", "model.name=osnet")
    assert rc == 0
    model = _assert_trunk_by_value(run, sd, _same)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in head if k.startswith("fc."))
    report = json.loads((run / WEIGHTS_REPORT).read_text())
    assert sorted(report["ignored"]) == ["epoch", "optimizer", "rank1"] and "module. stripped" in report["layout"]
    assert report["head_skipped"] == ["classifier.weight (751, 512) -> classifier.weight (16, 512)",
                                      "classifier.bias (751,) -> classifier.bias (16,)"]


def test_fastreid_checkpoint_fills_both_mbr_r50_branches(shards: Path, tmp_path: Path) -> None:
    sd = _random(torchvision.models.resnet18().state_dict())
    model = {f"module.backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 9},
                "iteration": 5}, tmp_path / "model_final.pth")
    rc, run = _train(shards, tmp_path, tmp_path / "model_final.pth", "data.transform.height=64",
                     "data.transform.width=64", config="lka_reid_tiny.yaml")
    assert rc == 0
    built = _assert_trunk_by_value(run, sd, _same)
    branches = {mk.split(".")[1] for mk in built.trunk_keys() if mk.startswith("branches.")}
    assert branches == {"0", "1"}
    report = json.loads((run / WEIGHTS_REPORT).read_text())
    assert report["layout"].startswith("FastReID checkpoint") and sorted(report["ignored"]) == [
        "iteration", "optimizer", "scheduler"]


_OUR_STREAM = re.compile(r"^(conv2\.\d\.conv2d)\.(conv1|attn|bn)\.")


def _authors(key: str) -> str:
    """Our DM-OSNet key -> the authors' (dmosnet.py: the stream is ``conv2d.0``, its attention ``attn2``)."""
    return _OUR_STREAM.sub(lambda m: f"{m.group(1)}.0.{'attn2' if m.group(2) == 'attn' else m.group(2)}.", key)


@pytest.mark.parametrize("recipe", ["dm_osnet_market.yaml", "dm_osnet_market_sbs.yaml"])
def test_dm_osnet_authors_fastreid_checkpoint_with_heads(shards: Path, tmp_path: Path, recipe: str) -> None:
    """Bag of tricks: the BNNeck BN and the linear classifier load; SBS: GeM's p too, while the
    CircleSoftmax weight has no place in the model (our circle proxies belong to the loss)."""
    spec = build_backbone("dm_osnet").state_dict()
    assert sum(_authors(k) != k for k in spec) == 58  # the two DL-MHSA streams of conv2
    sd = _random(spec)
    sbs = recipe.endswith("_sbs.yaml")
    bn = {s: torch.randn(512) for s in ("weight", "bias", "running_mean", "running_var")}
    heads = {**{f"heads.bottleneck.0.{s}": v for s, v in bn.items()}, "heads.weight": torch.randn(CLASSES, 512)}
    if sbs:
        heads["heads.pool_layer.p"] = torch.tensor([2.5])  # GeneralizedMeanPoolingP: a (1,) parameter
    torch.save({"model": {**{f"backbone.{_authors(k)}": v for k, v in sd.items()}, **heads}, "iteration": 24000},
               tmp_path / "model_best.pth")
    # epochs=0 leaves no room for the SBS schedule's delayed cosine, which this test does not reach
    schedule = ["optim.delay_epochs=0"] if sbs else []
    rc, run = _train(shards, tmp_path, tmp_path / "model_best.pth", "data.transform.height=64",
                     "data.transform.width=32", *schedule, config=recipe)
    assert rc == 0
    model = _assert_trunk_by_value(run, sd, _same)
    state = model.state_dict()
    assert all(torch.equal(state[f"neck.bn.{s}"], v) for s, v in bn.items())
    report = json.loads((run / WEIGHTS_REPORT).read_text())
    assert "DM-OSNet authors" in report["layout"] and report["ignored"] == ["iteration"]
    if sbs:
        assert state["pool.p"].item() == 2.5 and report["unused"] == ["heads.weight"]
    else:
        assert torch.equal(state["neck.classifier.weight"], heads["heads.weight"]) and not report["unused"]


def test_reid_strong_baseline_state_dict_with_cadene_trunk_and_bnneck(shards: Path, tmp_path: Path) -> None:
    """michuanhaohao/reid-strong-baseline's Baseline: ``base`` (a Cadene SENet), ``bottleneck``, ``classifier``."""
    sd = _timm("legacy_seresnext50_32x4d")
    head = {f"bottleneck.{s}": torch.randn(2048) for s in ("weight", "bias", "running_mean", "running_var")}
    head["classifier.weight"] = torch.randn(CLASSES, 2048)
    torch.save({**{f"base.{k}": v for k, v in sd.items() if not k.startswith("last_linear.")}, **head},
               tmp_path / "se_resnext50_model_120.pth")
    rc, run = _train(shards, tmp_path, tmp_path / "se_resnext50_model_120.pth", "model.name=bot_seresnext50",
                     config="bot_market.yaml")
    assert rc == 0
    state = _assert_trunk_by_value(run, sd, _cadene).state_dict()
    assert all(torch.equal(state[f"neck.bn.{s}"], head[f"bottleneck.{s}"]) for s in ("weight", "running_var"))
    assert torch.equal(state["neck.classifier.weight"], head["classifier.weight"])


# yxgeee/SpCL spcl/models/resnet.py (and cluster-contrast-reid's copy): self.base = nn.Sequential(conv1, bn1,
# relu, maxpool, layer1, layer2, layer3, layer4), so the module index replaces the torchvision name.
SPCL_INDEX = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def _spcl(key: str) -> str:
    """Our torchvision-layout key (or module name) -> its name in SpCL's ResNet."""
    module, dot, rest = key.partition(".")
    return f"base.{SPCL_INDEX[module]}{dot}{rest}"


def _bn1d(dim: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.randn(dim), "bias": torch.zeros(dim), "running_mean": torch.randn(dim),
            "running_var": torch.rand(dim) + 0.5, "num_batches_tracked": torch.tensor(4000)}


@pytest.mark.parametrize("source", ["spcl", "cluster_contrast", "openunreid"])
def test_unsupervised_reid_codebases_resnet50_into_bot(shards: Path, tmp_path: Path, source: str) -> None:
    """SpCL (examples/spcl_train_usl.py: ``models.create(..., num_classes=0)``, so ``base`` and ``feat_bn``),
    cluster-contrast-reid (the same class with GeM: ``gap.p``, its default ``--pooling-type gem``) and
    OpenUnReID (``ReIDBaseModel``: ``backbone``, ``global_pooling``, ``head.feat_bn``, ``classifier``)."""
    sd = _random(torchvision.models.resnet50().state_dict())
    trunk = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    bn = _bn1d(2048)
    extra: list[str] = []
    if source == "openunreid":
        theirs: Callable[[str], str] = lambda key: f"backbone.{key}"  # noqa: E731
        head = {**{f"head.feat_bn.{s}": v for s, v in bn.items()}, "global_pooling.p": torch.tensor([3.5]),
                "classifier.weight": torch.randn(CLASSES, 2048)}
    else:
        theirs = _spcl
        head = {f"feat_bn.{s}": v for s, v in bn.items()}
        if source == "cluster_contrast":
            head["gap.p"] = torch.tensor([3.5])  # GeneralizedMeanPoolingP: a (1,) parameter
    if "gap.p" in head or "global_pooling.p" in head:
        extra.append("model.options.pooling=gem")
    file = {**{theirs(k): v for k, v in trunk.items()}, **head}
    name = "model_best.pth" if source == "openunreid" else "model_best.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in file.items()}, "epoch": 50, "best_mAP": 0.731},
               tmp_path / name)
    rc, run = _train(shards, tmp_path, tmp_path / name, *extra, config="bot_market.yaml")
    assert rc == 0
    state = _assert_trunk_by_value(run, file, theirs).state_dict()
    assert all(torch.equal(state[f"neck.bn.{s}"], v) for s, v in bn.items())
    if extra:
        assert state["pool.p"].item() == 3.5
    if source == "openunreid":
        assert torch.equal(state["neck.classifier.weight"], head["classifier.weight"])
    report = json.loads((run / WEIGHTS_REPORT).read_text())
    assert report["layout"].startswith("training checkpoint ('state_dict'") and "module. stripped" in report["layout"]
    assert ("SpCL ResNet" in report["layout"]) == (source != "openunreid")
    assert sorted(report["ignored"]) == ["best_mAP", "epoch"] and report["unused"] == []


def test_spcl_uda_checkpoint_keeps_the_target_domain_bn_in_our_spcl(shards: Path, tmp_path: Path) -> None:
    """examples/spcl_train_uda.py saves the model with SpCL's DSBN (spcl/models/dsbn.py: every BatchNorm a
    ``BN_S`` / ``BN_T`` pair); its test.py keeps ``BN_T`` (``convert_bn(use_target=True)``), and so do we,
    here for the pretrain encoder (``pretrain/spcl.py model.weights=FILE``)."""
    sd = _random(build_backbone("resnet18").state_dict())
    bn_modules = {k.rsplit(".", 1)[0] for k in sd if k.endswith("running_mean")}
    file = {}
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1)
        if module in bn_modules:
            # BN_T first: the source domain's tensors come last and must still not win
            file[f"module.{_spcl(module)}.BN_T.{leaf}"] = value
            file[f"module.{_spcl(module)}.BN_S.{leaf}"] = torch.zeros_like(value)
        else:
            file[f"module.{_spcl(key)}"] = value
    file.update({f"module.feat_bn.BN_{d}.{s}": v for d in "ST" for s, v in _bn1d(512).items()})
    torch.save({"state_dict": file, "epoch": 50, "best_mAP": 0.5}, tmp_path / "model_best.pth.tar")
    rc = spcl_main(["--config", str(CONFIGS / "spcl_tiny.yaml"), "model.name=resnet18",
                    f"model.weights={tmp_path / 'model_best.pth.tar'}", "epochs=0", "bn_calibration_batches=0",
                    f"data.train=[{shards / 'train'}]", "data.query=''", "data.gallery=''", "data.p=4",
                    f"output_dir={tmp_path}", "run_name=spcl"])
    assert rc == 0
    exported = load_file(str(tmp_path / "spcl" / "backbone_final.safetensors"))
    assert exported.keys() == sd.keys() and all(torch.equal(exported[k], v) for k, v in sd.items())
    report = json.loads((tmp_path / "spcl" / WEIGHTS_REPORT).read_text())
    assert "SpCL DSBN: BN_T kept, BN_S dropped" in report["layout"] and "SpCL ResNet" in report["layout"]
    assert sorted(report["unused"]) == [f"feat_bn.{s}" for s in sorted(_bn1d(1))]


def test_dm_osnet_authors_dsbn_pretraining_file_onto_the_bare_encoder(tmp_path: Path) -> None:
    """The authors' loader strips ``module.backbone.`` and the ``dsbn.<domain>`` components of a SpCL
    checkpoint's state dict; the last domain wins. The pretrain encoder is a bare backbone."""
    spec = build_backbone("dm_osnet").state_dict()
    sd = _random(spec)
    bn_modules = {k.rsplit(".", 1)[0] for k in spec if k.endswith("running_mean")}
    file = {}
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1)
        if module in bn_modules:
            file[f"module.backbone.{_authors(module)}.dsbn.0.{leaf}"] = torch.zeros_like(value)
            file[f"module.backbone.{_authors(module)}.dsbn.1.{leaf}"] = value
        else:
            file[f"module.backbone.{_authors(key)}"] = value
    torch.save({"state_dict": file, "epoch": 40, "best_mAP": 0.5}, tmp_path / "checkpoint.pth.tar")
    encoder = build_backbone("dm_osnet")
    report = load_pretrained(encoder, tmp_path / "checkpoint.pth.tar", report_path=tmp_path / WEIGHTS_REPORT)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in sd.items())
    assert len(report.trunk_loaded) == len(spec) and "dsbn" in report.layout
    assert json.loads((tmp_path / WEIGHTS_REPORT).read_text())["counts"]["trunk_loaded"] == len(spec)


def test_our_own_exports_and_checkpoints(shards: Path, tmp_path: Path) -> None:
    # the pretrain stage's backbone export
    backbone = build_backbone("osnet_x0_25")
    backbone.load_state_dict(_random(backbone.state_dict()))
    export_model(backbone, tmp_path / "backbone_final.safetensors", {"kind": "backbone", "architecture": "osnet_x0_25"})
    sd = load_file(str(tmp_path / "backbone_final.safetensors"))
    rc, run = _train(shards, tmp_path / "a", tmp_path / "backbone_final.safetensors", "model.name=osnet",
                     "model.options={variant: osnet_x0_25}")
    assert rc == 0
    _assert_trunk_by_value(run, sd, _same)
    # a fine-tune export of the same architecture comes back whole, head included
    rc, again = _train(shards, tmp_path / "b", run / "model_final.safetensors", "model.name=osnet",
                       "model.options={variant: osnet_x0_25}")
    assert rc == 0
    first, second = load_file(str(run / "model_final.safetensors")), load_file(str(again / "model_final.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # a training checkpoint's model.safetensors (no metadata) of a two-branch model: each branch keeps its copy
    fnc = build_model("fnc", CLASSES, trunk="resnet18", input_size=[64, 64])
    fnc.load_state_dict(_random(fnc.state_dict()))
    state = {k: v.contiguous() for k, v in fnc.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    rc, run = _train(shards, tmp_path / "c", tmp_path / "model.safetensors", "data.transform.height=64",
                     "data.transform.width=64", config="fnc_tiny.yaml")
    assert rc == 0
    exported = load_file(str(run / "model_final.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in state.items())


def test_load_exported_model_is_exact(tmp_path: Path) -> None:
    model = build_model("osnet", 4, variant="osnet_x0_25")
    meta = {"architecture": "osnet", "num_classes": 4, "options": {"variant": "osnet_x0_25"}}
    export_model(model, tmp_path / "m.safetensors", meta)
    assert load_exported_model(tmp_path / "m.safetensors")[1] == meta
    del model.fc
    export_model(model, tmp_path / "cut.safetensors", meta)
    with pytest.raises(WeightsError, match=r"does not match its own architecture 'osnet' \(7 differences, "
                                           r"first: missing fc\.0\.weight\)"):
        load_exported_model(tmp_path / "cut.safetensors")


def test_a_partial_file_fails_in_one_line_unless_allowed(shards: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    sd = _random(torchvision.models.resnet50().state_dict())
    del sd["layer4.2.bn3.weight"]
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "partial.pth")
    rc, run = _train(shards, tmp_path, tmp_path / "partial.pth", config="bot_market.yaml")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err == (f"error: {tmp_path / 'partial.pth'} [training checkpoint ('state_dict': torchreid, SpCL), "
                   f"torchvision / timm ResNet]: 1 of 318 trunk tensors are not in the file and would stay at "
                   f"their init (first: layer4.2.bn3.weight); model.allow_partial=true accepts it")
    assert json.loads((run / WEIGHTS_REPORT).read_text())["trunk_missing"] == ["backbone.layer4.2.bn3.weight"]
    rc, run = _train(shards, tmp_path, tmp_path / "partial.pth", "model.allow_partial=true", config="bot_market.yaml")
    assert rc == 0
    exported = load_file(str(run / "model_final.safetensors"))
    assert all(torch.equal(exported[f"backbone.{k}"], v) for k, v in sd.items() if not k.startswith("fc."))


def test_a_file_for_another_trunk_or_with_code_is_refused(shards: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_random(torchvision.models.resnet18().state_dict()), tmp_path / "resnet18.pth")
    assert _train(shards, tmp_path, tmp_path / "resnet18.pth", config="bot_market.yaml")[0] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trunk tensors have another shape than the model's (first: layer1.0.conv1.weight " \
                                    "(64, 64, 3, 3) -> backbone.layer1.0.conv1.weight (64, 64, 1, 1))" in err
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": torch.nn.ReLU()}, tmp_path / "code.pth")
    assert _train(shards, tmp_path, tmp_path / "code.pth", config="bot_market.yaml")[0] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {tmp_path / 'code.pth'}: not loadable as plain tensors" in err


def test_pretrain_encoder_weights_take_the_same_loader(shards: Path, tmp_path: Path) -> None:
    """``pretrain/spcl.py ... model.weights=FILE``: the encoder is a bare backbone (identity trunk map)."""
    sd = _random(build_backbone("osnet_x0_25").state_dict())
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "osnet.pth.tar")
    rc = spcl_main(["--config", str(CONFIGS / "spcl_tiny.yaml"), "model.name=osnet_x0_25",
                    f"model.weights={tmp_path / 'osnet.pth.tar'}", "epochs=0", "bn_calibration_batches=0",
                    f"data.train=[{shards / 'train'}]", "data.query=''", "data.gallery=''", "data.p=4",
                    f"output_dir={tmp_path}", "run_name=spcl"])
    assert rc == 0
    exported = load_file(str(tmp_path / "spcl" / "backbone_final.safetensors"))
    assert exported.keys() == sd.keys() and all(torch.equal(exported[k], v) for k, v in sd.items())
    report = json.loads((tmp_path / "spcl" / WEIGHTS_REPORT).read_text())
    assert report["counts"]["trunk_loaded"] == len(sd) and report["ignored"] == ["epoch"]
