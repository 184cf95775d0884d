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


def gaussian_step(mean: Tensor, std: Tensor, sample: Tensor, prev_sample: Tensor | None = None,
                  generator: torch.Generator | None = None) -> SDEStep:
    """A step x_next ~ N(mean, std²) from ``sample``: drawn (or ``prev_sample`` re-scored) with its exact log-density,
    returned in ``sample``'s dtype; what `flow_sde_step` and `ddim_step` share once they have their mean and std."""
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return SDEStep(prev_sample.to(sample.dtype), log_prob, mean, std)


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
    return gaussian_step(mean, std, sample, prev_sample, generator)


def kl_to_reference(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std²) ‖ N(ref_mean, std²)) summed over non-batch dims → [B]; 0 where std is 0.

    Both policies share the SDE's std, so the KL is the squared mean difference over 2·std².
    """
    deterministic = std <= 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    elementwise = (mean.float() - ref_mean.float()) ** 2 / (2 * safe_std**2)
    elementwise = torch.where(deterministic, torch.zeros_like(elementwise), elementwise)
    return elementwise.flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------------------------------
# The UNet path: the DDIM step with η (DDIM paper, Song et al. 2021, eqs. 12 and 16).
#
# Written anew from diffusers 0.42 ``DDIMScheduler.step`` (schedulers/scheduling_ddim.py), keeping its order of
# operations so that the mean is bit-identical to it; DDPO (kvablack/ddpo-pytorch, ddpo_pytorch/diffusers_patch/
# ddim_with_logprob.py) adapts the same step to return a log-prob. What changed: the step takes the cumulative
# products ᾱ_t, ᾱ_prev themselves (scalars or [B]) instead of a scheduler and integer timesteps, so it stays pure;
# the log-prob is summed (not averaged) over C, H, W and computed in float32, as `flow_sde_step`'s. ::
#
#     x0   = (x − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t)                        ("epsilon"; "v_prediction" and "sample" as diffusers)
#     σ_t  = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev))
#     mean = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev − σ_t²)·ε,   std = σ_t,   x_prev ~ N(mean, std²)
#
# η = 0 is deterministic DDIM, η = 1 is DDPM's posterior variance.
# ---------------------------------------------------------------------------------------------------------------------


def ddim_mean_std(
    model_output: Tensor,
    alpha_prod: Tensor | float,
    alpha_prod_prev: Tensor | float,
    sample: Tensor,
    eta: Tensor | float,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean [B, C, H, W] and std [B, 1, 1, 1] (float32) of the DDIM step from ᾱ_t to ᾱ_prev (scalars or [B]).

    ``clip_sample`` clamps the predicted x0 to ±clip_sample (diffusers' ``clip_sample_range``; None: no clipping,
    SD1.x's setting)."""
    x = sample.float()
    out = model_output.float()
    alpha_t = _per_sample(alpha_prod, x)  # [B, 1, 1, 1]
    alpha_prev = _per_sample(alpha_prod_prev, x)
    eta = _per_sample(eta, x)
    beta_t = 1 - alpha_t
    if prediction_type == "epsilon":
        pred_x0 = (x - beta_t ** (0.5) * out) / alpha_t ** (0.5)
        pred_eps = out
    elif prediction_type == "v_prediction":
        pred_x0 = (alpha_t**0.5) * x - (beta_t**0.5) * out
        pred_eps = (alpha_t**0.5) * out + (beta_t**0.5) * x
    elif prediction_type == "sample":
        pred_x0 = out
        pred_eps = (x - alpha_t ** (0.5) * pred_x0) / beta_t ** (0.5)
    else:
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    if clip_sample is not None:
        pred_x0 = pred_x0.clamp(-clip_sample, clip_sample)
    variance = ((1 - alpha_prev) / beta_t) * (1 - alpha_t / alpha_prev)  # [B, 1, 1, 1]
    std = eta * variance ** (0.5)
    direction = (1 - alpha_prev - std**2).clamp(min=0) ** (0.5) * pred_eps  # clamp: rounding at η = 1 only
    mean = alpha_prev ** (0.5) * pred_x0 + direction
    return mean, std


def ddim_step(
    model_output: Tensor,
    alpha_prod: Tensor | float,
    alpha_prod_prev: Tensor | float,
    sample: Tensor,
    eta: Tensor | float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> SDEStep:
    """One DDIM step with η, with the exact log-density of the sample it takes (the shape of `flow_sde_step`).

    ``alpha_prod``/``alpha_prod_prev`` are ᾱ at the current and the next (less noisy) timestep; with
    ``prev_sample`` given the step re-scores that sample instead of drawing a new one."""
    mean, std = ddim_mean_std(model_output, alpha_prod, alpha_prod_prev, sample, eta, prediction_type, clip_sample)
    return gaussian_step(mean, std, sample, prev_sample, generator)
