"""Name -> builder registries (backbones, re-ID models), in the manner of timm's model registry."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from reidforge.shared.config import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Builders registered by name; an unknown name is a one-line error listing the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(builder: Callable[..., T]) -> Callable[..., T]:
            key = name or builder.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._builders[key] = builder
            return builder

        return add

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        if name not in self._builders:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        builder = self._builders[name]
        try:
            inspect.signature(builder).bind(*args, **kwargs)
        except TypeError as e:  # an option the builder does not take: name the ones it does
            options = [p.name for p in inspect.signature(builder).parameters.values()
                       if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][len(args):]
            raise ConfigError(f"{self.kind} {name!r}: {e}; its options: {', '.join(options) or 'none'}") from None
        return builder(*args, **kwargs)
