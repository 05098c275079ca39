"""Pictures of retrieval results: ranked-list grids, CMC curves and Grad-CAM activation maps.

- :func:`ranked_grid`: one row per query, the query then its top-k gallery images, each framed green
  (same identity), red (another identity) or grey (same identity and camera: junk under the protocol).
- :func:`cmc_curve`: CMC (rank-k accuracy) against k for one or several runs.
- :func:`epoch_curves`: per-epoch values of a run's history (e.g. SpCL's ARI and cluster count), one
  panel per group of keys.
- :func:`grad_cam`: Grad-CAM (Selvaraju et al., ICCV 2017) for models without classes: the score is
  the squared norm of the model's embedding (for a re-ID model, what makes the image "look like
  itself"), backpropagated to a chosen feature map; channel weights are the spatially averaged
  gradients and the map is ReLU(sum_c w_c A_c), upsampled to the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

GOOD, BAD, JUNK = "#1a9850", "#d73027", "#999999"


def _show(ax: plt.Axes, image: np.ndarray, colour: str | None = None, title: str = "") -> None:
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_color(colour)
            spine.set_linewidth(4)
    if title:
        ax.set_title(title, fontsize=7)


def ranked_grid(query_images: Sequence[np.ndarray], gallery_images: Sequence[np.ndarray], ranked: np.ndarray,
                q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray,
                path: str | Path) -> Path:
    """``ranked[i]``: the gallery indices shown for query ``i``, best first (HxWx3 uint8 images)."""
    rows, topk = ranked.shape
    fig, axes = plt.subplots(rows, topk + 1, figsize=(1.1 * (topk + 1), 2.2 * rows), squeeze=False)
    for i in range(rows):
        _show(axes[i, 0], query_images[i], "#2c7bb6", f"query {q_pids[i]}")
        for j, g in enumerate(ranked[i]):
            junk = g_pids[g] == q_pids[i] and g_camids[g] == q_camids[i]
            colour = JUNK if junk else GOOD if g_pids[g] == q_pids[i] else BAD
            _show(axes[i, j + 1], gallery_images[g], colour, f"{j + 1}: {g_pids[g]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def cmc_curve(curves: Mapping[str, np.ndarray], path: str | Path, max_rank: int = 20) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, cmc in curves.items():
        k = min(max_rank, len(cmc))
        ax.plot(np.arange(1, k + 1), 100 * np.asarray(cmc[:k]), marker="o", markersize=3, label=name)
    ax.set_xlabel("rank k")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def epoch_curves(history: Sequence[Mapping[str, float]], panels: Sequence[Sequence[str]], path: str | Path,
                 title: str = "") -> Path:
    """One panel per group of history keys against ``epoch``; epochs without a key are skipped."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if key in row]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def grad_cam(model: nn.Module, layer: nn.Module, images: torch.Tensor, **meta: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps in [0, 1] for a normalised (N, 3, H, W) batch, from ``layer``'s output.
    ``meta`` (``camids``, ``viewids``) goes to models that embed cameras or views."""
    store: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        store["a"] = output

    handle = layer.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            images = images.clone().requires_grad_(True)  # so the graph exists even with frozen weights
            feature = model(images, **meta)
            feature.pow(2).sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    if "a" not in store:
        raise ValueError(f"Grad-CAM: the layer {type(layer).__name__} was not run by the model's forward")
    activations, gradients = store["a"], store["a"].grad
    cam = F.relu((gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.flatten(1).min(dim=1).values[:, None, None]
    high = cam.flatten(1).max(dim=1).values[:, None, None]
    return ((cam - low) / (high - low).clamp(min=1e-12)).detach()


def cam_overlay(images: Sequence[np.ndarray], maps: torch.Tensor, path: str | Path, alpha: float = 0.45) -> Path:
    """Each image above its Grad-CAM map blended over it (jet colour map)."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 4.4), squeeze=False)
    colours = plt.get_cmap("jet")
    for i, image in enumerate(images):
        heat = colours(maps[i].numpy())[..., :3]
        blend = (1 - alpha) * image.astype(np.float64) / 255 + alpha * heat
        _show(axes[0, i], image)
        _show(axes[1, i], np.clip(blend, 0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
