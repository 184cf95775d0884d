"""Advantages for one terminal reward per sample (γ = 1, so no GAE): pure functions."""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-4, scale: str = "group") -> Tensor:
    """GRPO: (r − mean of its group) / (std of its group + eps), per sample.

    rewards: [B] float; group_ids: [B] int (samples of the same layout share an id) → [B].
    The std is the population std (a group of identical rewards gets advantage 0). With ``scale="batch"``
    (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training") the centred rewards are divided by
    their std over the whole batch instead, so a group whose rewards barely differ keeps advantages near 0
    rather than having that difference blown up to ±1.
    """
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group' or 'batch', got {scale!r}")
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    means = sums / counts
    centred = rewards - means[inverse]
    sq = torch.zeros_like(sums).index_add_(0, inverse, centred**2)
    if scale == "batch":
        return centred / ((centred**2).mean().sqrt() + eps)  # the centred rewards' batch std (their mean is 0)
    stds = (sq / counts).sqrt()
    return centred / (stds[inverse] + eps)


def critic_advantages(rewards: Tensor, values: Tensor) -> Tensor:
    """I-DRUID's actor-critic advantage A(s_t) = r − φ(s_t). rewards, values: [N] → [N]."""
    return rewards - values


def normalize(advantages: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean, unit std over the batch (a no-op shift for a batch of one)."""
    if advantages.numel() < 2:
        return advantages - advantages.mean()
    return (advantages - advantages.mean()) / (advantages.std() + eps)
