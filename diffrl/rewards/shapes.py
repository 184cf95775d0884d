"""The exact reward of the Shapes world: I-DRUID's r = Σ_i [IoU(b̂_i, b_i) + c_i], normalised per instance.

The detection (b̂_i, c_i) of each instance comes from the exact detector (`diffrl.shapes.detector`):
found box of the right colour, and the shape confidence. r ∈ [0, 2] when normalised.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from diffrl.layout import Layout
from diffrl.registry import REWARDS
from diffrl.rewards.base import Reward, RewardOutput, check_inputs


@REWARDS.register("shapes")
class ShapesReward(Reward):
    """The Shapes world's exact reward, no weights: per instance IoU of the found object with its box plus the
    shape confidence, r = Σ_i [IoU_i + c_i], divided by the instance count when ``normalize`` (r ∈ [0, 2]).

    ``reward(images [B, 3, H, W] in [0, 1], layouts)`` → rewards [B] and info [B, K]: ``iou``, ``confidence``,
    ``success`` (IoU ≥ 0.5, right colour and shape), ``color_ok``, ``shape_ok``, ``instance_mask``. Phrases must be
    Shapes-world ``"<color> <shape>"`` (e.g. "red square"); others raise LayoutError.
    """

    name = "shapes"

    def __init__(self, normalize: bool = True):
        self.normalize = normalize  # divide the per-image sum by the instance count

    def __call__(self, images: Tensor, layouts: Sequence[Layout]) -> RewardOutput:
        from diffrl.shapes.detector import detect  # scipy: imported when a reward runs, not with diffrl.rewards

        check_inputs(images, layouts)
        d = detect(images, layouts)
        per_instance = (d.iou + d.confidence) * d.mask  # [B, K]
        rewards = per_instance.sum(1)
        if self.normalize:
            rewards = rewards / d.mask.sum(1)
        info = {"iou": d.iou, "confidence": d.confidence, "success": d.success, "color_ok": d.color_ok,
                "shape_ok": d.shape_ok, "instance_mask": d.mask}
        return RewardOutput(rewards.to(images.device), {k: v.to(images.device) for k, v in info.items()})
