"""Supervised flow matching on paired (layout, image) data: the plain rectified-flow loss.

    x_t = (1 − t)·x0 + t·ε,   target v = ε − x0,   L_ldm = ‖v_θ(x_t, t, layout) − v‖²

with t drawn logit-normally (SD3's default training density). Used by `diffrl pretrain`, by the RL
learners' joint loss (``algo.ldm_coef``) and by `SFT` (``--algo sft``: I-DRUID's supervised ablation row,
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
    model: LayoutGenerator, x0: Tensor, cond: Conditioning, generator: torch.Generator | None = None
) -> Tensor:
    """Mean squared velocity error for clean latents x0 [B, C, H, W] under their conditioning."""
    t = sample_flow_times(x0.shape[0], generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    v = model.velocity(x_t, t, cond)
    return ((v.float() - (noise - x0)) ** 2).mean()
