"""SpCL pretraining on unlabelled shards: self-paced contrastive learning with a hybrid memory.

Ge et al., "Self-paced Contrastive Learning with Hybrid Memory for Domain Adaptive Object Re-ID",
NeurIPS 2020, in its unsupervised (USL) form: §3.1 the hybrid memory and the unified contrastive loss
(``pretrain/memory.py``), §3.2 self-paced clustering with the independence and compactness criteria
(``pretrain/clustering.py``), §4.1 the training schedule. This file is the loop::

    accelerate launch pretrain/spcl.py --config launch/configs/<recipe>.yaml [--resume] [key=value ...]
    python pretrain/spcl.py --config launch/configs/spcl_tiny.yaml

1. The memory gets one slot per kept pool image (slot = position in the sorted list of kept sample
   indices; CFS-filtered when a ranking is given, ``pretrain/cfs.py``), filled by one sequential
   extraction pass in evaluation mode, streamed (``StreamingShards``; each rank reads the shards
   webdataset's split_by_node gives it and sends its rows to the others in chunks of the memory's
   storage dtype; a split may be a local directory or a URL prefix, ``data/shards.py`` ``is_url``).
2. Every epoch: cluster (shared by the ranks, ``pretrain/distributed_clustering.py``; labels broadcast)
   the memory's features, or freshly re-extracted ones (``cluster_features: reextract``, which also
   refreshes the memory: at millions of images an
   epoch of ``iters_per_epoch`` batches touches a small fraction of the slots, so memory features go
   stale); un-clustered images stay as one-image classes.
3. ``iters_per_epoch`` global batches of P x K images per process, read by index: by default SpCL's
   ``RandomMultipleGallerySampler`` semantics (``data.sampler: multiple_gallery``, ``data/samplers.py``:
   every pseudo-class once per pass, an anchor plus K-1 images preferably from other cameras, a
   one-image class one slot), or P pseudo-identities x K images (``data.sampler: pk``); from a URL pool,
   streamed P x K batches built as the images arrive (``data/streaming.py``); loss = the memory's
   unified contrastive loss; the memory is updated in backward, in global batch order, identically on
   every rank.
4. Each epoch's clustering is logged (clusters, outliers, cluster sizes, the clustering's own statistics
   as ``cluster/<stat>`` and its settings as text, and, when the pool carries a true identity, as the
   synthetic pool and labelled splits do, ARI/NMI against it), beside the training scalars of
   ``shared/tensorboard.py`` (window and epoch means of lr, loss, gradient norm, images/s, data wait, GPU
   memory; the config as text at start, hparams with the final metrics at the end); optional retrieval checks on a
   labelled query/gallery pair (a monitor: ``backbone_final`` is the run's backbone, and no test-set
   result picks one); atomic checkpoints (model, optimiser, RNG, memory, labels, frozen
   independence threshold, history) so ``--resume`` continues a killed run; the backbone is exported
   as safetensors that ``finetune/train.py`` loads (``model.weights=<run>/backbone_final.safetensors``).

Deviations from the reference code (yxgeee/SpCL ``examples/spcl_train_usl.py``):

* SpCL keeps ``model_best`` by mAP on the target test set; here that pair only monitors, and the run
  hands on ``backbone_final`` (a model chosen on the test split would report an optimistic number).
* ``MultipleGallerySampler`` draws an anchor's K-1 companions without replacement whenever there
  are at least K-1 candidates (SpCL: at least K); its batches are cut from one pass's index list at a
  time, as SpCL's ``IterLoader`` restarts its ``drop_last`` loader after each pass.
* ``model.weights`` must be given: a file, or ``none`` for random init on purpose (SpCL always
  starts from ImageNet weights); an empty value stops the run before any work.
* ``data.p`` x ``data.k`` is the batch of one process; the global batch of an iteration is the
  concatenation of the ranks' batches (rank r takes slice r of one global P·world x K batch), so a
  run gives the same updates on any number of processes. ``samples_per_bn`` splits a process's batch
  into BatchNorm groups, so one GPU reproduces the BN statistics of a multi-GPU run (SpCL: 16 images
  per GPU; the BN batch changes results by several mAP).
* Clustering is shared by the ranks (kNN, V and Jaccard rows of each rank's block; DBSCAN and the
  criteria on rank 0, ``pretrain/distributed_clustering.py``), with one process's labels; SpCL and
  OpenUnReID cluster on one process while the others wait. Its collectives run on a gloo group whose
  timeout is 4 x the previous clustering's measured time (at least 10 minutes; the first clustering
  of a run gets ``dist_timeout_minutes``), so a rank lost during a long clustering is noticed in about
  that time.
* Images whose bytes cannot be decoded are left out of the memory's classes and never sampled,
  instead of ending the run.
* An epoch whose clustering leaves fewer pseudo-classes than P x processes (a collapsed clustering, or
  ``cluster.drop_outliers`` on a small pool) keeps training instead of stopping: ``multiple_gallery``
  needs no P distinct classes (its batches are cut from repeated passes over the classes there are),
  and ``pk`` draws each batch's P classes with replacement (``data/samplers.py``, ``replacement``);
  the epoch prints one line saying so and logs ``cluster/below_p`` (1) beside ``cluster/pseudo_classes``.
  A clustering that leaves no class at all (every image an outlier, dropped) trains that epoch on the
  images' instance classes (each image its own class, as when outliers are kept), with a printed line.
  A resumed epoch builds its batches from the restored labels through the same path.
* Exact resume (bit-identical with ``OMP_NUM_THREADS=1``), also mid-epoch and with DataLoader workers:
  each drawn image's augmentation is seeded by (seed, epoch, batch number, rank, position in the batch)
  (``data/draws.py``), so it does not depend on worker count, worker assignment or the batches a resumed
  epoch skips; the memory's incrementally kept cluster sums are checkpointed (``pretrain/memory.py``).
* With several processes every rank's BatchNorm buffers are overwritten with rank 0's before each
  feature extraction, checkpoint and export. DDP itself (``broadcast_buffers``) gives every rank
  rank 0's buffers at the start of each forward, so rank 0's are the run's statistics, the ones
  checkpointed and the ones a resumed run starts from; broadcasting them (rather than averaging the
  ranks') makes the ranks embed their shares of the pool alike and a resumed run equal to a whole one.
  SpCL leaves each GPU's statistics as they are.
* Re-extraction before clustering is an option (SpCL never re-extracts), as are the optimiser and its
  schedule (``optim.*``, the fine-tuning stage's block, ``shared/optim.py``; by default SpCL's Adam and
  ``StepLR(step_size=20)`` over 50 epochs, ``optim.milestones`` [20, 40], the DM-OSNet recipe's decay
  every 10 of 30 epochs [10, 20]). The rate is set per iteration; without a warm-up it is constant
  within an epoch, as SpCL's per-epoch steps give it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

from reidforge.data.config import DataConfig
from reidforge.data.draws import SeededBatches, SeededDraws
from reidforge.data.readers import ConcatShards, IndexedShards, SampleTally, StreamingShards, collate, stream_json
from reidforge.data.samplers import MultipleGallerySampler, PKSampler
from reidforge.data.shards import ShardError, is_url, load_manifest
from reidforge.data.streaming import PseudoIdentityStream
from reidforge.data.transforms import Normalize, build_transforms
from reidforge.pretrain.cfs import cfs_keep_indices
from reidforge.pretrain.clustering import ClusterConfig, SelfPacedClustering
from reidforge.pretrain.distributed_clustering import (clustering_timeout, distributed_cluster, row_bounds,
                                                       shared_clustering)
from reidforge.pretrain.memory import HybridMemory
from reidforge.shared.backbones import build_backbone
from reidforge.shared.checkpoints import Checkpoints
from reidforge.shared.config import ConfigError, bounded, choice, config_main, save_config
from reidforge.shared.heads import build_pooling
from reidforge.shared.io import atomic_write_json
from reidforge.shared.peak_memory import PeakMemory
from reidforge.shared.optim import OptimConfig, build_optimizer, build_scheduler, check_schedule, clip_gradients
from reidforge.shared.progress import Progress, RunProgress
from reidforge.shared.retrieval import evaluate, extract_features
from reidforge.shared.run_config import ModelConfig, RunConfig, start_run
from reidforge.shared.table import Percent, format_table
from reidforge.shared.tensorboard import TrainScalars, write_config_text, write_embedding, write_hparams
from reidforge.shared.weights import WEIGHTS_REPORT, WeightsError, export_model, load_pretrained


@dataclass
class EncoderConfig(ModelConfig):
    """The shared model block for SpCL's encoder: ``name`` is a backbone (shared/backbones), plus its pooling."""

    # A local pretrained file (any layout shared/weights.py detects) or "none": random init on purpose.
    # Left empty, the run stops at start: every recipe states how it begins.
    weights: str = ""
    pooling: str = choice("avg", "gem")  # SpCL: average; OpenUnReID's SpCL+: GeM


