"""The TensorBoard record of both training loops (shared/tensorboard.py), read back from the event files:
one epoch mean per epoch for every training scalar, the periodic window means, loss terms summing to the
total, the config as text, hparams with the final metrics, and SpCL's clustering statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from reidforge.finetune.train import main as train_main
from reidforge.pretrain.spcl import main as spcl_main

FINETUNE = "launch/configs/dm_osnet_tiny.yaml"
SPCL = "launch/configs/spcl_tiny.yaml"
SMALL = ("data.workers=0", "data.p=4", "data.k=4", "data.transform.height=64", "data.transform.width=32",
         "epochs=2")
COMMON = ("lr", "loss", "grad_norm", "images_per_s", "data_wait")


def _events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _epoch_means(events: EventAccumulator, names: tuple[str, ...], epochs: int) -> dict[str, list[float]]:
    """Each ``epoch/<name>``'s values, after checking there is exactly one finite point per epoch."""
    means = {}
    for name in names:
        series = _series(events, f"epoch/{name}")
        assert [step for step, _ in series] == list(range(1, epochs + 1)), name
        assert all(math.isfinite(v) for _, v in series), (name, series)
        means[name] = [v for _, v in series]
    return means


def _text(events: EventAccumulator, tag: str) -> str:
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def _hparams(events: EventAccumulator) -> tuple[dict[str, object], set[str]]:
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: v.number_value if v.HasField("number_value") else v.string_value if v.HasField("string_value")
              else v.bool_value for k, v in start.hparams.items()}
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    return values, {m.name.tag for m in experiment.metric_infos}


def test_finetune_writes_epoch_means_window_means_config_and_hparams(tiny_shards: Path, tmp_path: Path) -> None:
    split = tiny_shards / "synthetic_person"
    assert train_main(["--config", FINETUNE, f"output_dir={tmp_path}", "run_name=ft", *SMALL,
                       f"data.train=[{split / 'train'}]", f"data.query={split / 'query'}",
                       f"data.gallery={split / 'gallery'}", "log_every=1", "optim.clip_grad_norm=5"]) == 0
    run = tmp_path / "ft"
    events = _events(run)
    terms = ("loss/ce/global/logits", "loss/triplet/global/feat")  # dm_osnet's linear classifier and triplet
    means = _epoch_means(events, (*COMMON, "accuracy", *terms), epochs=2)
    for total, *parts in zip(means["loss"], *(means[t] for t in terms)):
        assert sum(parts) == pytest.approx(total, rel=1e-5)
    assert all(0 <= v <= 1 for v in means["accuracy"] + means["data_wait"])
    assert all(v > 5 for v in means["grad_norm"])  # the norm before clipping to 5
    assert all(v > 0 for v in means["images_per_s"])
    # one warm-up epoch (linear from lr x 0.01), then the recipe's constant lr
    assert means["lr"][0] < 3.5e-4 and means["lr"][1] == pytest.approx(3.5e-4)
    assert ("epoch/gpu_mem_gib" in events.Tags()["scalars"]) == torch.cuda.is_available()

    # the window means every log_every (1) iterations: the last window of each epoch is its last iteration
    windows = _series(events, "train/loss")
    iterations = len(windows) // 2
    assert [s for s, _ in windows] == list(range(1, 2 * iterations + 1)) and iterations >= 2
    per_epoch = [sum(v for _, v in windows[e * iterations:(e + 1) * iterations]) / iterations for e in (0, 1)]
    assert per_epoch == pytest.approx(means["loss"], rel=1e-5)

    assert "run_name: ft" in _text(events, "config") and "name: dm_osnet" in _text(events, "config")
    hparams, metrics = _hparams(events)
    assert hparams["model.name"] == "dm_osnet" and hparams["data.p"] == 4 and hparams["optim.lr"] == 3.5e-4
    assert hparams["data.train"] == json.dumps([str(split / "train")])
    assert metrics == {"test/mAP", "test/R1"}
    last = json.loads((run / "metrics.json").read_text())["history"][-1]
    assert _series(events, "test/mAP")[-1][1] == pytest.approx(last["mAP"])

    # at each evaluation: the ranked list and CMC pictures, and a projector sample with pid, camid and set
    evaluations = len(json.loads((run / "metrics.json").read_text())["history"])
    for tag in ("test/ranked", "test/cmc"):
        images = events.Images(tag)
        assert len(images) == evaluations and images[-1].width > 100 and images[-1].height > 100, tag
    meta = sorted(run.glob("tensorboard/**/test%2fembedding/metadata.tsv"))  # <step>/<quoted tag>/
    assert len(meta) == evaluations
    header, *rows = meta[-1].read_text().splitlines()
    assert header.split("\t") == ["pid", "camid", "set"] and 0 < len(rows) <= 2 * 256
    assert {r.split("\t")[2] for r in rows} == {"query", "gallery"}
    vectors = (meta[-1].parent / "tensors.tsv").read_text().splitlines()
    assert len(vectors) == len(rows) and len(vectors[0].split("\t")) == 512


