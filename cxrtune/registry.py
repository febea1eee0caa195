"""Name -> component registries.

Components (dataset sources, label schemes, backbones, losses, ...) are chosen by
name from a config file, so each lives in a small registry instead of an if/elif
chain; an unknown name produces an error that lists the valid ones.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of components of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds the decorated object."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise KeyError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str, *, where: str = "") -> T:
        """Return the component called ``name``; unknown names list the valid ones."""
        try:
            return self._items[name]
        except KeyError:
            at = f" in {where}" if where else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{at}; valid {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
