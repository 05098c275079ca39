"""Typed configs: dataclasses filled from ``launch/configs/*.yaml`` and ``key=value`` overrides.

A config schema is a plain dataclass (nested dataclasses allowed). Values are merged in order
schema defaults < YAML file < command-line overrides by OmegaConf, which checks types. A field whose
values are restricted declares them with :func:`choice`, a number's range with :func:`bounded` (a
value that would lose work or mean nothing, such as an interval of 0, is refused at start). Every mistake (unknown key, wrong type,
value outside the choices, malformed override, missing file) raises :class:`ConfigError` with one
line that names the key and what would have been valid; a key of an earlier version (:data:`RENAMED`)
names its new name. A schema may extend another dataclass (``reidforge.shared.run_config``): inherited
fields keep their base's description unless the schema redeclares them with one of its own.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from reidforge.shared.io import atomic_open
from reidforge.shared.runlog import output_log

T = TypeVar("T")

# Keys of earlier versions -> their names since both stages share one vocabulary (shared/run_config.py).
# A prefix entry renames every key below it (encoder.weights -> model.weights); the longest match wins.
RENAMED = {
    "encoder": "model",
    "encoder.backbone": "model.name",
    "data.splits": "data.train",
    "max_iters_per_epoch": "iters_per_epoch",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "milestones": "optim.milestones",
    "gamma": "optim.gamma",
    "sampler": "data.sampler",
}


class ConfigError(ValueError):
    """A config mistake, described in one line."""


def choice(default: str, *options: str) -> Any:
    """A string field restricted to ``default`` and ``options``."""
    return dataclasses.field(default=default, metadata={"choices": (default, *options)})


def bounded(default: float, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Any:
    """A numeric field that must lie in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); None = unbounded."""
    return dataclasses.field(default=default, metadata={"bounds": (lo, hi, lo_open)})


def _bound_error(value: float, lo: float | None, hi: float | None, lo_open: bool) -> str | None:
    if lo is not None and (value <= lo if lo_open else value < lo):
        return f"must be {'>' if lo_open else '>='} {lo}"
    if hi is not None and value > hi:
        return f"must be <= {hi}"
    return None


def _fields_at(schema: type, dotted: str) -> list[str]:
    """The valid key names beside ``dotted`` (the fields of the dataclass that should hold it)."""
    cls = schema
    for part in dotted.split(".")[:-1]:
        nested = {f.name: f.type for f in dataclasses.fields(cls)}.get(part)
        if not (isinstance(nested, type) and dataclasses.is_dataclass(nested)):
            break
        cls = nested
    return sorted(f.name for f in dataclasses.fields(cls))


def _has_key(schema: type, dotted: str) -> bool:
    cls: Any = schema
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return True  # below a dict field (model.options): any key
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        cls = fields[part]
    return True


def check_renamed(schema: type, keys: Iterable[str], source: str) -> None:
    """One line naming the new name of the first of ``keys`` (dotted) that is a renamed key of ``schema``."""
    for key in keys:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            old = ".".join(parts[:n])
            if old in RENAMED and not _has_key(schema, old):
                raise ConfigError(f"{source}: config key '{key}' was renamed to '{RENAMED[old]}{key[len(old):]}'")


def translate_renamed(schema: type, tree: dict) -> dict:
    """``tree`` (a nested mapping) with each renamed key of ``schema`` (:data:`RENAMED`) moved to its new
    name: an earlier version's saved run config read as today's (recipes and overrides get an error instead)."""
    _resolve_types(schema)
    out = copy.deepcopy(tree)
    for key in _dotted(tree):
        parts = key.split(".")
        old = next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                    if ".".join(parts[:n]) in RENAMED and not _has_key(schema, ".".join(parts[:n]))), None)
        if old is None:
            continue
        *path, leaf = parts
        nodes = [out]
        for part in path:
            nodes.append(nodes[-1][part])
        value = nodes[-1].pop(leaf)
        for parent, part, node in reversed(list(zip(nodes, path, nodes[1:]))):
            if not node:  # an old section left empty goes too
                del parent[part]
        *path, leaf = (RENAMED[old] + key[len(old):]).split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's leaves (an empty mapping is a leaf)."""
    return [k for key, value in tree.items()
            for k in (_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"])]


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        options = f.metadata.get("choices")
        if options is not None and value not in options:
            raise ConfigError(f"config key '{key}': invalid value {value!r}; valid choices: {', '.join(options)}")
        bounds = f.metadata.get("bounds")
        if bounds is not None and (problem := _bound_error(value, *bounds)):
            raise ConfigError(f"config key '{key}': {problem}, got {value!r}")
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{key}.")


def _resolve_types(schema: type) -> None:
    # OmegaConf needs real classes, not the strings that ``from __future__ import annotations`` leaves.
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        f.type = hints[f.name]
        if dataclasses.is_dataclass(f.type):
            _resolve_types(f.type)


def _load_yaml(path: Path) -> Any:
    """A YAML mapping; a syntax error or a file that is not a mapping is one line naming the place."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a config file is a mapping of keys to values, this holds a list or a scalar")
    return loaded


def _is_list(schema: type, dotted: str) -> bool:
    cls: Any = schema
    for part in dotted.split("."):
        fields = {f.name: f.type for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        cls = fields[part]
    return typing.get_origin(cls) is list


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                translate: bool = False) -> T:
    """Build a ``schema`` instance from its defaults, an optional YAML file and ``key=value`` overrides;
    ``translate``: the file's renamed keys are read under their new names (:func:`translate_renamed`)."""
    _resolve_types(schema)
    merged = OmegaConf.structured(schema)
    source = "defaults"
    try:
        if path is not None:
            source = str(path)
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            recipe = _load_yaml(Path(path))
            if translate:
                recipe = OmegaConf.create(translate_renamed(schema, OmegaConf.to_container(recipe)))
            check_renamed(schema, _dotted(OmegaConf.to_container(recipe)), source)
            merged = OmegaConf.merge(merged, recipe)
        for item in overrides:
            source = f"override '{item}'"
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            check_renamed(schema, [key], source)
            if _is_list(schema, key) and not value.lstrip().startswith("["):
                item = f"{key}=[{value}]"  # data.train=/path means the one-element list
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))  # one at a time: errors name theirs
        source = "config"
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(
            f"{source}: unknown config key '{key}'; valid keys here: {', '.join(_fields_at(schema, key))}"
        ) from None
    except OmegaConfBaseException as e:
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{source}: config key '{e.full_key}': {msg}") from None
    _check_choices(cfg)
    return cfg  # type: ignore[return-value]


