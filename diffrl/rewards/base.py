"""The Reward contract: ``reward(images, layouts) -> RewardOutput(rewards, info)``.

Inputs
    ``images``   float ``[B, 3, H, W]`` in [0, 1] (RGB), on any device; `check_inputs` enforces this.
    ``layouts``  a sequence of B `diffrl.layout.Layout`: ``prompt``, ``phrases`` (K_b of them) and ``boxes``
                 (K_b normalised xyxy in [0, 1]), one per image.
Output: `RewardOutput`
    ``rewards``  float ``[B]`` on the images' device, finite; higher is better. Any range works for training
                 (PPO / GRPO normalise advantages); the built-in rewards keep theirs stated (shapes, gdino:
                 [0, 2]; cycle: [−d_max, 0]). A NaN/inf (or an exception) leaves that sample out of the update.
    ``info``     a dict of named tensors, all optional. K = the batch's largest instance count; rows of images
                 with fewer instances are padded and masked out by ``instance_mask``.
        ``instance_mask`` [B, K] bool  which (b, k) are real instances         } these three together give
        ``success``       [B, K] bool  instance b, k is right (COCO-MIG test)  } train ISR, and the evaluation's
        ``iou``           [B, K] float IoU of what was found with its box      } ISR, mIoU and verdict counts
        ``color_ok``, ``shape_ok`` [B, K] bool  attribute checks: ISR's "wrong attribute" verdicts and mIoU's
                          zero for an instance with a wrong attribute (absent: attributes count as right)
        ``found``         [B, K] bool  a detection was matched: splits "missed" from "wrong box" (absent:
                          IoU > 0 counts as found)
        ``part/<name>``   [B] float    a composite's parts, logged per iteration as ``reward/<name>``
        anything else (``confidence``, ``boxes``, ``distance``, …) is carried along for your own analysis.
    A reward with none of them (per-image scores only) trains and evaluates: the evaluation reports the mean
    reward per level and says that ISR / mIoU were not measured (`diffrl.eval.metrics.summarize`).
Rules
    Format conversion happens inside the reward, never at the call site; the caller picks the device (no
    ``.cuda()`` inside). Heavy imports (detectors, SciPy) happen inside the class, so ``import diffrl.rewards``
    stays cheap. A constructor's keyword arguments are what ``reward.options`` sets from the config.

Using one from the CLI without editing diffrl: ``--reward package.module:ClassName`` (the module importable,
e.g. its folder on PYTHONPATH), or announce it as an entry point of the group ``diffrl.rewards`` and pass its
name. `Reward.as_ddpo_fn` adapts a reward to the ``fn(images, prompts, metadata) -> (rewards, info)`` signature
DDPO / Flow-GRPO trainers call.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from diffrl.errors import UserError
from diffrl.layout import Layout


class RewardUnavailable(UserError):
    """The reward could not be reached at all (its server down after the retries): no sample's fault.
    `GuardedReward` marks the whole batch invalid at once instead of bisecting it; the trainer goes on for up
    to ``reward.max_down_iterations`` iterations in a row of it. Unguarded (an evaluation) it is one line."""


@dataclass
class RewardOutput:
    """What a reward returns: ``rewards`` [B] float, and ``info``, optional named tensors (module docstring)."""

    rewards: Tensor  # [B] float
    info: dict[str, Tensor] = field(default_factory=dict)


def check_inputs(images: Tensor, layouts: Sequence[Layout]) -> None:
    """A clear ValueError for images/layouts that break the contract."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    if len(layouts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(layouts)} layouts")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f"images must be in [0, 1], got values in [{images.min():.3f}, {images.max():.3f}]")


def to_image_tensor(images: Any) -> Tensor:
    """Float [B, 3, H, W] in [0, 1] from a tensor of that form, uint8 NHWC numpy, or a list of PIL images."""
    if isinstance(images, Tensor):
        return images if images.is_floating_point() else images.float() / 255
    if isinstance(images, np.ndarray):
        array = images.astype(np.float32) / 255 if images.dtype == np.uint8 else images.astype(np.float32)
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                            for im in images])
    raise TypeError(f"cannot read images of type {type(images).__name__}: pass a tensor, uint8 NHWC numpy or PIL list")


class Reward(abc.ABC):
    """Base class of every reward: subclass it and implement ``__call__(images, layouts) -> RewardOutput``.

    images [B, 3, H, W] float in [0, 1]; layouts: B `Layout`s; rewards [B], higher is better; ``info`` optional
    per-instance tensors (``instance_mask``, ``success``, ``iou`` enable ISR / mIoU; see this module's docstring
    for every field and what it enables). Constructor keyword arguments come from ``reward.options``.
    """

    name: str = "reward"
    uses_grounder: bool = False  # scores through a Grounder: the constructor takes grounder= (or model=, its weights)

    @abc.abstractmethod
    def __call__(self, images: Tensor, layouts: Sequence[Layout]) -> RewardOutput:
        """images [B, 3, H, W] float in [0, 1], layouts (B of them) → `RewardOutput` (rewards [B], info)."""

    def as_ddpo_fn(self):
        """``fn(images, prompts, metadata) -> (rewards [B] CPU float32, info of CPU tensors)``;
        each ``metadata[i]["layout"]`` is a Layout or its dict."""

        def fn(images, prompts, metadata):
            layouts = [m["layout"] if isinstance(m["layout"], Layout) else Layout.from_dict(m["layout"]) for m in metadata]
            out = self(to_image_tensor(images), layouts)
            return out.rewards.detach().float().cpu(), {k: v.detach().cpu() for k, v in out.info.items()}

        return fn
