"""The Layout type: a prompt plus per-instance phrases and boxes (normalised xyxy in [0, 1]).

Constructing a Layout validates it; a bad one raises `LayoutError` (a ValueError) that names the
field and the instance, and — when read from a file — the file and line:

    layouts.jsonl:7: boxes[1]: x1 (0.2) must be greater than x0 (0.5)

On disk: JSONL, one layout per line, ``{"prompt": ..., "phrases": [...], "boxes": [[x0,y0,x1,y1], ...]}``.
This module imports nothing of diffrl.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence


class LayoutError(ValueError):
    """A layout (or a layout file) that is not valid; the message says where and why."""


@dataclass(frozen=True)
class Layout:
    prompt: str
    phrases: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise LayoutError("prompt: must be a non-empty string")
        if isinstance(self.phrases, str) or not isinstance(self.phrases, Iterable):
            raise LayoutError("phrases: must be a list of strings")
        if isinstance(self.boxes, str) or not isinstance(self.boxes, Iterable):
            raise LayoutError("boxes: must be a list of [x0, y0, x1, y1]")
        phrases = tuple(self.phrases)
        boxes = tuple(_check_box(i, b) for i, b in enumerate(self.boxes))
        for i, phrase in enumerate(phrases):
            if not isinstance(phrase, str) or not phrase.strip():
                raise LayoutError(f"phrases[{i}]: must be a non-empty string")
        if len(phrases) != len(boxes):
            raise LayoutError(f"phrases/boxes: {len(phrases)} phrases but {len(boxes)} boxes; each instance needs one of each")
        if not phrases:
            raise LayoutError("phrases: a layout needs at least one instance")
        object.__setattr__(self, "phrases", phrases)
        object.__setattr__(self, "boxes", boxes)

    @property
    def n(self) -> int:
        """Number of instances."""
        return len(self.phrases)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "phrases": list(self.phrases), "boxes": [list(b) for b in self.boxes]}

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None, line: int | None = None) -> "Layout":
        where = f"{source}:{line}: " if source is not None else (f"line {line}: " if line is not None else "")
        try:
            if not isinstance(d, dict):
                raise LayoutError("expected an object with prompt, phrases and boxes")
            missing = [k for k in ("prompt", "phrases", "boxes") if k not in d]
            if missing:
                raise LayoutError(f"{missing[0]}: missing")
            return cls(d["prompt"], d["phrases"], d["boxes"])
        except LayoutError as err:
            raise LayoutError(f"{where}{err}") from None


def _check_box(i: int, box: Any) -> tuple[float, float, float, float]:
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        raise LayoutError(f"boxes[{i}]: must be 4 numbers [x0, y0, x1, y1], got {box!r}")
    values = []
    for name, v in zip(("x0", "y0", "x1", "y1"), box):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LayoutError(f"boxes[{i}]: {name} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise LayoutError(f"boxes[{i}]: {name} is {v}; coordinates must be finite")
        if not 0.0 <= v <= 1.0:
            raise LayoutError(f"boxes[{i}]: {name} ({v}) is outside [0, 1]; boxes are normalised xyxy")
        values.append(float(v))
    x0, y0, x1, y1 = values
    if x1 <= x0:
        raise LayoutError(f"boxes[{i}]: x1 ({x1}) must be greater than x0 ({x0})")
    if y1 <= y0:
        raise LayoutError(f"boxes[{i}]: y1 ({y1}) must be greater than y0 ({y0})")
    return x0, y0, x1, y1


def read_jsonl(path: str | Path) -> list[Layout]:
    """Every layout in a JSONL file; the first bad line raises LayoutError naming it."""
    path = Path(path)
    layouts = []
    with open(path) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text.rstrip("\r\n"))  # newline kept: "line 2 column 1"
            except json.JSONDecodeError as err:
                raise LayoutError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
            layouts.append(Layout.from_dict(data, source=str(path), line=number))
    if not layouts:
        raise LayoutError(f"{path}: the file has no layouts")
    return layouts


def write_jsonl(path: str | Path, layouts: Iterable[Layout]) -> None:
    with open(path, "w") as f:
        for layout in layouts:
            f.write(json.dumps(layout.to_dict()) + "\n")
