"""The HTML report of a judged evaluation: each image, its target boxes and each instance's verdict.

One self-contained file (pictures embedded as base64 PNG): the summary table (ISR / mIoU per level and
pooled) and the judge's settings, then per image its prompt, the picture with the target boxes drawn by
`diffrl.eval.visualize.sample_grid` (solid: the instance succeeded, dashed with a red badge: it did not; numbered as in
the table below it) and per instance its phrase, verdict (ok / wrong box / wrong colour / missed), best
IoU and the share of its pixels in the asked colour.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from diffrl.eval.cocomig import Verdicts
from diffrl.eval.visualize import sample_grid
from diffrl.layout import Layout

TILE = 256  # pixels per picture in the report
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
.card { display: inline-block; vertical-align: top; width: 560px; margin: 0 1em 1.5em 0; }
.card img { float: left; margin-right: 8px; image-rendering: pixelated; }
.ok { color: #17803d; } .wrong-box, .wrong-colour { color: #b45309; } .missed { color: #b91c1c; }
"""


def _png(image: torch.Tensor, layout: Layout, success: torch.Tensor) -> str:
    tile = sample_grid(image[None], [layout], columns=1, verdicts=success[None], cell=TILE, numbered=True)
    buffer = io.BytesIO()
    tile.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _summary(metrics: dict) -> str:
    rows = "".join(f"<tr><td>{level}</td><td>{m['isr']:.3f}</td><td>{m['miou']:.3f}</td><td>{m['instances']}</td></tr>"
                   for level, m in metrics["per_level"].items())
    total = sum(m["instances"] for m in metrics["per_level"].values())
    return ("<table><tr><th>level</th><th>ISR</th><th>mIoU</th><th>instances</th></tr>" + rows
            + f"<tr><th>all</th><th>{metrics['isr']:.3f}</th><th>{metrics['miou']:.3f}</th><th>{total}</th></tr></table>")


def write_report(path: str | Path, images: torch.Tensor, layouts: Sequence[Layout], verdicts: Verdicts,
                 metrics: dict, settings: dict[str, str], title: str = "COCO-MIG evaluation") -> Path:
    """images [N, 3, H, W] in [0, 1] with their layouts, verdicts and summary block ``metrics`` → ``path``
    (HTML); ``settings`` are listed under the summary (judge, weights, thresholds…)."""
    path = Path(path)
    labels = verdicts.labels()
    counts = Counter(label for row in labels for label in row)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>", _summary(metrics),
             "<p>" + ", ".join(f"{label}: {counts.get(label, 0)}" for label in ("ok", "wrong box", "wrong colour", "missed"))
             + "</p><table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                                      for k, v in settings.items()) + "</table>"]
    for i, (layout, row) in enumerate(zip(layouts, labels)):
        instances = "".join(
            f"<tr><td>{k + 1}</td><td>{html.escape(phrase)}</td><td class='{label.replace(' ', '-')}'>{label}</td>"
            f"<td>{verdicts.iou[i, k]:.2f}</td>"
            f"<td>{f'{verdicts.color_fraction[i, k]:.2f}' if verdicts.box_ok[i, k] else '–'}</td></tr>"
            for k, (phrase, label) in enumerate(zip(layout.phrases, row)))
        parts.append(f"<div class='card'><p><b>{i}</b> {html.escape(layout.prompt)}</p>"
                     f"<img width='{TILE}' height='{TILE}' src='data:image/png;base64,{_png(images[i], layout, verdicts.success[i])}'>"
                     "<table><tr><th>#</th><th>phrase</th><th>verdict</th><th>IoU</th><th>colour</th></tr>"
                     f"{instances}</table></div>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path
