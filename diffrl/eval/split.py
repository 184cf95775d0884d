"""Where a fine-tuning helped: sample with one denoiser above a flow time and another at or below it.

RL explores and trains only the first ``policy.window`` of the denoising steps, but the weights it changes are
shared with every later step, which run deterministically and which no loss holds in place. Sampling with the
trained weights inside the window and the base weights after it (and the reverse) separates what an update did
where it was trained from what it did where it was not; `experiments/window_split.py` prints that table for a run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffrl.policies.generator import LayoutGenerator
from diffrl.policies.samplers import Sampler


class TimeSplit(nn.Module):
    """A denoiser that runs ``early`` on rows whose flow time is above ``boundary`` and ``late`` on the others."""

    def __init__(self, early: nn.Module, late: nn.Module, boundary: float):
        super().__init__()
        self.early, self.late, self.boundary = early, late, boundary

    def forward(self, x: Tensor, t: Tensor, cond) -> Tensor:
        early = t > self.boundary  # [B]
        if bool(early.all()):
            return self.early(x, t, cond)
        if not bool(early.any()):
            return self.late(x, t, cond)
        return torch.where(early.view(-1, *[1] * (x.ndim - 1)), self.early(x, t, cond), self.late(x, t, cond))


def window_boundary(sampler: Sampler, num_steps: int, window_steps: int, shift: float = 0.0) -> float:
    """A flow time between the last window step's and the first later step's (both run at their start time)."""
    if not 0 < window_steps < num_steps:
        raise ValueError(f"a window of {window_steps} of {num_steps} steps has no later step to split off "
                         f"(window_steps must be 1..{num_steps - 1})")
    times = sampler.times(num_steps, shift)
    return float(times[window_steps - 1] + times[window_steps]) / 2


def split_generator(generator: LayoutGenerator, early: nn.Module, late: nn.Module, boundary: float) -> LayoutGenerator:
    """``generator`` (its text encoder, latent space, sampler and guidance) with ``TimeSplit(early, late)`` as denoiser."""
    return LayoutGenerator(TimeSplit(early, late, boundary), generator.text, generator.space, generator.sampler,
                           guidance_scale=generator.guidance_scale, lora_by_default=generator.lora_by_default)
