"""MBR-4B and LKA-ReID: parameter and MAC counts against models.md §5-§6 and LKA-ReID's Table II, the
swapped modules, LAI, the train/eval contract, and the tiny (ResNet-18) trunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import reidforge.finetune.engine as engine
import reidforge.finetune.protocols as protocols
from conftest import ToySource
from reidforge.data.shards import WriteOptions, write_split
from reidforge.data.transforms import Normalize, TransformConfig
from reidforge.finetune.evaluate import main as evaluate_main
from reidforge.finetune.losses import Criterion
from reidforge.finetune.models import build_model
from reidforge.finetune.models.lka_reid import HCA, LKA, VANAttention, eca_kernel_size
from reidforge.finetune.models.mbr import MHSA
from reidforge.shared.backbones import build_backbone
from reidforge.shared.complexity import count_macs, count_params
from reidforge.shared.config import ConfigError, load_config
from reidforge.shared.weights import export_model

VERI_IDS = 575
LAI = {"trunk": "resnet18", "input_size": [64, 64], "n_cams": 3, "n_views": 8}
# Test images without an orientation (viewid -1), by split, as VeRi's test images absent from MBR's
# viewpoint_test list.
NO_VIEW = {"query": {1, 6}, "gallery": {5, 13, 14, 20}}


def _meta(name: str, num_classes: int = VERI_IDS, **options) -> nn.Module:
    with torch.device("meta"):  # shapes only: counting needs neither memory nor compute
        return build_model(name, num_classes, **options)


def test_mbr_4b_parameter_count_matches_models_md() -> None:
    model = _meta("mbr_4b")
    assert count_params(model) == 61_440_064  # models.md §5 and LKA-ReID Table II's baseline (61.44M)
    assert count_params(model, trainable_only=False) == 61_448_256  # + the 4 frozen BNNeck biases
    assert count_params(model.branches[0]) == 14_964_736 and count_params(model.branches[2]) == 10_301_952
    assert count_params(_meta("mbr_4b", n_cams=20, n_views=8)) - 61_440_064 == 1_310_720  # LAI on VeRi
    assert count_params(_meta("mbr_4b", n_cams=20)) - 61_440_064 == 4 * 20 * 2048
    assert count_params(_meta("mbr_4b", num_classes=0)) == 61_440_064 - 2 * 2048 * VERI_IDS


@pytest.mark.parametrize(("options", "expected", "table_ii"), [
    ({"lka": False, "hca": False}, 61_440_064, 61.44e6),
    ({"hca": False}, 61_575_232, 61.57e6),  # +6 x 22,528: VAN units in place of MHSA
    ({"lka": False}, 47_284_348, 47.29e6),  # -6 x 3x3 512x512 conv weights, +6 x 10 HCA weights
    ({}, 47_419_516, 47.42e6),
])
def test_lka_reid_reproduces_table_ii_parameters(options: dict, expected: int, table_ii: float) -> None:
    params = count_params(_meta("lka_reid", **options))
    assert params == expected
    assert abs(params - table_ii) / table_ii < 0.01


def test_lka_reid_mac_deltas_against_table_ii() -> None:
    macs = {key: count_macs(_meta("lka_reid", **options), (256, 256)) / 1e9 for key, options in
            {"base": {"lka": False, "hca": False}, "lka": {"hca": False}, "hca": {"lka": False}, "both": {}}.items()}
    assert macs["base"] == pytest.approx(12.236, abs=1e-3)  # models.md §5 (Table II prints 14.44)
    assert macs["lka"] - macs["base"] == pytest.approx(-0.546, abs=1e-3)  # Table II: 13.89 - 14.44 = -0.55
    # Six 3x3 convs at 8x8 (or at 16x16 with stride 2): -0.906G; Table II prints -0.19G (see lka_reid.py).
    assert macs["hca"] - macs["base"] == pytest.approx(-0.906, abs=1e-3)
    assert macs["both"] - macs["base"] == pytest.approx(-0.546 - 0.906, abs=2e-3)


def test_lka_and_hca_replace_the_modules_the_counts_point_to() -> None:
    model = _meta("lka_reid")
    for branch in model.branches[2:]:  # L branches = MBR's BoT branches
        assert [type(block.attention) for block in branch] == [VANAttention] * 3
    for branch in model.branches[:2]:  # H branches = MBR's R50 branches
        assert not [m for m in branch.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert isinstance(branch[0].conv2[0], HCA) and isinstance(branch[0].conv2[1], nn.AvgPool2d)
        assert [type(block.conv2) for block in branch[1:]] == [HCA, HCA]
    assert not [m for m in model.modules() if isinstance(m, MHSA)]
    assert [type(block.attention) for block in _meta("mbr_4b").branches[2]] == [MHSA] * 3


def test_lka_is_a_23x23_kernel_of_5x5_and_dilated_7x7_depthwise_convs() -> None:
    lka = LKA(4)
    assert count_params(lka) == 4 * 26 + 4 * 50 + 4 * 5
    for conv in (lka.conv0, lka.conv_spatial, lka.conv1):
        nn.init.ones_(conv.weight)
        nn.init.zeros_(conv.bias)
    impulse = torch.zeros(1, 4, 31, 31)
    impulse[0, :, 15, 15] = 1
    with torch.no_grad():
        support = lka.conv1(lka.conv_spatial(lka.conv0(impulse)))[0, 0] != 0
    rows, cols = support.nonzero().unbind(1)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 26, 4, 26)  # 23 x 23 around the centre


def test_van_attention_follows_eqs_1_to_3() -> None:
    torch.manual_seed(0)
    van = VANAttention(8).eval()
    x = torch.randn(2, 8, 6, 6)
    f = van.proj_1(nn.functional.gelu(x))  # Eq. 1: GELU before the 1x1 conv
    attention = van.spatial_gating_unit.conv1(van.spatial_gating_unit.conv_spatial(van.spatial_gating_unit.conv0(f)))
    assert torch.allclose(van(x), van.proj_2(attention * f) + x, atol=1e-6)  # Eqs. 2-3


def test_eca_kernel_sizes_follow_eq_4() -> None:
    assert [eca_kernel_size(c) for c in (64, 256, 512, 1024, 2048)] == [5, 5, 5, 7, 7]


def test_hca_mixes_local_and_global_channel_attention_per_image() -> None:
    torch.manual_seed(0)
    hca = HCA(512)
    assert count_params(hca) == 2 * 5
    for conv in (hca.conv_local, hca.conv_global):  # identity 1-D kernels: attention = sigmoid(pooled)
        nn.init.zeros_(conv.weight)
        conv.weight.data[..., 2] = 1
    x = torch.randn(3, 512, 10, 10)
    with torch.no_grad():
        out = hca(x)
        local = torch.sigmoid(nn.functional.adaptive_avg_pool2d(x, 5))
        glob = torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))
        expected = x * nn.functional.adaptive_avg_pool2d(0.5 * local + 0.5 * glob, (10, 10))
        assert torch.allclose(out, expected, atol=1e-6)
        assert torch.allclose(hca(x[1:2]), out[1:2], atol=1e-6)  # no mixing across the batch (MLCA's bug)
        # The local conv runs over one sequence laid out cell by cell, C values per cell (MLCA's layout):
        # a kernel that reads the next value takes channel 0 of the next cell at each cell's last channel.
        hca.conv_local.weight.data = torch.tensor([[[0.0, 0, 0, 1, 0]]])
        sequence = nn.functional.adaptive_avg_pool2d(x, 5).flatten(2).transpose(1, 2).reshape(3, -1)
        shifted = torch.cat([sequence[:, 1:], torch.zeros(3, 1)], dim=1)
        local = torch.sigmoid(shifted).view(3, 25, 512).transpose(1, 2).reshape(3, 512, 5, 5)
        expected = x * nn.functional.adaptive_avg_pool2d(0.5 * local + 0.5 * glob, (10, 10))
        assert torch.allclose(hca(x), expected, atol=1e-6)


def test_mhsa_is_botnet_attention_without_scaling() -> None:
    torch.manual_seed(0)
    mhsa = MHSA(8, (2, 3), heads=2)
    x = torch.randn(2, 8, 2, 3)
    q, k, v = (p(x).view(2, 2, 4, 6) for p in (mhsa.query, mhsa.key, mhsa.value))
    pos = (mhsa.rel_h + mhsa.rel_w).view(1, 2, 4, 6)
    energy = torch.einsum("nhdi,nhdj->nhij", q, k) + torch.einsum("hdi,nhdj->nhij", pos[0], q)
    expected = torch.einsum("nhdj,nhij->nhdi", v, energy.softmax(-1)).reshape(2, 8, 2, 3)
    assert torch.allclose(mhsa(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"position logits are \(2, 3\)"):
        mhsa(torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize("name", ["mbr_4b", "lka_reid"])
def test_train_outputs_feed_every_loss_and_reach_every_branch(name: str) -> None:
    torch.manual_seed(0)
    # 64 x 64 keeps the test fast; MBR's position tensors follow the layer3 map (4 x 4 here, 16 x 16 at 256).
    model = build_model(name, 5, input_size=(64, 64), n_cams=3, n_views=2)
    pids = torch.tensor([0, 0, 1, 1])
    camids, viewids = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, 1, 0])
    outputs = model(torch.randn(4, 3, 64, 64), camids=camids, viewids=viewids)
    for term in model.loss_terms:
        assert outputs[term.input].shape == ((4, 5) if term.loss == "ce" else (4, 2048))
    assert [(t.loss, t.weight) for t in model.loss_terms] == [
        ("ce", 0.6), ("triplet", 1.0), ("ce", 0.4), ("triplet", 0.4)]
    dims = {k: v.shape[1] for k, v in outputs.items()}
    loss, _ = Criterion(model.loss_terms, 5, dims)(outputs, pids)
    loss.backward()
    for part in (model.backbone, *model.branches, model.necks[0], model.necks[2]):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    unreached = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert unreached == {"necks.1.bn.weight", "necks.3.bn.weight"}  # triplet branches: BN for inference only
    assert model.lai.grad[:, camids * 2 + viewids].abs().sum() > 0

    model.eval()
    with torch.no_grad():
        feature = model(torch.randn(2, 3, 64, 64), camids=camids[:2], viewids=viewids[:2])
    assert feature.shape == (2, model.feature_dim) == (2, 8192)
    norms = feature.view(2, 4, 2048).norm(dim=2)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # each branch L2-normalised


def test_lai_embeds_camera_and_view_and_rejects_bad_ids() -> None:
    torch.manual_seed(0)
    model = build_model("mbr_4b", 0, input_size=(64, 64), n_cams=2, n_views=3).eval()
    assert model.loss_terms and all(t.loss == "triplet" for t in model.loss_terms)
    with torch.no_grad():
        model.lai.normal_()
        x = torch.randn(1, 3, 64, 64).expand(2, -1, -1, -1)
        same_image = model(x, camids=torch.tensor([0, 1]), viewids=torch.tensor([2, 2]))
    assert not torch.allclose(same_image[0], same_image[1])
    with pytest.raises(ValueError, match="forward needs camids"):
        model(x)
    with pytest.raises(ValueError, match=r"viewids must lie in \[0, 3\)"):
        model(x, camids=torch.tensor([0, 1]), viewids=torch.tensor([-1, 2]))


def test_input_size_must_suit_the_strides() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("mbr_4b", 0, input_size=(256, 200))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mbr_4b", "lka_reid"])
def test_full_size_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10)
    outputs = model(torch.randn(2, 3, *model.input_size))
    assert model.input_size == (256, 256) and {v.shape[1] for k, v in outputs.items() if k.endswith("/feat")} == {2048}
    sum(v.pow(2).mean() for v in outputs.values()).backward()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 8192)


def test_tiny_trunk_scales_the_branches_to_its_channels() -> None:
    mbr = _meta("mbr_4b", trunk="resnet18")
    assert count_params(mbr) == 21_478_208
    # The position tensors follow the layer3 map: smaller at 64 x 64.
    assert count_params(_meta("mbr_4b", trunk="resnet18", input_size=(64, 64))) == 21_459_776
    assert count_params(_meta("mbr_4b", trunk="resnet18", n_cams=20, n_views=8)) - 21_478_208 == 4 * 160 * 512
    assert [count_params(b) for b in mbr.branches] == [8_393_728, 8_393_728, 658_560, 658_560]
    bot = mbr.branches[2]
    assert [(b.conv1.in_channels, b.conv1.out_channels, b.conv3.out_channels) for b in bot] == [
        (256, 128, 512), (512, 128, 512), (512, 128, 512)]  # layer3's width in, D / 4 planes, D out
    assert bot[0].attention.query.in_channels == 128 and mbr.feature_dim == 4 * 512
    assert {neck.bn.num_features for neck in mbr.necks} == {512}

    lka = _meta("lka_reid", trunk="resnet18")
    assert count_params(lka) == 12_074_856
    assert count_params(_meta("lka_reid", trunk="resnet18", lka=False, hca=False)) == 21_478_208
    for branch in lka.branches[:2]:  # basic blocks: HCA takes conv2, conv1 (with the first block's stride) stays
        assert [type(block.conv2) for block in branch] == [HCA, HCA]
        assert [(block.conv1.kernel_size, block.conv1.stride) for block in branch] == [((3, 3), (2, 2)),
                                                                                        ((3, 3), (1, 1))]
    assert [type(block.attention) for block in lka.branches[2]] == [VANAttention] * 3


@pytest.mark.parametrize("name", ["mbr_4b", "lka_reid"])
def test_tiny_trunk_trains_and_gives_the_2048_d_feature(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 5, trunk="resnet18", input_size=(64, 64), n_cams=3, n_views=2)
    camids, viewids = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, 1, 0])
    outputs = model(torch.randn(4, 3, 64, 64), camids=camids, viewids=viewids)
    assert {k: v.shape[1] for k, v in outputs.items()} == {
        **{f"{b}/feat": 512 for b in model.branch_names}, f"{model.branch_names[0]}/logits": 5,
        f"{model.branch_names[2]}/logits": 5}
    loss, _ = Criterion(model.loss_terms, 5, {k: v.shape[1] for k, v in outputs.items()})(
        outputs, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    unreached = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert unreached == {"necks.1.bn.weight", "necks.3.bn.weight"}
    model.eval()
    with torch.no_grad():
        feature = model(torch.randn(2, 3, 64, 64), camids=camids[:2], viewids=viewids[:2])
    assert feature.shape == (2, model.feature_dim) == (2, 2048)


@pytest.mark.parametrize(("name", "options"), [("mbr_4b", {}), ("lka_reid", {"hca": False}), ("lka_reid", {})])
def test_trunk_map_sends_the_backbone_to_both_r50_branches(name: str, options: dict) -> None:
    torch.manual_seed(0)
    source = build_backbone("resnet18")
    model = build_model(name, 0, trunk="resnet18", input_size=(64, 64), **options)
    keys = model.trunk_keys()
    weights = source.state_dict()
    assert set(keys.values()) <= set(weights) and all(model.state_dict()[k].shape == weights[v].shape
                                                      for k, v in keys.items())
    hca = name == "lka_reid" and options.get("hca", True)
    replaced = {f"layer4.{block}.conv2.weight" for block in (0, 1)} if hca else set()  # HCA's 3x3 convs
    for branch in ("branches.0.", "branches.1."):
        assert set(weights) - {v for k, v in keys.items() if k.startswith(("backbone.", branch))} == replaced
    assert not any(k.startswith(("branches.2.", "branches.3.", "necks.")) for k in keys)  # BoT blocks: new
    assert not any(".conv2.conv_" in k for k in keys)  # nor are the HCA units
    model.load_state_dict({k: weights[v] for k, v in keys.items()}, strict=False)
    assert all(torch.equal(branch[1].conv1.weight, source.layer4[1].conv1.weight) for branch in model.branches[:2])
    assert torch.equal(model.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)


def test_trunk_must_be_resnet_family() -> None:
    with pytest.raises(ValueError, match="not a ResNet-family backbone"):
        _meta("mbr_4b", trunk="osnet_x0_25")


class _Views(ToySource):
    """``ToySource`` samples ``indices`` (all by default), with orientation bins i % 8 except for ``no_view``."""

    def __init__(self, n: int, no_view: set[int], indices: list[int] | None = None):
        super().__init__(n)
        self.no_view, self.indices = no_view, list(range(n)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, i: int) -> str:
        return super().key(self.indices[i])

    def image(self, i: int) -> tuple[bytes, str]:
        return super().image(self.indices[i])

    def meta(self, i: int) -> dict:
        j = self.indices[i]
        return {**super().meta(j), "viewid": None if j in self.no_view else j % 8}


@pytest.fixture(scope="module")
def view_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train, query and gallery with some images lacking a view, and kept_query/kept_gallery: the same
    splits without those images."""
    root = tmp_path_factory.mktemp("lai_test")
    opts = WriteOptions(samples_per_shard=8, progress=False)
    write_split(_Views(16, set()), root / "train", "train", relabel=True, options=opts)
    for split, n in (("query", 12), ("gallery", 24)):
        write_split(_Views(n, NO_VIEW[split]), root / split, split, options=opts)
        kept = [i for i in range(n) if i not in NO_VIEW[split]]
        write_split(_Views(n, NO_VIEW[split], kept), root / f"kept_{split}", split, options=opts)
    return root


