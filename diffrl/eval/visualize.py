"""Pictures a person would rather look at than read: sample grids with the target boxes drawn over, the prompt
under each tile and each failed instance marked, the before/after comparison of a train run, and the run's
pictures and evaluation scalars in TensorBoard (`RunPictures`).

Nothing here draws a random number or touches a model: the pictures are made from images and verdicts an
evaluation already produced, so drawing them cannot change a run's numbers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffrl.eval.metrics import scalars
from diffrl.files import atomic_write
from diffrl.layout import Layout

CELL = 128  # pixels per image in a grid
GUTTER = 8  # pixels between the tiles (and around them) of a run's grids
INNER = 3  # pixels between the two tiles of a before/after pair
CAPTION_LINES = 3  # prompt lines under a tile; a longer prompt is shortened with "…"
BACKGROUND = (30, 30, 30)
TEXT = (225, 225, 225)
GOOD, BAD = (110, 220, 120), (255, 95, 95)  # an all-ok / some-failed count under a tile
MARK = (215, 25, 25)  # the badge on a failed instance's box: red, white-rimmed, with a white cross
OUTLINE = {"red": (255, 60, 60), "yellow": (255, 230, 0), "green": (40, 220, 40), "blue": (60, 120, 255),
           "white": (255, 255, 255), "black": (0, 0, 0), "brown": (150, 90, 40)}
OTHER = (255, 0, 255)  # outline of a phrase without a known colour word


def outline_colour(phrase: str) -> tuple[int, int, int]:
    """The colour to outline a phrase's box in: its colour word (after an optional article) or magenta."""
    words = phrase.lower().split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return OUTLINE.get(words[0], OTHER) if words else OTHER


@lru_cache(maxsize=None)
def font(size: int = 11) -> ImageFont.ImageFont:
    """PIL's own font (no file to find): scalable where PIL has FreeType, its fixed bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # an old PIL, or one without FreeType
        return ImageFont.load_default()


def _line_height(size: int) -> int:
    return size + 3


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] → uint8 on the CPU, the pixels a grid shows (uint8 comes back as it is)."""
    if images.dtype == torch.uint8:
        return images.cpu()
    return (images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)


