"""Pictures of retrieval results: ranked-list grids, CMC curves and Grad-CAM activation maps.

- :func:`ranked_grid`: one row per query, the query (framed blue) then its top-k gallery images, each
  framed green (same identity), red (another identity) or grey (same identity and camera: junk under
  the protocol), titled with rank, identity, camera and (when given) distance; a legend names the frames.
- :func:`cmc_curve`: CMC (rank-k accuracy) against k for one or several runs.
- :func:`epoch_curves`: per-epoch values of a run's history (e.g. SpCL's ARI and cluster count), one
  panel, with its own labelled y axis, per group of keys of one scale.
- :func:`grad_cam`: Grad-CAM (Selvaraju et al., ICCV 2017) for models without classes: the score is
  the squared norm of the model's embedding (for a re-ID model, what makes the image "look like
  itself"), backpropagated to a chosen feature map; channel weights are the spatially averaged
  gradients and the map is ReLU(sum_c w_c A_c), upsampled to the image.
- :func:`cam_overlay`: images above their maps, with a colour bar; a flat (all-zero or constant) map is
  drawn as a labelled tile and reported with a :class:`FlatMapWarning` (:func:`flat_maps` finds them).

Grids are sized from the crops' aspect ratio (tall person crops, square or wide vehicle crops), so the
tiles fill the figure instead of floating in white space.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402

QUERY, GOOD, BAD, JUNK = "#2c7bb6", "#1a9850", "#d73027", "#999999"
FRAMES = {QUERY: "query", GOOD: "same identity", BAD: "another identity",
          JUNK: "junk: same identity, same camera"}
# History keys stored as fractions in [0, 1] and drawn in percent.
PERCENT_KEYS = ("mAP", "mINP", "R1", "R5", "R10", "R20")
MIN_LINE_POINTS = 4  # fewer points than this, or epochs skipped between them: markers only
FONT = 6.5  # tile titles and legends (points)
GAP = 0.08  # between tiles and at the figure's edges (inches); the 4 pt frames overhang by 0.03
TITLE_BAND = 0.32  # two title lines at FONT above each ranked tile (inches)
CMAP = "jet"
MAX_WIDTH = 16.0  # inches: wide vehicle crops shrink to keep a grid this wide at most


class FlatMapWarning(UserWarning):
    """A Grad-CAM map without any spatial variation: nothing in it says where the model looks."""


def _tile(image: np.ndarray, columns: int) -> tuple[float, float]:
    """(width, height) in inches of a tile showing crops shaped like ``image``, in exactly the crop's
    aspect ratio: at least 0.95 in wide (room for a title line) and, unless ``columns`` wide crops
    would then pass ``MAX_WIDTH``, at least 1.4 in tall."""
    height, width = image.shape[:2]
    aspect = height / width
    tile_w = max(0.95, min(1.4 / aspect, MAX_WIDTH / columns - GAP))
    return tile_w, tile_w * aspect


def _axes(fig: Figure, left: float, top: float, width: float, height: float) -> plt.Axes:
    """Axes placed in inches from the figure's left and top edges."""
    fig_w, fig_h = fig.get_size_inches()
    return fig.add_axes((left / fig_w, 1 - (top + height) / fig_h, width / fig_w, height / fig_h))


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
        ax.set_title(title, fontsize=FONT, pad=3)


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def _percent_axis(ax: plt.Axes, label: str) -> None:
    """A 0-100 % y axis (the whole range, so no zoom exaggerates a gap) with one-decimal labels."""
    ax.set_ylim(-2, 102)  # a little past both ends, so markers at 0 or 100 are not cut in half
    ax.yaxis.set_major_locator(MaxNLocator(steps=[2, 5, 10]))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.set_ylabel(label)


