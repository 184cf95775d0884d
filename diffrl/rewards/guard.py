"""A reward that cannot poison a batch: a sample it fails on is marked, not fatal.

`GuardedReward` wraps any `Reward`. A sample whose reward comes back NaN or ±inf keeps that value;
when the wrapped reward *raises*, the batch is split in halves and each half scored again, down to
single samples, so only the samples it truly fails on get a NaN reward (the failing ones are found in
about 2·f·log₂B calls for f failures; a reward that works costs exactly one call, and its output is
passed through untouched). The caller reads ``~isfinite(rewards)`` as "exclude this sample" and
`GuardedReward.take_errors` for what went wrong. GPU out-of-memory is never swallowed: it is about
the batch, not the sample, and the run must stop and say which knob to lower. A reward that cannot be
reached at all (`RewardUnavailable`: a reward server down after its retries) is not bisected either:
every sample of the batch is marked at once, each with that error line (`is_unavailable` tells them apart),
so a dead server costs one round of retries per batch, not one per sample.

`cat_outputs` joins reward outputs of consecutive batches (a bisection's halves, an iteration's
chunks): rewards are concatenated, per-instance ``info`` tensors ``[B, K, ...]`` padded along K with
zeros (False) to the largest K, and a key a part lacks (a sample whose scoring raised) filled with zeros.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from diffrl.layout import Layout
from diffrl.rewards.base import Reward, RewardOutput, RewardUnavailable


def cat_outputs(outputs: Sequence[RewardOutput]) -> RewardOutput:
    """Reward outputs of consecutive batches → one output over all their samples."""
    if len(outputs) == 1:
        return outputs[0]
    device = outputs[0].rewards.device
    rewards = torch.cat([out.rewards.to(device) for out in outputs])
    info: dict[str, Tensor] = {}
    for key in dict.fromkeys(k for out in outputs for k in out.info):
        present = [out.info[key] for out in outputs if key in out.info]
        ref = present[0]
        k = max(t.shape[1] for t in present) if ref.ndim >= 2 else None
        parts = []
        for out in outputs:
            n = out.rewards.shape[0]
            value = out.info.get(key)
            if value is None:
                shape = (n,) + ((k,) + tuple(ref.shape[2:]) if k is not None else tuple(ref.shape[1:]))
                value = torch.zeros(shape, dtype=ref.dtype, device=device)
            elif k is not None and value.shape[1] < k:
                pad = torch.zeros((n, k - value.shape[1], *value.shape[2:]), dtype=value.dtype, device=value.device)
                value = torch.cat([value, pad], dim=1)
            parts.append(value.to(device))
        info[key] = torch.cat(parts)
    return RewardOutput(rewards, info)


def error_line(err: BaseException) -> str:
    """The one line a failed sample is reported with: ``"<ExceptionType>: <first line of its message>"``."""
    return f"{type(err).__name__}: {err}".splitlines()[0]


def is_unavailable(line: str) -> bool:
    """Is this error line (of `GuardedReward.take_errors`) a reward that could not be reached at all?"""
    return line.startswith(f"{RewardUnavailable.__name__}:")


class GuardedReward(Reward):
    """``reward`` with failing samples marked (reward NaN) instead of failing the batch."""

    def __init__(self, reward: Reward):
        self.reward = reward
        self.name = reward.name
        self._errors: list[str] = []  # one line per sample the reward raised on, since the last take_errors

    def __call__(self, images: Tensor, layouts: Sequence[Layout]) -> RewardOutput:
        return self._score(images, list(layouts), top=True)

    def _score(self, images: Tensor, layouts: list[Layout], top: bool = False) -> RewardOutput:
        try:
            out = self.reward(images, layouts)
        except torch.OutOfMemoryError:
            raise
        except RewardUnavailable as err:  # the reward is down, not wrong about a sample: mark the batch at once
            self._errors += [error_line(err)] * len(layouts)
            return RewardOutput(torch.full((len(layouts),), math.nan, device=images.device))
        except Exception as err:  # noqa: BLE001  (any failure of one sample is that sample's, not the run's)
            if len(layouts) == 1:
                self._errors.append(error_line(err))
                return RewardOutput(torch.full((1,), math.nan, device=images.device))
            half = len(layouts) // 2
            return cat_outputs([self._score(images[:half], layouts[:half]), self._score(images[half:], layouts[half:])])
        if out.rewards.shape != (len(layouts),):
            raise ValueError(f"reward {self.name!r} returned rewards of shape {tuple(out.rewards.shape)} "
                             f"for {len(layouts)} images; the contract is [B]")
        return out

    def take_errors(self) -> list[str]:
        """The error line of each sample the reward raised on since the last call (and forget them)."""
        errors, self._errors = self._errors, []
        return errors
