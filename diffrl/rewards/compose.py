"""Weighted sums of rewards, and the ``--reward`` spec that names them.

A spec is one registered name (``gdino``) or weighted parts joined by commas (``gdino=1,cycle=0.5``):
    r = Σ_p w_p · r_p
`CompositeReward` reports each part's value per sample as ``part/<name>`` [B] and each part's own
info under ``<name>/<key>``. So a composite can stand wherever one reward is read (the trainer's
train ISR, the evaluator's ISR / mIoU), the per-instance verdicts of its first part that has them
(``iou``, ``success``, ``color_ok``, ``shape_ok``, ``instance_mask``) are also given unprefixed.
`build_reward` gives the parts that need a detector (gdino, cycle) one shared grounder.

A name (or part) that starts with ``http://`` or ``https://`` is a reward server's URL, scored by `HttpReward`
(``--reward http://127.0.0.1:8000/score``, or ``shapes=1,http://host:8000/score=0.5``); such a URL has no query
string, so that ``=`` and ``,`` keep their meaning in the spec.

A name is a registered reward (``diffrl list``), a reward another package announces under the entry-point group
``diffrl.rewards`` (``[project.entry-points."diffrl.rewards"] myreward = "mypkg.rewards:MyReward"``), or
``package.module:ClassName`` of any importable module (`reward_class`). ``options`` (``reward.options`` in the
config) are keyword arguments for the reward's constructor: for one reward its own, for weighted parts a mapping
part name → that part's options.
"""

from __future__ import annotations

import importlib
import inspect
import math
from importlib.metadata import entry_points
from typing import Any, Mapping, Sequence

from torch import Tensor

import diffrl.rewards.cycle  # noqa: F401  (registers "cycle")
import diffrl.rewards.gdino  # noqa: F401  (registers "gdino")
import diffrl.rewards.http  # noqa: F401  (registers "http", the client of a reward server)
import diffrl.rewards.shapes  # noqa: F401  (registers "shapes")
from diffrl.errors import UserError
from diffrl.layout import Layout
from diffrl.registry import REWARDS
from diffrl.rewards.base import Reward, RewardOutput
from diffrl.rewards.grounder import make_grounder
from diffrl.rewards.http import HttpReward, check_url

VERDICTS = ("iou", "success", "color_ok", "shape_ok", "instance_mask")
EXAMPLE = "e.g. --reward gdino or --reward gdino=1,cycle=0.5"
ENTRY_POINTS = "diffrl.rewards"  # the entry-point group other packages announce their rewards under


def reward_class(name: str) -> type[Reward]:
    """The class ``--reward NAME`` means: a registered name, an entry point of the group ``diffrl.rewards``, or
    ``package.module:ClassName`` (imported, checked to be a `Reward`, not built). Anything else is a UserError."""
    name = name.strip()
    if name in REWARDS:
        return REWARDS.get(name)
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"--reward {name}: cannot import {module_name} ({err}); put its folder on PYTHONPATH or "
                            "pip install its package") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise UserError(f"--reward {name}: module {module_name} has no {class_name!r}")
        return _check_reward_class(name, cls)
    found = [ep for ep in entry_points(group=ENTRY_POINTS) if ep.name == name]
    if found:
        try:
            cls = found[0].load()
        except ImportError as err:
            raise UserError(f"--reward {name}: its entry point {found[0].value} cannot be imported ({err})") from None
        return _check_reward_class(name, cls)
    REWARDS.get(name)  # raises the registry's one line: unknown name, the valid ones
    raise AssertionError("unreachable")


def _check_reward_class(name: str, cls: Any) -> type[Reward]:
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise UserError(f"--reward {name}: {cls!r} is not a subclass of diffrl.rewards.Reward (see its docstring for "
                        "the contract: __call__(images, layouts) -> RewardOutput)")
    return cls


def construct(name: str, cls: type[Reward], options: Mapping[str, Any], grounder: Any = None) -> Reward:
    """``cls(**options)`` (plus the shared ``grounder`` for a reward that takes one); options its constructor does
    not take are a UserError naming them and the ones it does take."""
    kwargs = dict(options)
    if cls.uses_grounder and "grounder" not in kwargs and "model" not in kwargs:
        kwargs["grounder"] = grounder
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(cls).parameters if p not in ("self", "grounder")]
        raise UserError(f"reward.options for {name}: {err}; its constructor takes {', '.join(params) or 'nothing'}") \
            from None
    return cls(**kwargs)