def ranked_grid(query_images: Sequence[np.ndarray], gallery_images: Sequence[np.ndarray], ranked: np.ndarray,
                q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray,
                path: str | Path, *, distances: np.ndarray | None = None,
                distance_name: str = "distance") -> Path:
    """``ranked[i]``: the gallery indices shown for query ``i``, best first (HxWx3 uint8 images).

    Tiles are titled with rank, identity and camera; ``distances`` (shape (queries, gallery size),
    indexed like ``g_pids``: the query rows of the distance matrix) adds each match's distance, named
    ``distance_name`` in the legend (e.g. ``"cosine distance"``)."""
    rows, topk = ranked.shape
    if distances is not None:
        distances = np.asarray(distances)
        if distances.shape != (rows, len(g_pids)):
            raise ValueError(f"ranked_grid: distances has shape {distances.shape}, expected "
                             f"{(rows, len(g_pids))} (one row per query, one column per gallery image)")
    cols = topk + 1
    tile_w, tile_h = _tile(query_images[0], cols)
    entries = [Patch(facecolor="none", edgecolor=c, linewidth=3, label=n) for c, n in FRAMES.items()]
    if distances is not None:
        entries.append(Line2D([], [], linestyle="none", label=f"d: {distance_name} to the query"))
    fig_w = GAP + cols * (tile_w + GAP)
    ncol = len(entries) if fig_w >= 7.5 else 2 if fig_w >= 3.2 else 1
    legend_h = 0.12 + 0.17 * -(-len(entries) // ncol)
    fig = plt.figure(figsize=(fig_w, rows * (TITLE_BAND + tile_h) + GAP + legend_h))
    for i in range(rows):
        top = TITLE_BAND + i * (TITLE_BAND + tile_h)
        _show(_axes(fig, GAP, top, tile_w, tile_h), query_images[i], QUERY,
              f"query: id {q_pids[i]}\ncam {q_camids[i]}")
        for j, g in enumerate(ranked[i]):
            same = g_pids[g] == q_pids[i]
            colour = JUNK if same and g_camids[g] == q_camids[i] else GOOD if same else BAD
            where = f"cam {g_camids[g]}" + ("" if distances is None else f" \u00b7 d {distances[i, g]:.3f}")
            _show(_axes(fig, GAP + (j + 1) * (tile_w + GAP), top, tile_w, tile_h), gallery_images[g], colour,
                  f"{j + 1}: id {g_pids[g]}\n{where}")
    fig.legend(handles=entries, loc="lower center", ncol=ncol, fontsize=FONT, frameon=False,
               handlelength=1.6, columnspacing=1.2, borderaxespad=0.2)
    return _save(fig, path, 110)


def cmc_curve(curves: Mapping[str, np.ndarray], path: str | Path, max_rank: int = 20) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 3.2), layout="constrained")
    for name, cmc in curves.items():
        k = min(max_rank, len(cmc))
        ax.plot(np.arange(1, k + 1), 100 * np.asarray(cmc[:k]), marker="o", markersize=3, label=name)
    ax.set_xlabel("rank k")
    _percent_axis(ax, "matching rate (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, 130)


def epoch_curves(history: Sequence[Mapping[str, float]], panels: Sequence[Sequence[str]], path: str | Path,
                 title: str = "", *, ylabels: Sequence[str] | None = None,
                 percent: Collection[str] = PERCENT_KEYS) -> Path:
    """One panel per group of history keys against ``epoch``; epochs without a key are skipped.

    The keys of one panel share its y axis, so group only quantities of one unit and scale (a count
    of clusters beside a count of outliers ten times larger flattens the first). ``ylabels`` names
    each panel's y axis (default: its keys). Keys in ``percent`` are fractions in [0, 1] drawn in % on
    a full 0-100 axis. A series with fewer than ``MIN_LINE_POINTS`` points, or with epochs skipped
    between them (e.g. an evaluation every few epochs), is drawn as markers only: a line would invent
    the values between."""
    if ylabels is not None and len(ylabels) != len(panels):
        raise ValueError(f"epoch_curves: {len(ylabels)} ylabels for {len(panels)} panels")
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False, sharex=True,
                             layout="constrained")
    for n, (ax, keys) in enumerate(zip(axes[0], panels)):
        in_percent = [key in percent for key in keys]
        if any(in_percent) and not all(in_percent):
            raise ValueError(f"epoch_curves: panel {list(keys)} mixes percentages with other quantities")
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if key in row]
            if not points:
                continue
            x, y = map(np.asarray, zip(*points))
            if all(in_percent):
                if y.min() < 0 or y.max() > 1:
                    raise ValueError(f"epoch_curves: {key} is drawn in % from fractions in [0, 1], got {y.min():g}"
                                     f" to {y.max():g}")
                y = 100 * y
            first = epochs.index(x[0])
            contiguous = epochs[first:first + len(x)] == list(x)
            line = "-" if len(x) >= MIN_LINE_POINTS and contiguous else "none"
            ax.plot(x, y, linestyle=line, marker="o", markersize=3 if line == "-" else 5, label=key)
        label = ylabels[n] if ylabels is not None else ", ".join(keys)
        if keys and all(in_percent):
            _percent_axis(ax, label if ylabels is not None else f"{label} (%)")
        else:
            ax.set_ylabel(label)
            if ax.has_data() and ax.dataLim.y0 >= 0:  # counts and scores from zero: no zoom exaggerates a change
                ax.set_ylim(bottom=-0.03 * ax.get_ylim()[1])  # with room for the markers at zero
            if ax.has_data() and all(float(v).is_integer() for line in ax.lines for v in line.get_ydata()):
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(x=0.1)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, 130)


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """``layer``'s dotted name inside ``model`` (as ``named_modules`` gives it), for picture titles."""
    for name, module in model.named_modules():
        if module is layer:
            return name or type(model).__name__
    raise ValueError(f"layer_name: {type(layer).__name__} is not a submodule of {type(model).__name__}")


