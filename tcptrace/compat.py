"""What the package needs from Pythons newer than its oldest (requires-python >= 3.9).

tests/test_versions.py and the vermin lint in scripts/test keep 3.10+ constructs out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def slotted(cls: type[T]) -> type[T]:
    """dataclass(slots=True), which 3.9 lacks: put it above @dataclass.

    Hot-path records (lifetimes, sock_diag rows, places) are slotted for speed: no
    instance __dict__ to make, faster attribute access. A class body cannot hold both
    __slots__ and the fields' defaults, so, as 3.10's dataclass does, the class is
    made again with __slots__ for its fields once the dataclass methods exist (they
    take the defaults from the fields, not from class attributes).
    """
    if "__slots__" in cls.__dict__:
        raise TypeError(f"{cls.__name__} already specifies __slots__")
    names = tuple(f.name for f in dataclasses.fields(cls))
    body = dict(cls.__dict__)
    for name in (*names, "__dict__", "__weakref__"):
        body.pop(name, None)
    body["__slots__"] = names
    if cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        # copy and pickle restore slots with setattr, which a frozen class refuses
        body["__getstate__"] = _frozen_getstate
        body["__setstate__"] = _frozen_setstate
    made = type(cls)(cls.__name__, cls.__bases__, body)
    made.__qualname__ = cls.__qualname__
    return made


def _frozen_getstate(self: Any) -> list[Any]:
    return [getattr(self, f.name) for f in dataclasses.fields(self)]


def _frozen_setstate(self: Any, state: list[Any]) -> None:
    for f, value in zip(dataclasses.fields(self), state):
        object.__setattr__(self, f.name, value)
