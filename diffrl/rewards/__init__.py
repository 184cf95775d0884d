"""Rewards other projects can import: ``from diffrl.rewards import ShapesReward``.

Importing this package is cheap: no Ray, no detector weights, no envs/policies/algos.
"""

from diffrl.rewards.base import Reward, RewardOutput
from diffrl.rewards.shapes import ShapesReward

__all__ = ["Reward", "RewardOutput", "ShapesReward"]
