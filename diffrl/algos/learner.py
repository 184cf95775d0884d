"""What PPO and GRPO share: TorchRL's clipped surrogate plus a KL to the reference policy, and the update loop.

TorchRL's ``ClipPPOLoss`` gives the clipped importance-ratio objective (and, for PPO, the critic
loss) from a precomputed ``advantage``; it has no KL to a *reference* policy (``KLPENPPOLoss``
penalises the distance to the behaviour policy, which is something else), so `RefKLClipPPOLoss` adds
``β · KL(π_θ(·|s_t) ‖ π_ref(·|s_t))``. Both policies are Gaussians with the SDE's std, so the KL is
closed-form: ‖μ_θ − μ_ref‖² / (2σ²).

A subclass defines ``advantages(batch, rewards)`` (and may add a critic); `Learner.update` takes one
iteration's rollout ``[B, T]``, keeps the RL-window steps, and runs ``epochs`` passes of minibatches.

I-DRUID trains the actor on the joint loss ``L_act = L_ldm + λ_dis·L_dis + λ_rl·L_rl``; here ``joint.ldm_coef`` = λ
weighs ``L_ldm`` (`diffrl.algos.sft.flow_matching_loss` on paired renders of the iteration's layouts) against
``L_rl`` (weight 1), added once per optimizer step; 0 (the default) trains on ``L_rl`` alone.
``joint.dis_coef`` = λ_dis adds the IDC loss ``L_dis`` (`diffrl.policies.idm`) of the very forward that scores each
minibatch — the policy on the rollout's own states, so it needs no paired images — as ``loss_dis``; it needs a
generator whose layout adapter has IDM (`require_idm`).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.objectives import ClipPPOLoss

from diffrl.algos.sft import Paired, flow_matching_loss
from diffrl.config import AlgoConfig, JointConfig, PGConfig, PPOConfig
from diffrl.distributed.learners import WHOLE, GradSum, Logs, weigh
from diffrl.errors import UserError
from diffrl.policies.actor import LOG_PROB_KEY, OBSERVATION_KEYS, SDEPolicyNet
from diffrl.policies.lora import TrainableOnly, has_lora
from diffrl.policies.sde import kl_to_reference


class RefKLClipPPOLoss(ClipPPOLoss):
    """``ClipPPOLoss`` + ``kl_coef · KL(π_θ ‖ π_ref)`` (as ``loss_kl``, with ``kl_ref`` logged)."""

    def __init__(self, actor, critic=None, *, reference: SDEPolicyNet, kl_coef: float, log_prob_reduce: str, **kwargs):
        super().__init__(actor, critic, functional=False, entropy_bonus=False, **kwargs)
        self.set_keys(sample_log_prob=LOG_PROB_KEY)
        self._reference = (reference,)  # a tuple, so its weights are not this module's parameters
        self.kl_coef = kl_coef
        self.log_prob_reduce = log_prob_reduce
        self.moments = False  # --learners N: also give the critic's target/residual moments (explained_variance's parts)
        self._dist = None

    def _get_cur_log_prob(self, tensordict, *args, **kwargs):
        # TorchRL's private hook, overridden to keep the current distribution for the KL term (its mean and std at
        # these states) without a second forward pass. Its arguments changed between releases (0.14 passes
        # ``params``, its main branch does not), so whatever it is given passes through, and the distribution is
        # found among what it returns by type, not by position.
        result = super()._get_cur_log_prob(tensordict, *args, **kwargs)
        self._dist = next(x for x in result if isinstance(x, torch.distributions.Distribution))
        return result

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        out = super().forward(tensordict)
        dist, self._dist = self._dist, None
        if dist is None:
            raise RuntimeError("TorchRL's ClipPPOLoss no longer calls _get_cur_log_prob; the KL term needs the current "
                               "distribution (diffrl.algos.learner.RefKLClipPPOLoss)")
        (reference,) = self._reference
        with torch.no_grad():
            ref_mean, _ = reference(*(tensordict[k] for k in OBSERVATION_KEYS))
        kl = kl_to_reference(dist.loc, ref_mean, dist.scale)  # [N]
        if self.log_prob_reduce == "mean":
            kl = kl / dist.loc[0].numel()
        out.set("kl_ref", kl.mean().detach())
        out.set("loss_kl", self.kl_coef * kl.mean())
        if self.moments and "explained_variance" in out.keys():
            with torch.no_grad():
                target = tensordict["value_target"].float()
                error = target - self.critic_network(tensordict.select(*self.critic_network.in_keys).clone())[
                    "state_value"].float()
                out.set("stat_ev", torch.stack([target.mean(), target.var(correction=0), error.mean(),
                                                error.var(correction=0)]))
        return out


def require_idm(cfg: JointConfig, generator) -> None:
    """``joint.dis_coef > 0`` needs IDM in the generator's layout adapter (a user error otherwise)."""
    if cfg.dis_coef > 0 and getattr(generator.denoiser, "adapter", None) is None:  # GLIGEN's own fusers only
        raise UserError(f"config joint.dis_coef={cfg.dis_coef} needs IDM, which lives in diffrl's layout adapter, and this "
                        "GLIGEN model grounds through its own gated fusers without one: pass model.adapter=FOLDER "
                        "(a layout adapter with IDM for this UNet), or set joint.dis_coef=0")
    if cfg.dis_coef > 0 and not generator.denoiser.adapter.config.idm:
        raise UserError(f"config joint.dis_coef={cfg.dis_coef} needs a generator with IDM, and this one has none: "
                        "add a fresh one with model.idm=true, or pre-train one with `diffrl pretrain --idm` (--init MODEL "
                        "adds IDM to a trained generator) and pass it as --model, or set joint.dis_coef=0")


