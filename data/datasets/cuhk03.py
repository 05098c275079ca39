"""CUHK03-NP: CUHK03 (Li et al., "DeepReID", CVPR 2014) under the new protocol of Zhong et al.,
"Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017: 767 train ids, 700 test ids,
one query per test id and camera (1,400 queries), evaluated like Market-1501.

Two layouts are handled; ``--variant`` picks the labeled (hand-drawn) or detected (DPM) boxes:

(a) torchreid's, ROOT = ``cuhk03/`` or the folder that contains it::

        ROOT/cuhk03_new_protocol_config_{labeled,detected}.mat   the split (scipy loadmat format)
        ROOT/images_{labeled,detected}/{pair}_{pid:03d}_{view}_{img:02d}.png

    The PNGs are those torchreid extracts from ``cuhk03_release/cuhk-03.mat`` on its first run. The
    config's ``filelist`` holds these very file names; ``labels`` the global ids 1..1467; ``train_idx``,
    ``query_idx`` and ``gallery_idx`` index both, **1-based** (MATLAB), and are shifted by -1.
(b) the Market-format copy, ROOT = the folder that contains ``cuhk03-np/`` (or ``cuhk03-np/`` itself)::

        ROOT/cuhk03-np/{labeled,detected}/{bounding_box_train,query,bounding_box_test}/PPPP_cC_*.png

    parsed like Market-1501 (``market1501.py``), cameras 1-2.

camid = view - 1 (0 or 1); pid already tells the camera pair apart. Train pids are relabelled 0..N-1 by
the shard writer; query and gallery keep the raw labels. Keys are the file stems; PNG bytes are stored
as they are. Published counts: labeled 7,368 / 1,400 / 5,328 images, detected 7,365 / 1,400 / 5,332
(train / query / gallery).

Deviations from torchreid / FastReID:

* the default variant is labeled (FastReID's default; torchreid's is detected);
* the two variants are two datasets, ``cuhk03_labeled`` and ``cuhk03_detected``, so that both can be
  built under one output root;
* layout (a) reads the config directly (torchreid caches it as ``splits_new_*.json``) and does not
  extract images: ``images_<variant>/`` must exist. The config's ``camId`` is not read; camid comes
  from the view in the file name, as in torchreid;
* the writer relabels train pids in sorted raw-label order (torchreid: the iteration order of a set);
* an index outside the file list, or a name or file out of pattern, fails in one line.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import MatReadError, matfile_version

from reidforge.data.datasets.market1501 import file_source, find_data_dir, market_style_splits
from reidforge.data.source import DatasetAdapter, DatasetError, FileRecord, Sources, register, require

VARIANTS = ("labeled", "detected")
DATA_FOLDER = "cuhk03"
NP_FOLDER = "cuhk03-np"
LAYOUT = ("ROOT[/cuhk03]/{cuhk03_new_protocol_config_VARIANT.mat, images_VARIANT/*.png} "
          "or ROOT[/cuhk03-np]/VARIANT/{bounding_box_train,query,bounding_box_test}/*.png, "
          "VARIANT = labeled or detected")
FILE_NAME = re.compile(r"\d+_\d+_([12])_\d+\.png")  # {pair}_{pid}_{view}_{img}.png
SPLIT_INDICES = {"train": "train_idx", "query": "query_idx", "gallery": "gallery_idx"}
PUBLISHED = {
    "labeled": {"train": {"images": 7_368, "ids": 767}, "query": {"images": 1_400, "ids": 700},
                "gallery": {"images": 5_328, "ids": 700}},
    "detected": {"train": {"images": 7_365, "ids": 767}, "query": {"images": 1_400, "ids": 700},
                 "gallery": {"images": 5_332, "ids": 700}},
}


def _config_path(data_dir: Path, variant: str) -> Path:
    return data_dir / f"cuhk03_new_protocol_config_{variant}.mat"


def _field(config: dict, name: str, path: Path, dataset: str) -> np.ndarray:
    if name not in config:
        raise DatasetError(f"{dataset}: {path} has no field {name!r}")
    return np.asarray(config[name]).ravel()


def new_protocol_splits(dataset: str, data_dir: Path, variant: str) -> dict[str, list[FileRecord]]:
    """train/query/gallery records from the new-protocol config and the extracted images of ``variant``."""
    path, image_dir = _config_path(data_dir, variant), data_dir / f"images_{variant}"
    require(data_dir, image_dir.name, dataset=dataset, layout=LAYOUT)
    try:
        v73 = matfile_version(path)[0] == 2  # the HDF5-based v7.3 format, which loadmat does not read
        config = {} if v73 else loadmat(path)
    except (MatReadError, ValueError, OSError) as e:
        raise DatasetError(f"{dataset}: cannot read {path} as a MATLAB v5 file: {e}") from None
    if v73:
        raise DatasetError(f"{dataset}: {path} is a MATLAB v7.3 (HDF5) file; the release's configs are v5: use "
                           "the original file, or re-save it in MATLAB with save(..., '-v7')")
    # filelist is a cell array: each entry loads as a 1-element string array (empty for an empty cell).
    names = ["".join(map(str, np.asarray(entry).ravel())) for entry in _field(config, "filelist", path, dataset)]
    labels = _field(config, "labels", path, dataset).astype(np.int64)
    if len(labels) != len(names):
        raise DatasetError(f"{dataset}: {path} has {len(names)} filelist entries but {len(labels)} labels")
    splits = {}
    for split, field in SPLIT_INDICES.items():
        indices = _field(config, field, path, dataset).astype(np.int64) - 1  # MATLAB indices are 1-based
        bad = indices[(indices < 0) | (indices >= len(names))]
        if bad.size:
            raise DatasetError(f"{dataset}: {path} field {field} holds {bad[0] + 1}, outside 1-{len(names)}")
        records = []
        for i in indices:
            match = FILE_NAME.fullmatch(names[i])
            if match is None:
                raise DatasetError(f"{dataset}: {path} filelist entry {i + 1} {names[i]!r} is not "
                                   "{pair}_{pid}_{view}_{img}.png")
            image = image_dir / names[i]
            if not image.is_file():
                raise DatasetError(f"{dataset}: {image} (filelist entry {i + 1} of {path.name}) not found")
            records.append(FileRecord(path=image, key=image.stem, pid=int(labels[i]), camid=int(match[1]) - 1))
        splits[split] = records
    return splits


@register
class CUHK03Adapter(DatasetAdapter):
    name = "cuhk03"
    summary = ("CUHK03-NP, the new protocol of Zhong et al. CVPR'17 (767 train / 700 test ids): the "
               "cuhk03_new_protocol_config_*.mat configs with torchreid's images_*/ PNGs, or the Market-format "
               "cuhk03-np/ copy")
    root_help = "cuhk03/ (torchreid's layout) or the folder that contains cuhk03/ or cuhk03-np/"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--variant", choices=VARIANTS, default="labeled",
                            help="labeled (hand-drawn) or detected (DPM) boxes; default labeled, FastReID's "
                                 "default (torchreid defaults to detected); built as dataset cuhk03_VARIANT")

    def sources(self) -> Sources:
        root, variant = self.args.root, self.args.variant
        dataset = f"{self.name}_{variant}"
        require(root, dataset=self.name, layout=LAYOUT)
        published = PUBLISHED[variant]
        data_dir = find_data_dir(root, DATA_FOLDER)
        config = _config_path(data_dir, variant)
        if config.is_file():
            records = new_protocol_splits(self.name, data_dir, variant)
            return {dataset: {split: file_source(dataset, split, recs, data_dir, config, published[split])
                              for split, recs in records.items()}}
        np_dir = find_data_dir(root, NP_FOLDER) / variant
        if not np_dir.is_dir():
            raise DatasetError(f"{self.name}: no {config.name} or {NP_FOLDER}/{variant}/ under {root}; "
                               f"expected layout: {LAYOUT}")
        return {dataset: market_style_splits(dataset, np_dir, cameras=2, layout=LAYOUT, published=published)}
