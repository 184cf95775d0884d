"""Supervised flow matching on paired (layout, image) data: the plain rectified-flow loss.

    x_t = (1 − t)·x0 + t·ε,   target v = ε − x0,   L_ldm = ‖v_θ(x_t, t, layout) − v‖²

(the noising and the target come from the generator's sampler, so an ε-predicting UNet gets its own), with
t drawn logit-normally (SD3's default training density). Used by `diffrl pretrain`, by the RL
learners' joint loss (``joint.ldm_coef``) and by `SFT` (``--algo sft``: I-DRUID's supervised ablation row,
trained in the same loop as RL — same layouts per iteration, same rollouts logged — with L_ldm alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffrl.policies.generator import LayoutGenerator
from diffrl.policies.text import Conditioning


@dataclass
class Paired:
    """Clean latents of rendered images [N, C, H, W] with their layouts' conditioning (N rows)."""

    latents: Tensor
    cond: Conditioning


def sample_flow_times(n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
    """t = sigmoid(u), u ~ N(0, 1): SD3's logit-normal time density. → [n] in (0, 1)."""
    return torch.sigmoid(torch.randn(n, generator=generator, device=device))


def flow_matching_loss(
    model: LayoutGenerator, x0: Tensor, cond: Conditioning, generator: torch.Generator | None = None,
    t: Tensor | None = None,
) -> Tensor:
    """Mean squared error of the model output against the sampler's target (flow: v = ε − x0) for clean latents
    x0 [B, C, H, W] under their conditioning (no guidance: the conditional model is what is trained), at flow
    times ``t`` [B] (default: drawn from `sample_flow_times`)."""
    if t is None:
        t = sample_flow_times(x0.shape[0], generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = model.sampler.noisy(x0, noise, t)
    out = model.velocity(x_t, t, cond)
    return ((out.float() - model.sampler.target(x0, noise, t)) ** 2).mean()
