"""Name -> component registries.

Components (dataset sources, label schemes, backbones, losses, ...) are chosen by
name from a config file, so each lives in a small registry instead of an if/elif
chain; an unknown name produces an error that lists the valid ones.

A registry may declare its names up front and name the module that registers the
components (its ``provider``): configs are then validated against the names without
importing that module (torch, OpenCV, ...), which is imported on the first ``get``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of components of one kind."""

    def __init__(self, kind: str, names: Iterable[str] = (), provider: str | None = None) -> None:
        """``names``: the components ``provider`` (a module name) registers, known before
        it is imported; without them the registry holds what has been added so far."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._declared = frozenset(names)
        self._provider = provider

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds the decorated object."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise KeyError(f"{self.kind} {name!r} is registered twice")
        if self._declared and name not in self._declared:
            raise KeyError(f"{self.kind} {name!r} is not among the declared names; declare it too")
        self._items[name] = obj

    def get(self, name: str, *, where: str = "") -> T:
        """Return the component called ``name`` (importing the provider on first use);
        unknown names list the valid ones."""
        self.check(name, where=where)
        if name not in self._items and self._provider is not None:
            importlib.import_module(self._provider)
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"{self.kind} {name!r} is declared but not registered "
                           f"(provider: {self._provider})") from None

    def check(self, name: str, *, where: str = "") -> None:
        """Raise the ConfigError of an unknown name (listing the valid ones); imports nothing."""
        if name not in self:
            at = f" in {where}" if where else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{at}; valid {self.kind}s: {', '.join(self.names())}"
            )

    def names(self) -> list[str]:
        return sorted(self._declared | self._items.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._declared or name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
