"""The learner of a run, built again inside a ``--learners N`` process (`diffrl.distributed.learners`).

The same recipe as `diffrl.algos.trainer.train`: the generator from ``model.*`` (LoRA included, so parameter names
and the optimizer's parameter order match the driver's), an env for the action spec and the flow times (it never
steps here: no reward, no data source), the policy, the frozen reference and the learner. The driver's *initial*
trainable weights are copied in before the reference is made, so π_ref is the driver's (a fresh adapter's or IDM's
random start included); the rest of the state (critic, optimizer, NFT's v_old, a resumed checkpoint) arrives as the
driver's learner state before the first update.
"""

from __future__ import annotations

import torch

from diffrl.config import TrainConfig, is_forward_learner, rollout_window
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import build_generator
from diffrl.policies.text import ConditionStore
from diffrl.registry import ALGOS, ENVS


def learner_replica(cfg: TrainConfig, device: torch.device, initial: dict[str, torch.Tensor]):
    """→ (learner, generator, store) on ``device``, its trainable weights ``initial`` (name → tensor)."""
    from diffrl.algos.trainer import frozen_copy  # the trainer imports every learner class (their registration)

    torch.manual_seed(cfg.seed)
    generator = build_generator(cfg.model, cfg.policy.train).to(device)
    params = dict(generator.denoiser.named_parameters())
    with torch.no_grad():
        for name, value in initial.items():
            params[name].copy_(value)
    store = ConditionStore()
    env = ENVS.get(cfg.env.name)(
        generator, None, None, store, layouts_per_reset=cfg.env.layouts_per_iter, group_size=cfg.env.group_size,
        num_steps=cfg.env.num_steps, shift=cfg.env.shift, seed=cfg.seed, share_noise=cfg.env.share_noise, device=device,
    )
    algo_cls = ALGOS.get(cfg.algo.name)
    if is_forward_learner(cfg):
        learner = algo_cls(generator, frozen_copy(generator), store, cfg.algo, cfg.forward, env.sigmas)
    else:
        policy = SDEPolicyNet(generator, store, cfg.policy.noise_level, *rollout_window(cfg))
        actor = make_actor(policy, env.action_spec, cfg.algo.log_prob_reduce)
        reference = SDEPolicyNet(frozen_copy(generator), store, cfg.policy.noise_level, *rollout_window(cfg))
        learner = algo_cls(policy, reference, actor, cfg.algo)
    return learner, generator, store
