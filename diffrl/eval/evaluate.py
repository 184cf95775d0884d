"""Evaluate a generator on a fixed set of layouts: deterministic ODE sampling through the same env and
actor that training uses (noise level 0 everywhere), scored by a reward whose ``info`` carries the
per-instance verdicts, summarised with COCO-MIG's ISR / mIoU (`diffrl.eval.metrics`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

from diffrl.envs.datasets import FixedLayouts
from diffrl.envs.layout_env import LayoutEnv
from diffrl.eval.metrics import summarize
from diffrl.layout import Layout
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import LayoutGenerator
from diffrl.policies.text import ConditionStore
from diffrl.rewards.base import Reward
from diffrl.shapes.world import sample_layouts


def held_out_layouts(n: int, levels: Sequence[int], seed: int) -> list[Layout]:
    """A fixed-seed evaluation set spread evenly over ``levels`` (round-robin)."""
    return sample_layouts(n, list(levels), seed=seed, balanced=True)


@torch.no_grad()
def evaluate(
    generator: LayoutGenerator,
    reward: Reward,
    layouts: Sequence[Layout],
    *,
    num_steps: int,
    shift: float = 1.0,
    batch_size: int = 125,
    seed: int = 1234,
    progress: bool = True,
    desc: str = "eval",
) -> tuple[dict, torch.Tensor]:
    """→ (the summary block ``{"isr", "miou", "reward", "per_level"}``, images [N, 3, H, W] in [0, 1])."""
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
    images = torch.cat(images)[: len(layouts)]
    return summarize(outputs, list(layouts)), images
