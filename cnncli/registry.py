"""One small registry for every named thing: models, datasets, augmentations, optimizers, ...

A duplicate name is a bug (raised at import time); an unknown name is a user mistake and says
which names are close.
"""

from collections.abc import Iterator
from typing import Any

from cnncli.errors import UserError, suggest


class Registry:
    """Maps names to builders, each with a one-line description."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, obj: Any = None, *, help: str = "") -> Any:
        """Register `obj` under `name`; without `obj`, return a decorator."""

        def add(o: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = o
            doc = (getattr(o, "__doc__", None) or "").strip().splitlines()
            self._help[name] = help or (doc[0] if doc else "")
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise UserError(f"unknown {self.kind} '{name}'{suggest(name, self._items)}; "
                            f"known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def help(self, name: str) -> str:
        return self._help[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

