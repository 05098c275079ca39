"""The fine-tuning engine: one loop for every registered re-ID model, from 1 CPU process to N GPUs.

Per epoch: P×K batches read by index from the train shards (each rank draws its own disjoint batches
from the same seeded sampler), the model's declared loss terms, one optimiser step and one scheduler
step per iteration. Every ``eval_every`` epochs the query and gallery splits are embedded (each rank
embeds its share; features are gathered and de-duplicated by index), ranked with the Market protocol,
and the best model by mAP is exported. Every ``checkpoint_every`` epochs the full state is saved
atomically (accelerate's model/optimizer/RNG state plus the scheduler, sampler position, criterion and
run history), so ``--resume`` continues a killed run where its last checkpoint left it.

Run directory ``<output_dir>/<run_name>/``: ``config.yaml``, TensorBoard events, ``checkpoints/``,
``metrics.json``, ``model_best.safetensors`` and ``model_final.safetensors`` (with metadata).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.readers import ConcatShards, IndexedShards, SampleTally, collate
from data.samplers import CameraAwarePKSampler, PKSampler
from data.shards import load_manifest
from data.transforms import Normalize, TransformConfig, build_transforms
from finetune.losses import Criterion, LossConfig
from finetune.models import build_model
from finetune.models.base import ReIDModel
from finetune.optim import OptimConfig, build_center_optimizer, build_optimizer, build_scheduler
from shared.checkpoints import Checkpoints
from shared.config import ConfigError, choice, save_config
from shared.io import atomic_write_json
from shared.retrieval import evaluate, extract_features
from shared.table import format_table
from shared.weights import WeightsError, export_model, load_weights


@dataclass
class ModelConfig:
    name: str = "bot_resnet50"
    options: dict[str, Any] = field(default_factory=dict)
    weights: str = ""  # a local torchvision/timm state dict or a safetensors export; "" = random init
    weights_prefix: str = ""  # prepended to the file's keys, e.g. "backbone." for a pretrain export


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["runs/demo/shards/synthetic_person/train"])
    query: str = "runs/demo/shards/synthetic_person/query"
    gallery: str = "runs/demo/shards/synthetic_person/gallery"
    sampler: str = choice("pk", "camera_aware")
    p: int = 16
    k: int = 4
    workers: int = 2
    test_batch_size: int = 128
    max_bad_fraction: float = 0.01
    transform: TransformConfig = field(default_factory=TransformConfig)


@dataclass
class TrainConfig:
    run_name: str = "finetune"
    output_dir: str = "runs"
    seed: int = 0
    epochs: int = 120
    eval_every: int = 10
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    freeze_backbone_iters: int = 0
    amp: str = choice("no", "bf16", "fp16")
    flip_test: bool = False
    rerank: bool = False
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    distance: str = choice("cosine", "euclidean")
    max_iters_per_epoch: int = 0  # 0 = every P×K batch of the epoch; > 0 caps it (tiny and smoke runs)
    log_every: int = 20
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)


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
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir) / cfg.run_name
        self._check_inputs(resume)
        cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision=cfg.amp if cuda else "no",
                                       log_with="tensorboard", project_dir=str(self.run_dir))
        acc = self.accelerator
        if cfg.amp != "no" and not cuda:
            acc.print(f"amp={cfg.amp} needs a GPU; training in float32 on the CPU")
        set_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        d = cfg.data
        train_tf = build_transforms(d.transform, train=True)
        self.train_set = ConcatShards([IndexedShards(path, train_tf) for path in d.train])
        self.num_classes = int(self.train_set.pid_offsets[-1])
        sampler_cls = CameraAwarePKSampler if d.sampler == "camera_aware" else PKSampler
        self.sampler = sampler_cls(self.train_set.pids, self.train_set.camids, p=d.p, k=d.k, seed=cfg.seed,
                                   rank=acc.process_index, world_size=acc.num_processes)
        self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=d.workers,
                                 collate_fn=collate, persistent_workers=d.workers > 0)

        model = build_model(cfg.model.name, self.num_classes, **cfg.model.options)
        if cfg.model.weights:
            load_weights(model, cfg.model.weights, prefix=cfg.model.weights_prefix, verbose=acc.is_main_process)
        needs_dims = any(t.loss in ("center", "circle") for t in model.loss_terms)
        dims = _output_dims(model, model.input_size) if needs_dims else {}
        self.criterion = Criterion(model.loss_terms, self.num_classes, dims, cfg.loss)
        holder = torch.nn.ModuleDict({"model": model, "criterion": self.criterion})
        # BoT's centres get their own SGD (optim.center_lr > 0), outside the main optimiser and its schedule.
        centers = self.criterion.centers() if cfg.optim.center_lr > 0 else []
        optimizer = build_optimizer(holder, cfg.optim, cfg.freeze_backbone_iters, exclude=[p for p, _ in centers])
        center_optimizer = build_center_optimizer(centers, cfg.optim)
        if center_optimizer is not None and acc.scaler is not None:
            # accelerate updates the fp16 GradScaler after each optimiser's step, so the second optimiser's
            # gradients would be unscaled with a scale the first one's step may already have changed.
            raise ConfigError("optim.center_lr > 0 needs amp=no or amp=bf16, not fp16")
        self.iters_per_epoch = len(self.sampler)
        if cfg.max_iters_per_epoch > 0:
            self.iters_per_epoch = min(self.iters_per_epoch, cfg.max_iters_per_epoch)
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.iters_per_epoch, cfg.epochs)
        if center_optimizer is None:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        else:  # prepared too, so that checkpoints save and restore its state with the main optimiser's
            self.model, self.optimizer, center_optimizer = acc.prepare(model, optimizer, center_optimizer)
        self.center_optimizer = center_optimizer
        self.criterion.to(acc.device)
        self.normalize = Normalize(d.transform.mean, d.transform.std).to(acc.device)
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", cfg.keep_checkpoints)
        self.state: dict[str, Any] = {"epoch": 0, "iteration": 0, "best_map": -1.0, "history": [],
                                      "world_size": acc.num_processes}
        if resume:
            self._resume()
        if acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
        acc.init_trackers("tensorboard")

    def _check_inputs(self, resume: bool) -> None:
        """One-line errors for every input, before any model is built or data read."""
        d = self.cfg.data
        for path in [*d.train, d.query, d.gallery]:
            load_manifest(path)
        if self.cfg.model.weights and not Path(self.cfg.model.weights).is_file():
            raise WeightsError(f"weights file not found: {self.cfg.model.weights}")
        if resume and not (self.run_dir / "checkpoints" / "latest").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint under {self.run_dir / 'checkpoints'}")

    def _resume(self) -> None:
        path, self.state = self.checkpoints.restore(self.accelerator)
        self.sampler.load_state_dict(self.state["sampler"])
        self.scheduler.load_state_dict(self.state["scheduler"])
        self.criterion.load_state_dict(Checkpoints.tensors(path, "criterion"), strict=False)
        self.accelerator.print(f"resumed from {path} at epoch {self.state['epoch']}")

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        tally = SampleTally(self.iters_per_epoch * cfg.data.p * cfg.data.k * cfg.epochs, cfg.data.max_bad_fraction,
                            "training")
        for epoch in range(self.state["epoch"], cfg.epochs):
            self.sampler.set_epoch(epoch)
            self._train_epoch(epoch, tally)
            self.state["epoch"] = epoch + 1
            last = epoch + 1 == cfg.epochs
            if (epoch + 1) % cfg.eval_every == 0 or last:
                self._evaluate(epoch + 1)
            if (epoch + 1) % cfg.checkpoint_every == 0 or last:
                self.state["sampler"] = self.sampler.state_dict()
                self.state["scheduler"] = self.scheduler.state_dict()
                self.checkpoints.save(acc, epoch + 1, self.state, {"criterion": self.criterion.state_dict()})
        if acc.is_main_process:
            self._export("model_final.safetensors")
            acc.print(tally.summary())
            acc.print(self.results_table())
            acc.print(f"run directory: {self.run_dir}")
        acc.end_training()
        return self.state

    def _train_epoch(self, epoch: int, tally: SampleTally) -> None:
        acc, model = self.accelerator, self.model
        model.train()
        batches = itertools.islice(tally.wrap(self.loader), self.iters_per_epoch)
        bar = tqdm(batches, total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                   disable=not acc.is_local_main_process, leave=False)
        for batch in bar:
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
            if self.cfg.optim.clip_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), self.cfg.optim.clip_grad_norm)
            self.optimizer.step()
            if self.center_optimizer is not None:
                self.center_optimizer.step()
            self.scheduler.step()
            self.state["iteration"] += 1
            it = self.state["iteration"]
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if it % self.cfg.log_every == 0:
                acc.log({"train/loss": loss.item(), "train/lr": self.scheduler.get_last_lr()[0],
                         **{f"train/{k}": v for k, v in values.items()}}, step=it)

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
        acc = self.accelerator
        qf, qi, query = self._embed(self.cfg.data.query)
        gf, gi, gallery = self._embed(self.cfg.data.gallery)
        if acc.is_main_process:
            start = time.perf_counter()
            cfg = self.cfg
            rerank = (cfg.rerank_k1, cfg.rerank_k2, cfg.rerank_lambda) if cfg.rerank else None
            metrics = evaluate(qf, gf, query.pids[qi], gallery.pids[gi], query.camids[qi], gallery.camids[gi],
                               cfg.distance, rerank)
            row = {"epoch": epoch, "mAP": metrics["mAP"], "mINP": metrics["mINP"], "queries": len(qi),
                   "gallery": len(gi),
                   **{f"R{r}": float(metrics["cmc"][r - 1]) for r in (1, 5, 10) if r <= len(metrics["cmc"])},
                   "eval_seconds": time.perf_counter() - start}
            self.state["history"].append(row)
            acc.log({f"eval/{k}": v for k, v in row.items() if k != "epoch"}, step=self.state["iteration"])
            if row["mAP"] > self.state["best_map"]:
                self.state["best_map"] = row["mAP"]
                self._export("model_best.safetensors")
            atomic_write_json(self.run_dir / "metrics.json", {"history": self.state["history"],
                                                              "best_map": self.state["best_map"],
                                                              "world_size": acc.num_processes})
            acc.print(f"epoch {epoch}: mAP {row['mAP']:.4f}  R1 {row.get('R1', float('nan')):.4f}")
        acc.wait_for_everyone()

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
        rows = [[r["epoch"], round(r["mAP"], 4), round(r.get("R1", 0.0), 4), round(r.get("R5", 0.0), 4),
                 round(r.get("R10", 0.0), 4), round(r["mINP"], 4)] for r in self.state["history"]]
        return format_table(["epoch", "mAP", "R1", "R5", "R10", "mINP"], rows)


@torch.no_grad()
def embed_split(model: ReIDModel, split_dir: str | Path, data: DataConfig, normalize: Normalize,
                device: torch.device | str, flip: bool = False, rank: int = 0, world_size: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, IndexedShards]:
    """Features and indices of the samples ``rank, rank + world_size, ...`` of a split (test transforms)."""
    dataset = IndexedShards(split_dir, build_transforms(data.transform, train=False))
    mine = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(mine, batch_size=data.test_batch_size, num_workers=data.workers, collate_fn=collate)
    tally = SampleTally(len(mine), data.max_bad_fraction, f"embedding {split_dir}")
    feats, index = extract_features(model, tally.wrap(loader), device, normalize, flip=flip)
    return feats, index, dataset


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and return the run's state (history, best mAP)."""
    return Trainer(cfg, resume).fit()
