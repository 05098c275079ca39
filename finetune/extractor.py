"""Features of image files from any model file: the library side of ``finetune/search.py``.

    from reidforge import FeatureExtractor
    extract = FeatureExtractor("runs/bot_tiny/model_final.safetensors")   # or .onnx, a checkpoint, a foreign file
    features = extract("photos/")                                         # (N, D) float32, L2-normalised rows

The counterpart of torchreid's ``FeatureExtractor(model_path)(paths)`` and FastReID's ``DefaultPredictor``.
A model is opened by :func:`reidforge.finetune.deploy.load_embedder` (our exports, training checkpoints,
SpCL backbones, ONNX exports; foreign files with ``model=``). Images are decoded to uint8 RGB (JPEG and
PNG of any mode by ``reidforge.data.readers.decode``, BMP by PIL, anything over ``MAX_IMAGE_PIXELS``
refused from its header) and resized on the host with the training pipeline's test transform, so images
of any size batch together and get the features ``finetune/evaluate.py`` gives them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from reidforge.data.readers import MAX_IMAGE_PIXELS, decode
from reidforge.data.transforms import TransformConfig, build_transforms
from reidforge.finetune.deploy import Embedder, ModelSource, load_embedder
from reidforge.shared.config import ConfigError
from reidforge.shared.progress import Progress
from reidforge.shared.text import printable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(path: Path) -> list[Path]:
    """The images under a folder (recursively, sorted), or ``[path]`` for one image file."""
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or folder")
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ConfigError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return images


def read_image(path: Path) -> np.ndarray:
    """uint8 (3, H, W) RGB; ``OSError``/``ValueError`` for a file that cannot or must not be decoded."""
    if path.suffix.lower() != ".bmp":
        return decode(path.read_bytes()).numpy()
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image of {image.width}x{image.height} pixels is over the "
                                 f"{MAX_IMAGE_PIXELS:,}-pixel limit")
            rgb = np.asarray(image.convert("RGB"))
    except (Image.DecompressionBombError, SyntaxError) as e:  # PIL's other ways of rejecting a file
        raise ValueError(str(e)) from None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def embed_images(embedder: Embedder, paths: Sequence[Path], batch_size: int, warn: Callable[[str], None],
                 desc: str = "embedding images", progress: bool = True
                 ) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """L2-normalised float32 features of the readable images, their positions in ``paths``, the skipped ones;
    a progress bar ``desc`` unless ``progress`` is False."""
    h, w = embedder.input_size
    resize = build_transforms(TransformConfig(height=h, width=w), train=False)
    feats: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[tuple[int, str]] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        ids = {name: np.zeros(len(batch), dtype=np.int64) for name in embedder.id_inputs}
        feats.append(embedder(np.stack(batch), ids))
        batch.clear()

    with Progress(len(paths), desc, "extract", unit="img", enabled=progress) as bar:
        for i, path in bar.wrap(enumerate(paths)):
            try:
                image = read_image(path)
            except (OSError, ValueError) as e:
                # PIL's message for a file it does not recognise repeats the path, which the warning names already.
                reason = ("not an image PIL can decode" if isinstance(e, UnidentifiedImageError)
                          else str(e).splitlines()[0] if str(e) else type(e).__name__)
                warn(f"warning: {printable(str(path))}: unreadable image, skipped ({reason})")
                skipped.append((i, reason))
                continue
            batch.append(resize(torch.from_numpy(image)).numpy())
            kept.append(i)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    if not feats:
        return np.zeros((0, 0), dtype=np.float32), kept, skipped
    x = np.concatenate(feats).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), kept, skipped


def _image_paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(images, (str, Path)):
        return list_images(Path(images))
    paths = [Path(p) for p in images]
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path}: no such image file")
    return paths


class FeatureExtractor:
    """``FeatureExtractor(model_path)(images)``: L2-normalised float32 features, one row per image.

    ``images`` is a folder (its images found recursively, in sorted path order), one image file, or a list
    of image files (rows in list order). ``model``, ``model_options``, ``allow_partial`` and ``input_size``
    ((height, width)) say how to read a foreign checkpoint, as ``--model``, ``--model-options``,
    ``--allow-partial`` and ``--input-size`` do on the command line. ``device`` defaults to CUDA when there
    is one. An image that cannot be decoded is an error naming it (rows never silently go missing);
    ``paths`` of the last call lists the images in row order.
    """

    def __init__(self, model_path: str | Path, device: str | torch.device | None = None, batch_size: int = 32,
                 model: str | None = None, model_options: dict[str, Any] | None = None,
                 allow_partial: bool = False, input_size: Sequence[int] | None = None,
                 note: Callable[[str], None] = print):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        source = ModelSource(model, dict(model_options or {}), allow_partial, input_size)
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.embedder: Embedder = load_embedder(model_path, device, source, note)
        self.batch_size = batch_size
        self.paths: list[Path] = []

    @property
    def input_size(self) -> tuple[int, int]:
        return self.embedder.input_size

    def __call__(self, images: str | Path | Sequence[str | Path]) -> torch.Tensor:
        paths = _image_paths(images)
        features, _, skipped = embed_images(self.embedder, paths, self.batch_size, lambda _: None)
        if skipped:
            position, reason = skipped[0]
            raise ValueError(f"{printable(str(paths[position]))}: unreadable image ({reason})"
                             + (f"; {len(skipped) - 1} more unreadable" if len(skipped) > 1 else ""))
        self.paths = paths
        return torch.from_numpy(features)
