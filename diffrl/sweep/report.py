"""A sweep's results: per-trial metrics → mean ± std over seeds per row → results.csv, results.md, results.png.

The std is the sample standard deviation over a row's seeds (n − 1 in the denominator); a row with one
finished seed has none (blank in the CSV, the mean alone in the table).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

from diffrl.files import atomic_write, atomic_write_text

LABELS = {"isr": "ISR", "miou": "mIoU", "reward": "reward", "leakage": "leakage", "own_colour": "own colour",
          "neighbour_pixels": "neighbour px"}


def label(metric: str) -> str:
    """isr_L2 → 'ISR L2', neighbour_pixels → 'neighbour px'."""
    name, _, level = metric.partition("_L")
    return f"{LABELS.get(name, name)} L{level}" if level.isdigit() else LABELS.get(metric, metric)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """→ (mean, sample std with n − 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(results: Sequence[dict], rows: Sequence[str], metrics: Sequence[str]) -> dict[str, dict]:
    """Trial results (each with "row" and the metrics) → row → {"n", metric: (mean, std)}; rows without a
    finished trial are left out. A metric a trial lacks is left out of that row's mean."""
    table = {}
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        if mine:
            table[row] = {"n": len(mine), **{m: mean_std([r[m] for r in mine if r.get(m) is not None])
                                             for m in metrics if any(r.get(m) is not None for r in mine)}}
    return table


def write_csv(path: Path, results: Sequence[dict], table: dict[str, dict], columns: Sequence[str]) -> Path:
    """One line per trial, then a mean and a std line per row (seed column 'mean' / 'std', n in its own column)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "seed", "trial", "n", *columns])
    for r in results:
        writer.writerow([r["row"], r["seed"], r["trial"], 1, *[_cell(r.get(c)) for c in columns]])
    for row, stats in table.items():
        for i, kind in enumerate(("mean", "std")):
            writer.writerow([row, kind, "", stats["n"], *[_cell(stats[c][i]) if c in stats else "" for c in columns]])
    return atomic_write_text(path, buffer.getvalue())


def markdown(table: dict[str, dict], metrics: Sequence[str], title: str, expected: dict[str, list[int]]) -> str:
    """Rows × metrics as 'mean ± std' (3 decimals), with each row's finished / planned seed count."""
    head = "| row | seeds | " + " | ".join(label(m) for m in metrics) + " |"
    lines = [f"### {title}", "", f"mean ± std over seeds (sample std); {sum(map(len, expected.values()))} trials planned",
             "", head, "|" + "---|" * (len(metrics) + 2)]
    for row, seeds in expected.items():
        stats = table.get(row)
        if stats is None:
            lines.append(f"| {row} | 0/{len(seeds)} | " + " | ".join("—" for _ in metrics) + " |")
            continue
        cells = [(f"{stats[m][0]:.3f}" + (f" ± {stats[m][1]:.3f}" if stats[m][1] is not None else ""))
                 if m in stats else "—" for m in metrics]
        lines.append(f"| {row} | {stats['n']}/{len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, table: dict[str, dict], metrics: Sequence[str], title: str) -> Path:
    """Grouped bars: one group per metric, one bar per row (its mean), error bars ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.2 * len(metrics) * max(1, len(rows)) + 4)), 4.5))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
        means = [table[row][m][0] if m in table[row] else math.nan for m in metrics]
        stds = [(table[row][m][1] or 0.0) if m in table[row] else 0.0 for m in metrics]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"{row} (n={table[row]['n']})")
    ax.set_xticks(range(len(metrics)), [label(m) for m in metrics], rotation=30, ha="right")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def _cell(value) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
