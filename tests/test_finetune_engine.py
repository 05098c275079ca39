"""The fine-tuning engine end to end on a tiny synthetic split: train, evaluate, export, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reidforge.finetune.engine as engine
from reidforge.data.shards import WriteOptions, load_manifest, write_split
from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.finetune.engine import TrainConfig
from reidforge.finetune.evaluate import main as evaluate_main
from reidforge.finetune.train import main as train_main
from reidforge.shared.config import load_config
from conftest import killed_in_epoch
from reidforge.shared.weights import read_export_metadata


@pytest.fixture(scope="module")
def tiny_person(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    cfg = SyntheticConfig(train_ids=16, images_per_train_id=6, test_ids=8, images_per_test_id=6, distractors=6)
    for split, source in build_sources(cfg)["synthetic_person"].items():
        write_split(source, root / split, split, relabel=split == "train", options=WriteOptions(progress=False))
    return root


OSNET = ("model.name=osnet", "model.options={variant: osnet_x0_25}")


def _config(shards: Path, out: Path, name: str, *extra: str, model: tuple[str, ...] = OSNET) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"run_name={name}", f"output_dir={out}", *model,
        f"data.train=[{shards / 'train'}]", f"data.query={shards / 'query'}", f"data.gallery={shards / 'gallery'}",
        "data.p=4", "data.k=4", "data.workers=0", "data.transform.height=64", "data.transform.width=32",
        "epochs=2", "eval_every=1", "optim.warmup_epochs=1", "optim.lr=0.003", "log_every=1", *extra])


def test_train_evaluate_export(tiny_person: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = engine.train(_config(tiny_person, tmp_path, "run"))
    run = tmp_path / "run"
    assert [(row["epoch"], row["split"]) for row in state["history"]] == [(1, "test"), (2, "test")]
    assert state["best_map"] == -1.0  # no validation split: nothing is selected on the test split
    out = capsys.readouterr().out
    assert "| epoch |" in out and "mAP" in out and f"run directory: {run}" in out
    meta = read_export_metadata(run / "model_final.safetensors")
    assert meta["architecture"] == "osnet" and meta["feature_dim"] == 512 and meta["input_size"] == [64, 32]
    assert meta["num_classes"] == 16 and not (run / "model_best.safetensors").exists()
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))

    # the standalone evaluator reproduces the engine's last evaluation from the export, with pictures
    out = tmp_path / "eval"
    assert evaluate_main(["--weights", str(run / "model_final.safetensors"), "--query", str(tiny_person / "query"),
                          "--gallery", str(tiny_person / "gallery"), "--workers", "0", "--out", str(out),
                          "--pictures", "ranked,cmc,gradcam"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mAP"] == pytest.approx(state["history"][-1]["mAP"], abs=1e-6)
    assert all((out / f"{name}.png").stat().st_size > 10_000 for name in ("ranked", "cmc", "gradcam"))


def test_killed_run_resumes_to_the_same_weights(tiny_person: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    engine.train(_config(tiny_person, tmp_path, "whole"))
    with killed_in_epoch(monkeypatch, engine.Trainer, 1):
        engine.train(_config(tiny_person, tmp_path, "killed"))
    state = engine.train(_config(tiny_person, tmp_path, "killed"), resume=True)
    assert state["epoch"] == 2
    whole = load_file(str(tmp_path / "whole" / "model_final.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "model_final.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert (whole[key].float() - resumed[key].float()).abs().max() <= 1e-5, key


def test_bot_centres_get_their_own_sgd_and_resume(tiny_person: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """BoT with center loss and optim.center_lr: the centres move under their own SGD (the main optimiser
    leaves them out), and a run killed in epoch 2 resumes to the same weights and centres."""
    bot = ("model.name=bot_resnet50", "model.options={center_loss: true}")
    extra = ("optim.center_lr=0.5", "iters_per_epoch=2", "data.k=2")

    def trainer(name: str, resume: bool = False) -> engine.Trainer:
        return engine.Trainer(_config(tiny_person, tmp_path, name, *extra, model=bot), resume)

    def centres_of(t: engine.Trainer) -> torch.Tensor:
        return t.criterion.owned["center:global/feat"].centers

    whole = trainer("whole")
    centres = centres_of(whole)
    start = centres.detach().clone()
    assert whole.center_optimizer is not None and whole.center_optimizer.param_groups[0]["lr"] == 0.5
    assert all(p is not centres for g in whole.optimizer.param_groups for p in g["params"])
    whole.fit()
    assert (centres.detach() - start).abs().max() > 1e-3  # moved, by their own optimiser alone

    with killed_in_epoch(monkeypatch, engine.Trainer, 1):
        trainer("killed").fit()
    resumed = trainer("killed", resume=True)
    assert resumed.fit()["epoch"] == 2
    assert (centres_of(resumed).detach() - centres.detach()).abs().max() <= 1e-5
    a = load_file(str(tmp_path / "whole" / "model_final.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model_final.safetensors"))
    assert a.keys() == b.keys() and all((a[k].float() - b[k].float()).abs().max() <= 1e-5 for k in a)


def test_bad_input_fails_in_one_line(tiny_person: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["optim.lrate=0.1"]) == 2
    assert "unknown config key 'optim.lrate'" in capsys.readouterr().err
    args = [f"data.train=[{tiny_person / 'train'}]", f"data.query={tiny_person / 'query'}",
            f"data.gallery={tiny_person / 'gallery'}", f"output_dir={tmp_path}"]
    assert train_main([*args, f"model.weights={tmp_path / 'none.pth'}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: weights file not found: {tmp_path / 'none.pth'}"
    assert train_main([*args, "model.name=resnet9000"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown model 'resnet9000'; valid: bot_resnet50")
    assert train_main([*args, "--resume"]) == 2
    assert "no checkpoint under" in capsys.readouterr().err


def test_two_processes_through_accelerate(tiny_person: Path, tmp_path: Path) -> None:
    """`accelerate launch` with the shipped 2-process CPU config really runs two ranks."""
    repo = Path(__file__).resolve().parents[1]
    cmd = ["accelerate", "launch", "--config_file", str(repo / "launch" / "accelerate" / "cpu_2proc.yaml"),
           str(repo / "finetune" / "train.py"), "run_name=ddp", f"output_dir={tmp_path}", "model.name=osnet",
           "model.options={variant: osnet_x0_25}", f"data.train=[{tiny_person / 'train'}]",
           f"data.query={tiny_person / 'query'}", f"data.gallery={tiny_person / 'gallery'}", "data.p=4", "data.k=4",
           "data.workers=0", "data.transform.height=64", "data.transform.width=32", "epochs=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    row = metrics["history"][0]
    # every query and gallery image was embedded once, whichever rank embedded it
    assert (row["queries"], row["gallery"]) == (load_manifest(tiny_person / "query")["num_samples"],
                                                load_manifest(tiny_person / "gallery")["num_samples"])
    assert (tmp_path / "ddp" / "model_final.safetensors").is_file()