class Learner:
    """The update loop shared by the clipped-surrogate learners. Beside ``algo`` (``cfg``) a learner reads the config
    sections it names in ``sections``, which the trainer passes by name (left out: their defaults)."""

    name = "base"
    shard = WHOLE  # this process is the only learner; `diffrl.distributed.learners` sets a Shard in each of N
    sections: tuple[str, ...] = ("pg", "joint")

    def __init__(self, policy: SDEPolicyNet, reference: SDEPolicyNet, actor, cfg: AlgoConfig, critic=None, *,
                 pg: PGConfig | None = None, joint: JointConfig | None = None, ppo: PPOConfig | None = None):
        self.pg, self.joint = pg or PGConfig(), joint or JointConfig()
        require_idm(self.joint, policy.generator)
        self.policy = policy
        self.reference = reference
        self.cfg = cfg
        self.critic = critic
        ppo = ppo or PPOConfig()  # the critic's settings, read only with a critic
        self.loss = RefKLClipPPOLoss(
            actor,
            critic,
            reference=reference,
            kl_coef=cfg.kl_coef,
            log_prob_reduce=self.pg.log_prob_reduce,
            clip_epsilon=self.pg.clip_epsilon,
            critic_coeff=ppo.critic_coef if critic is not None else None,
            loss_critic_type="l2",
        )
        groups = [{"params": [p for p in policy.generator.denoiser.parameters() if p.requires_grad], "lr": cfg.lr}]
        if critic is not None:
            groups.append({"params": list(critic.parameters()), "lr": ppo.critic_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """What a checkpoint must hold to continue: the policy weights (with LoRA only the trainable ones: LoRA
        and the layout adapter) and, for PPO, the critic."""
        denoiser = self.policy.generator.denoiser
        modules = {"denoiser": TrainableOnly(denoiser) if has_lora(denoiser) else denoiser}
        if self.critic is not None:
            modules["critic"] = self.critic
        return modules

    def advantages(self, batch: TensorDict, rewards: torch.Tensor) -> torch.Tensor:
        """Advantage per window transition [N] (batch: [N] window transitions, rewards: [N])."""
        raise NotImplementedError

    def window_batch(self, rollout: TensorDictBase) -> TensorDict:
        """[B, T] rollout → [B, W] transitions of the RL window, each with its sample's terminal reward."""
        window = self.policy.window_steps
        rewards = rollout["next", "reward"][:, -1, 0]  # [B] the terminal reward
        keys = [*OBSERVATION_KEYS, "action", LOG_PROB_KEY]
        batch = rollout[:, self.policy.window_start : self.policy.window_end].select(*keys).clone()  # [B, W]
        batch.set("reward", rewards[:, None].expand(-1, window).clone())
        return batch

    def ldm_loss(self, paired: Paired | None) -> torch.Tensor | None:
        """``ldm_coef · L_ldm`` on the paired renders, or None when off."""
        if paired is None or not self.joint.ldm_coef:
            return None
        return self.joint.ldm_coef * flow_matching_loss(self.policy.generator, paired.latents, paired.cond)

    def dis_loss(self) -> torch.Tensor | None:
        """``dis_coef · L_dis`` of the policy's last forward, or None when off."""
        if not self.joint.dis_coef:
            return None
        return self.joint.dis_coef * self.policy.generator.denoiser.adapter.last_dis

    def update(self, rollout: TensorDictBase, paired: Paired | None = None) -> dict[str, float]:
        """Epochs over the window steps in random order; a minibatch never mixes denoising steps and keeps
        the rollout's sample order, so with ``minibatch_size ≥ B`` the first pass recomputes exactly the
        rollout's forward and the importance ratio is exactly 1. With ``accumulate`` the gradients of a
        whole epoch (every window step and minibatch) are averaged into one optimizer step, as Flow-GRPO
        accumulates over timesteps; otherwise each minibatch takes its own step. A minibatch runs in pieces of
        ``micro_batch`` rows (`diffrl.distributed.learners`: with --learners N, each learner runs its pieces)."""
        batch = self.window_batch(rollout)  # [B, W]
        with torch.no_grad():
            flat = batch.reshape(-1)
            advantage = self.advantages(flat, flat["reward"]).reshape(batch.shape)
        batch.set("advantage", advantage.unsqueeze(-1))
        batch.set("value_target", batch["reward"].unsqueeze(-1))
        b, window = batch.shape
        self.loss.moments = 0 < self.cfg.micro_batch < min(self.cfg.minibatch_size, b)  # pieces of a minibatch
        logs = self.shard.logs()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = GradSum(params)
        chunks = [(step, start) for step in range(window) for start in range(0, b, self.cfg.minibatch_size)]
        per_step = 1 if not self.cfg.accumulate else len(chunks)  # minibatches whose gradients one step averages
        for epoch in range(self.cfg.epochs):
            order = [chunks[i] for i in torch.randperm(len(chunks)).tolist()]
            for first in range(0, len(order), per_step):
                group = [(epoch * len(order) + first + i, step, start)
                         for i, (step, start) in enumerate(order[first : first + per_step])]
                for piece in self.shard.pieces(group, b, self.cfg.minibatch_size, self.cfg.micro_batch):
                    out = self.loss(batch[piece.rows, piece.step])
                    if (dis := self.dis_loss()) is not None:  # of the forward that just scored this minibatch
                        out.set("loss_dis", dis)
                    total = sum(v for k, v in out.items() if k.startswith("loss_"))
                    grads.backward(weigh(total, piece.share) / per_step)
                    for key, value in out.items():
                        logs.add(piece.slot, piece.index, key, value, piece.share)
                self.optimizer_step(rollout, paired, params, grads, logs, group[-1][0])
        result = logs.result()
        result["advantage_abs"] = float(advantage.abs().mean())
        return result

    def optimizer_step(self, rollout: TensorDictBase, paired: Paired | None, params: list, grads: GradSum, logs,
                       slot: int) -> None:
        """One optimizer step: the terms of the whole step (L_ldm, the anchor KL) join the minibatches' gradients,
        which are summed over the learners, clipped and applied."""
        shard = self.shard
        with torch.set_grad_enabled(shard.rank == 0):  # every learner draws L_ldm's noise; rank 0 backpropagates it
            ldm = self.ldm_loss(paired)
        if ldm is not None:
            if shard.rank == 0:
                grads.backward(ldm)
            logs.add(slot, Logs.STEP, "loss_ldm", ldm, None)
        if self.pg.anchor_steps and rollout.shape[1] > self.policy.window_end:  # joins this step's gradient
            steps = self.anchor_draw(rollout)  # drawn by every learner alike
            b = rollout.shape[0]
            for piece in shard.pieces([(slot, 0, 0)], b, b, self.cfg.micro_batch):
                anchor = self.cfg.kl_coef * self.anchor_loss(rollout, piece.rows, steps)
                grads.backward(weigh(anchor, piece.share))
                logs.add(slot, Logs.STEP + 1 + piece.index, "loss_anchor", anchor, piece.share)
        shard.sync(params, grads)
        logs.add(slot, Logs.STEP, "grad_norm", shard.clip(params, self.cfg.max_grad_norm), None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def anchor_draw(self, rollout: TensorDictBase) -> torch.Tensor:
        """``anchor_steps`` random steps *after* the window."""
        end = self.policy.window_end
        return end + torch.randperm(rollout.shape[1] - end)[: self.pg.anchor_steps]

    def anchor_loss(self, rollout: TensorDictBase, rows: slice = slice(None), steps: torch.Tensor | None = None):
        """KL to the reference at the post-window ``steps`` (drawn when not given), scored as if they carried the
        SDE's noise (they are deterministic, but the weights they run on are shared with the window); over the
        samples ``rows``."""
        steps = self.anchor_draw(rollout) if steps is None else steps
        total = 0.0
        for step in steps.tolist():
            latent, sigma, sigma_next, _, layout_index = (rollout[rows, step][k] for k in OBSERVATION_KEYS)
            mean, std = self.policy.mean_std(latent, sigma, sigma_next, layout_index, self.policy.noise_level)
            with torch.no_grad():
                ref_mean, _ = self.reference.mean_std(latent, sigma, sigma_next, layout_index, self.policy.noise_level)
            total = total + kl_to_reference(mean, ref_mean, std).mean()
        return total / len(steps)
