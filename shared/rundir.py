"""Run directories: a command never silently replaces another run's results.

A directory holds a run when it has any of :data:`RUN_MARKERS`. Starting a fresh run there is refused
in one line unless ``--overwrite`` (which deletes the old run's outputs, naming them) or ``--resume``.
A resumed run must have the config it was started with, except :data:`MAY_CHANGE_ON_RESUME` (how long
it runs and how often it evaluates, saves and logs; the loader's worker count); ``output_dir`` and
``run_name`` locate the directory and are not compared. A saved config that uses a key renamed since
(``reidforge.shared.config.RENAMED``) is refused with the key's new name.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from reidforge.shared.config import ConfigError, check_renamed

RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.json", "model_*.safetensors", "backbone_*.safetensors")
# Further outputs of a run, deleted with it by --overwrite (finetune/engine.py and pretrain/spcl.py write them).
RUN_OUTPUTS = (*RUN_MARKERS, "tensorboard", "weights_report.json", "track2.txt", "log.txt")
MAY_CHANGE_ON_RESUME = frozenset({"epochs", "eval_every", "checkpoint_every", "checkpoint_every_iters", "log_every",
                                  "keep_checkpoints", "data.workers", "dist_timeout_minutes",
                                  "output_dir", "run_name"})


def _present(run_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in run_dir.glob(pattern)}) if run_dir.is_dir() else []


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def changed_keys(cfg: Any, saved: Path) -> list[str]:
    """Dotted keys whose value in ``cfg`` differs from the config file ``saved`` (resume-safe keys left out)."""
    now = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    try:
        before = _flat(OmegaConf.to_container(OmegaConf.load(saved)))
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"--resume: {saved} is not a readable config ({str(e).splitlines()[0]})") from None
    check_renamed(type(cfg), before, f"--resume: {saved}")  # a run started before a key was renamed
    return sorted(k for k in now.keys() | before.keys()
                  if k not in MAY_CHANGE_ON_RESUME and now.get(k, "<absent>") != before.get(k, "<absent>"))


def claim_run_dir(run_dir: Path, cfg: Any, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Check that this run may use ``run_dir`` (see the module docstring); with ``overwrite`` the main
    process deletes the previous run's outputs. Call it before anything is written there."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: give one")
    if resume:
        saved = run_dir / "config.yaml"
        if saved.is_file() and (changed := changed_keys(cfg, saved)):
            raise ConfigError(f"--resume: the config differs from the run's {saved} in {', '.join(changed)}; "
                              f"only {', '.join(sorted(MAY_CHANGE_ON_RESUME - {'output_dir', 'run_name'}))} may change")
        return
    old = _present(run_dir, RUN_MARKERS)
    if not old:
        return
    if not overwrite:
        raise ConfigError(f"{run_dir} holds another run ({', '.join(p.name for p in old)}): pass --resume to "
                          "continue it or --overwrite to replace it")
    if is_main:
        doomed = _present(run_dir, RUN_OUTPUTS)
        for path in doomed:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        print(f"--overwrite: deleted the previous run's {', '.join(p.name for p in doomed)} in {run_dir}")
