"""GRPO: G samples per layout, group-normalised advantages, no critic.

    A_i  = (r_i − mean(r_group)) / (std(r_group) + ε)      shared by every window step of sample i
           (group.scale=batch: divided by the batch's std of r_i − mean(r_group) instead, as Dr. GRPO)
    L_rl = max[−ρ_t·A_i, −clip(ρ_t, 1−ζ, 1+ζ)·A_i] + β·KL(π_θ ‖ π_ref)

The group of a sample is its ``layout_index`` (the env repeats each layout ``group_size`` times).
"""

from __future__ import annotations

from tensordict import TensorDict
from torch import Tensor

from diffrl.algos.advantages import group_advantages
from diffrl.algos.learner import Learner
from diffrl.config import AlgoConfig, GroupConfig
from diffrl.policies.actor import SDEPolicyNet
from diffrl.registry import ALGOS


@ALGOS.register("grpo")
class GRPO(Learner):
    name = "grpo"
    sections = ("pg", "joint", "group")

    def __init__(self, policy: SDEPolicyNet, reference: SDEPolicyNet, actor, cfg: AlgoConfig, *,
                 group: GroupConfig | None = None, **sections):
        self.group = group or GroupConfig()
        super().__init__(policy, reference, actor, cfg, critic=None, **sections)

    def advantages(self, batch: TensorDict, rewards: Tensor) -> Tensor:
        return group_advantages(rewards, batch["layout_index"], scale=self.group.scale)
