"""The Reward contract: ``reward(images, layouts) -> RewardOutput(rewards, info)``.

``images`` are float ``[B, 3, H, W]`` in [0, 1] on any device, ``layouts`` a sequence of `Layout`;
``rewards`` are float ``[B]`` on the images' device; ``info`` is a dict of named tensors
(per-instance IoU, confidence, …). Format conversion happens inside the reward, never at the call
site; the caller picks the device. `Reward.as_ddpo_fn` adapts a reward to the
``fn(images, prompts, metadata) -> (rewards, info)`` signature DDPO / Flow-GRPO trainers call.
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
    name: str = "reward"
    uses_grounder: bool = False  # scores through a Grounder: the constructor takes grounder= (or model=, its weights)

    @abc.abstractmethod
    def __call__(self, images: Tensor, layouts: Sequence[Layout]) -> RewardOutput: ...

    def as_ddpo_fn(self):
        """``fn(images, prompts, metadata) -> (rewards [B] CPU float32, info of CPU tensors)``;
        each ``metadata[i]["layout"]`` is a Layout or its dict."""

        def fn(images, prompts, metadata):
            layouts = [m["layout"] if isinstance(m["layout"], Layout) else Layout.from_dict(m["layout"]) for m in metadata]
            out = self(to_image_tensor(images), layouts)
            return out.rewards.detach().float().cpu(), {k: v.detach().cpu() for k, v in out.info.items()}

        return fn
