"""MSMT17 (Wei et al., "Person Transfer GAN to Bridge Domain Gap for Person Re-Identification", CVPR 2018):
4,101 ids seen by 15 cameras; V2 is the re-release with blurred faces.

Layout handled (ROOT is ``MSMT17_V1/``, ``MSMT17_V2/`` or the folder that contains one of them)::

    ROOT/{train,test}/ or ROOT/{mask_train_v2,mask_test_v2}/    images, <pid>/<name>.jpg (V1 / V2)
    ROOT/list_{train,val}.txt                                   train-folder images (30,248 + 2,373)
    ROOT/list_{query,gallery}.txt                               test-folder images (11,659 / 82,161)

Each list line is ``<pid>/<name>.jpg <pid>``, the path relative to the list's image folder (train lists to
the train folder, query and gallery lists to the test folder). Names read
``0000_000_01_0303morning_0015_0.jpg``; the camera is the third ``_`` field (01-15), camid = camera - 1.
The pid is the list's second column; keys are the file stems.

Protocol (torchreid and FastReID): train is ``list_train`` (1,041 ids); ``list_val`` joins it only with
``--with-val``, as theirs does only under ``combineall`` (which also trains on query and gallery; that
part is left to whoever combines the built splits). Val images live in the same ``<pid>/`` folders of the
train folder, so a val pid is the same person as the train pid of that number: the two lists share one
pid space and are merged, not kept apart.

Test pids restart at 0 and so collide with train pids. As in FastReID, query and gallery pids are offset
past the train pids, so that train and test records can be combined without mixing identities: the
offset is 1 + the largest pid of ``list_train`` and ``list_val``, which is FastReID's ``num_train_pids``
(1,041) on the release.

Deviations from torchreid / FastReID:

* torchreid does not offset test pids at all (fine only while train and test are never combined);
* FastReID's offset counts the pids of ``list_train`` alone; taking the largest pid of both train lists
  gives the same 1,041 on the release, cannot collide if pids have gaps, and does not change with
  ``--with-val``;
* when both versions are under ROOT, ``--version`` must say which (torchreid silently takes V1);
* a malformed line, a camera out of range or a listed file that is missing fails in one line naming the
  list and line number.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reidforge.data.datasets.folder import key_of, read_fields
from reidforge.data.datasets.market1501 import file_source
from reidforge.data.source import DatasetAdapter, DatasetError, FileRecord, Sources, register, require

VERSIONS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}  # train and test image folders
LISTS = {"train": "list_train.txt", "val": "list_val.txt", "query": "list_query.txt", "gallery": "list_gallery.txt"}
CAMERAS = 15
LAYOUT = ("ROOT[/MSMT17_V1]/{train,test}/ or ROOT[/MSMT17_V2]/{mask_train_v2,mask_test_v2}/, "
          "plus list_{train,val,query,gallery}.txt")
TRAIN_IDS = 1_041
PUBLISHED = {"train": {"images": 30_248, "ids": TRAIN_IDS}, "query": {"images": 11_659, "ids": 3_060},
             "gallery": {"images": 82_161, "ids": 3_060}}
TRAIN_WITH_VAL = {"images": 32_621, "ids": TRAIN_IDS}


def read_list(list_path: Path, image_dir: Path, *, dataset: str, pid_offset: int = 0) -> list[FileRecord]:
    """The records of one ``<pid>/<name>.jpg <pid>`` list, paths relative to ``image_dir``."""
    records = []
    for where, fields in read_fields(list_path):
        try:
            relative, pid_text = fields
            pid, camera = int(pid_text), int(Path(relative).name.split("_")[2])
        except (ValueError, IndexError):
            raise DatasetError(f"{dataset}: {where} is not '<pid>/<name>.jpg <pid>' with the camera as the name's "
                               f"third '_' field: {' '.join(fields)!r}") from None
        if not 1 <= camera <= CAMERAS:
            raise DatasetError(f"{dataset}: {where} has camera {camera}, outside 1-{CAMERAS}")
        path = image_dir / relative
        if not path.is_file():
            raise DatasetError(f"{dataset}: {where} lists {path}, which is not found")
        records.append(FileRecord(path=path, key=key_of(Path(path.name)), pid=pid + pid_offset, camid=camera - 1))
    return records


def locate(root: Path, versions: list[str], dataset: str) -> tuple[str, Path]:
    """The version and the folder that holds its image folders and lists."""
    require(root, dataset=dataset, layout=LAYOUT)
    found = [(v, base) for v in versions for base in (root / f"MSMT17_{v}", root) if (base / VERSIONS[v][0]).is_dir()]
    if not found:
        raise DatasetError(f"{dataset}: no {' or '.join(f'MSMT17_{v}/{VERSIONS[v][0]}/' for v in versions)} "
                           f"under {root}; expected layout: {LAYOUT}")
    if len(found) > 1:
        raise DatasetError(f"{dataset}: both {found[0][1]} ({found[0][0]}) and {found[1][1]} ({found[1][0]}) "
                           "hold MSMT17; pass --version")
    return found[0]


@register
class MSMT17Adapter(DatasetAdapter):
    name = "msmt17"
    summary = ("MSMT17 (Wei et al. CVPR'18), V1 or V2 (blurred faces): list_train (+ list_val with --with-val) for "
               "train, list_query / list_gallery with test pids offset past the train pids")
    root_help = "MSMT17_V1/, MSMT17_V2/ or the folder that contains one of them"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--version", choices=sorted(VERSIONS),
                            help="which release to read when ROOT holds both (default: the one found)")
        parser.add_argument("--with-val", action="store_true",
                            help="add list_val to train (as torchreid/FastReID do under combineall); the standard "
                                 "protocol trains on list_train only")

    def sources(self) -> Sources:
        version, base = locate(self.args.root, [self.args.version] if self.args.version else sorted(VERSIONS),
                               self.name)
        train_dir, test_dir = (base / folder for folder in VERSIONS[version])
        require(base, *VERSIONS[version], *LISTS.values(), dataset=self.name, layout=LAYOUT)
        train, val = (read_list(base / LISTS[s], train_dir, dataset=self.name) for s in ("train", "val"))
        offset = 1 + max((r.pid for r in train + val), default=-1)
        test = {s: read_list(base / LISTS[s], test_dir, dataset=self.name, pid_offset=offset)
                for s in ("query", "gallery")}
        splits = {"train": train + val if self.args.with_val else train, **test}
        published = {**PUBLISHED, "train": TRAIN_WITH_VAL} if self.args.with_val else PUBLISHED
        return {self.name: {split: file_source(self.name, split, records, base,
                                               base / LISTS["train" if split == "train" else split], published[split])
                            for split, records in splits.items()}}
