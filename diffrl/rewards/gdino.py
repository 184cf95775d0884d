"""I-DRUID's Grounding-DINO reward: r = Σ_i [IoU(b̂_i, b_i) + c_i] over a layout's instances, / K by default.

A grounder (Grounding DINO unless another is given) returns, for each phrase of the layout, candidate
boxes with confidences. Choosing (b̂_i, c_i) for instance i: within each phrase, the instances and that
phrase's detections are matched one to one by Hungarian matching that maximises IoU(b̂, b) + 0.001·c
(the confidence only breaks ties, e.g. between detections that all miss the box); so two instances of
the same phrase never share a detection. An instance left without a detection scores IoU 0 and
confidence 0. With ``normalize`` (the default) the sum is divided by the instance count K: r ∈ [0, 2].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from diffrl.layout import Layout
from diffrl.registry import REWARDS
from diffrl.rewards.base import Reward, RewardOutput, check_inputs
from diffrl.boxes import box_iou
from diffrl.rewards.grounder import Grounder, Grounding, make_grounder
from diffrl.rewards.matching import match_by_phrase

CONFIDENCE_TIE_BREAK = 1e-3


def iou_cost(targets: Tensor, detections: Grounding) -> Tensor:
    """Hungarian cost [n, M]: −(IoU + 0.001·confidence)."""
    return -(box_iou(targets, detections.boxes) + CONFIDENCE_TIE_BREAK * detections.scores[None, :])


@REWARDS.register("gdino")
class GroundingDinoReward(Reward):
    """``model``: hub id or folder of the Grounding DINO weights (default IDEA-Research/grounding-dino-tiny),
    or "shapes" for the exact Shapes detector; ``device``: where the detector runs (None: the images'
    device); ``grounder``: a ready `Grounder` (or "shapes"), which replaces model/device/thresholds.
    info: per instance ``iou``, ``confidence``, ``found``, ``success``, ``boxes`` and ``instance_mask`` [B, K]."""

    name = "gdino"
    uses_grounder = True

    def __init__(self, model: str | None = None, device: str | torch.device | None = None,
                 box_threshold: float = 0.35, text_threshold: float = 0.25, normalize: bool = True,
                 grounder: Grounder | str | None = None):
        self.grounder = make_grounder(grounder, model, device, box_threshold, text_threshold)
        self.normalize = normalize  # divide the per-image sum by the instance count

    def __call__(self, images: Tensor, layouts: Sequence[Layout]) -> RewardOutput:
        check_inputs(images, layouts)
        matches = match_by_phrase(layouts, self.grounder(images, [l.phrases for l in layouts]), iou_cost)
        rewards = ((matches.iou + matches.confidence) * matches.mask).sum(1)  # [B]
        if self.normalize:
            rewards = rewards / matches.mask.sum(1)
        info = matches.verdicts()
        return RewardOutput(rewards.to(images.device), {k: v.to(images.device) for k, v in info.items()})
