"""Readers that turn benchmark layout files into `Layout`s (prompt, phrases, normalised xyxy boxes).

``read_layouts(path, format="auto")`` reads one of:

- ``jsonl``: diffrl's own JSONL, one ``{"prompt", "phrases", "boxes"}`` per line (`diffrl.layout.read_jsonl`).
- ``cocomig``: COCO-MIG (MIGC, CVPR 2024), in the forms the benchmark ships:
  * MIGC's ``bench_file/mig_bench_anno.yaml`` (limuloo/MIGC):
    ``{prompt: {phrase: [[x0, y0, x1, y1], ...], "coco_id": id}}`` with normalised boxes; a phrase with several
    boxes is several instances (in the file's order). Or MIGC's ``mig_bench.txt``, one prompt per line (the
    order its inference_mig_benchmark.py generates in), read with the ``<stem>_anno.yaml`` beside it.
  * MIG_Bench's JSON (LeyRio/MIG_Bench: written by mig_bench_sample.py, read by eval_mig.py):
    ``{key: {"caption": prompt, "segment": [{"label": "a red car", "bbox": [x0, y0, x1, y1]}, ...], ...}}``
    with normalised boxes; a JSON list of such entries is read too.
- ``layoutsam``: LayoutSAM-eval rows (the hub dataset HuiZhang0812/LayoutSAM-eval, read as CreatiLayout's
  dataset/layoutsam_benchmark.py reads it): ``global_caption`` is the prompt, ``region_captions`` the phrases
  and ``bbox_list`` the boxes in pixel xyxy — each either a list or a stringified Python/JSON list — and
  ``width`` / ``height`` (numbers or numeric strings) the image size that normalises them. Other columns
  (``image``, ``detail_region_captions``, ``file_name``) are ignored. Rows come from ``.parquet`` (needs
  pyarrow), ``.jsonl`` (a row per line) or ``.json`` (a list of rows).

``format="auto"`` decides by the file: ``.yaml``/``.yml``/``.txt`` → cocomig; ``.parquet`` → layoutsam;
``.json`` → cocomig or layoutsam by its entries' keys; ``.jsonl`` → layoutsam when its first row has a
``bbox_list``, else diffrl's JSONL.

A coordinate at most 1e-3 (normalised) or 1 px (LayoutSAM's pixels) outside the image is clipped onto it — the files
carry float noise such as 1.0000000000000002. Anything else wrong raises a LayoutError naming the file, the
row (line, entry key or row number) and the field.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any, Callable

from diffrl.errors import UserError
from diffrl.layout import Layout, LayoutError, read_jsonl

FORMATS = ("auto", "jsonl", "cocomig", "layoutsam")
LAYOUTSAM_COLUMNS = ("global_caption", "region_captions", "bbox_list", "width", "height")
TOLERANCE = 1e-3  # normalised coordinates this far outside [0, 1] are clipped onto it


def read_layouts(path: str | Path, format: str = "auto") -> list[Layout]:
    """Every layout in ``path`` read as ``format`` (one of `FORMATS`; module doc)."""
    path = Path(path)
    if format not in FORMATS:
        raise UserError(f"unknown layout format {format!r}; valid: {', '.join(FORMATS)}")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if format == "auto":
        format = detect_format(path)
    reader: Callable[[Path], list[Layout]] = {"jsonl": read_jsonl, "cocomig": read_cocomig,
                                              "layoutsam": read_layoutsam}[format]
    layouts = reader(path)
    if not layouts:
        raise LayoutError(f"{path}: the file has no layouts")
    return layouts


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml", ".txt"):
        return "cocomig"
    if suffix == ".parquet":
        return "layoutsam"
    if suffix == ".jsonl":
        first = next((line for line in path.read_text().splitlines() if line.strip()), "")
        try:
            return "layoutsam" if "bbox_list" in json.loads(first) else "jsonl"
        except (json.JSONDecodeError, TypeError):
            return "jsonl"  # read_jsonl names the bad line
    if suffix == ".json":
        entries = _entries(_load_json(path), path)
        keys = set(entries[0][1]) if entries and isinstance(entries[0][1], dict) else set()
        if "segment" in keys:
            return "cocomig"
        if "bbox_list" in keys:
            return "layoutsam"
    raise UserError(f"{path}: cannot tell which layout format this is; pass --format ({', '.join(FORMATS[1:])})")


# ----------------------------------------------------------------------------------------------- COCO-MIG


def read_cocomig(path: Path) -> list[Layout]:
    """COCO-MIG: MIGC's annotation YAML (or its prompt .txt with the YAML beside it), or MIG_Bench's JSON."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_migc_txt(path)
    if suffix in (".yaml", ".yml"):
        return [_migc_entry(prompt, entry, f"{path}: {_short(prompt)}")
                for prompt, entry in _load_migc_yaml(path).items()]
    return [_mig_bench_entry(entry, f"{path}: entry {key}") for key, entry in _entries(_load_json(path), path)]


