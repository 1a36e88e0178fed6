"""Named entries registered once (model families, checkpoint formats, KL and advantage estimators, rewards): the
one mechanism behind every registry of the toolkit. A leaf module like ``errors``: it imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries under unique names, registered at import time and looked up by the name a user gave.

    Args:
        kind: what an entry is, for messages (``"KL estimator"``).
        unknown_error: raised for an unknown name (a user-facing error class where the name comes from a flag or a
            file; ValueError where it comes from code).
        choices_word: the word before the list of valid names in that message.
        load: imports the modules that register the built-in entries, run before the first lookup (lets a registry
            live below the modules that fill it).
    """

    def __init__(self, kind: str, unknown_error: type[Exception] = ValueError, choices_word: str = "valid",
                 load: Callable[[], None] | None = None):
        self.kind, self._unknown_error, self._choices_word, self._load = kind, unknown_error, choices_word, load
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("k1")`` adds the decorated object under ``name``."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str, prefix: str = "") -> T:
        """The entry ``name``; ``unknown_error`` naming the valid names otherwise (``prefix`` starts the message)."""
        self._ensure_loaded()
        if name not in self._entries:
            raise self._unknown_error(f"{prefix}unknown {self.kind} '{name}' ({self._choices_word}: "
                                      f"{', '.join(self.names())})")
        return self._entries[name]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def values(self) -> Iterator[T]:
        self._ensure_loaded()
        return iter(list(self._entries.values()))

    def _ensure_loaded(self) -> None:
        if self._load is not None:
            self._load()  # idempotent imports: a failed one is tried again at the next lookup
            self._load = None