def is_url(name: str) -> bool:
    """Does this ``--reward`` part name a reward server (`HttpReward`) rather than a registered reward?"""
    return name.startswith(("http://", "https://"))


def check_name(name: str) -> None:
    """A reward (`reward_class`) or a reward server's URL; a UserError naming the valid forms otherwise."""
    if is_url(name):
        check_url(name)
    elif reward_class(name) is HttpReward:
        raise UserError(f"--reward {name}: name the reward server by its URL, e.g. --reward http://127.0.0.1:8000/score")


class CompositeReward(Reward):
    """``parts``: name → (reward, weight); r = Σ weight · reward."""

    name = "composite"

    def __init__(self, parts: Mapping[str, tuple[Reward, float]]):
        if not parts:
            raise UserError(f"a composite reward needs at least one part; {EXAMPLE}")
        self.parts = dict(parts)

    def __call__(self, images: Tensor, layouts: Sequence[Layout]) -> RewardOutput:
        total, info, verdicts = 0.0, {}, {}
        for name, (reward, weight) in self.parts.items():
            out = reward(images, layouts)
            total = total + weight * out.rewards
            info[f"part/{name}"] = out.rewards
            info.update({f"{name}/{key}": value for key, value in out.info.items()})
            if not verdicts and all(key in out.info for key in VERDICTS):
                verdicts = {key: out.info[key] for key in VERDICTS}
        return RewardOutput(total, {**verdicts, **info})


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """``"gdino"`` → [("gdino", 1.0)]; ``"gdino=1,cycle=0.5"`` → [("gdino", 1.0), ("cycle", 0.5)].
    Checks every name (`reward_class`: registered, an entry point or module:Class) and builds nothing."""
    if "=" not in spec and "," not in spec:
        check_name(spec.strip())
        return [(spec.strip(), 1.0)]
    parts = []
    for text in spec.split(","):
        name, _, weight = (s.strip() for s in text.partition("="))
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not name or not math.isfinite(value):
            raise UserError(f"--reward {spec!r}: part {text.strip()!r} must be name=weight, the weight a number; "
                            f"{EXAMPLE}")
        check_name(name)
        if name in dict(parts):
            raise UserError(f"--reward {spec!r}: {name} appears twice; give each part once, {EXAMPLE}")
        parts.append((name, value))
    return parts


def build_reward(spec: str, model: str | None = None, options: Mapping[str, Any] | None = None,
                 http: Mapping | None = None) -> Reward:
    """The reward a ``--reward`` spec names. Its parts that score through a grounder (gdino, cycle) share
    one, loaded from ``model`` (``--reward-model``): a hub id, a local folder, or "shapes". ``options``: the
    constructor's keyword arguments (for weighted parts: part name → its options; module docstring). Its URL parts
    are `HttpReward` clients with the keywords ``http`` (batch_size, timeout, retries, image_format)."""
    parts = parse_reward_spec(spec)
    classes = {name: HttpReward if is_url(name) else reward_class(name) for name, _ in parts}
    options = dict(options or {})
    composite = "=" in spec
    if composite:
        unknown = [key for key in options if key not in classes]
        bad = [key for key, value in options.items() if not isinstance(value, Mapping)]
        if unknown or bad:
            raise UserError(f"reward.options with weighted parts is a mapping part name → its options (e.g. "
                            f"reward.options.{parts[0][0]}.key=value); {', '.join(unknown or bad)} is not a part of "
                            f"--reward {spec}")
    if not any(cls.uses_grounder for cls in classes.values()):
        if model:
            detectors = ", ".join(name for name, cls in REWARDS.items() if cls.uses_grounder)
            served = (" (a reward server loads its own: diffrl serve-reward NAME --reward-model …)"
                      if any(is_url(name) for name, _ in parts) else "")
            raise UserError(f"--reward-model is for rewards with a detector ({detectors}); --reward {spec} has none"
                            + served)
        grounder = None
    else:
        grounder = make_grounder(model=model)

    def build(name: str) -> Reward:
        if is_url(name):
            return HttpReward(name, **(http or {}))
        return construct(name, classes[name], options.get(name, {}) if composite else options, grounder)

    if not composite:
        return build(parts[0][0])
    return CompositeReward({name: (build(name), weight) for name, weight in parts})