def test_spcl_writes_epoch_means_clustering_statistics_and_hparams(tiny_shards: Path, tmp_path: Path) -> None:
    person = tiny_shards / "synthetic_person"
    assert spcl_main(["--config", SPCL, f"output_dir={tmp_path}", "run_name=spcl", *SMALL,
                      f"data.train=[{tiny_shards / 'synthetic_lup' / 'pool'}]", f"data.query={person / 'query'}",
                      f"data.gallery={person / 'gallery'}", "iters_per_epoch=2", "bn_calibration_batches=1",
                      "cluster.k1=10", "cluster.k2=3", "cluster.knn=int8"]) == 0
    run = tmp_path / "spcl"
    events = _events(run)
    history = json.loads((run / "metrics.json").read_text())["history"]
    means = _epoch_means(events, COMMON, epochs=2)
    assert means["loss"] == pytest.approx([row["loss"] for row in history], rel=1e-6)
    assert means["lr"] == pytest.approx([1e-3, 1e-3])
    tags = events.Tags()["scalars"]
    assert "epoch/accuracy" not in tags  # the hybrid memory is no classifier

    # ClusterResult.stats, one point per epoch: recall of the int8 search, the criteria, the counts
    for stat in ("n", "knn_recall", "knn_s", "dbscan_clusters", "rejected_by_criteria", "num_clusters",
                 "num_outliers", "fraction_clustered", "total_s"):
        series = _series(events, f"cluster/{stat}")
        assert len(series) == 2 and all(math.isfinite(v) for _, v in series), stat
    assert [v for _, v in _series(events, "cluster/n")] == [40.0, 40.0]
    assert [v for _, v in _series(events, "cluster/num_clusters")] == [row["clusters"] for row in history]
    assert 0 <= _series(events, "cluster/knn_recall")[-1][1] <= 1
    for stat in ("rejected_by_independence", "rejected_by_compactness"):
        assert len(_series(events, f"cluster/{stat}")) == 2, stat
    # the memory features for the projector, by pseudo-label and the pool's true identity
    meta = sorted(run.glob("tensorboard/**/cluster%2fmemory/metadata.tsv"))
    assert len(meta) == 2
    header, *rows = meta[-1].read_text().splitlines()
    assert header.split("\t") == ["pseudo_label", "true_id"] and len(rows) == 40
    settings = _text(events, "cluster/settings")
    assert "knn: int8" in settings and "k1: 10" in settings and "indep_threshold" in settings
    assert "knn_recall_queries: 40.0" in settings  # the recall's sample: every image below 2,000

    assert "name: resnet18" in _text(events, "config")
    hparams, metrics = _hparams(events)
    assert hparams["model.name"] == "resnet18" and hparams["cluster.knn"] == "int8"
    assert metrics == {"test/mAP", "test/R1", "cluster/ARI", "cluster/NMI"}
    assert _series(events, "test/mAP")[-1][1] == pytest.approx(history[-1]["mAP"])
