"""Name → class registries. A class registers itself where it is defined:

    @REWARDS.register("shapes")
    class ShapesReward(Reward): ...

`diffrl list` prints every registry; the CLI resolves `--reward shapes` through `REWARDS.get`.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from diffrl.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """A registry was asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of classes (or factories) of one kind."""

    def __init__(self, kind: str, flag: str):
        self.kind = kind  # "reward", used in messages
        self.flag = flag  # "--reward", the CLI flag that takes these names
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r} for {self.flag}; valid: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items


ENVS: Registry = Registry("env", "--env")
DATASETS: Registry = Registry("data", "--data")
MODELS: Registry = Registry("model", "--model")
REWARDS: Registry = Registry("reward", "--reward")
ALGOS: Registry = Registry("algo", "--algo")

ALL = (ENVS, DATASETS, MODELS, REWARDS, ALGOS)
