"""Enums whose members are their text: JSON, the database and config files keep the
plain strings they always had, and comparing with a string still works."""
from __future__ import annotations

from enum import Enum


class TextEnum(str, Enum):
    # hashed and shown as the text itself, so "done" in {State.DONE} and f"{state}" hold
    # on every Python (3.11 changed how mixed-in enums format)
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)