def _load_migc_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LayoutError(f"{path}: not valid YAML{where} ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise LayoutError(f"{path}: expected a mapping prompt → {{phrase: [boxes], coco_id}} like MIGC's "
                          "mig_bench_anno.yaml")
    return data


def _read_migc_txt(path: Path) -> list[Layout]:
    anno = path.with_name(f"{path.stem}_anno.yaml")
    if not anno.is_file():
        raise UserError(f"{path}: MIGC's prompt list needs its boxes in {anno.name} beside it "
                        "(bench_file/mig_bench_anno.yaml in limuloo/MIGC); or pass the .yaml itself")
    data = _load_migc_yaml(anno)
    layouts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        prompt = line.strip()
        if not prompt:
            continue
        if prompt not in data:
            raise LayoutError(f"{path}:{number}: prompt {_short(prompt)} has no entry in {anno.name}")
        layouts.append(_migc_entry(prompt, data[prompt], f"{path}:{number}"))
    return layouts


def _migc_entry(prompt: Any, entry: Any, where: str) -> Layout:
    """``{phrase: [[x0, y0, x1, y1], ...], "coco_id": id}`` → a Layout, a phrase per box."""
    if not isinstance(entry, dict):
        raise LayoutError(f"{where}: expected {{phrase: [boxes], coco_id}}, got {type(entry).__name__}")
    phrases, boxes = [], []
    for phrase, value in entry.items():
        if phrase == "coco_id":
            continue
        if not isinstance(value, list) or not value:
            raise LayoutError(f"{where}: {phrase!r}: expected a list of [x0, y0, x1, y1] boxes, got {value!r}")
        for j, box in enumerate(value):
            phrases.append(phrase)
            boxes.append(_box(box, f"{where}: {phrase!r}[{j}]"))
    return _layout(prompt, phrases, boxes, where)


def _mig_bench_entry(entry: Any, where: str) -> Layout:
    """``{"caption": prompt, "segment": [{"label", "bbox"}, ...]}`` → a Layout."""
    if not isinstance(entry, dict):
        raise LayoutError(f"{where}: expected {{caption, segment}}, got {type(entry).__name__}")
    for key in ("caption", "segment"):
        if key not in entry:
            raise LayoutError(f"{where}: {key}: missing")
    if not isinstance(entry["segment"], list):
        raise LayoutError(f"{where}: segment: expected a list of {{label, bbox}}")
    phrases, boxes = [], []
    for j, segment in enumerate(entry["segment"]):
        if not isinstance(segment, dict) or "label" not in segment or "bbox" not in segment:
            raise LayoutError(f"{where}: segment[{j}]: expected {{label, bbox}}, got {segment!r}")
        phrases.append(segment["label"])
        boxes.append(_box(segment["bbox"], f"{where}: segment[{j}].bbox"))
    return _layout(entry["caption"], phrases, boxes, where)


# ------------------------------------------------------------------------------------------ LayoutSAM-eval