def grad_cam(model: nn.Module, layer: nn.Module, images: torch.Tensor,
             reshape: Callable[[torch.Tensor], torch.Tensor] | None = None, **meta: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps in [0, 1] for a normalised (N, 3, H, W) batch, from ``layer``'s output.
    ``reshape`` lays that output out as an (N, C, h, w) map, for layers that give something else (a ViT's
    tokens: the ``grad-cam`` package's ``reshape_transform``); it is applied to the activations and their
    gradients alike. ``meta`` (``camids``, ``viewids``) goes to models that embed cameras or views; a map
    with no variation comes back all zero (see :func:`flat_maps`).

    A forward hook rather than the ``grad-cam`` package: that package targets class scores, calls the
    model without the ``camids``/``viewids`` that camera- and view-aware models need, leaves the model
    in eval mode and pulls in OpenCV, for what is here one hook and three tensor lines."""
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
    if reshape is not None:
        activations, gradients = reshape(activations), reshape(gradients)
    if activations.ndim != 4:
        raise ValueError(f"Grad-CAM: the layer {type(layer).__name__} gives {tuple(activations.shape)}, not an "
                         "(N, C, h, w) map (a reshape lays tokens out as one)")
    cam = F.relu((gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.flatten(1).min(dim=1).values[:, None, None]
    high = cam.flatten(1).max(dim=1).values[:, None, None]
    return ((cam - low) / (high - low).clamp(min=1e-12)).detach()


def flat_maps(maps: torch.Tensor) -> list[int]:
    """Indices of the maps without spatial variation (all zero, or constant), which show nothing."""
    flat = torch.as_tensor(maps).flatten(1)
    return [int(i) for i in torch.nonzero(flat.amax(dim=1) - flat.amin(dim=1) <= 1e-6).flatten()]


def _flatness(cam: torch.Tensor) -> str:
    return "all zero" if float(cam.abs().max()) <= 1e-6 else "constant"


def cam_overlay(images: Sequence[np.ndarray], maps: torch.Tensor, path: str | Path, alpha: float = 0.45, *,
                layer: str = "") -> Path:
    """Each image above its Grad-CAM map blended over it (jet colour map, colour bar at the right).

    ``layer`` (e.g. from :func:`layer_name`) goes into the title. A flat map is drawn as the dimmed
    image labelled "map is all zero" (or "map is constant") and reported with a
    :class:`FlatMapWarning`; :func:`flat_maps` gives the same indices to a caller that reports itself."""
    maps = torch.as_tensor(maps).detach().cpu()
    if len(images) != len(maps):
        raise ValueError(f"cam_overlay: {len(images)} images but {len(maps)} maps")
    if any(tuple(m.shape) != image.shape[:2] for image, m in zip(images, maps)):
        raise ValueError(f"cam_overlay: maps of shape {tuple(maps.shape[1:])} do not match images of shape "
                         f"{images[0].shape[:2]} (grad_cam returns maps at the input's size)")
    n = len(images)
    flat = flat_maps(maps)
    tile_w, tile_h = _tile(images[0], n)
    left, top, bar = 0.3, 0.42, 0.8  # row labels, title, colour bar with its label (inches)
    fig_w = left + n * tile_w + (n - 1) * GAP + bar
    fig = plt.figure(figsize=(fig_w, top + 2 * tile_h + 2 * GAP))
    colours = plt.get_cmap(CMAP)
    for i, image in enumerate(images):
        x = left + i * (tile_w + GAP)
        above, below = _axes(fig, x, top, tile_w, tile_h), _axes(fig, x, top + tile_h + GAP, tile_w, tile_h)
        _show(above, image)
        picture = image.astype(np.float64) / 255
        if i in flat:
            _show(below, 0.35 + 0.3 * picture.mean(axis=2, keepdims=True).repeat(3, axis=2), BAD)
            below.text(0.5, 0.5, f"map is\n{_flatness(maps[i])}", transform=below.transAxes, ha="center",
                       va="center", fontsize=8, color=BAD, fontweight="bold",
                       bbox={"facecolor": "white", "edgecolor": "none", "pad": 2})
        else:
            _show(below, np.clip((1 - alpha) * picture + alpha * colours(maps[i].numpy())[..., :3], 0, 1))
        if i == 0:
            above.set_ylabel("image", fontsize=7)
            below.set_ylabel("Grad-CAM", fontsize=7)
    cax = _axes(fig, fig_w - bar + 0.12, top + tile_h + GAP, 0.1, tile_h)
    fig.colorbar(ScalarMappable(Normalize(0, 1), colours), cax=cax).set_label(
        "activation (each map\nscaled to its range)", fontsize=FONT)
    cax.tick_params(labelsize=FONT)
    at = f" at {layer}" if layer else ""
    what = " or ".join(sorted({_flatness(maps[i]) for i in flat}))
    fig.suptitle(f"Grad-CAM{at}" + (f": {len(flat)} of {n} maps {what}" if flat else ""), fontsize=8,
                 wrap=True, y=1 - 0.08 / fig.get_size_inches()[1], va="top")
    if flat:
        warnings.warn(f"Grad-CAM{at}: the maps of images {flat} are {what} (no gradient reaches the layer, or "
                      "ReLU removed all of it): drawn as labelled tiles", FlatMapWarning, stacklevel=2)
    return _save(fig, path, 110)
