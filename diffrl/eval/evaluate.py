"""Evaluate a generator on a fixed set of layouts: deterministic ODE sampling through the same env and
actor that training uses (noise level 0 everywhere), scored by a reward whose ``info`` carries the
per-instance verdicts, summarised with COCO-MIG's ISR / mIoU (`diffrl.eval.metrics`). `generate` makes
the same images without scoring them, for a judge that looks at them afterwards (`diffrl.eval.cocomig`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

from diffrl.envs.datasets import FixedLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.eval.data import held_out_layouts  # noqa: F401  (the Shapes held-out set; defined beside eval.data)
from diffrl.eval.metrics import instance_success, summarize
from diffrl.layout import Layout
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import LayoutGenerator
from diffrl.policies.text import ConditionStore
from diffrl.rewards.base import Reward, RewardOutput


@torch.no_grad()
def evaluate(
    generator: LayoutGenerator,
    reward: Reward,
    layouts: Sequence[Layout],
    *,
    num_steps: int,
    shift: float = 0.0,
    batch_size: int = 125,
    seed: int = 1234,
    progress: bool = True,
    desc: str = "eval",
    verdicts: bool = False,
) -> tuple[dict, torch.Tensor] | tuple[dict, torch.Tensor, torch.Tensor | None]:
    """→ (the summary block ``{"isr", "miou", "reward", "per_level", "verdicts"}``, images [N, 3, H, W] in [0, 1]);
    with ``verdicts`` a third item: each instance's success [N, K] bool (None for a reward with per-image scores
    only), the judge's verdicts the block counts, for pictures that mark them without judging again."""
    outputs, images = _sample(generator, reward, layouts, num_steps=num_steps, shift=shift, batch_size=batch_size,
                              seed=seed, progress=progress, desc=desc)
    metrics = summarize(outputs, list(layouts))
    return (metrics, images, instance_success(outputs, len(layouts))) if verdicts else (metrics, images)


@torch.no_grad()
def generate(
    generator: LayoutGenerator,
    layouts: Sequence[Layout],
    *,
    num_steps: int,
    shift: float = 0.0,
    batch_size: int = 125,
    seed: int = 1234,
    progress: bool = True,
    desc: str = "generate",
) -> torch.Tensor:
    """The images `evaluate` would score, unscored: [N, 3, H, W] in [0, 1]."""
    return _sample(generator, _Unscored(), layouts, num_steps=num_steps, shift=shift, batch_size=batch_size,
                   seed=seed, progress=progress, desc=desc)[1]


class _Unscored(Reward):
    """Rewards 0 and reports nothing: sampling only."""

    name = "unscored"

    def __call__(self, images: torch.Tensor, layouts: Sequence[Layout]) -> RewardOutput:
        return RewardOutput(torch.zeros(images.shape[0], device=images.device))


def _sample(generator: LayoutGenerator, reward: Reward, layouts: Sequence[Layout], *, num_steps: int, shift: float,
            batch_size: int, seed: int, progress: bool, desc: str) -> tuple[list[RewardOutput], torch.Tensor]:
    """Deterministic rollouts over ``layouts`` in batches → (each batch's reward output, images [N, 3, H, W])."""
    batch_size = min(batch_size, len(layouts))
    store = ConditionStore()
    env = LayoutEnv(
        generator, reward, FixedLayouts(layouts), store,
        layouts_per_reset=batch_size, num_steps=num_steps, shift=shift, seed=seed,
        device=next(generator.parameters()).device,
    )
    actor = make_actor(SDEPolicyNet(generator, store, noise_level=0.0, window_steps=0), env.action_spec)
    outputs, images = [], []
    batches = math.ceil(len(layouts) / batch_size)
    was_training = generator.training
    generator.eval()
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in tqdm(range(batches), desc=desc, disable=not progress, leave=False):
            env.rollout(num_steps, actor, auto_reset=True)
            batch_images, _, out = env.last
            outputs.append(out)
            images.append(batch_images.cpu())
    generator.train(was_training)
    return outputs, torch.cat(images)[: len(layouts)]