@dataclass
class PoolConfig(DataConfig):
    train: list[str] = field(default_factory=lambda: ["runs/demo/shards/synthetic_lup/pool"])  # the unlabelled pool's splits
    query: str = ""  # optional labelled query/gallery splits for retrieval checks during pretraining
    gallery: str = ""
    sampler: str = choice("multiple_gallery", "pk")  # SpCL's RandomMultipleGallerySampler, or P x K
    cfs_ranking: str = ""  # ranking file (pretrain/cfs.py output or the released CFS_list.pkl); "" keeps all
    cfs_keep: float = bounded(0.5, 0, 1, lo_open=True)  # fraction of each split's ranked images kept when a ranking is given
    max_images: int = bounded(0, 0)  # > 0: only the first this many kept images of the pool (smoke and CPU runs)
    # Streamed training (a pool given as URLs, data/streaming.py): samples in the shuffle buffer, and the
    # most undecoded images waiting in incomplete pseudo-class buffers (per DataLoader worker).
    shuffle_buffer: int = bounded(1000, 0)
    stream_buffer_images: int = bounded(20000, 1)


@dataclass
class MemoryConfig:
    temperature: float = bounded(0.05, 0, None, lo_open=True)
    momentum: float = bounded(0.2, 0, 1)
    dtype: str = choice("float32", "float16")  # float16 halves the memory of a LUPerson-size bank


@dataclass
class SpCLConfig(RunConfig):
    run_name: str = "spcl"
    epochs: int = bounded(50, 0)  # SpCL examples/spcl_train_usl.py --epochs 50
    # Iterations an epoch trains (SpCL's --iters 400), passes following passes. 0 (one pass) is not offered
    # here: the schedule needs a fixed epoch length, and a pass over pseudo-labels changes with each clustering.
    iters_per_epoch: int = bounded(400, 1)
    cluster_features: str = choice("memory", "reextract")
    samples_per_bn: int = bounded(0, 0)  # split each process's batch into BatchNorm groups of this size; 0 = whole batch
    # Train-mode passes (no gradient) over pool images that set the BatchNorm running statistics before
    # the first extraction: a random init's (0, 1) statistics make eval-mode features meaningless.
    bn_calibration_batches: int = bounded(0, 0)
    # > 0: also checkpoint every this many iterations inside an epoch, so that a LUPerson-length epoch
    # (hours) is never lost whole; --resume then continues from that iteration with the epoch's labels.
    checkpoint_every_iters: int = bounded(0, 0)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    data: PoolConfig = field(default_factory=PoolConfig)
    # SpCL's optimiser: Adam, lr 3.5e-4, weight decay 5e-4 on every parameter, StepLR(step_size=20) over 50
    # epochs (x0.1 at 20 and 40), no warm-up (examples/spcl_train_usl.py).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_epochs=0.0, milestones=[20, 40]))
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


