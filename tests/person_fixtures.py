"""Fixture trees for the person dataset adapters: the real folder layouts and file names, tiny images."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


@lru_cache(maxsize=None)
def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 8), (90, 120, 200)).save(buf, format=fmt)  # 8 high, 4 wide
    return buf.getvalue()


def write_image(path: Path) -> Path:
    """A tiny JPEG or PNG (from the suffix) at ``path``, creating its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encoded("PNG" if path.suffix == ".png" else "JPEG"))
    return path


def folder_tree(root: Path, files: Mapping[str, Iterable[str]]) -> Path:
    """``root/<folder>/<name>`` for every name of every folder (Market-style trees)."""
    for folder, names in files.items():
        for name in names:
            write_image(root / folder / name)
    return root


def _column(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)


def cuhk03_config(path: Path, names: Sequence[str], labels: Sequence[int], views: Sequence[int],
                  splits: Mapping[str, Sequence[int]]) -> Path:
    """A new-protocol config as Zhong et al. ship it: ``filelist`` a cell array of names, ``labels`` and
    ``camId`` double column vectors, ``train_idx``/``query_idx``/``gallery_idx`` 1-based column vectors."""
    filelist = np.empty((len(names), 1), dtype=object)
    filelist[:, 0] = list(names)
    savemat(path, {"filelist": filelist, "labels": _column(labels), "camId": _column(views),
                   **{f"{split}_idx": _column(idx) for split, idx in splits.items()}})
    return path


def msmt17_tree(root: Path, train_dir: str, test_dir: str, lists: Mapping[str, Sequence[str]]) -> Path:
    """``list_<name>.txt`` files of ``<pid>/<file> <pid>`` lines and the images they name (train and val
    under ``train_dir``, query and gallery under ``test_dir``)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in lists.items():
        (root / f"list_{name}.txt").write_text("".join(f"{line}\n" for line in lines))
        for line in lines:
            write_image(root / (train_dir if name in ("train", "val") else test_dir) / line.split()[0])
    return root
