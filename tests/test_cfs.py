"""CFS (pretrain/cfs.py): the score, a streamed scoring pass over shards, the ranking the LUPerson adapter
reads, selection at training time, and inputs that must fail in one line."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ToySource
from PIL import Image
from torch import nn
from vehicle_fixtures import adapter_sources

from reidforge.data.datasets.luperson import cfs_selection, read_ranking
from reidforge.data.readers import decode
from reidforge.data.shards import WriteOptions, write_split
from reidforge.data.source import DatasetError
from reidforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, TransformConfig, build_transforms
from reidforge.pretrain.cfs import (RANKING, SCORES, SUMMARY, CFSError, ScoreConfig, catastrophic_forgetting_score,
                          cfs_keep_indices, load_embedder, main, score_pass, score_split, select_ranked, split_keys,
                          write_results)
from reidforge.shared.backbones import build_backbone
from reidforge.shared.heads import BNNeck, GeM
from reidforge.shared.weights import WeightsError, export_model

pytestmark = pytest.mark.filterwarnings("ignore::reidforge.data.source.CountMismatchWarning")

SIZE = [32, 16]
TOY_KEYS = [ToySource().key(i) for i in range(40)]


def test_score_is_the_cosine_of_the_two_features() -> None:
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[4.0, 3.0], [0.0, 2.0], [-2.0, -2.0], [5.0, 0.0], [1.0, 1.0], [2.0, -1.0]])
    # 24/25; orthogonal; opposite; same direction, other length; a zero feature; orthogonal again.
    assert catastrophic_forgetting_score(a, b).tolist() == pytest.approx([0.96, 0.0, -1.0, 1.0, 0.0, 0.0], abs=1e-7)
    assert catastrophic_forgetting_score(a, a).tolist()[:4] == pytest.approx([1.0] * 4, abs=1e-7)
    with pytest.raises(CFSError, match=r"two \(N, D\) feature batches of one shape, got \(6, 2\) and \(6, 3\)"):
        catastrophic_forgetting_score(a, torch.zeros(6, 3))


def _backbone(seed: int, arch: str = "osnet_x0_25") -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone(arch).eval()


def _save_pth(backbone: nn.Module, path: Path) -> Path:
    """A bare backbone state dict, as a torchvision/timm download is."""
    torch.save(backbone.state_dict(), path)
    return path


def _save_export(backbone: nn.Module, path: Path, **metadata: object) -> Path:
    """A fine-tune export: backbone keys under ``backbone.``, a BNNeck head beside them, metadata."""
    model = nn.Module()
    model.backbone, model.neck = backbone, BNNeck(backbone.out_channels, 5)
    export_model(model, path, {"architecture": "osnet", "options": {"variant": "osnet_x0_25"}, "input_size": SIZE,
                               "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **metadata})
    return path


def _score(split: Path, a: Path, b: Path, **kwargs: object) -> dict:
    return score_split(ScoreConfig(split_dir=split, pretrained=a, finetuned=b, arch=kwargs.pop("arch", "osnet_x0_25"),
                                   workers=0, progress=False, **kwargs))


def test_identical_models_score_one_through_the_cli(toy_split: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    backbone = _backbone(0)
    a = _save_pth(backbone, tmp_path / "a.pth")
    b = _save_export(backbone, tmp_path / "model_best.safetensors")
    assert main(["score", str(toy_split), "--arch", "osnet_x0_25", "--pretrained", str(a), "--finetuned", str(b),
                 "--workers", "0", "--batch-size", "16", "--no-progress"]) == 0
    assert "40 images scored (0 lost)" in capsys.readouterr().out

    assert split_keys(toy_split) == TOY_KEYS
    ranking = (toy_split / RANKING).read_text().splitlines()
    assert sorted(ranking) == sorted(TOY_KEYS)
    scores = np.load(toy_split / SCORES, allow_pickle=False)
    assert scores.dtype == np.float32 and scores.shape == (40,)
    assert scores == pytest.approx(np.ones(40), abs=1e-6)  # nothing forgotten: cosine 1 for every image
    summary = json.loads((toy_split / SUMMARY).read_text())
    assert (summary["scored"], summary["lost"], summary["input_size"], summary["arch"]) == (40, 0, SIZE, "osnet_x0_25")
    assert summary["formula"].startswith("CFS(x) = <f_A(x), f_B(x)>")
    assert summary["quantiles"]["q0.5"] == pytest.approx(1.0, abs=1e-6)
    assert summary["models"]["B"]["export"]["architecture"] == "osnet" and summary["models"]["A"]["export"] == {}
    assert summary["models"]["A"]["unused"] == 0 and summary["models"]["B"]["unused"] > 0  # the neck

    # The LUPerson adapter's parser reads our file, and selection keeps the top of it.
    assert read_ranking(toy_split / RANKING) == ranking
    kept = toy_split.parent / "kept.npy"
    assert main(["select", str(toy_split), "--keep", "0.25", "--out", str(kept)]) == 0
    assert "keep 10 of the 40 ranked samples" in capsys.readouterr().out
    assert np.load(kept).tolist() == sorted(TOY_KEYS.index(k) for k in ranking[:10])


def _expected(backbone: nn.Module, mean: list[float], std: list[float]) -> torch.Tensor:
    """Pooled features of every toy image, computed here without the shard pipeline."""
    resize = build_transforms(TransformConfig(height=SIZE[0], width=SIZE[1]), train=False)
    source = ToySource()
    images = torch.stack([resize(decode(source.image(i)[0])) for i in range(len(source))])
    with torch.no_grad():
        return backbone(Normalize(mean, std)(images)).mean(dim=(2, 3))


def test_different_models_rank_by_their_cosine(toy_split: Path, tmp_path: Path) -> None:
    # A from a bare state dict with ImageNet statistics; B an export normalised with 0.5 / 0.5.
    backbone_a, backbone_b = _backbone(0), _backbone(1)
    a = _save_pth(backbone_a, tmp_path / "a.pth")
    b = _save_export(backbone_b, tmp_path / "b.safetensors", mean=[0.5] * 3, std=[0.5] * 3)
    summary = _score(toy_split, a, b, batch_size=7)
    expected = catastrophic_forgetting_score(_expected(backbone_a, IMAGENET_MEAN, IMAGENET_STD),
                                             _expected(backbone_b, [0.5] * 3, [0.5] * 3)).numpy()
    scores = np.load(toy_split / SCORES)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(np.round(expected, 4))) > 30  # distinct scores: the order below is meaningful
    ranking = (toy_split / RANKING).read_text().splitlines()
    assert ranking == [TOY_KEYS[i] for i in np.argsort(-scores, kind="stable")]
    assert summary["models"]["B"]["mean"] == [0.5] * 3 and summary["models"]["A"]["mean"] == IMAGENET_MEAN

    # Model B's input size and statistics can be overridden; an override of the size changes the scores.
    _score(toy_split, a, b, size=(64, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dir=tmp_path)
    assert json.loads((tmp_path / SUMMARY).read_text())["models"]["B"]["std"] == IMAGENET_STD
    assert not np.allclose(np.load(tmp_path / SCORES), scores, atol=1e-3)


class MeanColour(nn.Module):
    """uint8 batch -> its mean RGB, channel-weighted: ``(1, 1, 0)`` is a model that forgot blue."""

    def __init__(self, weights: tuple[float, float, float]):
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3)) * self.weights


# Pool order; CFS under the pair above: |(r, g)| / |(r, g, b)|.
COLOURS = [(0, 0, 255), (255, 0, 0), (100, 100, 100), (0, 255, 0), (0, 100, 200), (200, 0, 100)]
COLOUR_CFS = [0.0, 1.0, math.sqrt(2 / 3), 1.0, 1 / math.sqrt(5), 2 / math.sqrt(5)]
LUP_KEYS = [f"00_00_0000_{i:08d}" for i in range(len(COLOURS))]


def test_forgotten_images_rank_last_and_the_luperson_adapter_keeps_the_best(tmp_path: Path) -> None:
    flat = tmp_path / "lup"
    flat.mkdir()
    for key, colour in zip(LUP_KEYS, COLOURS):
        Image.new("RGB", (4, 8), colour).save(flat / f"{key}.png")
    split = tmp_path / "shards" / "luperson" / "pool"
    pool = adapter_sources("luperson", "--root", str(flat))["luperson"]["pool"]
    write_split(pool, split, "pool", options=WriteOptions(samples_per_shard=4, progress=False))

    scores, keys, tally = score_pass(MeanColour((1, 1, 1)), MeanColour((1, 1, 0)), split, (8, 4), batch_size=4,
                                     workers=0, progress=False)
    assert (keys, tally.lost) == (LUP_KEYS, 0)
    assert scores.tolist() == pytest.approx(COLOUR_CFS, abs=1e-6)
    write_results(split, scores, keys, {})
    ranking = (split / RANKING).read_text().splitlines()
    # red and green tie at 1 and keep pool order; blue, all forgotten, is last.
    assert ranking == [LUP_KEYS[i] for i in (1, 3, 5, 2, 4, 0)]

    # ceil(0.5 * 6) = 3: the adapter keeps the same images, at build time, as cfs_keep_indices at train time.
    kept = adapter_sources("luperson", "--root", str(flat), "--cfs", str(split / RANKING), "--keep", "0.5")
    kept_pool = kept["luperson"]["pool"]
    assert [kept_pool.key(i) for i in range(len(kept_pool))] == [LUP_KEYS[i] for i in (1, 3, 5)]
    assert cfs_keep_indices(split, None, 0.5).tolist() == [1, 3, 5]


def test_keep_indices_from_text_and_pickle_rankings(toy_split: Path, tmp_path: Path) -> None:
    order = np.random.default_rng(0).permutation(40)
    text = tmp_path / "ranking.txt"
    text.write_text("".join(f"{TOY_KEYS[i]}\n" for i in order))
    for keep, count in ((0.5, 20), (0.3, 12), (0.26, 11), (1, 40), (0.01, 1)):
        kept = cfs_keep_indices(toy_split, text, keep)
        assert kept.tolist() == sorted(order[:count].tolist())
        assert kept.tolist() == cfs_selection(TOY_KEYS, read_ranking(text), keep, text)[0].tolist()

    # A released CFS_list.pkl: image names, some of images the split does not hold.
    released = tmp_path / "CFS_list.pkl"
    released.write_bytes(pickle.dumps([f"{TOY_KEYS[i]}.jpg" for i in order[:10]] + ["99_99_9999_00000001.jpg"]))
    with pytest.warns(UserWarning, match=r"CFS: 1 entries of the ranking .*CFS_list.pkl are not in .*train; ignored"):
        kept = cfs_keep_indices(toy_split, released, 0.3)
    assert kept.tolist() == sorted(order[:3].tolist())  # ceil(0.3 * 10 ranked), not ceil(0.3 * 11) nor 4
    selection = select_ranked(toy_split, released, 1.0)
    assert (selection.ranked, selection.unknown, selection.total) == (10, 1, 40)


def test_gem_exponent_loads_from_a_whole_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backbone = _backbone(0)
    model = nn.Module()
    model.backbone, model.pool = backbone, GeM(p=4.5)
    export_model(model, tmp_path / "gem.safetensors", {})
    embedder, report = load_embedder(tmp_path / "gem.safetensors", "osnet_x0_25", pooling="gem")
    assert embedder.pool.p.item() == 4.5 and report.head_loaded == ["pool.p"] and report.unused == []
    embedder, _ = load_embedder(_save_pth(backbone, tmp_path / "a.pth"), "osnet_x0_25", pooling="gem")
    assert embedder.pool.p.item() == 3.0
    assert "holds no GeM exponent (pool.p): using p = 3" in capsys.readouterr().out
    load_embedder(tmp_path / "gem.safetensors", "osnet_x0_25")
    assert "pools with GeM (pool.p) but the scoring pools with 'avg'" in capsys.readouterr().out


def test_models_a_and_b_in_the_layouts_the_training_stages_take(toy_split: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A as torchreid saves it (``{'state_dict', 'epoch'}``, DataParallel keys), B as FastReID does
    (``{'model', 'iteration'}``, ``backbone.`` / ``heads.``, GeM's p as ``heads.pool_layer.p``)."""
    backbone = _backbone(0)
    state = backbone.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 60}, tmp_path / "a.pth.tar")
    heads = {"heads.pool_layer.p": torch.tensor([4.0]), "heads.weight": torch.randn(5, backbone.out_channels)}
    torch.save({"model": {**{f"backbone.{k}": v for k, v in state.items()}, **heads}, "iteration": 900},
               tmp_path / "model_final.pth")
    assert main(["score", str(toy_split), "--arch", "osnet_x0_25", "--pretrained", str(tmp_path / "a.pth.tar"),
                 "--finetuned", str(tmp_path / "model_final.pth"), "--pooling", "gem", "--size", *map(str, SIZE),
                 "--workers", "0", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "holds no GeM exponent (pool.p): using p = 3" in out  # A has none; B's 4.0 loads
    # One backbone pooled with p = 3 and p = 4: close, but below the 1 (within 1e-7) of identical models.
    scores = np.load(tmp_path / SCORES)
    assert ((scores > 0.999) & (scores < 1 - 1e-6)).all()
    models = json.loads((tmp_path / SUMMARY).read_text())["models"]
    assert models["A"]["layout"].startswith("training checkpoint ('state_dict'") and "module. stripped" in \
        models["A"]["layout"]
    assert models["B"]["layout"].startswith("FastReID checkpoint ('model')") and "prefix 'backbone.'" in \
        models["B"]["layout"]
    assert [models[r]["trunk_loaded"] for r in "AB"] == [len(state)] * 2 and models["B"]["head_loaded"] == 1
    assert models["B"]["unused"] == 1  # heads.weight: the scoring has no classifier
    embedder, _ = load_embedder(tmp_path / "model_final.pth", "osnet_x0_25", pooling="gem")
    assert embedder.pool.p.item() == 4.0
    assert all(torch.equal(embedder.backbone.state_dict()[k], v) for k, v in state.items())


class Exploit:
    """Unpickling this with the plain pickle module would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs_fail_in_one_line(toy_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backbone = _backbone(0)
    a = _save_pth(backbone, tmp_path / "a.pth")
    b = _save_export(backbone, tmp_path / "b.safetensors")
    with pytest.raises(CFSError) as e:
        _score(toy_split, tmp_path / "nowhere.pth", b)
    assert _one_line(e) == f"weights file of model A not found: {tmp_path / 'nowhere.pth'}"
    # The architecture of the files is osnet_x0_25: another width has every conv at another shape.
    with pytest.raises(WeightsError) as e:
        _score(toy_split, a, b, arch="osnet_x0_5")
    assert _one_line(e) == (f"{a} [plain state dict, torchreid OSNet]: 479 trunk tensors have another shape than "
                            "the model's (first: conv1.conv.weight (16, 3, 7, 7) -> backbone.conv1.conv.weight "
                            "(32, 3, 7, 7)): a file for another architecture")
    # A half-loaded model (a file without its last layer) is an error too, not a warning, unless allowed.
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("conv5.")}
    torch.save(state, tmp_path / "half.pth")
    with pytest.raises(WeightsError) as e:
        _score(toy_split, tmp_path / "half.pth", b)
    assert _one_line(e) == (f"{tmp_path / 'half.pth'} [plain state dict, torchreid OSNet]: 5 of 558 trunk tensors "
                            "are not in the file and would stay at their init (first: conv5.conv.weight, "
                            "conv5.bn.weight, conv5.bn.bias); --allow-partial=true accepts it")
    assert main(["score", str(toy_split), "--arch", "osnet_x0_25", "--pretrained", str(tmp_path / "half.pth"),
                 "--finetuned", str(b), "--allow-partial=true", "--workers", "0", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    half = json.loads((tmp_path / SUMMARY).read_text())["models"]["A"]
    assert (half["trunk_loaded"], half["trunk_missing"][:2]) == (len(state), ["backbone.conv5.conv.weight",
                                                                              "backbone.conv5.bn.weight"])
    with pytest.raises(WeightsError, match=r"a\.pth \[plain state dict, torchreid OSNet\]: no tensor matches the "
                                           r"model's trunk \(first file key: conv1\.conv\.weight\)"):
        _score(toy_split, a, b, arch="resnet18")
    with pytest.raises(CFSError, match=r"^backbone 'osnet_x0_25': got an unexpected keyword argument 'bogus'; its options: none$"):
        _score(toy_split, a, b, options={"bogus": 1})
    bad = _save_export(backbone, tmp_path / "bad.safetensors", input_size="256x128")
    with pytest.raises(CFSError) as e:
        _score(toy_split, a, bad)
    assert _one_line(e).endswith("bad.safetensors: metadata 'input_size' = '256x128': expected [height, width], "
                                 "two positive ints")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError) as e:
        _score(toy_split, a, tmp_path / "corrupt.safetensors")
    assert _one_line(e).startswith(f"{tmp_path / 'corrupt.safetensors'}: not a readable safetensors file")
    assert not (toy_split / RANKING).exists()  # every failure above came before the pass

    text = tmp_path / "ranking.txt"
    text.write_text("".join(f"{k}\n" for k in TOY_KEYS))
    for keep in (0, 1.5, float("nan"), -0.5):
        with pytest.raises(CFSError, match=r"keep must be in \(0, 1\]"):
            cfs_keep_indices(toy_split, text, keep)
    with pytest.raises(CFSError, match=r"keep 1e-09 of the 40 samples of .*train that .*ranking.txt ranks keeps none"):
        cfs_keep_indices(toy_split, text, 1e-9)
    text.write_text("\n")
    with pytest.raises(CFSError) as e:
        cfs_keep_indices(toy_split, text)
    assert _one_line(e) == f"{text}: the ranking is empty"
    (tmp_path / "empty.pkl").write_bytes(pickle.dumps([]))
    with pytest.raises(CFSError, match=r"empty.pkl: the ranking is empty"):
        cfs_keep_indices(toy_split, tmp_path / "empty.pkl")
    text.write_text("00_00_0000_00000001\n00_00_0000_00000002\n")
    with pytest.raises(CFSError) as e:
        cfs_keep_indices(toy_split, text)
    assert _one_line(e).startswith(f"{text}: ranks none of the 40 samples of {toy_split}")
    text.write_text(f"{TOY_KEYS[0]}\n{TOY_KEYS[0]}.jpg\n")
    with pytest.raises(CFSError, match=r"ranking.txt: ranks some image more than once"):
        cfs_keep_indices(toy_split, text)
    text.write_text(f"{TOY_KEYS[0]} 0.9\n")
    with pytest.raises(DatasetError, match=r"ranking.txt:1: expected one key or image name per line"):
        cfs_keep_indices(toy_split, text)
    with pytest.raises(CFSError, match=r"CFS ranking not found: .*cfs_ranking.txt \(score the split first"):
        cfs_keep_indices(toy_split)
    evil = tmp_path / "CFS_list.pkl"
    evil.write_bytes(pickle.dumps([TOY_KEYS[0], Exploit(tmp_path / "pwned")]))
    with pytest.raises(DatasetError, match=r"CFS_list.pkl: refused to unpickle \(it names the global posix.system\)"):
        cfs_keep_indices(toy_split, evil)
    assert not (tmp_path / "pwned").exists()

    capsys.readouterr()
    assert main(["score", str(toy_split), "--arch", "osnet_x0_25", "--pretrained", str(a), "--finetuned",
                 str(tmp_path / "missing.safetensors"), "--workers", "0", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: weights file of model B not found: {tmp_path / 'missing.safetensors'}\n"
    assert main(["select", str(tmp_path), "--keep", "0.5"]) == 2
    assert capsys.readouterr().err.startswith(f"error: no manifest.json in {tmp_path}: not a shard split directory")


def test_unreadable_images_are_counted_and_left_out_of_the_ranking(tmp_path: Path) -> None:
    class Broken(ToySource):
        def image(self, i: int) -> tuple[bytes, str]:
            data, ext = super().image(i)
            return (b"\xff\xd8\xff not a jpeg" if i == 3 else data), ext

    split = tmp_path / "broken"
    write_split(Broken(8), split, "train", options=WriteOptions(samples_per_shard=4, progress=False))
    scores, keys, tally = score_pass(MeanColour((1, 1, 1)), MeanColour((1, 0, 1)), split, (8, 4), workers=0,
                                     max_bad_fraction=0.2, progress=False)
    assert tally.lost == 1 and keys[3] is None and np.isnan(scores[3])
    summary = write_results(split, scores, keys, {})
    assert (summary["scored"], summary["lost"]) == (7, 1)
    assert sorted((split / RANKING).read_text().splitlines()) == sorted(k for k in keys if k is not None)
    assert np.isnan(np.load(split / SCORES)[3])