def test_lai_evaluation_drops_and_counts_test_images_without_a_view(view_splits: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    options = ", ".join(f"{k}: {v}" for k, v in LAI.items())
    cfg = load_config(engine.TrainConfig, None, [
        f"output_dir={tmp_path}", "run_name=lai", "model.name=mbr_4b", f"model.options={{{options}}}",
        f"data.train=[{view_splits / 'train'}]", f"data.query={view_splits / 'query'}",
        f"data.gallery={view_splits / 'gallery'}", "data.p=4", "data.k=4", "data.workers=0", "data.transform.height=64",
        "data.transform.width=64", "data.test_batch_size=5"])
    trainer = engine.Trainer(cfg)
    with torch.no_grad():
        trainer.accelerator.unwrap_model(trainer.model).lai.normal_()  # LAI rows that change the features
    capsys.readouterr()
    row = trainer._rank("test", str(view_splits / "query"), str(view_splits / "gallery"))  # raised on viewid -1 before
    out = capsys.readouterr().out
    assert f"LAI: dropped 2 of 12 images of {view_splits / 'query'}" in out
    assert f"LAI: dropped 4 of 24 images of {view_splits / 'gallery'}" in out
    assert "(0 without a camid, 4 without a viewid); 20 evaluated" in out
    alone = trainer._rank("test", str(view_splits / "kept_query"), str(view_splits / "kept_gallery"))
    assert (row["queries"], row["gallery"]) == (alone["queries"], alone["gallery"]) == (10, 20)
    assert {k: row[k] for k in ("mAP", "mINP", "R1", "R5", "R10")} == pytest.approx(
        {k: alone[k] for k in ("mAP", "mINP", "R1", "R5", "R10")}, abs=1e-6)
    assert "LAI" not in capsys.readouterr().out  # nothing dropped from the kept splits


def test_lai_ids_beyond_the_model_in_a_test_split_fail_in_one_line(view_splits: Path) -> None:
    model = build_model("mbr_4b", 0, **{**LAI, "n_views": 4}).eval()
    data = engine.DataConfig(workers=0, transform=TransformConfig(height=64, width=64))
    with pytest.raises(ConfigError, match="query has viewid 7 but model.options.n_views=4"):
        protocols.embed_split(model, view_splits / "query", data, Normalize(data.transform.mean, data.transform.std),
                           "cpu")


def test_evaluate_cli_drops_and_counts_images_without_a_view(view_splits: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = build_model("lka_reid", 4, **LAI)
    with torch.no_grad():
        model.lai.normal_()
    weights = tmp_path / "model_final.safetensors"
    export_model(model, weights, {"architecture": "lka_reid", "options": LAI, "num_classes": 4,
                                  "feature_dim": model.feature_dim, "input_size": [64, 64],
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                  "provenance": {"run": "test"}})
    results, printed = {}, {}
    for name in ("", "kept_"):
        out = tmp_path / (name or "all")
        assert evaluate_main(["--weights", str(weights), "--query", str(view_splits / f"{name}query"),
                              "--gallery", str(view_splits / f"{name}gallery"), "--workers", "0", "--device", "cpu",
                              "--out", str(out)]) == 0
        results[name] = json.loads((out / "results.json").read_text())
        printed[name] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LAI")]
    assert printed[""] == [
        f"LAI: dropped 2 of 12 images of {view_splits / 'query'} without the labels the model embeds "
        "(0 without a camid, 2 without a viewid); 10 evaluated",
        f"LAI: dropped 4 of 24 images of {view_splits / 'gallery'} without the labels the model embeds "
        "(0 without a camid, 4 without a viewid); 20 evaluated"]
    assert printed["kept_"] == []
    assert results[""]["num_valid_queries"] == results["kept_"]["num_valid_queries"] == 10
    for key in ("mAP", "mINP"):
        assert results[""][key] == pytest.approx(results["kept_"][key], abs=1e-6)
    assert results[""]["cmc"] == pytest.approx(results["kept_"]["cmc"], abs=1e-6)
