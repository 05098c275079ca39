"""finetune/evaluate.py and the engine's evaluation for every protocol: VehicleID's averaged draws,
re-ranking options, the device, CityFlow's unlabelled challenge split, and model selection on a
validation split only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import reidforge.finetune.engine as engine
import reidforge.finetune.protocols as protocols
import reidforge.shared.rerank
from reidforge.data.build_shards import main as build_shards_main
from reidforge.data.shards import WriteOptions, write_split
from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.data.transforms import Normalize, TransformConfig
from reidforge.finetune.evaluate import main as evaluate_main
from reidforge.finetune.models import build_model, load_exported_model
from reidforge.shared.config import ConfigError, load_config
from reidforge.shared.retrieval import pairwise_distance
from reidforge.shared.weights import export_model, read_export_metadata
from vehicle_fixtures import make_cityflow, make_vehicleid

SIZE = (32, 16)
# VehicleID: (image id, vehicle id); test vehicles with 3, 2, 4, 1 and 3 images.
TRAIN = [(100 + 4 * v + j, 30 + v) for v in range(4) for j in range(4)]
TEST = [(11, 20), (12, 20), (13, 20), (14, 21), (15, 21), (16, 22), (17, 22), (18, 22), (19, 22), (20, 23),
        (21, 24), (22, 24), (23, 24)]
# CityFlow: 6 vehicles with 4 images each, 2 per camera; one track per (vehicle, camera).
CF_VEHICLES = {1: (1, 2), 2: (2, 3), 5: (3, 40), 10: (5, 6), 11: (6, 7), 12: (7, 8)}
CF_TRAIN = {4 * k + j + 1: (vid, cams[j // 2]) for k, (vid, cams) in enumerate(CF_VEHICLES.items()) for j in range(4)}
CF_TRACKS = [[i, i + 1] for i in range(1, 25, 2)]
CF_TEST_TRACKS = [[1, 2, 3], [4, 5], [6]]


def _export(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("osnet", 7, variant="osnet_x0_25")
    export_model(model, path, {"architecture": "osnet", "options": {"variant": "osnet_x0_25"}, "num_classes": 7,
                               "feature_dim": model.feature_dim, "input_size": list(SIZE),
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                               "provenance": {"run": "test"}})
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("model") / "model_final.safetensors")


@pytest.fixture(scope="module")
def vehicleid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VehicleID build of 10 draws (seed 3), as data/build_shards.py writes it."""
    root = tmp_path_factory.mktemp("vehicleid")
    make_vehicleid(root / "VehicleID", TRAIN, {800: TEST})
    with pytest.warns(UserWarning):
        assert build_shards_main(["vehicleid", "--root", str(root / "VehicleID"), "--out", str(root / "shards"),
                                  "--seed", "3", "--no-progress"]) == 0
    return root / "shards" / "vehicleid"


