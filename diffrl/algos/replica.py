"""The learner of a run, built in one place: by the trainer (`diffrl.algos.trainer.start`) for the run, and again by
`learner_replica` inside each ``--learners N`` process (`diffrl.distributed.learners`), so the two cannot drift.

`build_learner` is the recipe: the learner class from the ``ALGOS`` registry, given the policy and the frozen
reference (a window learner: PPO, GRPO, SFT) or the generator and its frozen copy (a forward-process learner: AWM,
NFT). `learner_replica` makes a learner process's generator from ``model.*`` (LoRA included, so parameter names and
the optimizer's parameter order match the driver's) and an env for the action spec and the flow times (it never steps
there: no reward, no data source). The driver's *initial* trainable weights are copied in before the reference is
made, so π_ref is the driver's (a fresh adapter's or IDM's random start included); the rest of the state (critic,
optimizer, NFT's v_old, a resumed checkpoint) arrives as the driver's learner state before the first update.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

import diffrl.algos.forward  # noqa: F401  (registers "awm", "nft")
import diffrl.algos.grpo  # noqa: F401  (registers "grpo")
import diffrl.algos.ppo  # noqa: F401  (registers "ppo")
import diffrl.algos.sft_learner  # noqa: F401  (registers "sft")
import diffrl.envs.layout_env  # noqa: F401  (registers "layout")
from diffrl.config import TrainConfig, is_forward_learner, micro_batch, rollout_window
from diffrl.policies.actor import SDEPolicyNet, make_actor
from diffrl.policies.generator import LayoutGenerator, build_generator
from diffrl.policies.lora import LoraReference, has_lora
from diffrl.policies.text import ConditionStore
from diffrl.registry import ALGOS, ENVS


def frozen_copy(generator: LayoutGenerator) -> LayoutGenerator:
    """The reference policy π_ref: the initial denoiser, frozen (text encoder, latent space, sampler and guidance
    shared). With LoRA it is the policy's own backbone with LoRA off (`LoraReference`: no second backbone)."""
    if has_lora(generator.denoiser):
        denoiser = LoraReference(generator.denoiser).eval()
    else:
        denoiser = copy.deepcopy(generator.denoiser).requires_grad_(False).eval()
    return LayoutGenerator(denoiser, generator.text, generator.space, generator.sampler, generator.guidance_scale)


def build_learner(cfg: TrainConfig, generator: LayoutGenerator, store: ConditionStore, env):
    """→ (learner, actor) of ``cfg.algo.name`` on ``generator``: the rollouts' actor (the SDE policy) and the learner
    with its frozen reference; its ``algo.micro_batch`` resolved (`diffrl.config.micro_batch`)."""
    algo_cls = ALGOS.get(cfg.algo.name)
    algo = replace(cfg.algo, micro_batch=micro_batch(cfg))  # the same pieces of a minibatch in every learner process
    policy = SDEPolicyNet(generator, store, cfg.policy.noise_level, *rollout_window(cfg))
    actor = make_actor(policy, env.action_spec, cfg.pg.log_prob_reduce)
    sections = {name: getattr(cfg, name) for name in algo_cls.sections}  # the learner's own config sections
    if is_forward_learner(cfg):  # AWM / NFT: the flow-matching loss on final samples, no actor to score
        return algo_cls(generator, frozen_copy(generator), store, algo, cfg.forward, env.sigmas, **sections), actor
    reference = SDEPolicyNet(frozen_copy(generator), store, cfg.policy.noise_level, *rollout_window(cfg))
    return algo_cls(policy, reference, actor, algo, **sections), actor


def learner_replica(cfg: TrainConfig, device: torch.device, initial: dict[str, torch.Tensor]):
    """→ (learner, generator, store) on ``device``, its trainable weights ``initial`` (name → tensor)."""
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
    learner, _ = build_learner(cfg, generator, store, env)
    return learner, generator, store
