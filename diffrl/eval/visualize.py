"""Pictures a person would rather look at than read: sample grids with the target boxes drawn over."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffrl.layout import Layout

CELL = 128  # pixels per image in a grid
OUTLINE = {"red": (255, 60, 60), "yellow": (255, 230, 0), "green": (40, 220, 40), "blue": (60, 120, 255),
           "white": (255, 255, 255), "black": (0, 0, 0), "brown": (150, 90, 40)}
OTHER = (255, 0, 255)  # outline of a phrase without a known colour word


def outline_colour(phrase: str) -> tuple[int, int, int]:
    """The colour to outline a phrase's box in: its colour word (after an optional article) or magenta."""
    words = phrase.lower().split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return OUTLINE.get(words[0], OTHER) if words else OTHER


def sample_grid(images: torch.Tensor, layouts: Sequence[Layout], columns: int = 8,
                verdicts: torch.Tensor | None = None, cell: int = CELL, numbered: bool = False) -> Image.Image:
    """images [N, 3, H, W] in [0, 1] → one PIL grid of ``cell``-pixel tiles, each box outlined (in its phrase's
    colour when the phrase starts with a known colour word), solid when ``verdicts[i, k]`` is True, dashed
    when False; ``numbered``: each box labelled with its instance number k + 1."""
    n = images.shape[0]
    rows = (n + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell, rows * cell), (30, 30, 30))
    pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        tile = Image.fromarray(pixels[i]).resize((cell, cell), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for k, (phrase, box) in enumerate(zip(layouts[i].phrases, layouts[i].boxes)):
            colour = outline_colour(phrase)
            xy = [round(v * (cell - 1)) for v in box]
            ok = True if verdicts is None else bool(verdicts[i, k])
            if ok:
                draw.rectangle(xy, outline=colour, width=2)
            else:
                _dashed_rectangle(draw, xy, colour)
            if numbered:
                halo = (0, 0, 0) if sum(colour) > 250 else (255, 255, 255)  # dark numbers get a light halo
                draw.text((xy[0] + 4, xy[1] + 3), str(k + 1), fill=colour, stroke_width=2, stroke_fill=halo)
        grid.paste(tile, ((i % columns) * cell, (i // columns) * cell))
    return grid


def _dashed_rectangle(draw: ImageDraw.ImageDraw, xy: list[int], colour, dash: int = 6) -> None:
    x0, y0, x1, y1 = xy
    for start in range(x0, x1, 2 * dash):
        draw.line([(start, y0), (min(start + dash, x1), y0)], fill=colour, width=2)
        draw.line([(start, y1), (min(start + dash, x1), y1)], fill=colour, width=2)
    for start in range(y0, y1, 2 * dash):
        draw.line([(x0, start), (x0, min(start + dash, y1))], fill=colour, width=2)
        draw.line([(x1, start), (x1, min(start + dash, y1))], fill=colour, width=2)


def save_grid(path: str | Path, images: torch.Tensor, layouts: Sequence[Layout], **kwargs) -> Path:
    path = Path(path)
    sample_grid(images, layouts, **kwargs).save(path)
    return path