class Encoder(nn.Module):
    """backbone -> pooling -> BatchNorm1d with a frozen zero bias -> L2 normalisation (SpCL's head, no FC)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.backbone = build_backbone(cfg.name, **cfg.options)
        self.pool = build_pooling(cfg.pooling)
        self.feature_dim = self.backbone.out_channels
        self.bn = nn.BatchNorm1d(self.feature_dim)
        self.bn.bias.requires_grad_(False)
        nn.init.constant_(self.bn.weight, 1.0)
        nn.init.constant_(self.bn.bias, 0.0)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bn(self.pool(self.backbone(images))), dim=1)

    def forward(self, images: torch.Tensor, samples_per_bn: int = 0, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and 0 < samples_per_bn < len(images):
            return torch.cat([self._embed(group) for group in images.split(samples_per_bn)])
        return self._embed(images)


SAMPLERS = {"multiple_gallery": MultipleGallerySampler, "pk": PKSampler}
EXCHANGE_ROWS = 1 << 15  # memory rows a rank broadcasts at a time after an extraction (128 MB at 2048-d fp16)
PERCENT = ("mAP", "R1")  # shown in % in the summary table, as the papers report them


class PseudoIdentityBatches(Sampler[list[int]]):
    """``iters`` batches of P x K memory slots for this rank, cycling through P·world x K global batches.

    Global batch b is the same on every rank (the ``sampler`` kind seeded by (seed, epoch, round)); rank
    r takes its r-th slice of P x K, so the concatenation over ranks is the global batch. Fewer
    pseudo-classes than P·world are drawn with replacement (``pk``) or from repeated passes.
    """

    def __init__(self, labels: np.ndarray, camids: np.ndarray | None, p: int, k: int, iters: int, seed: int,
                 epoch: int, rank: int, world_size: int, start: int = 0, sampler: str = "multiple_gallery"):
        super().__init__()
        self.sampler = SAMPLERS[sampler](labels, camids, p=p * world_size, k=k, seed=seed, replacement=True)
        self.iters, self.epoch, self.rank, self.size, self.start = iters, epoch, rank, p * k, start

    def __len__(self) -> int:
        return self.iters - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch in self.keyed():
            yield batch

    def keyed(self) -> Iterator[tuple[tuple[int, int, int], list[int]]]:
        """As iterating, with each batch's key ``(epoch, iteration in the epoch, rank)`` (``data/draws.py``)."""
        done, rounds = 0, 0
        while done < self.iters:
            for batch in self.sampler.global_batches((self.epoch << 16) + rounds):
                if done >= self.start:  # a resumed epoch skips the batches its checkpoint had trained on
                    mine = batch[self.rank * self.size:(self.rank + 1) * self.size]
                    yield (self.epoch, done, self.rank), mine.tolist()
                done += 1
                if done == self.iters:
                    return
            rounds += 1


def kept_samples(data: PoolConfig) -> list[np.ndarray]:
    """Per pool split, the sorted sample indices that get a memory slot (all, or the CFS top fraction)."""
    kept = []
    for split in data.train:
        if data.cfs_ranking:
            kept.append(np.asarray(cfs_keep_indices(split, data.cfs_ranking, data.cfs_keep), dtype=np.int64))
        else:
            kept.append(np.arange(int(load_manifest(split)["num_samples"]), dtype=np.int64))
    return kept


def true_identities(pool: ConcatShards, samples: np.ndarray) -> np.ndarray | None:
    """Ground-truth identities of ``samples`` for judging the clustering, or None when the pool has none.

    A labelled split used as a pool (SpCL's unsupervised Market-1501 setting) has them in its index;
    the synthetic pool keeps them in each sample's ``hidden_pid``.
    """
    pids = pool.pids[samples]
    if (pids >= 0).all():
        return pids

    def meta(i: int) -> dict[str, Any]:
        k = int(np.searchsorted(pool.offsets, i, side="right")) - 1
        part = pool.parts[k]
        if isinstance(part.split_dir, str):  # a URL split has no random access: its first sample, streamed
            return next(stream_json(part.split_dir))
        return json.loads(part.read_bytes(i - int(pool.offsets[k]))[1])

    if "hidden_pid" not in meta(int(samples[0])):
        return None
    if any(isinstance(part.split_dir, str) for part in pool.parts):
        hidden = np.concatenate([[m.get("hidden_pid", -1) for m in stream_json(part.split_dir)]
                                 if isinstance(part.split_dir, str) else
                                 [json.loads(part.read_bytes(i)[1]).get("hidden_pid", -1) for i in range(len(part))]
                                 for part in pool.parts]).astype(np.int64)
        return hidden[samples]
    return np.array([meta(int(i)).get("hidden_pid", -1) for i in samples], dtype=np.int64)