def sample_grid(images: torch.Tensor, layouts: Sequence[Layout], columns: int = 8,
                verdicts: torch.Tensor | None = None, cell: int = CELL, numbered: bool = False, *,
                gutter: int = 0, captions: bool = False) -> Image.Image:
    """images [N, 3, H, W] (float in [0, 1] or uint8) → one PIL grid of ``cell``-pixel tiles, each box outlined (in
    its phrase's colour when the phrase starts with a known colour word), solid when ``verdicts[i, k]`` is True,
    dashed and marked with a red cross badge when False; ``numbered``: each box labelled with its instance number
    k + 1; ``gutter``: background pixels between and around the tiles; ``captions``: under each tile its prompt
    (wrapped, shortened to fit) and, with verdicts, how many of its instances are ok."""
    n = images.shape[0]
    rows = (n + columns - 1) // columns
    band = caption_height(verdicts is not None) if captions else 0
    grid = Image.new("RGB", (columns * cell + (columns + 1) * gutter, rows * (cell + band) + (rows + 1) * gutter),
                     BACKGROUND)
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        row = None if verdicts is None else verdicts[i]
        x, y = gutter + (i % columns) * (cell + gutter), gutter + (i // columns) * (cell + band + gutter)
        grid.paste(tile(pixels[i], layouts[i], row, cell, numbered), (x, y))
        if captions:
            counts = [] if row is None else [(x, row[: layouts[i].n])]
            caption(draw, (x, y + cell), cell, layouts[i].prompt, counts)
    return grid


def tile(pixels: np.ndarray, layout: Layout, verdicts: torch.Tensor | None = None, cell: int = CELL,
         numbered: bool = False) -> Image.Image:
    """One image [H, W, 3] uint8 → a ``cell``-pixel tile with its boxes, failed ones dashed and badged."""
    picture = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    failed = []
    for k, (phrase, box) in enumerate(zip(layout.phrases, layout.boxes)):
        colour = outline_colour(phrase)
        xy = [round(v * (cell - 1)) for v in box]
        ok = True if verdicts is None else bool(verdicts[k])
        if ok:
            draw.rectangle(xy, outline=colour, width=2)
        else:
            _dashed_rectangle(draw, xy, colour)
            failed.append(xy)
        if numbered:
            halo = (0, 0, 0) if sum(colour) > 250 else (255, 255, 255)  # dark numbers get a light halo
            draw.text((xy[0] + 4, xy[1] + 3), str(k + 1), fill=colour, stroke_width=2, stroke_fill=halo)
    for xy in failed:  # last, so no box is drawn over a badge
        fail_mark(draw, xy, cell)
    return picture


def fail_mark(draw: ImageDraw.ImageDraw, xy: Sequence[int], cell: int) -> None:
    """A failed instance's badge on its box's top-right corner (kept inside the tile): a red square rimmed in white
    with a white cross, readable on any background."""
    size = max(9, cell // 10)
    x0 = min(max(xy[2] - size // 2, 0), cell - size)
    y0 = min(max(xy[1] - size // 2, 0), cell - size)
    x1, y1 = x0 + size - 1, y0 + size - 1
    draw.rectangle([x0, y0, x1, y1], fill=MARK, outline=(255, 255, 255))
    pad = max(2, size // 4)
    draw.line([(x0 + pad, y0 + pad), (x1 - pad, y1 - pad)], fill=(255, 255, 255), width=max(1, size // 7))
    draw.line([(x0 + pad, y1 - pad), (x1 - pad, y0 + pad)], fill=(255, 255, 255), width=max(1, size // 7))


def _dashed_rectangle(draw: ImageDraw.ImageDraw, xy: list[int], colour, dash: int = 6) -> None:
    x0, y0, x1, y1 = xy
    for start in range(x0, x1, 2 * dash):
        draw.line([(start, y0), (min(start + dash, x1), y0)], fill=colour, width=2)
        draw.line([(start, y1), (min(start + dash, x1), y1)], fill=colour, width=2)
    for start in range(y0, y1, 2 * dash):
        draw.line([(x0, start), (x0, min(start + dash, y1))], fill=colour, width=2)
        draw.line([(x1, start), (x1, min(start + dash, y1))], fill=colour, width=2)


def caption_height(counted: bool, size: int = 11) -> int:
    """Pixels of the band under a tile: a count line (with verdicts) and CAPTION_LINES prompt lines."""
    return 4 + (CAPTION_LINES + counted) * _line_height(size)


def caption(draw: ImageDraw.ImageDraw, at: tuple[int, int], width: int, prompt: str,
            counts: Sequence[tuple[int, torch.Tensor]] = (), size: int = 11) -> None:
    """Under a tile (or a pair, ``width`` wide) from ``at``: each ``(x, verdicts [K])``'s "ok / instances" at x,
    green when all are ok, red otherwise; then the prompt, wrapped to ``width``."""
    x, y = at[0], at[1] + 3
    if counts:
        for left, row in counts:
            ok = int(row.sum())
            draw.text((left, y), f"{ok}/{len(row)} ok", fill=GOOD if ok == len(row) else BAD, font=font(size))
        y += _line_height(size)
    for line in wrap(prompt, width, CAPTION_LINES, size):
        draw.text((x, y), line, fill=TEXT, font=font(size))
        y += _line_height(size)


def wrap(text: str, width: int, lines: int, size: int = 11) -> list[str]:
    """``text`` in at most ``lines`` lines no wider than ``width`` pixels; what does not fit ends in "…"."""
    measure, out, line = font(size).getlength, [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and measure(candidate) > width:
            out.append(line)
            line = word
        else:
            line = candidate
    out.append(line)
    cut = len(out) > lines
    out = out[:lines]
    for i, line in enumerate(out):
        if measure(line) > width or (cut and i == len(out) - 1):
            while line and measure(line.rstrip(" ,") + "…") > width:
                line = line[:-1]
            out[i] = line.rstrip(" ,") + "…"
    return out


def before_after(before: torch.Tensor, after: torch.Tensor, layouts: Sequence[Layout],
                 before_verdicts: torch.Tensor | None = None, after_verdicts: torch.Tensor | None = None, *,
                 header: Sequence[str] = (), labels: tuple[str, str] = ("base", "trained"), pairs_per_row: int = 4,
                 cell: int = CELL, gutter: int = GUTTER) -> Image.Image:
    """The same layouts (and noise) before and after, [N, 3, H, W] each → one picture: ``header`` lines on top, then
    pairs side by side, ``pairs_per_row`` to a row, before on the left and after on the right (named by ``labels``
    above the first row), each pair captioned with both sides' ok counts and its prompt."""
    n = before.shape[0]
    columns = max(1, min(pairs_per_row, n))
    rows = (n + columns - 1) // columns
    counted = before_verdicts is not None or after_verdicts is not None
    pair, band, line = 2 * cell + INNER, caption_height(counted), _line_height(13)
    top = gutter + len(header) * line + _line_height(11)
    width = max(columns * pair + (columns + 1) * gutter,
                2 * gutter + max((int(font(13).getlength(text)) for text in header), default=0))
    canvas = Image.new("RGB", (width, top + rows * (cell + band) + (rows + 1) * gutter), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(header):
        draw.text((gutter, gutter + j * line), text, fill=TEXT, font=font(13))
    sides = [(to_uint8(before).permute(0, 2, 3, 1).numpy(), before_verdicts),
             (to_uint8(after).permute(0, 2, 3, 1).numpy(), after_verdicts)]
    for i in range(n):
        x = gutter + (i % columns) * (pair + gutter)
        y = top + gutter + (i // columns) * (cell + band + gutter)
        for side, (pixels, verdicts) in enumerate(sides):
            row = None if verdicts is None else verdicts[i]
            canvas.paste(tile(pixels[i], layouts[i], row, cell), (x + side * (cell + INNER), y))
            if i < columns:
                draw.text((x + side * (cell + INNER), y - _line_height(11)), labels[side], fill=TEXT, font=font(11))
        counts = [(x + side * (cell + INNER), verdicts[i][: layouts[i].n])
                  for side, (_, verdicts) in enumerate(sides) if verdicts is not None]
        caption(draw, (x, y + cell), pair, layouts[i].prompt, counts)
    return canvas


def summary_line(label: str, metrics: dict) -> str:
    """An evaluation's summary block as one line: ISR, mIoU, reward and the verdict counts."""
    parts = [f"{name} {metrics[key]:.3f}" for key, name in (("isr", "ISR"), ("miou", "mIoU"), ("reward", "reward"))
             if metrics.get(key) is not None]
    parts += [f"{name} {count}" for name, count in (metrics.get("verdicts") or {}).items()]
    return f"{label}: " + " · ".join(parts)


def save_grid(path: str | Path, images: torch.Tensor, layouts: Sequence[Layout], **kwargs) -> Path:
    path = Path(path)
    sample_grid(images, layouts, **kwargs).save(path)
    return path


class RunPictures:
    """A train run's pictures (`diffrl.algos.trainer`): ``samples_before.png`` / ``samples_after.png`` (the first
    evaluation layouts, captioned and with the judge's marks), ``before_after.png`` (the two side by side), and in
    TensorBoard every evaluation's scalars under ``eval/`` with these pictures as images. The base samples shown are
    kept in ``samples_before.pt`` (uint8, at most tile-sized, with their verdicts), so a resumed run draws
    before_after.png too."""

    BEFORE = "samples_before.pt"

    def __init__(self, folder: str | Path, layouts: Sequence[Layout], writer, evaluated: int):
        self.folder, self.layouts, self.writer, self.evaluated = Path(folder), list(layouts), writer, evaluated

    def grid(self, images: torch.Tensor, verdicts: torch.Tensor | None) -> Image.Image:
        n = len(self.layouts)
        return sample_grid(images[:n], self.layouts, columns=min(8, n), verdicts=_first(verdicts, n),
                           gutter=GUTTER, captions=True)

    def before(self, metrics: dict, images: torch.Tensor, verdicts: torch.Tensor | None) -> None:
        """The base evaluation (step 0): samples_before.png and .pt, its scalars and grid in TensorBoard."""
        pictures = {}
        if self.layouts:
            n = len(self.layouts)
            kept = {"images": tile_sized(to_uint8(images[:n])), "verdicts": _first(verdicts, n)}
            atomic_write(self.folder / self.BEFORE, lambda tmp: torch.save(kept, tmp))
            pictures["eval/samples_before"] = self.grid(kept["images"], kept["verdicts"])
            pictures["eval/samples_before"].save(self.folder / "samples_before.png")
        self.log(metrics, 0, pictures)

    def during(self, metrics: dict, images: torch.Tensor, verdicts: torch.Tensor | None, step: int) -> None:
        """An evaluation between iterations (eval.every): its scalars and grid in TensorBoard at ``step``."""
        self.log(metrics, step, {"eval/samples": self.grid(images, verdicts)} if self.layouts else {})

    def after(self, base: dict, final: dict, images: torch.Tensor, verdicts: torch.Tensor | None,
              step: int) -> bool:
        """The final evaluation: samples_after.png, before_after.png (when the base samples were kept), scalars and
        pictures in TensorBoard at ``step``. → whether before_after.png was drawn."""
        pictures, saved = {}, self.folder / self.BEFORE
        if self.layouts:
            pictures["eval/samples_after"] = self.grid(images, verdicts)
            pictures["eval/samples_after"].save(self.folder / "samples_after.png")
        if self.layouts and saved.is_file():
            kept, n = torch.load(saved, weights_only=True), len(self.layouts)
            header = [summary_line("base", base), summary_line(f"trained ({step} iterations)", final),
                      f"counts over all {self.evaluated} evaluation layouts; the first {n} shown, with the same "
                      "noise: solid box = instance ok, dashed box with a red badge = failed"]
            pictures["eval/before_after"] = before_after(kept["images"], images[:n], self.layouts, kept["verdicts"],
                                                         _first(verdicts, n), header=header)
            pictures["eval/before_after"].save(self.folder / "before_after.png")
        self.log(final, step, pictures)
        return "eval/before_after" in pictures

    def log(self, metrics: dict, step: int, pictures: dict[str, Image.Image]) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(f"eval/{key}", value, step)
        for tag, picture in pictures.items():
            self.writer.add_image(tag, np.asarray(picture), step, dataformats="HWC")
        self.writer.flush()


def tile_sized(images: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """uint8 [N, 3, H, W] no larger than a tile: images larger than ``cell`` shrunk as `tile` shrinks them (PIL's
    nearest), so the tiles drawn from them are the same while a large model's samples stay small on disk."""
    if images.shape[-1] <= cell and images.shape[-2] <= cell:
        return images
    shrunk = [np.asarray(Image.fromarray(p).resize((cell, cell), Image.NEAREST)) for p in images.permute(0, 2, 3, 1).numpy()]
    return torch.from_numpy(np.stack(shrunk)).permute(0, 3, 1, 2).contiguous()


def _first(verdicts: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if verdicts is None else verdicts[:n].cpu()
