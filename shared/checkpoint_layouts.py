"""How released and trained re-ID checkpoints name a backbone's tensors, and the renames onto ours.

Our backbones (``reidforge.shared.backbones``) keep their reference implementation's names: torchvision's for
ResNet and ResNet-IBN-a, timm's for SE-ResNeXt (``legacy=True``: timm's ``legacy_*``, the Cadene
names), torchreid's for OSNet. A file is read into one flat ``{key: tensor}`` dict (``reidforge.shared.weights``
unwraps containers and strips ``module.``); this module then recognises, by key names and shapes:

- where the backbone sits in it: a key prefix (``backbone.`` in FastReID, OpenUnReID and our model
  exports, ``base.`` in reid-strong-baseline's and SpCL's, none in an ImageNet file), chosen as the
  prefix under which the most tensors match the target backbone's keys and shapes;
- which naming it uses, from :data:`NAMINGS`, chosen the same way (a naming's rename is tried only when
  its marker keys are present):

  * torchvision / timm ResNet (torchvision ``models/resnet.py``, timm ``models/resnet.py``): our names.
    OpenUnReID (``openunreid/models/backbones/resnet.py``, under ``backbone.``) keeps them too.
  * SpCL ResNet (yxgeee/SpCL ``spcl/models/resnet.py``, ``resnet_ibn.py``; alibaba/cluster-contrast-reid
    ``clustercontrast/models/resnet.py`` is the same class): torchvision's modules held as
    ``base = nn.Sequential(conv1, bn1, relu, maxpool, layer1, ..., layer4)``, so ``base.0`` is ``conv1``,
    ``base.1`` ``bn1`` and ``base.4``..``base.7`` ``layer1``..``layer4``: renamed onto ours.
  * IBN-Net ResNet-IBN-a (XingangPan/IBN-Net ``ibnnet/resnet_ibn.py``): torchvision names with
    ``bn1.IN`` / ``bn1.BN`` in layer1..3: our names.
  * timm SE-ResNeXt (``seresnext*``: stem ``conv1``/``bn1``, ``layerN.M.se.fc1``): our default names;
    renamed onto the Cadene names for a ``legacy=True`` backbone.
  * Cadene SE-ResNeXt (``pretrainedmodels/models/senet.py``, key for key timm's ``legacy_*``:
    ``layer0.conv1``, ``layer0.bn1``, ``se_module.fc1``): renamed onto timm's names, or taken as they
    are by a ``legacy=True`` backbone.
  * torchreid OSNet (``torchreid/models/osnet.py``): our names, plus the head's ``fc.*`` and
    ``classifier.*``.
  * DM-OSNet authors (yalei-zhou/DM-OSNet ``fastreid/modeling/backbones/dmosnet.py``): their DL-MHSA
    stream is ``conv2d.0`` (``attnConv3x3``: ``conv1``, ``attn2``, ``bn``), ours ``conv2d``
    (``conv1``, ``attn``, ``bn``): 29 tensors per block, 58 in the paper's model (both conv2 blocks);
    every other key is torchreid's.

- the head tensors it carries (:func:`head_candidates`): FastReID's ``EmbeddingHead``
  (``fastreid/modeling/heads/embedding_head.py``: ``heads.bottleneck.<i>`` the BNNeck BN, ``heads.weight``
  the classifier, ``heads.classifier.weight`` before fast-reid commit 883fd4a, ``heads.pool_layer.p``
  GeM's p), reid-strong-baseline's (``modeling/baseline.py``: ``bottleneck``, ``classifier``), SpCL's and
  cluster-contrast-reid's (``feat_bn``, the BatchNorm1d with a frozen zero bias on the pooled feature;
  ``classifier``; cluster-contrast's GeM ``gap.p``) and OpenUnReID's (``models/builder.py`` and
  ``layers/embedding.py``: ``head.feat_bn``, ``classifier``, GeM ``global_pooling.p``) map to our
  :class:`reidforge.shared.heads.BNNeck` (``neck.bn``, ``neck.classifier``) and GeM (``pool.p``). A BN that follows
  an embedding layer (SpCL's ``feat``, OpenUnReID's ``head.feat_reduction``: ``--features``/``embed_feat``
  > 0) normalises another feature than BNNeck's and does not map.

Domain-specific BatchNorm is collapsed onto plain BN (:func:`collapse_dsbn`):

- ``dsbn.<domain>`` (the DM-OSNet authors' SpCL/DSBN checkpoints, OpenUnReID's ``layers/
  domain_specific_bn.py``): the component and the domain index after it are dropped, as the DM-OSNet
  authors' loader does (``sanchuzichuan(k, "dsbn")``), so their LUPerson-pretrained files load; where
  several domains collapse onto one key, the last in file order wins, as in their ``OrderedDict`` rebuild
  and in OpenUnReID's ``convert_bn`` at its default ``target_bn_idx=-1`` (``models/utils/dsbn_utils.py``;
  a run whose validation domain was not the last listed kept another one);
- SpCL's ``BN_S`` / ``BN_T`` (``spcl/models/dsbn.py``, the UDA script's ``convert_dsbn``): the target
  domain's ``BN_T`` is kept and ``BN_S`` dropped, as SpCL's ``convert_bn(model, use_target=True)`` does
  before its ``examples/test.py`` evaluates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
Rename = Callable[[Mapping[str, T]], dict[str, T]]


@dataclass(frozen=True)
class Naming:
    """A key naming: its name, a test on a file's keys (after the prefix), and its rename onto ours."""

    name: str
    matches: Callable[[list[str]], bool]
    rename: Rename


