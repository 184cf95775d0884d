"""Where layouts come from: the Shapes sampler, a JSONL file, or a fixed list (evaluation).

A source hands out ``n`` layouts at a time from its own seeded generator, so a run's data order
depends on its seed alone; `state_dict` / `load_state_dict` let a resumed run continue the order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import torch

from diffrl.errors import UserError
from diffrl.layout import Layout, read_jsonl
from diffrl.registry import DATASETS
from diffrl.shapes.world import LEVELS, sample_layouts


class LayoutSource(Protocol):
    def sample(self, n: int) -> list[Layout]: ...


@DATASETS.register("shapes")
class ShapesLayouts:
    """Random Shapes-world layouts with a level (instance count) drawn from ``levels``, in the classic world's box
    rules (shapes-tiny's: 7–19 px, one free cell between boxes)."""

    world = "classic"

    def __init__(self, levels: Sequence[int] = LEVELS, seed: int = 0):
        bad = [lv for lv in levels if lv not in LEVELS]
        if bad or not levels:
            raise UserError(f"Shapes levels must be among {list(LEVELS)}, got {list(levels)}")
        self.levels = list(levels)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> list[Layout]:
        return sample_layouts(n, self.levels, generator=self.generator, world=self.world)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@DATASETS.register("shapes-loose")
class LooseShapesLayouts(ShapesLayouts):
    """Shapes-world layouts in the loose-box world's rules (9–19 px, boxes may touch; docs/scenarios.md)."""

    world = "loose"


def model_data(model: str) -> str:
    """The Shapes dataset a generator was pre-trained in (``env.data=''``, the default): the world its folder's
    ``pretrain.json`` names (`diffrl pretrain --world`), ``shapes`` (the classic world) for any other model."""
    import json

    from diffrl.policies.generator import resolve_model

    try:
        record = resolve_model(model) / "pretrain.json"
    except UserError:  # not loadable: the generator's loader says why, with the whole run's context
        return "shapes"
    world = json.loads(record.read_text())["config"].get("world", "classic") if record.is_file() else "classic"
    return next(name for name, cls in DATASETS.items() if getattr(cls, "world", None) == world)


def shapes_world(data: str) -> str | None:
    """The Shapes world (`diffrl.shapes.world.WORLDS`) whose layouts ``--data`` names, or None for a file."""
    cls = DATASETS.get(data) if data in DATASETS else None
    return getattr(cls, "world", None)


class JsonlLayouts:
    """Layouts from a JSONL file (or a list of them: a file less its held-out part), in a fresh seeded shuffle
    each pass."""

    def __init__(self, path: str | Path | Sequence[Layout], seed: int = 0):
        self.layouts = read_jsonl(path) if isinstance(path, (str, Path)) else list(path)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def sample(self, n: int) -> list[Layout]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = torch.randperm(len(self.layouts), generator=self.generator).tolist()
            out.append(self.layouts[self.order.pop()])
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": torch.tensor(self.order, dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].tolist()


class FixedLayouts:
    """A fixed list handed out in order, wrapping around (evaluation sets)."""

    def __init__(self, layouts: Sequence[Layout]):
        if not layouts:
            raise UserError("no layouts to evaluate")
        self.layouts = list(layouts)
        self.position = 0

    def sample(self, n: int) -> list[Layout]:
        out = [self.layouts[(self.position + i) % len(self.layouts)] for i in range(n)]
        self.position = (self.position + n) % len(self.layouts)
        return out


def make_source(data: str, levels: Sequence[int], seed: int) -> LayoutSource:
    """``--data``: a registered name (``shapes``) or a path to a JSONL file of layouts."""
    if data in DATASETS:
        return DATASETS.get(data)(levels=levels, seed=seed)
    path = Path(data)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise UserError(f"--data {data}: no such file")
        return JsonlLayouts(path, seed=seed)  # a bad line raises LayoutError naming it
    raise UserError(f"--data {data!r} is neither a dataset name ({', '.join(DATASETS.names())}) nor a .jsonl file")
