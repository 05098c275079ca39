"""Data pipeline throughput, images/s, all measured in one run on the same synthetic images.

    python launch/bench/data_pipeline.py [--images 4000] [--workers 0] [--out runs/bench/data_pipeline.json]

1. streaming: webdataset shards -> torchvision.io decode -> uint8 tensor train transforms
   (StreamingShards) -> batch normalisation (Normalize, timed here on the CPU)
2. indexed P×K: PKSampler batches read by offset from the same shards (IndexedShards), same transforms
3. baseline: the same images unpacked to a folder tree, torchvision ImageFolder + PIL decode + the
   classic PIL train transforms (resize, flip, pad+crop, to-tensor, normalise, random erasing)

All three end with the same normalised float32 batch.

Every reader runs in the main process with one intra-op thread (``--workers 0``, the per-core
figure) unless ``--workers N`` asks for DataLoader workers. The ratio column is against the baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from reidforge.data.readers import IndexedShards, SampleTally, StreamingShards, collate
from reidforge.data.samplers import PKSampler
from reidforge.data.shards import WriteOptions, load_manifest, write_split
from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.data.transforms import Normalize, TransformConfig, build_transforms
from reidforge.shared.io import atomic_write_json
from reidforge.shared.table import format_table

BATCH = 64


def _rate(loader: DataLoader, expected: int, normalize: Normalize) -> float:
    """Images/s over one full pass (after a short warm-up pass over the first batches)."""
    for i, _ in enumerate(loader):
        if i == 2:
            break
    start, n = time.perf_counter(), 0
    tally = SampleTally(expected)
    for batch in loader:
        if isinstance(batch, dict):  # our readers: uint8 batch, normalised as a model's first step would
            normalize(tally.update(batch)["image"])
            n += len(batch["index"])
        else:
            n += len(batch[0])
    return n / (time.perf_counter() - start)


def _unpack(split_dir: Path, folder: Path) -> None:
    indexed = IndexedShards(split_dir)
    for i in range(len(indexed)):
        image, _ = indexed.read_bytes(i)
        cls = folder / f"{int(indexed.pids[i]):05d}"
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{i:07d}.jpg").write_bytes(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="training images to render (about)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = main process, per core)")
    parser.add_argument("--repeats", type=int, default=2, help="passes per reader; the best is reported")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/data_pipeline.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = SyntheticConfig(train_ids=max(args.images // 12, 4), images_per_train_id=12)
    source = build_sources(cfg)["synthetic_person"]["train"]
    tcfg = TransformConfig()  # 256x128, flip, pad 10 + crop, erasing: the BoT recipe
    with tempfile.TemporaryDirectory() as tmp:
        split_dir, folder = Path(tmp) / "train", Path(tmp) / "folder"
        write_split(source, split_dir, "train", relabel=True, options=WriteOptions(samples_per_shard=1000, workers=2))
        _unpack(split_dir, folder)
        n = load_manifest(split_dir)["num_samples"]
        train_tf = build_transforms(tcfg, train=True)
        pil_tf = T.Compose([
            T.Resize((tcfg.height, tcfg.width)), T.RandomHorizontalFlip(tcfg.flip), T.Pad(tcfg.pad),
            T.RandomCrop((tcfg.height, tcfg.width)), T.ToTensor(), T.Normalize(tcfg.mean, tcfg.std),
            T.RandomErasing(p=tcfg.random_erasing, value=0),
        ])
        indexed = IndexedShards(split_dir, train_tf)
        sampler = PKSampler(indexed.pids, indexed.camids, p=16, k=4, seed=0)
        loaders = {
            "streaming shards": DataLoader(
                StreamingShards(split_dir, train_tf), batch_size=BATCH, num_workers=args.workers, collate_fn=collate),
            "indexed P×K from shards": DataLoader(
                indexed, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate),
            "baseline: ImageFolder + PIL": DataLoader(
                datasets.ImageFolder(str(folder), pil_tf), batch_size=BATCH, num_workers=args.workers, shuffle=True),
        }
        normalize = Normalize(tcfg.mean, tcfg.std)
        rates = {name: max(_rate(loader, n, normalize) for _ in range(args.repeats)) for name, loader in loaders.items()}
    base = rates["baseline: ImageFolder + PIL"]
    rows = [[name, round(rate, 1), round(rate / base, 2)] for name, rate in rates.items()]
    print(f"{n} images of {cfg.height}x{cfg.width} -> {tcfg.height}x{tcfg.width}, batch {BATCH}, "
          f"workers {args.workers}, 1 intra-op thread")
    print(format_table(["reader", "images/s", "vs baseline"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"images": n, "workers": args.workers, "images_per_s": rates,
                                 "ratio_vs_baseline": {k: v / base for k, v in rates.items()}})


if __name__ == "__main__":
    main()