def _comments(schema: type) -> dict[str, str]:
    """Each field's description: that of the latest class in the MRO that describes it (a redeclaration
    without a comment keeps its base's)."""
    notes: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if dataclasses.is_dataclass(cls):
            notes.update(_own_comments(cls))
    return notes


def _own_comments(cls: type) -> dict[str, str]:
    """Each field's description in the class's own source: its trailing ``#`` comment, else the comment
    lines right above it (the schemas document their fields that way)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    above: list[str] = []
    notes: dict[str, str] = {}
    field_at: dict[int, str] = {}
    for number, line in enumerate(source.splitlines(), 1):
        if m := re.match(r"\s+(\w+)\s*:", line):
            field_at[number] = m.group(1)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            row = tok.start[0]
            if row in field_at and tok.line.strip() != tok.string:
                notes.setdefault(field_at[row], text)
            else:
                above.append(text)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            if tok.start[0] in field_at and above:
                notes.setdefault(field_at[tok.start[0]], " ".join(above))
            above = []
    return notes


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def describe_fields(schema: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str]]:
    """``(key = default, what it is)`` for every leaf field of ``schema``, nested ones dotted, in order; the
    defaults are those of ``instance`` (default: ``schema()``), so a block's stage defaults show."""
    _resolve_types(schema)
    notes = _comments(schema)
    rows: list[tuple[str, str]] = []
    instance = schema() if instance is None else instance
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type):
            rows += describe_fields(f.type, f"{key}.", getattr(instance, f.name))
            continue
        default = getattr(instance, f.name)
        limits = []
        if (options := f.metadata.get("choices")) is not None:
            limits.append("one of " + ", ".join(options))
        if (bounds := f.metadata.get("bounds")) is not None:
            lo, hi, lo_open = bounds
            limits += [f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []
            limits += [f"<= {hi:g}"] if hi is not None else []
        what = "; ".join(filter(None, [notes.get(f.name, "").rstrip("."), ", ".join(limits)]))
        rows.append((f"{key}={default!r} ({_type_name(f.type)})", what))
    return rows


def _help_epilog(schema: type, width: int = 110) -> str:
    lines = ["config keys, as key=value after the options (schema defaults shown; a recipe overrides them):"]
    for key, what in describe_fields(schema):
        lines.append(f"  {key}")
        lines += textwrap.wrap(what, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def is_main_process() -> bool:
    """True outside distributed launches and on global rank 0 (torchrun and accelerate set RANK)."""
    return os.environ.get("RANK", "0") == "0"


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a run directory's ``config.yaml``)."""
    with atomic_open(path, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def config_main(schema: type[T], run: Callable[[T, bool, bool], Any], argv: Sequence[str] | None, description: str,
                errors: tuple[type[Exception], ...] = ()) -> int:
    """The command line of a training script: ``--config FILE [--resume | --overwrite] [key=value ...]``.

    ``--help`` lists every config key with its default and description; ``--print-config`` prints the
    resolved config and exits. Otherwise the resolved config is printed (by the main process) and
    ``run(config, resume, overwrite)`` runs; a bad config, missing file or any of ``errors`` prints one
    line and returns exit status 2. ``--no-progress`` turns the progress display off
    (``reidforge.shared.progress``).
    """
    from reidforge.shared.progress import progress_options  # imported here: that module imports this one

    parser = argparse.ArgumentParser(description=description, epilog=_help_epilog(schema),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="recipe YAML (launch/configs/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config that the recipe and the overrides resolve to, and exit")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run directory that holds a previous run, deleting its outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        print("error: --resume continues the run in the directory, --overwrite deletes it: give one", file=sys.stderr)
        return 2
    # The run attaches its log.txt (reidforge.shared.runlog.log_to) once it has claimed its directory.
    with output_log(is_main_process() and not args.print_config):
        try:
            cfg = load_config(schema, args.config, args.overrides)
            if args.print_config or is_main_process():
                print(("" if args.print_config else "config:\n") + OmegaConf.to_yaml(OmegaConf.structured(cfg)),
                      end="", flush=True)
            if args.print_config:
                return 0
            with progress_options(not args.no_progress):
                run(cfg, args.resume, args.overwrite)
        except (ConfigError, FileNotFoundError, *errors) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0
