"""Loading weights from local files onto a model, with a report of what matched.

Nothing is ever downloaded, and nothing is unpickled beyond plain data: ``.pth``/``.pt``/``.bin``/``.tar``
files load with ``torch.load(weights_only=True)`` (a pickle with code in it is refused), ``.safetensors``
with safetensors. :func:`read_checkpoint` unwraps training checkpoints (``state_dict``, ``model``,
``net`` ... nesting: torchreid's ``{'state_dict', 'epoch', 'optimizer', ...}``, FastReID's ``{'model',
'iteration', ...}``), keeps the tensors and lists the other entries as ignored, strips ``module.``
(DataParallel / DDP) and collapses domain-specific BatchNorm (``dsbn.<domain>``, SpCL's ``BN_S``/``BN_T``).

- :func:`load_pretrained` is the one way a pretrained or released file reaches a model
  (``model.weights`` of either stage). It detects the file's layout by structure
  (``reidforge.shared.checkpoint_layouts``: torchvision, timm, Cadene, IBN-Net, torchreid, FastReID, the DM-OSNet
  authors', SpCL / cluster-contrast-reid, OpenUnReID, our own exports), maps it onto the backbone's own
  key names and copies each backbone tensor into every model tensor that ``model.trunk_map()`` builds
  from it (every FNC branch's copy of layer3 and layer4, both MBR R50 branches). It is strict: a trunk
  tensor the file leaves at its init (BatchNorm's ``num_batches_tracked`` counters aside) or a trunk
  tensor of another shape is an error naming the file, the layout and the first missing keys, unless
  ``allow_partial``; head tensors (BNNeck BN, classifier, GeM p) load where the file has them at the
  model's shape, and are skipped and reported otherwise (a classifier for another number of classes).
- :func:`export_model` / :func:`read_export_metadata`: our safetensors exports and their JSON header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from reidforge.shared.checkpoint_layouts import NAMINGS, Naming, collapse_dsbn, head_candidates, prefixes, strip_module
from reidforge.shared.io import atomic_open, atomic_write_json

# Container keys that hold the state dict of a training checkpoint, in the order they are tried.
NESTING_KEYS = ("state_dict", "model", "net", "module", "model_state_dict", "network")
WEIGHTS_REPORT = "weights_report.json"  # written into the run directory by the training loops
METADATA_KEY = "reidforge"


class WeightsError(ValueError):
    """A weights file that cannot be used, described in one line."""


@dataclass
class Checkpoint:
    """The tensors of a weights file and what was done to reach them."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    container: str  # how the file holds its state dict, e.g. "FastReID checkpoint ('model')"
    ignored: list[str] = field(default_factory=list)  # non-tensor entries (epoch, optimizer, iteration ...)
    notes: list[str] = field(default_factory=list)  # "module. stripped", "dsbn.<domain> collapsed" ...


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a local weights file safely and flatten it to ``{key: tensor}`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        metadata = read_header(path)
        try:
            tensors = load_file(str(path))
        except Exception as e:  # a sound header over truncated or overlapping data
            raise WeightsError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        container = "safetensors state dict"
        if METADATA_KEY in metadata:
            meta = _export_json(path, metadata)
            container = f"reidforge {meta.get('kind', 'model')} export ({meta.get('architecture', '?')})"
        ckpt = Checkpoint(tensors, metadata, container)
    else:
        try:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with code in it, or not a torch file at all
            raise WeightsError(f"{path}: not loadable as plain tensors ({str(e).splitlines()[0]})") from None
        ckpt = _unwrap(obj, path)
    ckpt.tensors, stripped = strip_module(ckpt.tensors)
    if stripped:
        ckpt.notes.append("module. stripped")
    ckpt.tensors, collapsed = collapse_dsbn(ckpt.tensors)
    ckpt.notes += collapsed
    return ckpt


def _unwrap(obj: Any, path: Path) -> Checkpoint:
    trail: list[str] = []
    ignored: list[str] = []
    while isinstance(obj, Mapping):
        nested = next((k for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        ignored += [str(k) for k in obj if k != nested]
        trail.append(nested)
        obj = obj[nested]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    ignored += [str(k) for k in obj if k not in tensors]
    if not tensors:
        shown = ", ".join(map(str, list(obj)[:6]))
        raise WeightsError(f"{path}: holds no tensors (entries: {shown or 'none'})")
    if trail == ["model"]:
        container = "FastReID checkpoint ('model')"
    elif trail == ["state_dict"]:
        container = "training checkpoint ('state_dict': torchreid, SpCL)"
    elif trail:
        container = "checkpoint (" + " > ".join(repr(k) for k in trail) + ")"
    else:
        container = "plain state dict"
    return Checkpoint(tensors, {}, container, ignored)


# ---------------------------------------------------------------------------------------------------
@dataclass
class MatchReport:
    """What :func:`load_pretrained` found: the layout, and every trunk/head tensor's fate."""

    path: str
    layout: str
    trunk_total: int
    trunk_loaded: list[str] = field(default_factory=list)  # model keys
    trunk_missing: list[str] = field(default_factory=list)  # model keys left at their init
    trunk_mismatched: list[str] = field(default_factory=list)  # "file key shape -> model key shape"
    head_loaded: list[str] = field(default_factory=list)
    head_skipped: list[str] = field(default_factory=list)  # head tensors of another shape (class count)
    unused: list[str] = field(default_factory=list)  # file tensors with no place in the model
    ignored: list[str] = field(default_factory=list)  # non-tensor checkpoint entries
    copies: list[list[str]] = field(default_factory=list)  # trunk_map pairs (model prefix, backbone prefix)

    def line(self) -> str:
        missing = f", {len(self.trunk_missing)} left at init" if self.trunk_missing else ""
        return (f"weights {self.path} [{self.layout}]: trunk {len(self.trunk_loaded)}/{self.trunk_total} tensors"
                f"{missing}, head {len(self.head_loaded)} loaded / {len(self.head_skipped)} skipped (shape), "
                f"{len(self.unused)} file tensors unused")

    def write(self, path: str | Path) -> None:
        counts = {k: len(v) for k, v in asdict(self).items() if isinstance(v, list) and k != "copies"}
        atomic_write_json(Path(path), {"counts": counts, **asdict(self)})


def _trunk_keys(model: nn.Module) -> dict[str, str]:
    """Model key -> backbone key of every tensor built from the pretrained backbone (a bare backbone: all)."""
    if hasattr(model, "trunk_keys"):
        return model.trunk_keys()
    return {k: k for k in model.state_dict()}


def _best_mapping(tensors: Mapping[str, torch.Tensor], wanted: Mapping[str, tuple[int, ...]]
                  ) -> tuple[str, Naming, dict[str, str]]:
    """(prefix, naming, {backbone key: file key}) under which the most file tensors land on ``wanted``
    by key and shape; ties keep the earlier prefix ("" first) and the earlier naming."""
    best: tuple[int, str, Naming, dict[str, str]] | None = None
    for prefix in prefixes(list(tensors)):
        sub = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
        names = list(sub)
        for naming in NAMINGS:
            if not naming.matches(names):
                continue
            mapped = naming.rename(sub)
            score = sum(1 for bk, fk in mapped.items() if wanted.get(bk) == tuple(tensors[fk].shape))
            if best is None or score > best[0]:
                best = (score, prefix, naming, mapped)
    assert best is not None  # the last naming matches anything
    return best[1], best[2], best[3]


def load_pretrained(model: nn.Module, path: str | Path, allow_partial: bool = False,
                    report_path: str | Path | None = None, partial_option: str = "model.allow_partial"
                    ) -> MatchReport:
    """Load a pretrained or released file onto ``model``'s trunk (and head where it fits); see the module
    docstring. ``report_path`` receives the JSON report, also when the load fails; ``partial_option``
    names the config key that accepts a partial file, for the error message."""
    ckpt = read_checkpoint(path)
    tensors = ckpt.tensors
    target = model.state_dict()
    trunk = _trunk_keys(model)
    wanted = {bk: tuple(target[mk].shape) for mk, bk in trunk.items()}
    prefix, naming, mapped = _best_mapping(tensors, wanted)
    layout = ", ".join([ckpt.container, *ckpt.notes, *([f"prefix {prefix!r}"] if prefix else []), naming.name])
    report = MatchReport(str(path), layout, len(trunk), ignored=ckpt.ignored,
                         copies=[list(p) for p in getattr(model, "trunk_map", lambda: ())()])
    loaded: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for mk, bk in trunk.items():
        want = tuple(target[mk].shape)
        # The model's own key first (our export of this architecture: each branch keeps its own copy).
        fk = mk if mk in tensors and tuple(tensors[mk].shape) == want else mapped.get(bk)
        if fk is None:
            report.trunk_missing.append(mk)
        elif tuple(tensors[fk].shape) != want:
            report.trunk_mismatched.append(f"{fk} {tuple(tensors[fk].shape)} -> {mk} {want}")
            used.add(fk)
        else:
            loaded[mk] = tensors[fk]
            report.trunk_loaded.append(mk)
            used.add(fk)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    heads = {mk: mk for mk in target if mk not in trunk and mk in tensors}
    for mk, fk in head_candidates(list(tensors), shapes).items():
        if mk in target and mk not in trunk:
            heads.setdefault(mk, fk)
    for mk, fk in heads.items():
        value, want = tensors[fk], target[mk].shape
        if mk.endswith("pool.p") and value.numel() == target[mk].numel():
            value = value.reshape(want)  # FastReID's GeM p is (1,), ours a scalar
        used.add(fk)
        if value.shape == want:
            loaded[mk] = value
            report.head_loaded.append(mk)
        else:
            report.head_skipped.append(f"{fk} {tuple(value.shape)} -> {mk} {tuple(want)}")
    report.unused = [k for k in tensors if k not in used]
    if report_path is not None:
        report.write(report_path)

    where = f"{path} [{layout}]"
    if report.trunk_mismatched:
        raise WeightsError(f"{where}: {len(report.trunk_mismatched)} trunk tensors have another shape than the "
                           f"model's (first: {report.trunk_mismatched[0]}): a file for another architecture")
    if not report.trunk_loaded:
        raise WeightsError(f"{where}: no tensor matches the model's trunk (first file key: {next(iter(tensors))})")
    required = [mk for mk in report.trunk_missing if not mk.endswith("num_batches_tracked")]
    if required and not allow_partial:
        first = list(dict.fromkeys(trunk[mk] for mk in required))[:3]
        raise WeightsError(f"{where}: {len(required)} of {len(trunk)} trunk tensors are not in the file and would "
                           f"stay at their init (first: {', '.join(first)}); {partial_option}=true accepts it")
    model.load_state_dict(loaded, strict=False)
    return report


# ---------------------------------------------------------------------------------------------------
def export_model(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``model``'s state as safetensors with ``metadata`` (JSON) in the header, atomically."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    try:
        with atomic_open(path, "wb") as f:
            f.write(blob)
    except OSError as e:  # a full disk: atomic_open has removed its temporary, the old export is intact
        raise WeightsError(f"cannot write {path}: {e.strerror or e}") from None


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an export carries (architecture, input size, mean/std, feature dim, provenance)."""
    if Path(path).suffix != ".safetensors":
        raise WeightsError(f"{path}: exports are .safetensors files")
    header = read_header(path)
    if METADATA_KEY not in header:
        raise WeightsError(f"{path}: not a reidforge export (no '{METADATA_KEY}' metadata)")
    return _export_json(path, header)


def _export_json(path: str | Path, header: dict[str, str]) -> dict[str, Any]:
    try:
        meta = json.loads(header[METADATA_KEY])
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: the '{METADATA_KEY}' metadata is not a JSON object")
    return meta


def read_header(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header (our exports keep theirs under ``METADATA_KEY``)."""
    if not Path(path).is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise WeightsError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