def _replace(pairs: tuple[tuple[str, str], ...]) -> Rename:
    """Each (old, new): an inner component ``.old.`` is replaced everywhere, a stem name ``old.`` at the start."""
    def rename(tensors: Mapping[str, T]) -> dict[str, T]:
        out = {}
        for key, value in tensors.items():
            for old, new in pairs:
                if old.startswith("."):
                    key = key.replace(old, new)
                elif key.startswith(old):
                    key = new + key[len(old):]
            out[key] = value
        return out
    return rename


def _identity(tensors: Mapping[str, T]) -> dict[str, T]:
    return dict(tensors)


CADENE_TO_TIMM = (("layer0.conv1.", "conv1."), ("layer0.bn1.", "bn1."), (".se_module.", ".se."))
TIMM_TO_CADENE = tuple((new, old) for old, new in CADENE_TO_TIMM)

_AUTHORS_STREAM = re.compile(r"^(.*\.conv2d\.)0\.(conv1|attn2|bn)\.(.*)$")


def _dm_osnet_authors(tensors: Mapping[str, T]) -> dict[str, T]:
    """``<block>.conv2d.0.{conv1,attn2,bn}.*`` -> ``<block>.conv2d.{conv1,attn,bn}.*`` in the blocks whose
    ``conv2d`` is a DL-MHSA stream (those holding ``conv2d.0.attn2``); Lite 3x3 streams keep ``conv2d.0``."""
    attention_blocks = {m.group(1) for key in tensors if (m := _AUTHORS_STREAM.match(key)) and m.group(2) == "attn2"}
    out = {}
    for key, value in tensors.items():
        m = _AUTHORS_STREAM.match(key)
        if m and m.group(1) in attention_blocks:
            key = f"{m.group(1)}{'attn' if m.group(2) == 'attn2' else m.group(2)}.{m.group(3)}"
        out[key] = value
    return out


# SpCL ``self.base`` indices -> torchvision module names (2 and 3 are ReLU and max-pool: no tensors).
SPCL_BASE = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_SPCL_BLOCK = re.compile(r"^[4-7]\.\d+\.conv1\.")


def _spcl_base(tensors: Mapping[str, T]) -> dict[str, T]:
    out = {}
    for key, value in tensors.items():
        index, _, rest = key.partition(".")
        out[f"{SPCL_BASE[index]}.{rest}" if index in SPCL_BASE and rest else key] = value
    return out


def _has(fragment: str) -> Callable[[list[str]], bool]:
    return lambda keys: any(fragment in k for k in keys)


# In order of precedence where two tie (the first whose rename matches most tensors wins).
NAMINGS: tuple[Naming, ...] = (
    Naming("DM-OSNet authors (fast-reid dmosnet.py: conv2d.0.attn2)", _has(".conv2d.0.attn2."), _dm_osnet_authors),
    Naming("DM-OSNet (ours: conv2d.attn)", _has(".conv2d.attn."), _identity),
    Naming("torchreid OSNet", _has(".conv2a."), _identity),
    Naming("IBN-Net ResNet-IBN-a (bn1.IN / bn1.BN)", _has(".bn1.IN."), _identity),
    Naming("Cadene pretrainedmodels SE-ResNeXt (layer0., se_module.) onto timm names", _has(".se_module."),
           _replace(CADENE_TO_TIMM)),
    Naming("Cadene pretrainedmodels SE-ResNeXt (layer0., se_module.)", _has(".se_module."), _identity),
    Naming("timm SE-ResNeXt (se.fc1) onto Cadene/legacy names", _has(".se.fc1."), _replace(TIMM_TO_CADENE)),
    Naming("timm SE-ResNeXt (se.fc1)", _has(".se.fc1."), _identity),
    Naming("SpCL ResNet (base.<index> = nn.Sequential of torchvision's modules)",
           lambda keys: any(_SPCL_BLOCK.match(k) for k in keys), _spcl_base),
    Naming("torchvision / timm ResNet", _has("layer1.0.conv1."), _identity),
    Naming("unrecognised naming, matched by key", lambda keys: True, _identity),
)

