"""How a generator's model output becomes a step: the time grid, the step's Gaussian, and the training target.

The env, the actor, evaluation and the learners see a sampler only through this protocol, so the same
code trains a flow-matching MM-DiT (`FlowSampler`) and an ε-predicting UNet (``DDIMSampler`` in
`diffrl.policies.backbones.unet`). Times are in [0, 1] and decrease along a rollout, ending at 0.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from diffrl.policies.sde import sde_mean_std


class Sampler(Protocol):
    prediction: str  # "flow" (the model predicts v = ε − x0) or "epsilon"

    def times(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """[T+1] decreasing times in [0, 1], the last one 0 (``shift`` 0: the sampler's own)."""

    def mean_std(self, model_output: Tensor, t: Tensor | float, t_next: Tensor | float, sample: Tensor,
                 noise_level: Tensor | float) -> tuple[Tensor, Tensor]:
        """(mean [B, C, H, W] fp32, std [B, 1, 1, 1] fp32) of the step from ``sample`` at t to t_next."""

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t for clean latents x0 [B, C, H, W], noise like x0 and times t [B]."""

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model should predict at x_t (for L_ldm, SFT and pre-training)."""


def flow_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """[T+1] flow times of diffusers' FlowMatchEulerDiscreteScheduler for ``num_steps`` steps, ending at 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float()


class FlowSampler:
    """Rectified flow (SD3): ``x_t = (1 − t)·x0 + t·ε``, the model predicts ``v = ε − x0``, and a step is the
    SDE step of `diffrl.policies.sde.sde_mean_std` (the Euler ODE step at noise level 0)."""

    prediction = "flow"

    def __init__(self, shift: float = 1.0):
        self.shift = shift  # the model's own time shift (its scheduler's: 3.0 for SD3), used when a run asks for 0

    def times(self, num_steps: int, shift: float = 0.0) -> Tensor:
        return flow_sigmas(num_steps, shift or self.shift)

    def mean_std(self, model_output, t, t_next, sample, noise_level):
        return sde_mean_std(model_output, t, t_next, sample, noise_level)

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        tt = t.view(-1, *([1] * (x0.ndim - 1)))  # [B, 1, 1, 1]
        return (1 - tt) * x0 + tt * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def __repr__(self) -> str:
        return f"FlowSampler(shift={self.shift:g})"


def as_batch_times(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A scalar or [B] time as a float32 [B] tensor."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    return t.expand(batch) if t.ndim == 0 else t.reshape(batch)
