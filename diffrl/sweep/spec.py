"""The sweep file: a base `diffrl train` config, rows of overrides (and/or a grid), seeds, prepared models.

```yaml
name: my-sweep                       # optional; a label for the tables
base: {iterations: 20, env: {layouts_per_iter: 32}}     # like a --config file
seeds: [0, 1]                        # every row runs once per seed (a row may say its own `seeds:`)
models:                              # generators the sweep prepares once, in its folder, by `diffrl pretrain`
  idm: {pretrain: {idm: true, init: shapes-tiny, steps: 300, lr: 1e-4, batch_size: 32}}
rows:                                # row label → overrides (dotted keys or sections); `model.name` may name a model above
  PPO: {algo.name: ppo}
  IDM+PPO: {model.name: idm, algo.name: ppo, joint.dis_coef: 0.1}
grid: {algo.lr: [1e-5, 1e-4]}        # optional: every row × every combination of these values
leakage_layouts: 64                  # attribute-leakage probe layouts scored per trial (0: skip)
cpus_per_trial: 1                    # Ray resources per trial (also its torch threads)
gpus_per_trial: 0
metrics: [isr, miou, leakage]        # columns of results.md and bars of results.png (results.csv has them all)
```

Loading checks everything a trial would check about its config (every row's overrides go through
`build_config`), so a bad key or value is one line naming the file and the row before any work starts.
A trial is one (row, seed); its whole resolved train config is fixed here, so the runner only adds the folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffrl.algos.pretrain import PretrainConfig
from diffrl.config import build_config, to_dict
from diffrl.errors import UserError

TOP_KEYS = ("name", "base", "seeds", "models", "rows", "grid", "leakage_layouts", "cpus_per_trial", "gpus_per_trial",
            "metrics")
ROW_KEYS = ("seeds",)  # keys of a row that belong to the sweep, not to the train config
SWEEP_OWNED = ("seed", "out")  # train keys the sweep sets itself
PRETRAIN_KEYS = tuple(f.name for f in dataclasses.fields(PretrainConfig) if f.name != "out")
SUMMARY_METRICS = ("isr", "miou", "reward")  # of the final evaluation, also per level as isr_L2, miou_L2 …
LEAKAGE_METRICS = ("leakage", "own_colour", "neighbour_pixels")
DEFAULT_METRICS = ("isr", "miou", "reward")


@dataclass
class Trial:
    id: str  # its folder name under trials/, unique in the sweep: "<row slug>-seed<seed>"
    row: str  # the row label
    seed: int
    config: dict  # the resolved train config (`to_dict`), `model.name` a prepared model's name or as given
    model: str | None  # the prepared model it trains (its `model.name` is replaced by that model's folder), or None


@dataclass
class Sweep:
    file: Path
    name: str
    rows: dict[str, list[int]]  # row label → its seeds, in file order
    models: dict[str, PretrainConfig]  # prepared model name → how `diffrl pretrain` makes it (its `out` unset)
    trials: list[Trial]
    leakage_layouts: int
    cpus_per_trial: float
    gpus_per_trial: float
    metrics: list[str]
    levels: list[int]  # the evaluation levels every trial shares, for the per-level metrics


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"sweep file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"sweep file {path}: expected a mapping with base, seeds and rows (see `diffrl sweep --help`)")
    try:
        return parse_sweep(data, path)
    except UserError as err:
        raise UserError(f"sweep file {path}: {err}") from None


def parse_sweep(data: dict, file: Path = Path("<sweep>")) -> Sweep:
    _known(data, TOP_KEYS, "top-level key")
    base = _mapping(data.get("base", {}), "base")
    _owned(base.keys(), "base")
    seeds = _seeds(data.get("seeds", [0]), "seeds")
    models = {name: _model(name, spec) for name, spec in _mapping(data.get("models", {}), "models").items()}
    rows = _mapping(data.get("rows", {"base": {}}) or {"base": {}}, "rows")
    grid = _mapping(data.get("grid", {}), "grid")
    for key, values in grid.items():
        _owned([key], "grid")
        if not isinstance(values, list) or not values:
            raise UserError(f"grid {key}: expected a non-empty list of values")

    trials, row_seeds = [], {}
    for row, overrides in rows.items():
        overrides = _mapping(overrides if overrides is not None else {}, f"rows {row}")
        own_seeds = _seeds(overrides.pop("seeds"), f"rows {row}: seeds") if "seeds" in overrides else seeds
        _owned(overrides.keys(), f"rows {row}")
        for point in itertools.product(*grid.values()):
            label = " ".join([str(row)] * bool(data.get("rows")) + [f"{k}={v}" for k, v in zip(grid, point)]) or "base"
            row_seeds[label] = own_seeds
            for seed in own_seeds:
                trials.append(_trial(label, seed, base, {**overrides, **dict(zip(grid, point))}, models))
    ids = [t.id for t in trials]
    if len(set(ids)) != len(ids):
        clash = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"rows: two labels give the same folder name {clash!r}; rename one")

    levels = sorted({lv for t in trials for lv in t.config["eval"]["levels"]})
    known = (list(SUMMARY_METRICS) + [f"{m}_L{lv}" for m in ("isr", "miou") for lv in levels]
             + list(LEAKAGE_METRICS))
    leakage_layouts = _number(data.get("leakage_layouts", 64), "leakage_layouts", int, minimum=0)
    default = list(DEFAULT_METRICS) + (["leakage", "neighbour_pixels"] if leakage_layouts else [])
    metrics = data.get("metrics", default)
    if not isinstance(metrics, list) or not metrics:
        raise UserError("metrics: expected a non-empty list of metric names")
    for metric in metrics:
        _known({metric: None}, known, "metric")
        if metric in LEAKAGE_METRICS and not leakage_layouts:
            raise UserError(f"metrics: {metric} needs leakage_layouts > 0")
    return Sweep(
        file=file, name=str(data.get("name") or file.stem), rows=row_seeds, models=models, trials=trials,
        leakage_layouts=leakage_layouts,
        cpus_per_trial=_number(data.get("cpus_per_trial", 1), "cpus_per_trial", float, minimum=1e-9),
        gpus_per_trial=_number(data.get("gpus_per_trial", 0), "gpus_per_trial", float, minimum=0),
        metrics=[str(m) for m in metrics], levels=levels,
    )


def _trial(row: str, seed: int, base: dict, overrides: dict, models: dict[str, PretrainConfig]) -> Trial:
    try:
        cfg = build_config(base, [*overrides.items(), ("seed", seed)])
    except UserError as err:
        raise UserError(f"rows {row}: {err}") from None
    model = cfg.model.name if cfg.model.name in models else None
    if model is None:
        import diffrl.policies.backbones.tiny  # noqa: F401  (registers shapes-tiny)
        from diffrl.registry import MODELS

        folder = Path(cfg.model.name)
        if cfg.model.name not in MODELS and not (folder / "model_index.json").is_file():
            declared = f"a model under models: ({', '.join(models)}), " if models else ""
            raise UserError(f"rows {row}: model.name {cfg.model.name!r}: not {declared}a registered model "
                            f"({', '.join(MODELS.names())}) nor a generator folder (no model_index.json)")
        if folder.is_dir():
            cfg.model.name = str(folder.resolve())  # trials run in other processes, maybe other folders
    elif cfg.joint.dis_coef > 0 and not models[model].idm:
        raise UserError(f"rows {row}: joint.dis_coef needs a generator with IDM; give models {model}: pretrain: idm: true")
    if cfg.env.data != "shapes" and Path(cfg.env.data).is_file():
        cfg.env.data = str(Path(cfg.env.data).resolve())
    slug = re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-") or "row"
    return Trial(id=f"{slug}-seed{seed}", row=row, seed=seed, config=to_dict(cfg), model=model)


def _model(name: str, spec: Any) -> PretrainConfig:
    spec = _mapping(spec, f"models {name}")
    _known(spec, ("pretrain",), f"key of models {name} (only `pretrain:` models so far)")
    options = _mapping(spec.get("pretrain") or {}, f"models {name}: pretrain")
    _known(options, PRETRAIN_KEYS, f"key of models {name}: pretrain")
    defaults = PretrainConfig()
    for key, value in options.items():
        default, where = getattr(defaults, key), f"models {name}: pretrain: {key}"
        if isinstance(default, float) and isinstance(value, str):
            value = _float(value, where)
        if isinstance(default, tuple):
            value = tuple(value if isinstance(value, list) else [value])
        elif isinstance(default, str):
            value = str(value)
        elif isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (type(default) is int and not isinstance(value, int)):
            raise UserError(f"{where}: expected {type(default).__name__}, got {value!r}")
        options[key] = type(default)(value)
    if options.get("dis_coef", 0) and not options.get("idm"):
        raise UserError(f"models {name}: pretrain: dis_coef weighs the IDC loss of IDM: add idm: true")
    return PretrainConfig(**options)


def _known(data: dict, allowed, what: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid: {', '.join(map(str, allowed))}"
            raise UserError(f"unknown {what} {key!r}{hint}")


def _owned(keys, where: str) -> None:
    for key in keys:
        if key in SWEEP_OWNED:
            what = "list seeds under `seeds:`" if key == "seed" else "the sweep puts each trial in its own folder"
            raise UserError(f"{where}: {key!r} is the sweep's to set ({what})")


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _seeds(value: Any, where: str) -> list[int]:
    value = value if isinstance(value, list) else [value]
    if not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value) or len(set(value)) != len(value):
        raise UserError(f"{where}: expected a list of distinct integers, got {value!r}")
    return value


def _number(value: Any, where: str, kind: type, minimum: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise UserError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise UserError(f"{where}: must be {'≥ 0' if minimum == 0 else '> 0'}, got {value}")
    return kind(value)


def _float(value: str, where: str) -> float:
    try:  # YAML 1.1 reads 1e-4 (no dot) as a string
        return float(value)
    except ValueError:
        raise UserError(f"{where}: expected a number, got {value!r}") from None
