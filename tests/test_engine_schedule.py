"""The engine's trunk freeze (FastReID's and MBR's) and LAI training sets, through the real Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import reidforge.finetune.engine as engine
from conftest import ToySource
from reidforge.data.readers import SampleTally
from reidforge.data.shards import WriteOptions, write_split
from reidforge.finetune.engine import TrainConfig
from reidforge.finetune.models.mbr import MBR4B
from reidforge.shared.config import ConfigError, load_config
from reidforge.shared.progress import RunProgress

NO_VIEW = {3, 10, 17, 29} | set(range(20, 24))  # four scattered images and every image of the sixth identity


class ViewSource(ToySource):
    """``ToySource`` with VeRi-like orientation bins (i % 8), none for the indices in ``no_view``."""

    def __init__(self, n: int, no_view: set[int] = frozenset()):
        super().__init__(n)
        self.no_view = no_view

    def meta(self, i: int) -> dict:
        return {**super().meta(i), "viewid": None if i in self.no_view else i % 8}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("views")
    opts = WriteOptions(samples_per_shard=16, progress=False)
    write_split(ViewSource(48, NO_VIEW), root / "train", "train", relabel=True, options=opts)  # 12 ids x 4
    for split in ("query", "gallery"):
        write_split(ViewSource(12), root / split, split, relabel=False, options=opts)
    return root


def _trainer(shards: Path, out: Path, *extra: str, options: str = "") -> engine.Trainer:
    cfg = load_config(TrainConfig, None, [
        f"output_dir={out}", "run_name=run", "model.name=mbr_4b",
        f"model.options={{trunk: resnet18, input_size: [64, 64]{options}}}",
        f"data.train=[{shards / 'train'}]", f"data.query={shards / 'query'}", f"data.gallery={shards / 'gallery'}",
        "data.p=4", "data.k=4", "data.workers=0", "data.transform.height=64", "data.transform.width=64",
        "epochs=4", "iters_per_epoch=2", "optim.lr=0.01", "optim.warmup_epochs=0", *extra])
    return engine.Trainer(cfg)


def _train(trainer: engine.Trainer, epoch: int) -> None:
    trainer.sampler.set_epoch(epoch)
    cfg = trainer.cfg
    with RunProgress(cfg.epochs, cfg.iters_per_epoch, epoch, enabled=False) as progress:
        trainer._train_epoch(epoch, SampleTally(10 ** 6, 1.0), progress)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _moved(model: torch.nn.Module, before: dict[str, torch.Tensor], names: set[str]) -> set[str]:
    state = model.state_dict()
    return {n for n in names if not torch.equal(state[n], before[n])}


def _split(model: MBR4B) -> tuple[set[str], set[str], set[str]]:
    """Trainable parameter names: in the trunk before the branches, in its layer4 copies, and the rest."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trunk = set(model.trunk_keys()) & trainable
    shared = {n for n in trunk if n.startswith("backbone.")}
    return shared, trunk - shared, trainable - trunk


def test_fastreid_freeze_holds_every_trunk_tensor_then_releases_it(shards: Path, tmp_path: Path) -> None:
    trainer = _trainer(shards, tmp_path, "freeze_backbone_iters=2")
    model = trainer.accelerator.unwrap_model(trainer.model)
    shared, copies, rest = _split(model)
    assert shared and copies and rest
    stats = {n for n in model.state_dict() if n.startswith("backbone.") and n.endswith("running_mean")}
    before = _snapshot(model)
    _train(trainer, 0)  # iterations 0 and 1: frozen
    assert _moved(model, before, shared | copies | stats) == set()  # parameters and BN statistics bit-identical
    assert not model.backbone.training and not model.branches[0].training and model.branches[2].training
    state = trainer.optimizer.optimizer.state
    assert all(not state[p] for n, p in model.named_parameters() if n in shared | copies)  # no moments built up
    reached = _moved(model, before, rest)
    assert {n for n in rest if n.startswith(("branches.2.", "branches.3.", "necks.0.classifier"))} <= reached
    after_freeze = _snapshot(model)
    _train(trainer, 1)  # iterations 2 and 3: free
    assert _moved(model, after_freeze, shared | copies) == shared | copies
    assert _moved(model, after_freeze, stats) == stats and model.backbone.training


def test_mbr_freeze_holds_the_trunk_before_the_branches_at_constant_lr(shards: Path, tmp_path: Path) -> None:
    trainer = _trainer(shards, tmp_path, "freeze_backbone_epochs=1", "optim.freeze_mode=mbr",
                       "optim.warmup_epochs=2", "optim.warmup_factor=0.0", "optim.milestones=[3]")
    model = trainer.accelerator.unwrap_model(trainer.model)
    shared, copies, rest = _split(model)
    stats = {n for n in model.state_dict() if n.startswith("backbone.") and n.endswith("running_mean")}
    before = _snapshot(model)
    lrs = []
    for epoch in range(2):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        _train(trainer, epoch)
        if epoch == 0:  # MBR: requires_grad off for modelup2L3 only; its BN layers stay in train mode
            assert _moved(model, before, shared) == set()
            assert _moved(model, before, copies) == copies and _moved(model, before, stats) == stats
            unfrozen = _snapshot(model)
    assert _moved(model, unfrozen, shared) == shared
    # 2 iterations an epoch, frozen for 1 epoch: base lr, then warm-up restarted and stepped per epoch
    sched = trainer.scheduler.lr_lambdas[0]
    assert [sched(it) for it in range(8)] == pytest.approx([1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.1, 0.1])
    assert lrs == pytest.approx([0.01, 0.005])


def test_freeze_settings_fail_in_one_line(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="set at most one"):
        _trainer(shards, tmp_path, "freeze_backbone_iters=10", "freeze_backbone_epochs=1")
    with pytest.raises(ConfigError, match="optim.delay_epochs=5.0 delays a cosine schedule"):
        _trainer(shards, tmp_path, "optim.delay_epochs=5")
    monkeypatch.setattr(MBR4B, "trunk_map", lambda self: (("nothing.", ""),))
    with pytest.raises(ConfigError, match="freezes no parameter of MBR4B"):
        _trainer(shards, tmp_path, "freeze_backbone_iters=10")
    _trainer(shards, tmp_path)  # no freeze asked: nothing to check


def test_lai_drops_and_counts_training_images_without_a_view(shards: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _trainer(shards, tmp_path, options=", n_cams: 3, n_views: 8")
    out = capsys.readouterr().out
    assert out.count("LAI: dropped 8 of 48 training images") == 1
    assert "(0 without a camid, 8 without a viewid); 11 identities left" in out
    assert len(trainer.train_set) == 40 and trainer.num_classes == 11  # MBR relabels the ids left
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.necks[0].classifier.out_features == 11
    for batch, _ in zip(trainer.loader, range(3)):
        assert (batch["viewid"] >= 0).all() and set(batch["pid"].tolist()) <= set(range(11))
    _train(trainer, 0)  # trains instead of raising on viewid -1


def test_without_lai_every_training_image_stays(shards: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _trainer(shards, tmp_path)
    assert len(trainer.train_set) == 48 and trainer.num_classes == 12 and "LAI" not in capsys.readouterr().out


def test_lai_ids_beyond_the_model_fail_at_start(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.train has viewid 7 but model.options.n_views=4"):
        _trainer(shards, tmp_path, options=", n_views: 4")
