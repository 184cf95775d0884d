"""The flow ODE rewritten as an SDE, so that a deterministic flow-matching sampler can explore.

Flow convention (SD3, diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x_t = (1 − t)·x0 + t·ε`` and
the network predicts ``v ≈ ε − x0``. Sampling walks ``t`` from 1 to 0 with ``dt = t_next − t < 0``.
I-DRUID (eq. in §3.3) and Flow-GRPO replace the Euler ODE step by the Euler–Maruyama step of an SDE
with the same marginals:

    σ_t  = a·sqrt(t / (1 − t))
    mean = x + [v + σ_t² / (2t) · (x + (1 − t)·v)] · dt
    std  = σ_t · sqrt(−dt)
    x_next ~ N(mean, std²)

At ``t = 1`` the noise scale ``σ_t`` is infinite; as Flow-GRPO does (flow_grpo/diffusers_patch/
sd3_sde_with_logprob.py, ``sigma_max = sigmas[1]``), the ``1 − t`` under the root then uses the
next step's ``t`` instead. With ``a = 0`` the step is exactly the Euler ODE step.

Everything here is pure: no schedule object, no hidden step counter. The log-density is computed
in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SDEStep(NamedTuple):
    prev_sample: Tensor  # [B, C, H, W] the next latent x_{t+dt}
    log_prob: Tensor  # [B] log N(prev_sample; mean, std²) summed over C, H, W (0 where std == 0)
    mean: Tensor  # [B, C, H, W]
    std: Tensor  # [B, 1, 1, 1]


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or a [B] tensor of times as float32 [B, 1, 1, 1]."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def sde_mean_std(
    velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, sample: Tensor, noise_level: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Mean [B, C, H, W] and std [B, 1, 1, 1] of the SDE step (float32); see the module docstring."""
    x = sample.float()
    v = velocity.float()
    t = _per_sample(sigma, x)
    t_next = _per_sample(sigma_next, x)
    a = _per_sample(noise_level, x)
    dt = t_next - t
    t_under_root = torch.where(t >= 1, t_next, t)
    sigma_t = a * torch.sqrt(t / (1 - t_under_root))
    mean = x + (v + sigma_t**2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = sigma_t * torch.sqrt(-dt)
    return mean, std


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std²) summed over all non-batch dims → [B]; 0 for samples whose std is 0."""
    x = x.float()
    deterministic = std <= 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    elementwise = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    elementwise = torch.where(deterministic, torch.zeros_like(elementwise), elementwise)
    return elementwise.flatten(1).sum(1)


def flow_sde_step(
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    sample: Tensor,
    noise_level: Tensor | float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """One SDE step of the flow sampler, with the exact log-density of the sample it takes.

    ``sigma``/``sigma_next`` are the current and next flow times (scalars or ``[B]``); with
    ``prev_sample`` given the step re-scores that sample instead of drawing a new one.
    """
    mean, std = sde_mean_std(velocity, sigma, sigma_next, sample, noise_level)
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return SDEStep(prev_sample.to(sample.dtype), log_prob, mean, std)


def kl_to_reference(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std²) ‖ N(ref_mean, std²)) summed over non-batch dims → [B]; 0 where std is 0.

    Both policies share the SDE's std, so the KL is the squared mean difference over 2·std².
    """
    deterministic = std <= 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    elementwise = (mean.float() - ref_mean.float()) ** 2 / (2 * safe_std**2)
    elementwise = torch.where(deterministic, torch.zeros_like(elementwise), elementwise)
    return elementwise.flatten(1).sum(1)
