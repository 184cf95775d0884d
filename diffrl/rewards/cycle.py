"""EchoGen's cycle-consistency reward (layout → image → layout): r = −(1/K) Σ_k d(ŷ_k, x_k).

A grounder recovers boxes ŷ from the generated image for the layout's phrases; each input box x_k is
matched one to one with a recovered box of its own phrase by Hungarian matching on d (a box recovered
for another phrase cannot match). An input box nothing was matched to costs the maximum distance.
    d = "l1"   : mean |ŷ − x| over the four normalised coordinates, in [0, 1]  (maximum 1)
    d = "giou" : 1 − GIoU(ŷ, x), in [0, 2]                                     (maximum 2)
So r ∈ [−d_max, 0], 0 when every box comes back exactly. EchoGen (AAAI 2026) uses this box
inconsistency, with its own grounding head, as a self-supervised GRPO reward; here the grounder is
Grounding DINO by default, or the exact Shapes detector (``grounder="shapes"``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from diffrl.errors import UserError
from diffrl.layout import Layout
from diffrl.registry import REWARDS
from diffrl.rewards.base import Reward, RewardOutput, check_inputs
from diffrl.boxes import generalized_box_iou, l1_distance
from diffrl.rewards.grounder import Grounder, make_grounder
from diffrl.rewards.matching import match_by_phrase

DISTANCES = {
    "l1": (l1_distance, 1.0),  # (pairwise d [N, M], its maximum)
    "giou": (lambda a, b: 1 - generalized_box_iou(a, b), 2.0),
}


@REWARDS.register("cycle")
class CycleConsistencyReward(Reward):
    """``distance``: "l1" or "giou"; ``model``, ``device``, thresholds and ``grounder`` as for
    `GroundingDinoReward`. info: per instance ``distance`` and the matching's ``iou``, ``confidence``,
    ``found``, ``success``, ``boxes`` (recovered) and ``instance_mask`` [B, K]."""

    name = "cycle"
    uses_grounder = True

    def __init__(self, distance: str = "l1", model: str | None = None, device: str | torch.device | None = None,
                 box_threshold: float = 0.35, text_threshold: float = 0.25, grounder: Grounder | str | None = None):
        if distance not in DISTANCES:
            raise UserError(f"unknown cycle distance {distance!r}; valid: {', '.join(DISTANCES)}")
        self.distance, self.max_distance = DISTANCES[distance]
        self.grounder = make_grounder(grounder, model, device, box_threshold, text_threshold)

    def __call__(self, images: Tensor, layouts: Sequence[Layout]) -> RewardOutput:
        check_inputs(images, layouts)
        recovered = self.grounder(images, [l.phrases for l in layouts])
        matches = match_by_phrase(layouts, recovered, lambda targets, found: self.distance(targets, found.boxes))
        distance = torch.where(matches.found, matches.cost, self.max_distance) * matches.mask  # [B, K] d(ŷ_k, x_k)
        rewards = -distance.sum(1) / matches.mask.sum(1)
        info = {"distance": distance, **matches.verdicts()}
        return RewardOutput(rewards.to(images.device), {k: v.to(images.device) for k, v in info.items()})