@pytest.fixture(scope="module")
def cityflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CityFlow build with a 2-vehicle validation carve-out and the unlabelled challenge splits."""
    root = tmp_path_factory.mktemp("cityflow")
    make_cityflow(root / "data", CF_TRAIN, CF_TRACKS, 3, CF_TEST_TRACKS)
    with pytest.warns(UserWarning):
        assert build_shards_main(["cityflow", "--root", str(root / "data"), "--out", str(root / "shards"),
                                  "--val-ids", "2", "--no-progress"]) == 0
    return root / "shards" / "cityflow"


def _evaluate(weights: Path, out: Path, query: str | Path, gallery: str | Path, *extra: str) -> dict:
    assert evaluate_main(["--weights", str(weights), "--query", str(query), "--gallery", str(gallery),
                          "--workers", "0", "--device", "cpu", "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_vehicleid_protocol_averages_the_ten_draws(weights: Path, vehicleid: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    calls = []
    real = protocols.embed_split
    monkeypatch.setattr("reidforge.finetune.evaluate.embed_split", lambda model, path, *a: calls.append(path) or real(
        model, path, *a))
    result = _evaluate(weights, tmp_path / "all", vehicleid / "query_{d}", vehicleid / "gallery_{d}",
                       "--protocol", "vehicleid")
    assert calls == [str(vehicleid / "query_0"), str(vehicleid / "gallery_0")]  # each test image embedded once
    per_draw = result["per_draw"]
    assert result["draws"] == 10 and [r["draw"] for r in per_draw] == list(range(10))
    assert all((r["queries"], r["gallery_images"]) == (8, 5) for r in per_draw)
    assert result["mAP"] == pytest.approx(np.mean([r["mAP"] for r in per_draw]), abs=1e-12)
    assert result["cmc"][0] == pytest.approx(np.mean([r["R1"] for r in per_draw]), abs=1e-12)
    assert len({r["mAP"] for r in per_draw}) > 1  # the draws differ
    table = capsys.readouterr().out
    assert "| mean of 10 |" in table and "| draw 9 " in table
    # every draw's figures are those of that draw ranked on its own
    for d in (0, 7):
        single = _evaluate(weights, tmp_path / str(d), vehicleid / f"query_{d}", vehicleid / f"gallery_{d}")
        assert single["mAP"] == pytest.approx(per_draw[d]["mAP"], abs=1e-9)
        assert single["cmc"][:5] == pytest.approx([per_draw[d]["R1"], *single["cmc"][1:4], per_draw[d]["R5"]])


def test_vehicleid_protocol_bad_patterns_fail_in_one_line(weights: Path, vehicleid: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--weights", str(weights), "--protocol", "vehicleid", "--device", "cpu", "--out", str(tmp_path)]
    assert evaluate_main([*base, "--query", str(vehicleid / "query_0"), "--gallery", str(vehicleid / "gallery_0")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name the draws with {d}, e.g. shards/vehicleid/query_{d}" in err
    assert evaluate_main([*base, "--query", str(tmp_path / "q_{d}"), "--gallery", str(tmp_path / "g_{d}")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: no VehicleID draw at {tmp_path / 'q_0'} (build one with "
                                               "data/build_shards.py vehicleid)")
    market = [a for a in base if a not in ("--protocol", "vehicleid")]
    assert evaluate_main([*market, "--query", str(vehicleid / "query_{d}"), "--gallery", str(vehicleid / "g_{d}")]) == 2
    assert "{d} names VehicleID draws, which eval_protocol=vehicleid (evaluate.py --protocol vehicleid)" in (
        capsys.readouterr().err)


def test_rerank_options_reach_the_re_ranking(weights: Path, vehicleid: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = reidforge.shared.rerank.re_rank

    def spy(q, g, k1, k2, lambda_value):
        seen.append(((k1, k2, lambda_value), real(q, g, k1=k1, k2=k2, lambda_value=lambda_value)))
        return seen[-1][1]

    monkeypatch.setattr(reidforge.shared.rerank, "re_rank", spy)
    pair = (vehicleid / "query_0", vehicleid / "gallery_0")
    default = _evaluate(weights, tmp_path / "default", *pair, "--rerank")
    fnc = _evaluate(weights, tmp_path / "fnc", *pair, "--rerank", "--rerank-k1", "75", "--rerank-k2", "10",
                    "--rerank-lambda", "0.1")
    small = _evaluate(weights, tmp_path / "small", *pair, "--rerank", "--rerank-k1", "2", "--rerank-k2", "1",
                      "--rerank-lambda", "0.9")
    assert small["rerank"] == {"k1": 2, "k2": 1, "lambda": 0.9}
    assert [params for params, _ in seen] == [(20, 6, 0.3), (75, 10, 0.1), (2, 1, 0.9)]
    assert default["rerank"] == {"k1": 20, "k2": 6, "lambda": 0.3}
    assert fnc["rerank"] == {"k1": 75, "k2": 10, "lambda": 0.1}
    assert not np.allclose(seen[0][1], seen[2][1]) and not np.allclose(seen[1][1], seen[2][1])
    assert _evaluate(weights, tmp_path / "plain", *pair)["rerank"] is None and len(seen) == 3


def test_device_option(weights: Path, vehicleid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair = ["--query", str(vehicleid / "query_0"), "--gallery", str(vehicleid / "gallery_0")]
    assert evaluate_main(["--weights", str(weights), *pair, "--workers", "0", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["device"] == ("cuda" if torch.cuda.is_available()
                                                                            else "cpu")
    assert evaluate_main(["--weights", str(weights), *pair, "--device", "tpu9"]) == 2
    assert capsys.readouterr().err.startswith("error: --device 'tpu9': ")
    if not torch.cuda.is_available():
        assert evaluate_main(["--weights", str(weights), *pair, "--device", "cuda"]) == 2
        assert capsys.readouterr().err.strip() == "error: --device 'cuda': CUDA is not available on this machine"


def test_cityflow_challenge_split_gives_the_track2_submission(weights: Path, cityflow: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    validation = _evaluate(weights, tmp_path / "val", cityflow / "query", cityflow / "gallery")
    assert 0 < validation["mAP"] <= 1 and validation["num_valid_queries"] == 4  # the labelled carve-out has metrics
    out = tmp_path / "challenge"
    result = _evaluate(weights, out, cityflow / "challenge_query", cityflow / "challenge_gallery")
    assert "no metrics" in capsys.readouterr().out and "mAP" not in result
    assert (result["submission"], result["queries"], result["gallery"]) == (str(out / "track2.txt"), 3, 6)
    lines = [line.split(" ") for line in (out / "track2.txt").read_text().splitlines()]
    # one line per query image, its gallery image ids (000001.jpg -> 1) nearest first
    model, meta = load_exported_model(weights)
    data = engine.DataConfig(transform=TransformConfig(height=SIZE[0], width=SIZE[1]), workers=0)
    feats = [protocols.embed_split(model, cityflow / split, data, Normalize(meta["mean"], meta["std"]), "cpu")[0]
             for split in ("challenge_query", "challenge_gallery")]
    expected = np.argsort(pairwise_distance(*feats), axis=1, kind="stable") + 1
    assert lines == [[str(i) for i in row] for row in expected]
    assert evaluate_main(["--weights", str(weights), "--query", str(cityflow / "challenge_query"), "--gallery",
                          str(cityflow / "challenge_gallery"), "--device", "cpu", "--pictures", "ranked"]) == 2
    assert "have no identity labels to colour them by" in capsys.readouterr().err


def test_cityflow_built_without_validation_ids_is_evaluable(weights: Path, tmp_path: Path) -> None:
    """``--val-ids 0`` (train on all 333 vehicles, as for a challenge entry) writes only the challenge
    splits: the evaluator ranks them into the submission."""
    make_cityflow(tmp_path / "data", CF_TRAIN, CF_TRACKS, 3, CF_TEST_TRACKS)
    with pytest.warns(UserWarning):
        assert build_shards_main(["cityflow", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "shards"),
                                  "--val-ids", "0", "--no-progress"]) == 0
    built = tmp_path / "shards" / "cityflow"
    assert sorted(p.name for p in built.iterdir()) == ["challenge_gallery", "challenge_query", "train"]
    result = _evaluate(weights, tmp_path / "out", built / "challenge_query", built / "challenge_gallery", "--rerank",
                       "--rerank-k1", "75", "--rerank-k2", "10", "--rerank-lambda", "0.1")
    lines = (tmp_path / "out" / "track2.txt").read_text().splitlines()
    assert result["rerank"] == {"k1": 75, "k2": 10, "lambda": 0.1} and len(lines) == 3
    assert all(sorted(map(int, line.split())) == [1, 2, 3, 4, 5, 6] for line in lines)


def _train(tmp_path: Path, name: str, train: Path, query: str | Path, gallery: str | Path, *extra: str) -> dict:
    cfg = load_config(engine.TrainConfig, None, [
        f"run_name={name}", f"output_dir={tmp_path}", "model.name=osnet", "model.options={variant: osnet_x0_25}",
        f"data.train=[{train}]", f"data.query={query}", f"data.gallery={gallery}", "data.p=2", "data.k=2",
        "data.workers=0", f"data.transform.height={SIZE[0]}", f"data.transform.width={SIZE[1]}", "epochs=3",
        "eval_every=1", "iters_per_epoch=2", "optim.warmup_epochs=0", "optim.lr=0.01", *extra])
    return engine.train(cfg)


@pytest.fixture(scope="module")
def person(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("person")
    cfg = SyntheticConfig(train_ids=8, images_per_train_id=4, test_ids=6, images_per_test_id=4, distractors=2,
                          height=SIZE[0], width=SIZE[1])
    for split, source in build_sources(cfg)["synthetic_person"].items():
        write_split(source, root / split, split, relabel=split == "train", options=WriteOptions(progress=False))
    return root


def test_model_best_is_chosen_on_the_validation_split_only(person: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    state = _train(tmp_path, "val", person / "train", person / "query", person / "gallery",
                   f"data.val_query={person / 'gallery'}", f"data.val_gallery={person / 'query'}")
    history = state["history"]
    assert [(r["epoch"], r["split"]) for r in history] == [(e, s) for e in (1, 2, 3) for s in ("val", "test")]
    val = [r for r in history if r["split"] == "val"]
    best = max(val, key=lambda r: r["mAP"])  # the first of equal maxima: a later one must be better to replace it
    assert (state["best_epoch"], state["best_map"]) == (best["epoch"], best["mAP"])
    run = tmp_path / "val"
    assert read_export_metadata(run / "model_best.safetensors")["provenance"]["epoch"] == best["epoch"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model_best"] == {"epoch": best["epoch"], "split": "val", "mAP": best["mAP"]}
    assert metrics["splits"]["val"] == {"query": str(person / "gallery"), "gallery": str(person / "query")}
    assert [r["split"] for r in metrics["history"]] == [r["split"] for r in history]
    table = capsys.readouterr().out
    assert f"|     {best['epoch']} | val   |" in table and "model_best" in table and "model_final" in table

    state = _train(tmp_path, "test_only", person / "train", person / "query", person / "gallery")
    run = tmp_path / "test_only"
    assert not (run / "model_best.safetensors").exists() and (run / "model_final.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model_best"] is None and metrics["selection"].startswith("none: no validation split")
    assert [r["split"] for r in metrics["history"]] == ["test"] * 3
    table = capsys.readouterr().out.split("| epoch |")[1]
    best_test = max(state["history"], key=lambda r: r["mAP"])["epoch"]
    lines = {int(line.split("|")[1]): line for line in table.splitlines()[2:5]}
    assert "best on test (not for selection)" in lines[best_test] and "model_final" in lines[3]
    assert not any("model_best" in line for line in lines.values())


def test_training_evaluates_vehicleid_draws(vehicleid: Path, tmp_path: Path) -> None:
    state = _train(tmp_path, "vid", vehicleid / "train", vehicleid / "query_{d}", vehicleid / "gallery_{d}",
                   "eval_protocol=vehicleid", "epochs=1")
    row = state["history"][0]
    assert (row["split"], row["draws"], row["queries"], row["gallery"]) == ("test", 10, 8, 5)
    assert row["mAP"] == pytest.approx(np.mean(row["mAP_per_draw"]), abs=1e-12) and len(row["R5_per_draw"]) == 10
    # the standalone evaluator on the exported model gives the same averaged figures
    result = _evaluate(tmp_path / "vid" / "model_final.safetensors", tmp_path / "eval", vehicleid / "query_{d}",
                       vehicleid / "gallery_{d}", "--protocol", "vehicleid")
    assert result["mAP"] == pytest.approx(row["mAP"], abs=1e-6)
    with pytest.raises(ConfigError, match=r"eval_protocol=vehicleid: the query and gallery paths name"):
        _train(tmp_path, "bad", vehicleid / "train", vehicleid / "query_0", vehicleid / "gallery_0",
               "eval_protocol=vehicleid")


def test_training_on_cityflow_selects_on_validation_and_writes_the_submission(cityflow: Path, tmp_path: Path) -> None:
    state = _train(tmp_path, "fnc", cityflow / "train", cityflow / "challenge_query", cityflow / "challenge_gallery",
                   f"data.val_query={cityflow / 'query'}", f"data.val_gallery={cityflow / 'gallery'}", "epochs=2")
    assert [r["split"] for r in state["history"]] == ["val", "val"]  # the challenge split has no metrics
    run = tmp_path / "fnc"
    assert (run / "model_best.safetensors").is_file()
    lines = (run / "track2.txt").read_text().splitlines()
    assert len(lines) == 3 and all(sorted(map(int, line.split())) == [1, 2, 3, 4, 5, 6] for line in lines)
    # the final model's ranking: the standalone evaluator on model_final writes the same file
    _evaluate(run / "model_final.safetensors", tmp_path / "eval", cityflow / "challenge_query",
              cityflow / "challenge_gallery")
    assert (tmp_path / "eval" / "track2.txt").read_text().splitlines() == lines
    with pytest.raises(ConfigError, match=r"data.val_query=.*challenge_query: no identity labels"):
        _train(tmp_path, "bad", cityflow / "train", cityflow / "query", cityflow / "gallery",
               f"data.val_query={cityflow / 'challenge_query'}", f"data.val_gallery={cityflow / 'challenge_gallery'}")
    with pytest.raises(ConfigError, match=r"data.val_query and data.val_gallery go together"):
        _train(tmp_path, "bad", cityflow / "train", cityflow / "query", cityflow / "gallery",
               f"data.val_query={cityflow / 'query'}")
