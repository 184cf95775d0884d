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
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

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


def is_url(name: str) -> bool:
    """Does this ``--reward`` part name a reward server (`HttpReward`) rather than a registered reward?"""
    return name.startswith(("http://", "https://"))


def check_name(name: str) -> None:
    """A registered reward name or a reward server's URL; a UserError naming the valid forms otherwise."""
    if is_url(name):
        check_url(name)
    elif REWARDS.get(name) is HttpReward:
        raise UserError(f"--reward {name}: name the reward server by its URL, e.g. --reward http://127.0.0.1:8000/score")


def uses_grounder(name: str) -> bool:
    return not is_url(name) and REWARDS.get(name).uses_grounder


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
    Checks every name against the registry and loads nothing."""
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


def build_reward(spec: str, model: str | None = None, http: Mapping | None = None) -> Reward:
    """The reward a ``--reward`` spec names. Its parts that score through a grounder (gdino, cycle) share
    one, loaded from ``model`` (``--reward-model``): a hub id, a local folder, or "shapes". Its URL parts are
    `HttpReward` clients with the keywords ``http`` (batch_size, timeout, retries, image_format)."""
    parts = parse_reward_spec(spec)
    if not any(uses_grounder(name) for name, _ in parts):
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
        cls = REWARDS.get(name)
        return cls(grounder=grounder) if cls.uses_grounder else cls()

    if "=" not in spec:
        return build(parts[0][0])
    return CompositeReward({name: (build(name), weight) for name, weight in parts})
