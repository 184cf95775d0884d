"""What the scripts in experiments/ share: each writes its numbers as JSON beside its printout.

``--json PATH`` (default: ``experiments/<script>.json``, beside the script, as the committed
``best_of_n_*.json`` are; ``--json ''`` writes none). The file holds the script's name, the date (UTC), its
arguments and the numbers it printed, unrounded. A script imports this module by name: a script's folder is on
``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime, timezone
from pathlib import Path


def add_json_option(parser: argparse.ArgumentParser, script: str) -> None:
    """``--json PATH``, by default the script's own path with the suffix .json."""
    default = Path(script).resolve().with_suffix(".json")
    parser.add_argument("--json", default=str(default), metavar="PATH",
                        help=f"write the numbers, arguments and date here (default: experiments/{default.name}; "
                             "'' writes none)")


def _plain(value):
    """NaN and infinities as null (JSON has neither), tuples and tensors as lists, anything else JSON lacks as str."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # a tensor or an array
        return _plain(value.tolist())
    return str(value)


def write_json(args: argparse.Namespace, script: str, **numbers) -> None:
    """Write ``{"script", "date", "args", **numbers}`` to ``args.json`` (nothing when it is empty) and say where."""
    if not args.json:
        return
    record = {"script": Path(script).name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "args": {k: v for k, v in vars(args).items() if k != "json"}, **numbers}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(record), indent=2, ensure_ascii=False) + "\n")
    try:
        shown = path.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = path
    print(f"json: {shown}")
