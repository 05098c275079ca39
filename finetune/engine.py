"""The fine-tuning engine: one loop for every registered re-ID model, from 1 CPU process to N GPUs.

Per epoch: P×K batches read by index from the train shards (each rank draws its own disjoint batches
from the same seeded sampler), the model's declared loss terms, one optimiser step and one scheduler
step per iteration. Every ``eval_every`` epochs the validation split (``data.val_query``/``val_gallery``)
and the test split (``data.query``/``gallery``) are embedded (each rank embeds its share; features are
gathered and de-duplicated by index) and ranked with ``eval_protocol``: Market-1501 (one query/gallery
pair) or VehicleID (every ``{d}`` draw of a ``query_{d}``/``gallery_{d}`` pattern, averaged). Only the
validation split selects: the epoch with its best mAP is exported as ``model_best``. Test results are
reported, never used to pick a model; without a validation split no ``model_best`` is written and
``model_final`` is the run's model. A test split without identity labels (CityFlow's challenge
query/test) is ranked once, after the last epoch, into the AI City track-2 submission ``track2.txt``.
Every ``checkpoint_every`` epochs the full state is saved atomically (accelerate's model/optimizer/RNG
state plus the scheduler, sampler position, criterion and run history), so ``--resume`` continues a
killed run where its last checkpoint left it.

Run directory ``<output_dir>/<run_name>/``: ``config.yaml``, TensorBoard events (``shared/tensorboard.py``:
window and epoch means of lr, each weighted loss term and the total, identity top-1, gradient norm,
images/s, data wait and GPU memory; the config as text; hparams with the final mAP and R1), ``checkpoints/``,
``metrics.json`` (every evaluation, each row naming its split), ``model_final.safetensors`` and, with a
validation split, ``model_best.safetensors`` (with metadata); with ``model.weights``, ``weights_report.json``
(the detected layout and every trunk and head tensor's match, ``reidforge.shared.weights.load_pretrained``).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from reidforge.data.config import DataConfig
from reidforge.data.draws import SeededBatches, SeededDraws
from reidforge.data.readers import ConcatShards, IndexedShards, Problem, SampleTally, collate
from reidforge.data.samplers import CameraAwarePKSampler, EpochBatches, PKSampler
from reidforge.data.shards import load_manifest
from reidforge.data.transforms import Normalize, build_transforms
from reidforge.finetune.losses import Criterion, LossConfig
from reidforge.finetune.models import build_model
from reidforge.finetune.models.base import ReIDModel
from reidforge.finetune.optim import (TrainOptimConfig, TrunkFreeze, build_center_optimizer, freeze_iterations,
                                      freeze_lr_factor)
from reidforge.finetune.protocols import (draw_features, embed_split, eval_splits, has_labels, lai_keep, ranked_picture,
                                write_submission)
from reidforge.shared.checkpoints import Checkpoints
from reidforge.shared.config import ConfigError, bounded, choice, save_config
from reidforge.shared.io import atomic_write_json
from reidforge.shared.optim import build_optimizer, build_scheduler, check_schedule, clip_gradients
from reidforge.shared.progress import RunProgress
from reidforge.shared.retrieval import distance_matrix, evaluate, evaluate_draws
from reidforge.shared.run_config import ModelConfig, RunConfig, start_run
from reidforge.shared.table import Percent, format_table
from reidforge.shared.tensorboard import (TrainScalars, write_config_text, write_embedding, write_hparams,
                                write_picture)
from reidforge.shared.visualize import cmc_curve
from reidforge.shared.weights import WEIGHTS_REPORT, WeightsError, export_model, load_pretrained


TB_QUERIES, TB_TOP_K = 4, 8  # the ranked-list picture written to TensorBoard at each evaluation


@dataclass
class TrainDataConfig(DataConfig):
    # The validation pair that alone chooses model_best ("" = none: model_final only), e.g. CityFlow's
    # 100-id carve-out (FNC paper Table 1) or ids held out of train; same eval_protocol as query/gallery.
    val_query: str = ""
    val_gallery: str = ""
    sampler: str = choice("pk", "camera_aware")  # torchreid's RandomIdentitySampler, or one camera-diverse group per id


@dataclass
class TrainConfig(RunConfig):
    run_name: str = "finetune"
    # Trunk frozen for the first iterations (FastReID SOLVER.FREEZE_ITERS) or epochs (MBR's
    # epoch_freeze_L1toL3); at most one non-zero; optim.freeze_mode says how (finetune/optim.py).
    freeze_backbone_iters: int = bounded(0, 0)
    freeze_backbone_epochs: float = bounded(0.0, 0)
    flip_test: bool = False  # evaluation adds the horizontally flipped image's feature (evaluate.py --flip-test)
    # market: one query/gallery pair; vehicleid: data.query/gallery are patterns such as
    # shards/vehicleid/query_{d}, every draw d = 0, 1, ... of the build is ranked and the metrics averaged.
    eval_protocol: str = choice("market", "vehicleid")
    rerank: bool = False
    rerank_k1: int = bounded(20, 1)
    rerank_k2: int = bounded(6, 1)
    rerank_lambda: float = bounded(0.3, 0, 1)
    distance: str = choice("cosine", "euclidean")
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="bot_resnet50"))
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: TrainOptimConfig = field(default_factory=TrainOptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)


class KeptSamples(Dataset):
    """The samples ``keep`` of a training set, ids relabelled 0..N-1 over them (MBR relabels after the drop)."""

    def __init__(self, base: ConcatShards, keep: np.ndarray):
        self.base, self.keep = base, keep
        ids, self.pids = np.unique(base.pids[keep], return_inverse=True)
        self.num_classes = len(ids)
        self.camids = base.camids[keep]

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> dict[str, Any] | Problem:
        sample = self.base[int(self.keep[index])]
        if not isinstance(sample, Problem):
            sample["pid"] = int(self.pids[index])
        return sample


def _output_dims(model: ReIDModel, input_size: tuple[int, int]) -> dict[str, int]:
    """Width of each training output, from a 2-image forward that leaves BN statistics untouched."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    no_meta = torch.zeros(2, dtype=torch.long)  # camera/view 0: valid for models that embed them
    with torch.no_grad():
        outputs = model(torch.zeros(2, 3, *input_size), camids=no_meta, viewids=no_meta)
    model.load_state_dict(buffers, strict=False)
    return {k: int(v.shape[1]) for k, v in outputs.items()}


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir) / cfg.run_name
        self._check_inputs()
        run = start_run(cfg, resume, overwrite)
        self.accelerator, self.checkpoints, self.resume_from = run.accelerator, run.checkpoints, run.resume_from
        acc = self.accelerator

        d = cfg.data
        train_tf = build_transforms(d.transform, train=True)
        self.train_set: ConcatShards | KeptSamples = ConcatShards([IndexedShards(path, train_tf) for path in d.train])
        self.num_classes = int(self.train_set.pid_offsets[-1])
        keep, missing = lai_keep(self.train_set, cfg.model.options)
        self.train_dropped = int((~keep).sum())
        if self.train_dropped:  # MBR drops the images LAI cannot embed, then relabels the ids left
            self.train_set = KeptSamples(self.train_set, np.flatnonzero(keep))
            self.num_classes = self.train_set.num_classes
            acc.print(f"LAI: dropped {self.train_dropped} of {len(keep)} training images without the labels the "
                      f"model embeds ({missing}); {self.num_classes} identities left")
        identities = int(np.unique(self.train_set.pids[self.train_set.pids >= 0]).size)
        if d.p > identities:
            raise ConfigError(f"data.p={d.p}: the training data holds {identities} identities, and a P x K batch "
                              f"needs p distinct ones (p <= {identities})")
        sampler_cls = CameraAwarePKSampler if d.sampler == "camera_aware" else PKSampler
        self.sampler = sampler_cls(self.train_set.pids, self.train_set.camids, p=d.p, k=d.k, seed=cfg.seed,
                                   rank=acc.process_index, world_size=acc.num_processes)
        # Each image's augmentation is seeded by (seed, epoch, batch, position) (data/draws.py), and the loader's
        # own generator keeps its worker seeds off the global RNG: any worker count resumes bit for bit.
        # iters_per_epoch > 0: exactly that many batches an epoch, from further passes when one is shorter.
        batches = EpochBatches(self.sampler, cfg.iters_per_epoch) if cfg.iters_per_epoch > 0 else self.sampler
        self.loader = DataLoader(SeededDraws(self.train_set), batch_sampler=SeededBatches(batches, cfg.seed),
                                 num_workers=d.workers, collate_fn=collate, persistent_workers=d.workers > 0,
                                 generator=torch.Generator().manual_seed(cfg.seed))
        self.iters_per_epoch = len(batches)
        freeze_iters = freeze_iterations(cfg.freeze_backbone_iters, cfg.freeze_backbone_epochs, self.iters_per_epoch)
        check_schedule(cfg.optim, cfg.epochs)

        model = build_model(cfg.model.name, self.num_classes, **cfg.model.options)
        if d.k < 2 and any(t.loss == "triplet" for t in model.loss_terms):
            raise ConfigError(f"data.k={d.k}: {cfg.model.name}'s triplet loss needs k >= 2 images per identity "
                              "(an anchor without a positive gives a zero loss)")
        if cfg.model.weights:
            report = load_pretrained(model, cfg.model.weights, cfg.model.allow_partial,
                                     self.run_dir / WEIGHTS_REPORT if acc.is_main_process else None)
            acc.print(report.line())
        needs_dims = any(t.loss in ("center", "circle") for t in model.loss_terms)
        dims = _output_dims(model, model.input_size) if needs_dims else {}
        self.criterion = Criterion(model.loss_terms, self.num_classes, dims, cfg.loss)
        holder = torch.nn.ModuleDict({"model": model, "criterion": self.criterion})
        # BoT's centres get their own SGD (optim.center_lr > 0), outside the main optimiser and its schedule.
        centers = self.criterion.centers() if cfg.optim.center_lr > 0 else []
        optimizer = build_optimizer(holder, cfg.optim, exclude=[p for p, _ in centers])
        self.freeze = TrunkFreeze(model, freeze_iters, cfg.optim.freeze_mode)
        center_optimizer = build_center_optimizer(centers, cfg.optim)
        if center_optimizer is not None and acc.scaler is not None:
            # accelerate updates the fp16 GradScaler after each optimiser's step, so the second optimiser's
            # gradients would be unscaled with a scale the first one's step may already have changed.
            raise ConfigError("optim.center_lr > 0 needs amp=no or amp=bf16, not fp16")
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.iters_per_epoch, cfg.epochs,
                                         partial(freeze_lr_factor, freeze_iters=freeze_iters))
        if center_optimizer is None:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        else:  # prepared too, so that checkpoints save and restore its state with the main optimiser's
            self.model, self.optimizer, center_optimizer = acc.prepare(model, optimizer, center_optimizer)
        self.center_optimizer = center_optimizer
        self.criterion.to(acc.device)
        self.normalize = Normalize(d.transform.mean, d.transform.std).to(acc.device)
        self.state: dict[str, Any] = {"epoch": 0, "iteration": 0, "best_map": -1.0, "best_epoch": 0, "history": [],
                                      "world_size": acc.num_processes}
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
        acc.init_trackers("tensorboard")
        write_config_text(acc, self.run_dir / "config.yaml")
        self.scalars = TrainScalars(acc, cfg.log_every, d.p * d.k)
        # each term's weight, so that the logged terms are the parts of the total (shared/tensorboard.py)
        self.term_weights = {f"{t.loss}/{t.input}": t.weight for t in self.criterion.terms}

    def _check_inputs(self) -> None:
        """One-line errors for every input, before any model is built or data read."""
        d = self.cfg.data
        for path in d.train:
            load_manifest(path)
        if bool(d.val_query) != bool(d.val_gallery):
            raise ConfigError(f"data.val_query and data.val_gallery go together, got {d.val_query!r} and "
                              f"{d.val_gallery!r}")
        self.test_labelled = has_labels(eval_splits(self.cfg.eval_protocol, d.query, d.gallery)[0])
        if d.val_query and not has_labels(eval_splits(self.cfg.eval_protocol, d.val_query, d.val_gallery)[0]):
            raise ConfigError(f"data.val_query={d.val_query}: no identity labels, which a validation split needs")
        if self.cfg.model.weights and not Path(self.cfg.model.weights).is_file():
            raise WeightsError(f"weights file not found: {self.cfg.model.weights}")

    def _resume(self, checkpoint: Path) -> None:
        path, self.state = self.checkpoints.restore(self.accelerator, checkpoint)
        self.sampler.load_state_dict(self.state["sampler"])
        self.scheduler.load_state_dict(self.state["scheduler"])
        self.criterion.load_state_dict(Checkpoints.tensors(path, "criterion"), strict=False)
        self.accelerator.print(f"resumed from {path} at epoch {self.state['epoch']}")

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        # One display for the whole run, from the resumed epoch on (reidforge.shared.progress).
        with RunProgress(cfg.epochs, self.iters_per_epoch, self.state["epoch"],
                         enabled=acc.is_main_process) as progress:
            tally = self._epochs(progress)
            progress.set_phase("export")
            if acc.is_main_process:
                self._export("model_final.safetensors")
        if acc.is_main_process:
            acc.print(tally.summary())
            acc.print(self.results_table())
            acc.print(f"run directory: {self.run_dir}")
            write_hparams(acc, cfg, self._final_metrics(), self.state["iteration"])
        acc.end_training()
        return self.state

    def _epochs(self, progress: RunProgress) -> SampleTally:
        """Train, evaluate and checkpoint every epoch left; the tally of the training samples lost."""
        cfg, acc = self.cfg, self.accelerator
        tally = SampleTally(len(self.train_set), cfg.data.max_bad_fraction,
                            "training")
        for epoch in range(self.state["epoch"], cfg.epochs):
            self.sampler.set_epoch(epoch)
            self._train_epoch(epoch, tally, progress)
            self.state["epoch"] = epoch + 1
            last = epoch + 1 == cfg.epochs
            if (epoch + 1) % cfg.eval_every == 0 or last:
                progress.set_phase("eval")
                self._evaluate(epoch + 1)
            if (epoch + 1) % cfg.checkpoint_every == 0 or last:
                progress.set_phase("checkpoint")
                self.state["sampler"] = self.sampler.state_dict()
                self.state["scheduler"] = self.scheduler.state_dict()
                self.checkpoints.save(acc, epoch + 1, self.state, {"criterion": self.criterion.state_dict()})
        return tally

    def _final_metrics(self) -> dict[str, float]:
        """The last evaluation's mAP and R1 per split, by their scalar tags (``test/mAP``, ``val/R1``, ...)."""
        return {f"{row['split']}/{k}": row[k] for row in self.state["history"]
                if row["epoch"] == self.state["epoch"] for k in ("mAP", "R1") if k in row}

    def _train_epoch(self, epoch: int, tally: SampleTally, progress: RunProgress) -> None:
        acc, model = self.accelerator, self.model
        model.train()
        batches = itertools.islice(tally.wrap(self.loader), self.iters_per_epoch)
        progress.start_epoch(epoch)
        progress.set_phase("train")
        if self.train_dropped and self.state["iteration"] == 0:
            acc.log({"data/train_images_dropped": self.train_dropped}, step=0)
        self.scalars.start_epoch()
        for batch in self.scalars.timed(batches):
            self.freeze.set_mode(self.state["iteration"])
            images = self.normalize(batch["image"].to(acc.device, non_blocking=True))
            pids = batch["pid"].to(acc.device)
            with acc.autocast():
                outputs = model(images, camids=batch["camid"].to(acc.device), viewids=batch["viewid"].to(acc.device))
                loss, values = self.criterion(outputs, pids)
            self.optimizer.zero_grad(set_to_none=True)
            if self.center_optimizer is not None:
                self.center_optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            self._average_criterion_grads()
            self.freeze.drop_grads(self.state["iteration"])
            norm = clip_gradients(acc, model.parameters(), self.cfg.optim)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step applies
            accuracy = self._train_accuracy(outputs, pids)
            self.optimizer.step()
            if self.center_optimizer is not None:
                self.center_optimizer.step()
            self.scheduler.step()
            self.state["iteration"] += 1
            progress.step(loss.item())
            self.scalars.step(self.state["iteration"], {
                "lr": lr, "loss": loss, "grad_norm": norm, **({"accuracy": accuracy} if accuracy is not None else {}),
                **{f"loss/{k}": self.term_weights[k] * v for k, v in values.items()}})
        self.scalars.end_epoch(epoch + 1)
        progress.end_epoch()

    @torch.no_grad()
    def _train_accuracy(self, outputs: dict[str, torch.Tensor], pids: torch.Tensor) -> torch.Tensor | None:
        """Top-1 of the identity classifiers (the mean over a model's ce and circle terms), on the device;
        None for a model without one. A circle term's prediction is its nearest class proxy."""
        hits = []
        for t in self.criterion.terms:
            if t.loss == "ce":
                logits = outputs[t.input]
            elif t.loss == "circle":
                logits = outputs[t.input].float() @ F.normalize(self.criterion.owned[Criterion._key(t)].weight).T
            else:
                continue
            hits.append((logits.argmax(1) == pids).float().mean())
        return torch.stack(hits).mean() if hits else None

    def _average_criterion_grads(self) -> None:
        """Centres and proxies live outside DDP: average their gradients so every rank's copy stays equal."""
        if self.accelerator.num_processes == 1:
            return
        for p in self.criterion.parameters():
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def _embed(self, split_dir: str) -> tuple[torch.Tensor, np.ndarray, IndexedShards]:
        """Features of a split in ``index`` order; each rank embeds its share, then all are gathered."""
        acc, d = self.accelerator, self.cfg.data
        feats, index, dataset = embed_split(acc.unwrap_model(self.model), split_dir, d, self.normalize, acc.device,
                                            self.cfg.flip_test, acc.process_index, acc.num_processes)
        feats = acc.gather(acc.pad_across_processes(feats.to(acc.device), dim=0)).cpu()
        index = acc.gather(acc.pad_across_processes(index.to(acc.device), dim=0, pad_index=-1)).cpu().numpy()
        keep = index >= 0
        feats, index = feats[keep], index[keep]
        order = np.argsort(index, kind="stable")
        return feats[order], index[order], dataset

    def _evaluate(self, epoch: int) -> None:
        """Rank the validation split (its mAP alone picks model_best) and the test split (reported only)."""
        acc, d = self.accelerator, self.cfg.data
        rows = [("val", self._rank("val", d.val_query, d.val_gallery))] if d.val_query else []
        if self.test_labelled:
            rows.append(("test", self._rank("test", d.query, d.gallery)))
        elif epoch == self.cfg.epochs:
            self._submission()
        if acc.is_main_process:
            for split, row in rows:
                row = {"epoch": epoch, "split": split, **row}
                self.state["history"].append(row)
                acc.log({f"{split}/{k}": v for k, v in row.items() if isinstance(v, float | int) and k != "epoch"},
                        step=self.state["iteration"])
                acc.print(f"epoch {epoch} {split}: mAP {row['mAP']:.4f}  R1 {row.get('R1', float('nan')):.4f}")
                if split == "val" and row["mAP"] > self.state["best_map"]:
                    self.state["best_map"], self.state["best_epoch"] = row["mAP"], epoch
                    self._export("model_best.safetensors")
            best = self.state.get("best_epoch", 0)
            atomic_write_json(self.run_dir / "metrics.json", {
                "history": self.state["history"],
                "splits": {"val": {"query": d.val_query, "gallery": d.val_gallery} if d.val_query else None,
                           "test": {"query": d.query, "gallery": d.gallery, "labelled": self.test_labelled}},
                "eval_protocol": self.cfg.eval_protocol,
                "selection": ("model_best: the epoch of the best validation mAP" if d.val_query else
                              "none: no validation split, so no model_best; model_final is the run's model and "
                              "test rows are reported, never used to choose"),
                "model_best": {"epoch": best, "split": "val", "mAP": self.state["best_map"]} if best else None,
                "world_size": acc.num_processes})
        acc.wait_for_everyone()

    def _rank(self, split: str, query: str, gallery: str) -> dict[str, Any] | None:
        """One split's metrics under ``eval_protocol`` (on the main process; None elsewhere), and its
        TensorBoard pictures and projector sample (Market protocol)."""
        cfg, acc = self.cfg, self.accelerator
        rerank = (cfg.rerank_k1, cfg.rerank_k2, cfg.rerank_lambda) if cfg.rerank else None
        pairs = eval_splits(cfg.eval_protocol, query, gallery)
        if cfg.eval_protocol == "vehicleid":
            feats, pids, draws = draw_features(self._embed, pairs)
        else:
            (qf, qi, q), (gf, gi, g) = self._embed(query), self._embed(gallery)
        if not acc.is_main_process:
            return None
        start = time.perf_counter()
        if cfg.eval_protocol == "vehicleid":
            metrics = evaluate_draws(feats, pids, draws, cfg.distance, rerank)
            per_draw = {"mAP_per_draw": metrics["mAP_per_draw"].tolist(),
                        **{f"R{r}_per_draw": metrics["cmc_per_draw"][:, r - 1].tolist()
                           for r in (1, 5) if r <= len(metrics["cmc"])}}
            counts = {"queries": len(draws[0][0]), "gallery": len(draws[0][1]), "draws": len(draws)}
        else:
            metrics = evaluate(qf, gf, q.pids[qi], g.pids[gi], q.camids[qi], g.camids[gi], cfg.distance, rerank)
            per_draw, counts = {}, {"queries": len(qi), "gallery": len(gi)}
            seconds = time.perf_counter() - start
            self._tensorboard_eval(split, (qf, np.asarray(qi), q), (gf, np.asarray(gi), g), metrics["cmc"])
            start = time.perf_counter() - seconds  # eval_seconds counts the ranking, not the pictures
        return {"mAP": metrics["mAP"], "mINP": metrics["mINP"], **counts,
                **{f"R{r}": float(metrics["cmc"][r - 1]) for r in (1, 5, 10) if r <= len(metrics["cmc"])},
                **per_draw, "eval_seconds": time.perf_counter() - start}

    def _tensorboard_eval(self, split: str, query: tuple, gallery: tuple, cmc: np.ndarray) -> None:
        """The split's ranked list of a few queries (plain distances), CMC curve and a projector sample."""
        (qf, qi, q), (gf, gi, g) = query, gallery
        acc, step = self.accelerator, self.state["iteration"]
        shown = np.linspace(0, len(qi) - 1, min(TB_QUERIES, len(qi))).astype(int)
        with tempfile.TemporaryDirectory() as tmp:
            rows = distance_matrix(qf[torch.from_numpy(shown)], gf, self.cfg.distance)
            write_picture(acc, f"{split}/ranked", ranked_picture(Path(tmp) / "ranked.png", q, qi, g, gi, shown, rows,
                                                                 TB_TOP_K, f"{self.cfg.distance} distance"), step)
            write_picture(acc, f"{split}/cmc", cmc_curve({self.cfg.model.name: cmc}, Path(tmp) / "cmc.png"), step)
        columns = {"pid": [*q.pids[qi], *g.pids[gi]], "camid": [*q.camids[qi], *g.camids[gi]],
                   "set": ["query"] * len(qi) + ["gallery"] * len(gi)}
        write_embedding(acc, f"{split}/embedding", torch.cat([qf, gf]), columns, step, seed=self.cfg.seed)

    def _submission(self) -> None:
        """The unlabelled test split ranked into ``track2.txt`` (the AI City track-2 submission format)."""
        cfg, acc = self.cfg, self.accelerator
        (qf, qi, query), (gf, gi, gallery) = self._embed(cfg.data.query), self._embed(cfg.data.gallery)
        if acc.is_main_process:
            rerank = (cfg.rerank_k1, cfg.rerank_k2, cfg.rerank_lambda) if cfg.rerank else None
            path = write_submission(self.run_dir / "track2.txt", qf, qi, query, gf, gi, gallery, cfg.distance, rerank)
            acc.print(f"data.query has no identity labels (a challenge split): no metrics; ranked {len(qi)} queries "
                      f"against {len(gi)} gallery images into {path} for the challenge server")

    def _export(self, name: str) -> None:
        model = self.accelerator.unwrap_model(self.model)
        t = self.cfg.data.transform
        export_model(model, self.run_dir / name, {
            "architecture": self.cfg.model.name,
            "options": self.cfg.model.options,
            "num_classes": self.num_classes,
            "feature_dim": model.feature_dim,
            "input_size": [t.height, t.width],
            "mean": t.mean,
            "std": t.std,
            "provenance": {"run": self.cfg.run_name, "epoch": self.state["epoch"], "train": self.cfg.data.train,
                           "weights": self.cfg.model.weights},
        })

    def results_table(self) -> str:
        """Every evaluation by epoch and split; the note marks model_best (chosen on validation only),
        model_final, and the best test epoch, which is shown and never selected."""
        history = self.state["history"]
        tests = [r for r in history if r.get("split", "test") == "test"]
        best_test = max(tests, key=lambda r: r["mAP"]) if len(tests) > 1 else None
        rows = []
        for r in history:
            split = r.get("split", "test")
            notes = [note for note, applies in (
                ("model_best", split == "val" and r["epoch"] == self.state.get("best_epoch")),
                ("model_final", split == "test" and r["epoch"] == self.state["epoch"]),
                ("best on test (not for selection)", r is best_test)) if applies]
            rows.append([r["epoch"], split, *[Percent(r.get(k, 0.0)) for k in ("mAP", "R1", "R5", "R10", "mINP")],
                         ", ".join(notes)])
        return format_table(["epoch", "split", "mAP (%)", "R1 (%)", "R5 (%)", "R10 (%)", "mINP (%)", "note"], rows)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and return the run's state (history, best mAP); ``resume``
    and ``overwrite`` as in ``reidforge.shared.rundir.claim_run_dir``."""
    return Trainer(cfg, resume, overwrite).fit()
