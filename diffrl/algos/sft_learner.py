"""``--algo sft``: I-DRUID's supervised ablation row — the flow-matching loss L_ldm alone, on paired renders.

It runs in the RL loop so that it sees exactly what an RL learner sees (the same layouts per iteration,
the same logged rollouts and evaluations); each optimizer step is ``epochs`` steps of
``L_ldm`` on the iteration's layouts, and no RL term, critic or reference KL. With ``joint.dis_coef`` > 0 (a generator
with IDM) each step's loss is ``L_ldm + λ_dis·L_dis``, L_dis from the same forward, logged as ``loss_dis``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from diffrl.algos.learner import Learner
from diffrl.algos.sft import Paired, flow_matching_loss
from diffrl.config import AlgoConfig
from diffrl.policies.actor import SDEPolicyNet
from diffrl.registry import ALGOS


@ALGOS.register("sft")
class SFT(Learner):
    name = "sft"

    def __init__(self, policy: SDEPolicyNet, reference: SDEPolicyNet, actor, cfg: AlgoConfig, **sections):
        super().__init__(policy, reference, actor, cfg, critic=None, **sections)

    def update(self, rollout: TensorDictBase, paired: Paired | None = None) -> dict[str, float]:
        if paired is None:
            raise ValueError("SFT trains on paired images: pass paired=")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        losses, dis_losses, norms = [], [], []
        for _ in range(self.cfg.epochs):
            ldm = flow_matching_loss(self.policy.generator, paired.latents, paired.cond)
            loss = ldm
            if (dis := self.dis_loss()) is not None:  # of the forward that just computed L_ldm
                dis_losses.append(float(dis.detach()))
                loss = ldm + dis
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(ldm.detach()))
        logs = {"loss_ldm": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms)}
        if dis_losses:
            logs["loss_dis"] = sum(dis_losses) / len(dis_losses)
        return logs