_DSBN = re.compile(r"(^|\.)dsbn\.\d+(?=\.)")
_SPCL_DSBN = re.compile(r"(^|\.)BN_([ST])(?=\.)")


def collapse_dsbn(tensors: Mapping[str, T]) -> tuple[dict[str, T], list[str]]:
    """Domain-specific BN onto plain BN (see the module docstring); a note for each kind collapsed."""
    out: dict[str, T] = {}
    indexed = spcl = False
    for key, value in tensors.items():
        new = _DSBN.sub("", key).lstrip(".")
        indexed |= new != key
        if m := _SPCL_DSBN.search(new):
            spcl = True
            if m.group(2) == "S":
                continue
            new = (new[:m.start()] + new[m.end():]).lstrip(".")
        out[new] = value  # the last domain in file order wins, as in the DM-OSNet authors' OrderedDict rebuild
    notes = ["dsbn.<domain> collapsed (last domain wins)"] if indexed else []
    return out, notes + (["SpCL DSBN: BN_T kept, BN_S dropped"] if spcl else [])


def strip_module(tensors: Mapping[str, T]) -> tuple[dict[str, T], bool]:
    """Remove leading ``module.`` (DataParallel / DDP, possibly nested); True when there were any."""
    out, found = {}, False
    for key, value in tensors.items():
        while key.startswith("module."):
            key, found = key[len("module."):], True
        out[key] = value
    return out, found


def prefixes(keys: list[str]) -> list[str]:
    """Candidate backbone prefixes of a file: none, then every first path component (``backbone.``, ``base.``)."""
    return ["", *sorted({k.split(".", 1)[0] + "." for k in keys if "." in k})]


# FastReID EmbeddingHead, reid-strong-baseline, SpCL / cluster-contrast-reid and OpenUnReID head tensors ->
# our BNNeck and pooling.
_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# (BN prefix, the embedding layer that would precede it, classifier): heads with a BNNeck-like BatchNorm1d.
_BN_HEADS = (("bottleneck.", "", "classifier.weight"),  # reid-strong-baseline modeling/baseline.py
             ("feat_bn.", "feat.weight", "classifier.weight"),  # SpCL / cluster-contrast models/resnet.py
             ("head.feat_bn.", "head.feat_reduction.weight", "classifier.weight"))  # OpenUnReID
# GeM's p under FastReID's GeneralizedMeanPoolingP, cluster-contrast's ``gap``, OpenUnReID's ``global_pooling``.
GEM_P = ("heads.pool_layer.p", "gap.p", "global_pooling.p")


def head_candidates(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """``{our model key: file key}`` for head tensors a file carries under the names of the module docstring;
    ``shapes`` are the file's, used to find the BN inside ``heads.bottleneck`` (with ``EMBEDDING_DIM`` a
    1x1 conv precedes it: then the neck does not map)."""
    out: dict[str, str] = {}
    bottleneck = sorted({m.group(1) for k in keys if (m := re.match(r"^heads\.bottleneck\.(\d+)\.running_mean$", k))})
    convs = [k for k in keys if k.startswith("heads.bottleneck.") and len(shapes[k]) == 4]
    if len(bottleneck) == 1 and not convs:
        for suffix in _BN_SUFFIXES:
            out[f"neck.bn.{suffix}"] = f"heads.bottleneck.{bottleneck[0]}.{suffix}"
    for key in ("heads.weight", "heads.classifier.weight"):
        if key in shapes:
            out["neck.classifier.weight"] = key
    out.update(("pool.p", key) for key in GEM_P if key in shapes)
    for bn, embedding, classifier in _BN_HEADS:
        if f"{bn}running_mean" in shapes and embedding not in shapes:
            for suffix in _BN_SUFFIXES:
                out[f"neck.bn.{suffix}"] = f"{bn}{suffix}"
            out["neck.classifier.weight"] = classifier
    return {ours: theirs for ours, theirs in out.items() if theirs in shapes}
