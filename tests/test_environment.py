"""The installed stack is the declared one, and the folders import only downstream of the data flow."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = ["torch", "torchvision", "faiss", "sklearn", "hdbscan", "webdataset", "accelerate", "tensorboard",
        "omegaconf", "safetensors", "tqdm", "PIL", "matplotlib", "scipy", "numpy"]
# What each code folder may import from the project (data -> pretrain -> finetune, shared underneath).
ALLOWED = {"shared": {"shared"}, "data": {"data", "shared"}, "pretrain": {"data", "shared", "pretrain"},
           "finetune": {"data", "shared", "finetune"}}


@pytest.mark.parametrize("module", CORE)
def test_core_dependency_imports(module: str) -> None:
    importlib.import_module(module)


def test_torch_stack_matches_the_constraints() -> None:
    pins = dict(line.split("==") for line in (REPO / "launch" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name in ("torch", "torchvision", "webdataset", "omegaconf"):
        assert importlib.metadata.version(name) == pins[name], name


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folders_respect_the_data_flow(folder: str) -> None:
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top in ALLOWED:
                    assert top in ALLOWED[folder], f"{path.relative_to(REPO)} imports {name}"
