"""README.md (and models.md) held to the code: the Python blocks run, the commands name real scripts,
flags and recipes, and every relative link resolves.

Python blocks: every ```python block of README.md runs, in README order, each in a fresh namespace,
except one preceded by an HTML comment ``<!-- not run: reason -->`` (for a block that needs a GPU or
real data). Before a block runs, the path placeholder ``runs/demo/shards`` (where ``bash launch/demo.sh``
writes its shards) is replaced by the root of the session's ``tiny_shards`` fixture, which has the same
``<dataset>/<split>`` layout. A block that defines ``test_*`` functions (the README's example test) then
has each called with a fresh ``tmp_path``. What a block registers (a dataset adapter, a model, a
backbone) is removed again afterwards, so the registries the rest of the suite sees are unchanged.

Commands: in the bash blocks and in inline code, every ``python``/``accelerate launch``/``torchrun``
command names a script that exists, and each ``--flag`` after a project script is one that script's
argparse parser accepts (the subcommand's, for ``data/build_shards.py`` and ``pretrain/cfs.py``; any
subcommand's where the README writes a placeholder such as ``<dataset>``). The parsers are captured
by calling each script's ``main`` with ``parse_known_args`` patched to hand the parser back, so no
script runs and no subprocess starts. Every ``launch/...`` path and every recipe named by its bare
``*.yaml`` file name exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import re
import shlex
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

import reidforge.data.datasets  # noqa: F401  (every adapter registered before the registries are snapshotted)
from reidforge.data.source import ADAPTERS
from reidforge.finetune.models import MODELS, build_model
from reidforge.shared.backbones import BACKBONES, build_backbone

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = (README, ROOT / "models.md")
SHARDS_PLACEHOLDER = "runs/demo/shards"
NOT_RUN = re.compile(r"<!--\s*not run:\s*\S.*?-->\s*$", re.DOTALL)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")
LAUNCHERS = ("python", "accelerate", "torchrun")
# Console scripts (pyproject's [project.scripts]) -> the script file each one runs.
CONSOLE_SCRIPTS = {name: module.replace(".", "/") + ".py" for name, module in re.findall(
    r'^(reidforge-[\w-]+) = "reidforge\.([\w.]+):main"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)}
# Bare file names in the README that are a run's outputs, not recipes.
RUN_OUTPUTS = {"config.yaml"}


def _fenced(text: str) -> list[tuple[str, int, str, str]]:
    """(language, first line number, body, text just before the fence) of each fenced block."""
    return [(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2), text[:m.start()])
            for m in FENCE.finditer(text)]


def python_blocks() -> list[tuple[int, str, bool]]:
    """(line, source, runs) of every ```python block of README.md."""
    return [(line, body, not NOT_RUN.search(before))
            for lang, line, body, before in _fenced(README.read_text(encoding="utf-8")) if lang == "python"]


# --- Python blocks ---------------------------------------------------------------------------------


@pytest.fixture
def restored_registries() -> Iterator[None]:
    saved = [(registry, dict(registry)) for registry in (ADAPTERS, MODELS._builders, BACKBONES._builders)]
    try:
        yield
    finally:
        for registry, before in saved:
            registry.clear()
            registry.update(before)


def test_readme_has_the_blocks_it_documents() -> None:
    blocks = python_blocks()
    assert sum(runs for _, _, runs in blocks) >= 5  # every block today runs on the tiny shards
    assert any("StreamingShards(" in source for _, source, _ in blocks)


def test_readme_python_blocks_run(tiny_shards: Path, tmp_path: Path, restored_registries: None) -> None:
    """Each block runs as written; then the blocks did what the README says they do."""
    namespaces = {}
    for line, source, runs in python_blocks():
        if not runs:
            continue
        namespace: dict[str, Any] = {"__name__": f"readme_block_{line}"}
        code = compile(source.replace(SHARDS_PLACEHOLDER, str(tiny_shards)), f"README.md:{line}", "exec")
        exec(code, namespace)  # noqa: S102 (the README's own code; a traceback names README.md and the line)
        for name, value in list(namespace.items()):
            if name.startswith("test_") and callable(value):
                work = tmp_path / f"block{line}_{name}"
                work.mkdir()
                value(work)
        namespaces[source.split("\n", 1)[0]] = namespace
    # "Reading shards": an epoch over the tiny split's 8 ids is one P x K = 8 x 4 batch, nothing lost.
    reading = next(ns for ns in namespaces.values() if "StreamingShards" in ns)
    assert len(reading["stream"]) == len(reading["indexed"]) and len(set(reading["indexed"].pids.tolist())) == 8
    assert (reading["tally"].delivered, reading["tally"].lost) == (32, 0)
    assert reading["images"].shape == (32, 3, 256, 128) and reading["images"].dtype == torch.float32
    # The extension examples registered their names, and what they registered builds and runs.
    assert "mycars" in ADAPTERS
    net = build_model("my_net", 4).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 32)).shape == (1, 2048)
    tiny = build_backbone("tiny", width=8)
    assert tiny.out_channels == 8 and tiny(torch.zeros(1, 3, 16, 8)).shape == (1, 8, 8, 4)


# --- commands --------------------------------------------------------------------------------------


def _commands() -> list[tuple[str, str]]:
    """(where, command) of every launcher command in the README's bash blocks and inline code."""
    text = README.read_text(encoding="utf-8")
    found = []
    for lang, line, body, _ in _fenced(text):
        if lang != "bash":
            continue
        for n, command in enumerate(body.replace("\\\n", " ").splitlines()):
            if command.strip().split(" ", 1)[0] in (*LAUNCHERS, *CONSOLE_SCRIPTS):
                found.append((f"README.md:{line + 1 + n}", command))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in INLINE.finditer(prose):
        span = " ".join(m.group(1).split())
        if (span.split(" ", 1)[0] in LAUNCHERS and ".py" in span) or span.split(" ", 1)[0] in CONSOLE_SCRIPTS:
            found.append((f"README.md:{prose.count(chr(10), 0, m.start()) + 1}", span))
    return found


def _script_and_args(command: str) -> tuple[str, list[str]]:
    tokens = shlex.split(command, comments=True)
    if tokens[0] in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[tokens[0]], tokens[1:]
    index = next(i for i, token in enumerate(tokens) if token.endswith(".py"))
    return tokens[index], tokens[index + 1:]


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _load(script: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A package's script as its module; a script outside the packages (launch/) from its file."""
    if (ROOT / script).parent.joinpath("__init__.py").is_file():
        return importlib.import_module("reidforge." + script.removesuffix(".py").replace("/", "."))
    name = "readme_script_" + script.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def _parser(script: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser ``script``'s ``main`` builds, captured as it starts parsing."""
    if script not in _PARSERS:
        def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
            raise _Captured(self)

        main = _load(script, monkeypatch).main
        with monkeypatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
            with pytest.raises(_Captured) as captured:
                main([]) if main.__code__.co_argcount else main()
        _PARSERS[script] = captured.value.parser
    return _PARSERS[script]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((action.choices for action in parser._actions
                 if isinstance(action, argparse._SubParsersAction)), {})


def test_readme_finds_its_commands() -> None:
    scripts = {_script_and_args(command)[0] for _, command in _commands()}
    assert {"data/build_shards.py", "finetune/train.py", "finetune/evaluate.py", "pretrain/spcl.py",
            "pretrain/cfs.py", "finetune/search.py", "launch/bench/clustering.py"} <= scripts


@pytest.mark.parametrize("where, command", _commands(), ids=[where for where, _ in _commands()])
def test_readme_command_names_a_script_and_its_flags(where: str, command: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    script, args = _script_and_args(command)
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    flags = [m.group(1) for m in (re.match(r"\[*(--?[A-Za-z][\w-]*)", token) for token in args) if m]
    if not flags:
        return
    parser = _parser(script, monkeypatch)
    subparsers = _subparsers(parser)
    chosen, label = [parser], script
    if subparsers:
        first = args[0] if args else ""
        if first in subparsers:
            chosen, label = [subparsers[first]], f"{script} {first}"
        else:  # a placeholder (<dataset>): a flag some subcommand takes
            assert re.fullmatch(r"<\w+>", first), f"{where}: {script} has no subcommand {first!r}"
            chosen = list(subparsers.values())
    accepted = _options(parser).union(*(_options(sub) for sub in chosen))
    assert [flag for flag in flags if flag not in accepted] == [], f"{where}: {label} does not accept these"


def test_readme_launch_paths_and_recipes_exist() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [path for path in re.findall(r"launch/[\w./-]+", text)
               if not (ROOT / path.rstrip(".")).exists()]
    assert missing == []
    recipes = {name for name in re.findall(r"`([\w-]+\.yaml)`", text) if name not in RUN_OUTPUTS}
    known = {p.name for p in (ROOT / "launch").rglob("*.yaml")}
    assert sorted(recipes - known) == []
    assert {"dm_osnet_synthetic.yaml", "fnc_tiny.yaml", "spcl_tiny.yaml"} <= recipes


# --- links -----------------------------------------------------------------------------------------


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    assert doc.is_file()
    broken = []
    for target in _links(doc):
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file) if file else doc
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert broken == []


def test_models_md_is_linked_and_covers_every_registered_model() -> None:
    assert "models.md" in _links(README)
    text = (ROOT / "models.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,4} .*?`(\w+)`", text, re.MULTILINE))
    assert sorted(set(MODELS.names()) - headings) == []
    assert sorted(set(BACKBONES.names()) - set(re.findall(r"`(\w+)`", text))) == []


def _model_sections() -> dict[str, str]:
    """Registered model name -> its ``###`` section of models.md, with the ``##`` family text above it."""
    text = (ROOT / "models.md").read_text(encoding="utf-8")
    sections = {}
    for family in re.split(r"^(?=## )", text, flags=re.MULTILINE):
        intro, *parts = re.split(r"^(?=### )", family, flags=re.MULTILINE)
        for part in parts:
            for name in re.findall(r"`(\w+)`", part.splitlines()[0]):
                sections[name] = intro + part
    return sections


def _defaults(name: str) -> dict[str, Any]:
    """The option defaults of a registered model: its builder's, or its class's where it takes **options."""
    builder = MODELS._builders[name]
    parameters = dict(inspect.signature(builder).parameters)
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        parameters |= inspect.signature(typing.get_type_hints(builder)["return"].__init__).parameters
    return {key: list(p.default) if isinstance(p.default, tuple) else p.default
            for key, p in parameters.items() if p.default is not p.empty}


def test_models_md_options_and_recipes_are_the_code_s() -> None:
    sections = _model_sections()
    recipes = {path.name: yaml.safe_load(path.read_text(encoding="utf-8"))
               for path in (ROOT / "launch" / "configs").glob("*.yaml")}
    for name in MODELS.names():
        section = sections[name]
        defaults = _defaults(name)
        for option, literal in re.findall(r"^\| `(\w+)` \| `([^`|]+)` \|", section, re.MULTILINE):
            assert option in defaults and yaml.safe_load(literal) == defaults[option], (name, option, literal)
        named = set(re.findall(r"launch/configs/([\w-]+\.yaml)", section.rsplit("\n### ", 1)[-1]))
        users = {recipe for recipe, cfg in recipes.items() if (cfg.get("model") or {}).get("name") == name}
        backbone_users = {recipe for recipe, cfg in recipes.items()
                          if (cfg.get("encoder") or {}).get("backbone") == name}
        assert users <= named <= users | backbone_users, name