class SpCLTrainer:
    def __init__(self, cfg: SpCLConfig, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir) / cfg.run_name
        self._check_inputs()
        run = start_run(cfg, resume, overwrite)
        self.accelerator, self.checkpoints, resume_from = run.accelerator, run.checkpoints, run.resume_from
        acc = self.accelerator

        d = cfg.data
        parts = [IndexedShards(s) for s in d.train]
        offsets = ConcatShards(parts).offsets
        self.slots = np.concatenate([k + off for k, off in zip(kept_samples(d), offsets)])
        if d.max_images > 0:
            self.slots = self.slots[:d.max_images]
        self.train_pool = ConcatShards([IndexedShards(s, build_transforms(d.transform, train=True)) for s in d.train])
        self.slot_camids = self.train_pool.camids[self.slots]  # -1 where the pool has none (LUPerson)
        self.test_pool = ConcatShards([IndexedShards(s, build_transforms(d.transform, train=False)) for s in d.train])
        n = len(self.slots)
        if n < d.p * acc.num_processes:
            raise ConfigError(f"data: {n} pool images kept, fewer than p x processes = {d.p * acc.num_processes}")
        # Memory fill and re-extraction always stream the kept slots; training streams only a URL pool.
        self.test_stream = StreamingShards(d.train, build_transforms(d.transform, train=False), keep=self.slots)
        self.streamed_training = any(is_url(s) for s in d.train)
        if self.streamed_training:
            self.train_stream = StreamingShards(d.train, build_transforms(d.transform, train=True), keep=self.slots)
            shards, readers = len(self.train_stream.all_shards()), acc.num_processes * max(d.workers, 1)
            if shards < readers:
                raise ConfigError(f"data.train: streamed training needs a shard per reader, the pool has {shards} "
                                  f"shards with kept images for processes x workers = {readers}")
        self.peaks = PeakMemory(acc.device)

        encoder = Encoder(cfg.model)
        if cfg.model.weights != "none":
            # The encoder is a bare backbone: the file's layout is mapped onto its own key names.
            report = load_pretrained(encoder.backbone, cfg.model.weights, cfg.model.allow_partial,
                                     self.run_dir / WEIGHTS_REPORT if acc.is_main_process else None)
            acc.print(report.line())
        dtype = torch.float16 if cfg.memory.dtype == "float16" else torch.float32
        self.memory = HybridMemory(n, encoder.feature_dim, cfg.memory.temperature, cfg.memory.momentum,
                                   dtype=dtype).to(acc.device)
        self.valid = torch.zeros(n, dtype=torch.bool)  # slots whose image delivered a feature
        self.clustering = SelfPacedClustering(cfg.cluster)
        self.cluster_seconds: float | None = None  # the last clustering's, on every rank (its collectives' timeout)
        optimizer = build_optimizer(encoder, cfg.optim)  # the trainable parameters: not the BN's frozen bias
        self.scheduler = build_scheduler(optimizer, cfg.optim, cfg.iters_per_epoch, cfg.epochs)
        self.model, self.optimizer = acc.prepare(encoder, optimizer)
        self.normalize = Normalize(d.transform.mean, d.transform.std).to(acc.device)
        self.state: dict[str, Any] = {"epoch": 0, "iteration": 0, "history": [],
                                      "world_size": acc.num_processes}
        self.truth = true_identities(ConcatShards(parts), self.slots) if acc.is_main_process else None
        if resume_from is not None:
            self._resume(resume_from)
        else:
            if cfg.bn_calibration_batches > 0:
                self._calibrate_batchnorm()
            self._initialise_memory()
        if acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
        acc.init_trackers("tensorboard")
        write_config_text(acc, self.run_dir / "config.yaml")
        acc.log(self.peaks.take(), step=self.state["iteration"])
        self.scalars = TrainScalars(acc, cfg.log_every, d.p * d.k)

    def _check_inputs(self) -> None:
        """One-line errors for every input before any model is built or image read."""
        weights = self.cfg.model.weights
        if not weights:
            raise ConfigError("model.weights is empty: give the pretrained file this recipe starts from "
                              "(model.weights=FILE), or model.weights=none to train from random init")
        if weights != "none" and not Path(weights).is_file():
            raise WeightsError(f"weights file not found: {weights}")
        d = self.cfg.data
        if not d.train:
            raise ConfigError("data.train: give at least one pool split")
        for split in [*d.train, *[s for s in (d.query, d.gallery) if s]]:
            load_manifest(split)  # a URL split: a bad URL fails here, in one line naming it
        for key, split in (("data.query", d.query), ("data.gallery", d.gallery)):
            if is_url(split):
                raise ConfigError(f"{key}: {split}: the retrieval check reads by index; give a local split")
        if bool(d.query) != bool(d.gallery):
            raise ConfigError("data.query and data.gallery go together: give both or neither")
        if d.cfs_ranking and not Path(d.cfs_ranking).is_file():
            raise FileNotFoundError(f"data.cfs_ranking: no such file {d.cfs_ranking}")
        check_schedule(self.cfg.optim, self.cfg.epochs)

    # -- features --------------------------------------------------------------------------------
    def _extract(self, dataset: Any, samples: np.ndarray, name: str, phase: str = "extract"
                 ) -> tuple[torch.Tensor, np.ndarray]:
        """Eval-mode features of ``dataset[samples]`` in ``samples`` order (rows of lost images are absent),
        its progress shown as ``[phase] name``.

        Each rank embeds a contiguous share; the shares are gathered on every rank. Returns the features
        and the positions (into ``samples``) they belong to.
        """
        acc, d = self.accelerator, self.cfg.data
        self._sync_batchnorm()
        bounds = np.linspace(0, len(samples), acc.num_processes + 1).astype(int)
        lo, hi = bounds[acc.process_index], bounds[acc.process_index + 1]
        loader = DataLoader(Subset(dataset, samples[lo:hi].tolist()), batch_size=d.test_batch_size,
                            num_workers=d.workers, collate_fn=collate)
        tally = SampleTally(hi - lo, d.max_bad_fraction, name)
        with Progress(len(loader), name, phase, unit="batch", enabled=acc.is_main_process) as bar:
            feats, index = extract_features(acc.unwrap_model(self.model), tally.wrap(bar.wrap(loader)), acc.device,
                                            self.normalize)
        position = torch.from_numpy(np.searchsorted(samples, index.numpy()))
        feats = acc.gather(acc.pad_across_processes(feats.to(acc.device), dim=0)).cpu()
        position = acc.gather(acc.pad_across_processes(position.to(acc.device), dim=0, pad_index=-1)).cpu()
        keep = position >= 0
        return feats[keep], position[keep].numpy()

    @torch.no_grad()
    def _sync_batchnorm(self) -> None:
        """Every rank's buffers (BatchNorm running statistics) := rank 0's, which DDP also hands every rank
        at each forward (module docstring: broadcast, not a mean)."""
        if self.accelerator.num_processes == 1:
            return
        for buffer in self.accelerator.unwrap_model(self.model).buffers():
            torch.distributed.broadcast(buffer, src=0)

    @torch.no_grad()
    def _calibrate_batchnorm(self) -> None:
        """Running statistics as the cumulative average over the same seeded batches on every rank."""
        cfg, acc = self.cfg, self.accelerator
        encoder = acc.unwrap_model(self.model)
        norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        size = cfg.data.test_batch_size
        rng = np.random.default_rng(cfg.seed)
        picks = rng.choice(len(self.slots), min(len(self.slots), size * cfg.bn_calibration_batches), replace=False)
        chosen = self.slots[np.sort(picks)]
        # A URL pool streams the chosen images (each rank its shards' share; rank 0's statistics win, as
        # _sync_batchnorm hands them to every rank before the first extraction).
        dataset = (StreamingShards(cfg.data.train, self.test_stream.transform, keep=chosen) if self.streamed_training
                   else Subset(self.test_pool, chosen.tolist()))
        loader = DataLoader(dataset, batch_size=size, num_workers=cfg.data.workers, collate_fn=collate)
        encoder.train()
        with Progress(len(loader), "BatchNorm calibration", "extract", unit="batch",
                      enabled=acc.is_main_process) as bar:
            for batch in bar.wrap(loader):
                if "image" in batch:
                    encoder(self.normalize(batch["image"].to(acc.device)))
        for m in norms:
            m.momentum = 0.1

    @torch.no_grad()
    def _initialise_memory(self) -> None:
        """Fill (or refresh) the memory by one streamed pass over the kept slots, local or URL shards.

        Each rank embeds the shards webdataset's split_by_node gives it and writes its rows; the rows go
        to the other ranks in chunks of ``EXCHANGE_ROWS`` in the memory's storage dtype (fp16 for
        ``memory.dtype: float16``), rank after rank, and every rank (the sender too) writes exactly those
        stored rows: no rank ever holds N x d fp32 features, and the replicas stay bit-identical.
        """
        acc = self.accelerator
        with self.peaks.phase("extract"):
            feats, positions = self._stream_features(self.test_stream, "memory features")
            rows, slots = self.memory.to_storage(feats), torch.from_numpy(positions).to(acc.device)
            self.valid[:] = False
            if acc.num_processes == 1:
                self.memory.write_stored(rows, slots)
                self.valid[slots.cpu()] = True
                return
            counts = acc.gather(torch.tensor([len(rows)], device=acc.device)).tolist()
            for sender, count in enumerate(counts):
                for a in range(0, count, EXCHANGE_ROWS):
                    n = min(EXCHANGE_ROWS, count - a)
                    mine = sender == acc.process_index
                    chunk = rows[a:a + n].contiguous() if mine else rows.new_empty(n, rows.shape[1])
                    where = slots[a:a + n].contiguous() if mine else slots.new_empty(n)
                    torch.distributed.broadcast(chunk, src=sender)
                    torch.distributed.broadcast(where, src=sender)
                    self.memory.write_stored(chunk, where)
                    self.valid[where.cpu()] = True

    @torch.no_grad()
    def _stream_features(self, stream: StreamingShards, name: str) -> tuple[torch.Tensor, np.ndarray]:
        """This rank's share of a streamed eval-mode pass over the kept slots: features (on the device) and
        their slot positions; images lost to bad data are absent (and counted, ``data.max_bad_fraction``)."""
        acc, d = self.accelerator, self.cfg.data
        self._sync_batchnorm()
        share = stream.my_count()
        if share == 0:  # fewer shards than ranks: this one has none
            return torch.zeros(0, acc.unwrap_model(self.model).feature_dim, device=acc.device), np.zeros(0, np.int64)
        loader = DataLoader(stream, batch_size=d.test_batch_size, num_workers=d.workers, collate_fn=collate)
        tally = SampleTally(share, d.max_bad_fraction, name)
        with Progress(share, name, "extract", unit="img", enabled=acc.is_main_process) as bar:
            def counted() -> Iterator[dict[str, Any]]:
                for batch in tally.wrap(loader):
                    bar.update(len(batch["index"]))
                    yield batch

            feats, index = extract_features(acc.unwrap_model(self.model), counted(), acc.device, self.normalize)
        return feats.to(acc.device), np.searchsorted(self.slots, index.numpy())

    # -- clustering --------------------------------------------------------------------------------
    def _cluster(self, epoch: int, progress: RunProgress) -> dict[str, Any]:
        """Pseudo labels for every slot: the ranks share the clustering (``pretrain/distributed_clustering.py``;
        rank 0 alone for HDBSCAN and the approximate indices), every rank receives rank 0's labels."""
        acc = self.accelerator
        if self.cfg.cluster_features == "reextract" and epoch > 0:
            progress.set_phase("extract")
            self._initialise_memory()
        progress.set_phase("cluster")
        row: dict[str, Any] = {"epoch": epoch + 1}
        start = time.perf_counter()
        valid = self.valid.numpy()
        # the clustering's collectives (CPU tensors) run on a gloo group whose timeout follows the last
        # measured clustering time (pretrain/distributed_clustering.py clustering_timeout)
        group = dist.new_group(backend="gloo", timeout=clustering_timeout(
            self.cluster_seconds, self.cfg.dist_timeout_minutes)) if acc.num_processes > 1 else None
        result = None
        if group is not None and shared_clustering(self.clustering):  # every rank clusters its block
            rows = np.flatnonzero(valid)
            bounds = row_bounds(len(rows), acc.num_processes)
            mine = torch.from_numpy(rows[bounds[acc.process_index]:bounds[acc.process_index + 1]])
            block = F.normalize(self.memory.features[mine.to(acc.device)].float(), dim=1).cpu().numpy()
            result = distributed_cluster(self.clustering, block, len(rows), group)
        elif acc.is_main_process:
            result = self.clustering(F.normalize(self.memory.features[self.valid.to(acc.device)].float(),
                                                 dim=1).cpu().numpy())
        full = torch.full((len(self.slots),), -1, dtype=torch.long)
        if result is not None:
            full[self.valid] = torch.from_numpy(result.labels)
        if group is not None:  # every rank receives rank 0's labels
            dist.broadcast(full, group_src=0, group=group)
            dist.destroy_process_group(group)
        labels = full.to(acc.device)
        self.cluster_seconds = time.perf_counter() - start
        if acc.is_main_process:
            clustered = result.labels[(result.labels >= 0) & (result.labels < result.num_clusters)]
            sizes = np.bincount(clustered) if len(clustered) else np.zeros(0, dtype=np.int64)
            row.update(clusters=result.num_clusters, outliers=result.num_outliers,
                       clustered=float(len(clustered) / max(len(result.labels), 1)),
                       mean_size=float(sizes.mean()) if len(sizes) else 0.0,
                       max_size=int(sizes.max()) if len(sizes) else 0,
                       cluster_seconds=self.cluster_seconds,
                       # per stage: kNN search, Jaccard graph, DBSCAN and criteria (the stats' knn_s, ...)
                       **{f"{name}_seconds": result.stats[key] for name, key in
                          (("knn", "knn_s"), ("jaccard", "jaccard_s"), ("dbscan", "cluster_s")) if key in result.stats})
            if self.truth is not None:
                truth = self.truth[valid]
                row["ARI"] = float(adjusted_rand_score(truth, result.labels))
                row["NMI"] = float(normalized_mutual_info_score(truth, result.labels))
            acc.log({f"cluster/{k}": v for k, v in row.items() if k != "epoch"}, step=self.state["iteration"])
            self._log_clustering(result.stats)
            # outliers (own classes past num_clusters) shown as -1: the projector colours the clusters
            pseudo = np.where(result.labels < result.num_clusters, result.labels, -1)
            columns = {"pseudo_label": pseudo, **({"true_id": self.truth[valid]} if self.truth is not None else {})}
            feats = F.normalize(self.memory.features[self.valid.to(acc.device)].float(), dim=1).cpu()
            write_embedding(acc, "cluster/memory", feats, columns, self.state["iteration"],
                            seed=self.cfg.seed + epoch)
            if len(sizes):
                acc.get_tracker("tensorboard", unwrap=True).add_histogram("cluster/sizes", sizes,
                                                                          self.state["iteration"])
        if not (labels >= 0).any():  # cluster.drop_outliers and no cluster at all: nothing would be trained
            valid = self.valid.to(labels.device)
            labels = torch.where(valid, torch.arange(len(labels), device=labels.device), labels)
            acc.print(f"epoch {epoch + 1}: no cluster and outliers dropped: every image is its own class this epoch")
        self.memory.set_labels(labels)
        return row

    def _log_clustering(self, stats: dict[str, float]) -> None:
        """The clustering's own statistics (``ClusterResult.stats``: kNN recall and timings, the search's
        settings, the independence threshold, the samples the criteria rejected, cluster and outlier counts)
        as ``cluster/<name>`` scalars, and its settings as the ``cluster/settings`` text."""
        acc, step = self.accelerator, self.state["iteration"]
        acc.log({f"cluster/{k}": float(v) for k, v in stats.items()}, step=step)
        settings = {**asdict(self.clustering.cfg),
                    "indep_threshold (frozen once set)": self.clustering.indep_threshold,
                    **{k: v for k, v in stats.items() if k.startswith(("ivf_", "hnsw_", "knn_recall_"))}}
        acc.log({"cluster/settings": "\n".join(f"    {k}: {v}" for k, v in settings.items())}, step=step)

    # -- training ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        resumed_step = self.state["partial"]["step"] if "partial" in self.state else 0
        # One display for the whole run, from the resumed iteration on (reidforge.shared.progress).
        with RunProgress(cfg.epochs, cfg.iters_per_epoch, self.state["epoch"], resumed_step,
                         enabled=acc.is_main_process) as progress:
            self._epochs(progress)
            progress.set_phase("export")
            self._sync_batchnorm()
            if acc.is_main_process:
                self._export("backbone_final.safetensors")
        if acc.is_main_process:
            acc.print(self.results_table())
            acc.print(f"run directory: {self.run_dir}")
            write_hparams(acc, cfg, self._final_metrics(), self.state["iteration"])
        acc.end_training()
        return self.state

    def _epochs(self, progress: RunProgress) -> None:
        """Cluster, train, evaluate and checkpoint every epoch left."""
        cfg, acc = self.cfg, self.accelerator
        for epoch in range(self.state["epoch"], cfg.epochs):
            partial = self.state.pop("partial", None)  # a mid-epoch checkpoint: its labels are restored
            progress.start_epoch(epoch, partial["step"] if partial else 0)
            with self.peaks.phase("cluster"):  # with a re-extraction, when there is one, inside it
                row = partial["row"] if partial else self._cluster(epoch, progress)
            acc.log(self.peaks.take(), step=self.state["iteration"])
            row["loss"] = self._train_epoch(epoch, row, progress, partial)
            self.state["epoch"] = epoch + 1
            last = epoch + 1 == cfg.epochs
            if cfg.data.query and ((epoch + 1) % cfg.eval_every == 0 or last):
                progress.set_phase("eval")
                row.update(self._evaluate())
            if acc.is_main_process:
                self.state["history"].append(row)
                atomic_write_json(self.run_dir / "metrics.json", {"history": self.state["history"],
                                                                  "world_size": acc.num_processes})
                acc.print(self._row_line(row))
            if (epoch + 1) % cfg.checkpoint_every == 0 or last:
                progress.set_phase("checkpoint")
                self._checkpoint()

    def _final_metrics(self) -> dict[str, float]:
        """The last retrieval check (``test/mAP``, ``test/R1``) and clustering quality (``cluster/ARI``,
        ``cluster/NMI``) of the run, by their scalar tags."""
        tags = {"mAP": "test/mAP", "R1": "test/R1", "ARI": "cluster/ARI", "NMI": "cluster/NMI"}
        last: dict[str, float] = {}
        for row in self.state["history"]:
            last.update({tag: row[k] for k, tag in tags.items() if k in row})
        return last

    def _train_epoch(self, epoch: int, row: dict[str, Any], progress: RunProgress,
                     partial: dict[str, Any] | None = None) -> float:
        """Train one epoch (from the iteration a mid-epoch checkpoint reached); the mean loss of its steps."""
        cfg, acc = self.cfg, self.accelerator
        start, total = (partial["step"], partial["loss_sum"]) if partial else (0, 0.0)
        labels = self.memory.labels.cpu().numpy()
        self._log_pseudo_classes(epoch, labels)
        # Each image's augmentation is seeded by its draw (data/draws.py); the loader's own generator keeps
        # its worker base seed off the global RNG, which the training loop alone consumes.
        generator = torch.Generator().manual_seed((cfg.seed << 20) + epoch)
        if self.streamed_training:  # a URL pool: P x K batches built as the images stream in (data/streaming.py)
            pool_labels = np.full(int(self.train_stream.offsets[-1]), -1, dtype=np.int64)
            pool_labels[self.slots] = labels
            stream = PseudoIdentityStream(self.train_stream, pool_labels, cfg.data.p, cfg.data.k, seed=cfg.seed,
                                          epoch=epoch, rank=acc.process_index, start=start,
                                          shuffle_buffer=cfg.data.shuffle_buffer,
                                          max_buffered=cfg.data.stream_buffer_images)
            streamed = DataLoader(stream, batch_size=None, num_workers=cfg.data.workers, generator=generator)
            loader: Any = itertools.islice((b for b in streamed if not b.get("skipped")), cfg.iters_per_epoch - start)
        else:
            sampler = PseudoIdentityBatches(labels, self.slot_camids, cfg.data.p, cfg.data.k, cfg.iters_per_epoch,
                                            cfg.seed, epoch, acc.process_index, acc.num_processes, start,
                                            cfg.data.sampler)
            loader = DataLoader(SeededDraws(Subset(self.train_pool, self.slots.tolist())),
                                batch_sampler=SeededBatches(sampler, cfg.seed), num_workers=cfg.data.workers,
                                collate_fn=collate, generator=generator)
        tally = SampleTally(len(self.slots), cfg.data.max_bad_fraction, "training")
        self.model.train()
        progress.set_phase("train")
        self.scalars.start_epoch()
        with self.peaks.phase("train"):
            total = self._train_steps(loader, tally, start, total, row, progress)
        acc.log(self.peaks.take(), step=self.state["iteration"])
        self.scalars.end_epoch(epoch + 1)
        progress.end_epoch()
        return total / max(cfg.iters_per_epoch, 1)

    def _train_steps(self, loader: Any, tally: SampleTally, start: int, total: float, row: dict[str, Any],
                     progress: RunProgress) -> float:
        """The epoch's steps from iteration ``start`` (loss sum ``total`` so far); the loss sum at its end."""
        cfg, acc = self.cfg, self.accelerator
        for step, batch in enumerate(self.scalars.timed(tally.wrap(loader)), start + 1):
            images = self.normalize(batch["image"].to(acc.device, non_blocking=True))
            slots = torch.from_numpy(np.searchsorted(self.slots, batch["index"].numpy())).to(acc.device)
            with acc.autocast():
                feats = self.model(images, samples_per_bn=cfg.samples_per_bn)
            loss = self.memory(feats.float(), slots)
            self.optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            norm = clip_gradients(acc, self.model.parameters(), cfg.optim)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step applies
            self.optimizer.step()
            self.scheduler.step()
            self.state["iteration"] += 1
            total += loss.item()
            progress.step(loss.item())
            self.scalars.step(self.state["iteration"], {"lr": lr, "loss": loss, "grad_norm": norm})
            every = cfg.checkpoint_every_iters
            if every > 0 and step % every == 0 and step < cfg.iters_per_epoch:
                self.state["partial"] = {"step": step, "loss_sum": total, "row": row}
                progress.set_phase("checkpoint")
                self._checkpoint(step)
                progress.set_phase("train")
                del self.state["partial"]
        return total

    def _log_pseudo_classes(self, epoch: int, labels: np.ndarray) -> None:
        """Say when the epoch has fewer pseudo-classes than a global batch has identity slots (P x processes)."""
        acc, p = self.accelerator, self.cfg.data.p * self.accelerator.num_processes
        classes = len(np.unique(labels[labels >= 0]))
        if classes < p:
            how = "draws its classes with replacement" if self.cfg.data.sampler == "pk" else "cycles passes over them"
            acc.print(f"epoch {epoch + 1}: {classes} pseudo-classes, fewer than p x processes = {p}: "
                      f"each batch {how}")
        acc.log({"cluster/pseudo_classes": classes, "cluster/below_p": int(classes < p)}, step=self.state["iteration"])

    def _evaluate(self) -> dict[str, float]:
        acc, d = self.accelerator, self.cfg.data
        tf = build_transforms(d.transform, train=False)
        embedded = []
        for split in (d.query, d.gallery):
            dataset = IndexedShards(split, tf)
            feats, pos = self._extract(dataset, np.arange(len(dataset)), f"embedding {Path(split).name}", "eval")
            embedded.append((feats, dataset.pids[pos], dataset.camids[pos]))
        (qf, qp, qc), (gf, gp, gc) = embedded
        metrics = evaluate(qf, gf, qp, gp, qc, gc) if acc.is_main_process else {"mAP": 0.0, "cmc": [0.0]}
        result = {"mAP": float(metrics["mAP"]), "R1": float(metrics["cmc"][0])}
        if acc.is_main_process:
            # A monitor only: the pair is a target test set, so no backbone is chosen by it.
            acc.log({f"test/{k}": v for k, v in result.items()}, step=self.state["iteration"])
        return result

    # -- state ---------------------------------------------------------------------------------------
    def _replica_digest(self) -> int:
        """A 63-bit digest of this rank's memory (features and labels), hashed a chunk at a time (the
        whole bank is never copied to host)."""
        h = hashlib.sha256()
        for a in range(0, len(self.slots), EXCHANGE_ROWS):
            h.update(self.memory.features[a:a + EXCHANGE_ROWS].cpu().numpy().tobytes())
        h.update(self.memory.labels.cpu().numpy().tobytes())
        return int.from_bytes(h.digest()[:8], "little") >> 1

    def _check_replicas(self) -> None:
        """Every rank's memory must be bit-identical: the ordered update in backward guarantees it."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        digests = acc.gather(torch.tensor([self._replica_digest()], device=acc.device)).tolist()
        if len(set(digests)) != 1:
            raise RuntimeError(f"memory replicas differ across ranks after epoch {self.state['epoch']}: {digests}")
        self.state["replicas_identical"] = True

    def _checkpoint(self, step: int = 0) -> None:
        """End of epoch (``step`` 0) or after iteration ``step`` of the epoch in progress."""
        acc = self.accelerator
        with self.peaks.phase("checkpoint"):
            self._check_replicas()
            self._sync_batchnorm()
            self.state["scheduler"] = self.scheduler.state_dict()
            self.state["clustering"] = self.clustering.state_dict()
            # The replicas are identical (checked above): rank 0 alone writes the memory; the others pass
            # nothing, so no copy of the bank is made on their hosts.
            memory = {"memory": {**self.memory.state_dict(), "valid": self.valid}} if acc.is_main_process else None
            self.checkpoints.save(acc, self.state["epoch"], self.state, memory, step)
        acc.log(self.peaks.take(), step=self.state["iteration"])

    def _resume(self, checkpoint: Path) -> None:
        path, self.state = self.checkpoints.restore(self.accelerator, checkpoint)
        tensors = Checkpoints.tensors(path, "memory")
        self.valid = tensors.pop("valid").bool()
        if len(self.valid) != len(self.slots):
            raise ConfigError(f"--resume: the checkpoint has {len(self.valid)} memory slots, the pool "
                              f"{len(self.slots)} (data.train or the CFS selection changed)")
        self.memory.load_state_dict(tensors)
        self.clustering.load_state_dict(self.state["clustering"])
        self.scheduler.load_state_dict(self.state["scheduler"])
        self.accelerator.print(f"resumed from {path} at epoch {self.state['epoch']}")

    def _export(self, name: str) -> None:
        encoder = self.accelerator.unwrap_model(self.model)
        t, c = self.cfg.data.transform, self.cfg
        export_model(encoder.backbone, self.run_dir / name, {
            "kind": "backbone",
            "architecture": c.model.name,
            "options": c.model.options,
            "feature_dim": encoder.feature_dim,
            # The pooling the backbone was trained under (GeM with its learnt exponent), for its users.
            "pooling": c.model.pooling,
            **({"gem_p": encoder.pool.p.detach().item()} if c.model.pooling == "gem" else {}),
            "input_size": [t.height, t.width],
            "mean": t.mean,
            "std": t.std,
            "provenance": {"stage": "spcl", "run": c.run_name, "epoch": self.state["epoch"], "pool": c.data.train,
                           "cfs_ranking": c.data.cfs_ranking, "cfs_keep": c.data.cfs_keep if c.data.cfs_ranking else 1.0,
                           "memory_slots": len(self.slots), "weights": c.model.weights},
        })

    @staticmethod
    def _row_line(row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}", f"clusters {row.get('clusters', '-')}", f"outliers {row.get('outliers', '-')}"]
        parts += [f"{k} {row[k]:.4f}" for k in ("ARI", "NMI", "loss", "mAP", "R1") if k in row]
        return "  ".join(parts)

    def results_table(self) -> str:
        keys = ["epoch", "clusters", "outliers", "clustered", "mean_size", "ARI", "NMI", "loss", "mAP", "R1"]
        shown = [k for k in keys if any(k in r for r in self.state["history"])]
        rows = [[Percent(r[k]) if k in PERCENT and k in r else round(r[k], 4) if isinstance(r.get(k), float)
                 else r.get(k, "") for k in shown] for r in self.state["history"]]
        return format_table([f"{k} (%)" if k in PERCENT else k for k in shown], rows)


def pretrain(cfg: SpCLConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run SpCL on ``cfg.data`` and return the run's state (per-epoch history); ``resume`` and
    ``overwrite`` as in ``reidforge.shared.rundir.claim_run_dir``."""
    return SpCLTrainer(cfg, resume, overwrite).fit()


def main(argv: list[str] | None = None) -> int:
    return config_main(SpCLConfig, pretrain, argv, __doc__, errors=(ShardError, WeightsError))


if __name__ == "__main__":
    sys.exit(main())