def read_layoutsam(path: Path) -> list[Layout]:
    """LayoutSAM-eval rows from .parquet, .jsonl or .json (module doc)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [layoutsam_row(row, f"{path}: row {i}") for i, row in enumerate(_parquet_rows(path))]
    if suffix == ".jsonl":
        layouts = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise LayoutError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
            layouts.append(layoutsam_row(row, f"{path}:{number}"))
        return layouts
    return [layoutsam_row(row, f"{path}: row {key}") for key, row in _entries(_load_json(path), path)]


def layoutsam_row(row: Any, where: str) -> Layout:
    """One LayoutSAM-eval row → a Layout: pixel boxes divided by the row's width and height."""
    if not isinstance(row, dict):
        raise LayoutError(f"{where}: expected a row with {', '.join(LAYOUTSAM_COLUMNS)}, got {type(row).__name__}")
    for column in LAYOUTSAM_COLUMNS:
        if column not in row:
            raise LayoutError(f"{where}: {column}: missing (LayoutSAM-eval rows have {', '.join(LAYOUTSAM_COLUMNS)})")
    width, height = (_size(row[c], f"{where}: {c}") for c in ("width", "height"))
    phrases = _list_column(row["region_captions"], f"{where}: region_captions")
    raw_boxes = _list_column(row["bbox_list"], f"{where}: bbox_list")
    if len(phrases) != len(raw_boxes):
        raise LayoutError(f"{where}: bbox_list has {len(raw_boxes)} boxes but region_captions {len(phrases)} phrases")
    boxes = [_box(b, f"{where}: bbox_list[{j}]", pixels=(width, height)) for j, b in enumerate(raw_boxes)]
    return _layout(row["global_caption"], phrases, boxes, where)


def _parquet_rows(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow (`pip install pyarrow`); or write the rows "
                        "to .jsonl and pass that") from None
    names = pq.read_schema(path).names
    missing = [c for c in LAYOUTSAM_COLUMNS if c not in names]
    if missing:
        raise LayoutError(f"{path}: column {missing[0]!r} missing (LayoutSAM-eval rows have "
                          f"{', '.join(LAYOUTSAM_COLUMNS)})")
    return pq.read_table(path, columns=list(LAYOUTSAM_COLUMNS)).to_pylist()  # not the image column


def _list_column(value: Any, where: str) -> list:
    """A list, or a stringified one (JSON or a Python literal, as the hub stores bbox_list)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                shown = value if len(value) <= 40 else value[:37] + "..."
                raise LayoutError(f"{where}: not a list literal ({shown!r})") from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise LayoutError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _size(value: Any, where: str) -> float:
    try:
        size = float(value)
    except (TypeError, ValueError):
        raise LayoutError(f"{where}: expected a number of pixels, got {value!r}") from None
    if not math.isfinite(size) or size <= 0:
        raise LayoutError(f"{where}: must be a positive number of pixels, got {value!r}")
    return size


# ---------------------------------------------------------------------------------------------- shared


def _box(value: Any, where: str, pixels: tuple[float, float] | None = None) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1], normalised or — with ``pixels`` = (width, height) — in pixels → normalised, clipped
    onto the image when at most 1e-3 (normalised) or 1 px outside it."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != 4
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise LayoutError(f"{where}: must be 4 numbers [x0, y0, x1, y1], got {value!r}")
    sizes = (1.0, 1.0, 1.0, 1.0) if pixels is None else (pixels[0], pixels[1], pixels[0], pixels[1])
    out = []
    for name, v, size in zip(("x0", "y0", "x1", "y1"), value, sizes):
        n = v / size
        tolerance = TOLERANCE if pixels is None else 1 / size
        if not math.isfinite(n) or not -tolerance <= n <= 1 + tolerance:
            bound = "[0, 1]" if pixels is None else f"the image [0, {size:g}]"
            raise LayoutError(f"{where}: {name} ({v}) is outside {bound}")
        out.append(min(max(n, 0.0), 1.0))
    return tuple(out)


def _layout(prompt: Any, phrases: list, boxes: list, where: str) -> Layout:
    try:
        return Layout(prompt, phrases, boxes)
    except LayoutError as err:
        raise LayoutError(f"{where}: {err}") from None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LayoutError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def _entries(data: Any, path: Path) -> list[tuple[Any, Any]]:
    """A JSON object's (key, value) pairs, or a list's (index, item) pairs."""
    if isinstance(data, dict):
        return list(data.items())
    if isinstance(data, list):
        return list(enumerate(data))
    raise LayoutError(f"{path}: expected a JSON object or list of entries, got {type(data).__name__}")


def _short(text: Any) -> str:
    text = str(text)
    return repr(text if len(text) <= 50 else text[:47] + "...")
