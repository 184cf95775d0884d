"""PPO as in I-DRUID: actor-critic with a small MLP critic and the clipped ratio.

    A(s_t)   = r − φ(s_t)                      (one terminal reward r, γ = 1)
    L_critic = (φ(s_t) − r)²
    L_rl     = max[−ρ_t·A_t, −clip(ρ_t, 1−ζ, 1+ζ)·A_t] + β·KL(π_θ ‖ π_ref)

on the transitions of the RL window (the first 20% of denoising steps by default).
"""

from __future__ import annotations

from tensordict import TensorDict
from torch import Tensor

from diffrl.algos.advantages import critic_advantages, normalize
from diffrl.algos.learner import Learner
from diffrl.config import AlgoConfig, PPOConfig
from diffrl.policies.actor import SDEPolicyNet
from diffrl.policies.critic import ValueNet, make_critic
from diffrl.registry import ALGOS


@ALGOS.register("ppo")
class PPO(Learner):
    name = "ppo"
    sections = ("pg", "joint", "ppo")

    def __init__(self, policy: SDEPolicyNet, reference: SDEPolicyNet, actor, cfg: AlgoConfig, *,
                 ppo: PPOConfig | None = None, **sections):
        generator = policy.generator
        value_net = ValueNet(policy.store, generator.latent_shape[0], generator.text.pooled_dim)
        self.ppo = ppo or PPOConfig()
        super().__init__(policy, reference, actor, cfg, critic=make_critic(value_net), ppo=self.ppo, **sections)

    def advantages(self, batch: TensorDict, rewards: Tensor) -> Tensor:
        values = self.critic(batch.select(*self.critic.in_keys).clone())["state_value"].squeeze(-1)  # [N] φ(s_t)
        advantage = critic_advantages(rewards, values)
        return normalize(advantage) if self.ppo.normalize_advantage else advantage
