"""Forward-process learners: the flow-matching loss on the model's own final samples, weighted by the reward.

Where PPO and GRPO score the SDE step's log-probability inside a window of denoising steps, these learners need
only what a rollout ends with: the final latent x0 of each sample, its conditioning (a ``layout_index`` into the
`ConditionStore`) and its reward. At K flow times t per sample they noise x0 afresh,

    x_t = (1 − t)·x0 + t·ε,     target  v* = ε − x0          (the sampler's `noisy` / `target`)

and train the velocity there (so any sampler may make the rollouts: the ODE, or the SDE):

* **AWM** (Advantage Weighted Matching, 2025):
  ``L = mean_i A_i·w(‖v_θ(x_t⁽ⁱ⁾, t) − v*⁽ⁱ⁾‖²) + β_KL·‖v_θ − v_ref‖²`` with group-normalised advantages A of both
  signs; w is the identity, or (``forward.awm_power`` p < 1) Flow-Factory's generalised Huber weighting (`awm_loss`).
* **NFT** (DiffusionNFT, Zheng et al. 2025, arXiv 2509.16117): with r = clip(A / A_max, −1, 1)/2 + 1/2 ∈ [0, 1],
  ``v⁺ = (1−β)·v_old + β·v_θ`` and ``v⁻ = (1+β)·v_old − β·v_θ``,
  ``L = A_max/β · mean_i [r_i·‖x̂0(v⁺) − x0‖²/w⁺ + (1−r_i)·‖x̂0(v⁻) − x0‖²/w⁻] + β_KL·‖v_θ − v_ref‖²``
  in x0-space (x̂0(v) = x_t − t·v, so ‖x̂0 − x0‖² = t²‖v − v*‖²) with the paper's adaptive weights w = mean|x̂0 − x0|
  (no gradient); v_old is a slow EMA of θ (the paper's ``decay_type=1``: η = min(0.001·iteration, 0.5)).
  At v_θ = v_old its gradient is 2·(A/A_max)·(v_old − v*)/w — AWM's direction, which is why both cancel the pull
  towards the model's own samples that plain refitting (RAFT) suffers from.

**Common random numbers.** The samples of one layout's group share their (t, ε) draws (``forward.crn``). Under
zero-mean group advantages Σ_i A_i = 0, so whatever the K loss terms of a group have in common — the noise's own
contribution to ‖v_θ − v*‖², the same at equal (t, ε) wherever x0 agrees — cancels in Σ_i A_i·ℓ_i exactly, instead
of adding variance that only averages out over many samples. `benchmarks/crn_variance.py` measures the gradient's
variance with and without it.

The UNet (ε-prediction, DDIM) backbones: both losses are written in the sampler's own noising and target
(`Sampler.noisy`, `Sampler.target`), which for an ε-predicting UNet are its DDPM noising and ε; NFT's x0-space
weights use the flow identity x̂0 = x_t − t·v, so `NFT` is flow-only and says so in one line; `AWM` trains both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn
from torch.func import functional_call

from diffrl.algos.advantages import group_advantages
from diffrl.config import AlgoConfig, ForwardConfig, GroupConfig
from diffrl.distributed.learners import WHOLE, GradSum, Logs, weigh
from diffrl.errors import UserError
from diffrl.policies.generator import LayoutGenerator
from diffrl.policies.lora import TrainableOnly, has_lora
from diffrl.policies.text import ConditionStore
from diffrl.registry import ALGOS


@dataclass
class FinalSamples:
    """What a forward-process learner needs of a rollout: no per-step tensors."""

    x0: Tensor  # [B, C, H, W] final latents
    layout_index: Tensor  # [B] rows of the ConditionStore (a group shares one)
    rewards: Tensor  # [B]

    @classmethod
    def of(cls, rollout: TensorDictBase) -> "FinalSamples":
        """A ``[B, T]`` env rollout → its final samples."""
        return cls(rollout["next", "latent"][:, -1], rollout["layout_index"][:, 0], rollout["next", "reward"][:, -1, 0])


# ---- pure math -------------------------------------------------------------------------------------------------


def group_times_noise(layout_index: Tensor, k: int, latent_shape, times: Tensor | None, crn: bool,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """K flow times and noises per sample: (t [K, B], ε [K, B, C, H, W]).

    ``times``: the values to draw t from without replacement per row (the sampling schedule's times in (0, 1]), or
    None for t ~ U(0, 1). With ``crn`` every sample of a group (same ``layout_index``) gets its group's draws."""
    groups, inverse = torch.unique(layout_index, return_inverse=True)
    rows = groups.numel() if crn else layout_index.numel()
    device = layout_index.device
    if times is None:
        t = torch.rand(k, rows, generator=generator, device=device)
    else:
        if k > times.numel():
            raise UserError(f"config forward.timesteps={k}: more than the {times.numel()} times of the sampling schedule")
        pick = torch.stack([torch.randperm(times.numel(), generator=generator, device=device)[:k] for _ in range(rows)], 1)
        t = times.to(device)[pick]  # [K, rows]
    noise = torch.randn(k, rows, *latent_shape, generator=generator, device=device)
    if crn:
        t, noise = t[:, inverse], noise[:, inverse]
    return t, noise


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference over all but the batch dim: [B, ...] × 2 → [B]."""
    return ((a.float() - b.float()) ** 2).flatten(1).mean(1)


def awm_loss(velocity: Tensor, target: Tensor, advantages: Tensor, t: Tensor | None = None, power: float = 1.0,
             eps: float = 1e-10) -> Tensor:
    """AWM's policy term mean_i A_i·w(ℓ_i) on the matching loss ℓ_i = ‖v_i − v*_i‖² (velocity, target [B, C, H, W];
    advantages, t [B]). ``power`` 1: w(ℓ) = ℓ, the plain loss. ``power`` p < 1: the generalised Huber weighting
    w(ℓ, t) = t/p·((ℓ + eps)^p − eps^p) that Flow-Factory ships for AWM (``awm_weighting: ghuber``, p = 0.25,
    eps = 1e-10). Its gradient t·(ℓ + eps)^(p−1)·∇ℓ scales each sample's pull by a power of its own error, so the
    noisiest times and samples, whose large ‖v − v*‖² is mostly the noise's, do not set the update's size (as NFT's
    adaptive weights do)."""
    loss = per_sample_mse(velocity, target)
    if power != 1.0:
        loss = t * ((loss + eps) ** power - eps**power) / power
    return (advantages * loss).mean()


def nft_reward(advantages: Tensor, adv_clip: float) -> Tensor:
    """DiffusionNFT's optimality probability r = clip(A / A_max, −1, 1)/2 + 1/2 ∈ [0, 1]."""
    return (advantages / adv_clip).clamp(-1, 1) / 2 + 0.5


def nft_loss(velocity: Tensor, old_velocity: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, beta: float,
             adv_clip: float, eps: float = 1e-5) -> Tensor:
    """DiffusionNFT's policy term (see the module docstring): velocity, old_velocity, x_t, x0 [B, C, H, W], t [B],
    r [B] in [0, 1]; x0-space errors with the paper's adaptive weights (detached)."""
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    old = old_velocity.detach().float()
    positive = (1 - beta) * old + beta * velocity.float()
    negative = (1 + beta) * old - beta * velocity.float()
    x0 = x0.float()
    err_pos, err_neg = x_t - tt * positive - x0, x_t - tt * negative - x0  # x̂0(v) − x0
    with torch.no_grad():
        w_pos = err_pos.abs().flatten(1).mean(1).clamp_min(eps)
        w_neg = err_neg.abs().flatten(1).mean(1).clamp_min(eps)
    pos = (err_pos**2).flatten(1).mean(1) / w_pos
    neg = (err_neg**2).flatten(1).mean(1) / w_neg
    return adv_clip * (r * pos + (1 - r) * neg).mean() / beta


def require_flow(algo: str, generator: LayoutGenerator) -> None:
    """``--algo nft`` needs a flow model (a user error otherwise, raised before a run folder is made)."""
    if algo == "nft" and generator.sampler.prediction != "flow":
        raise UserError("--algo nft is flow-only (its x0-space weights use x̂0 = x_t − t·v); this model predicts "
                        f"{generator.sampler.prediction}: use --algo awm, ppo or grpo")


# ---- the learners ----------------------------------------------------------------------------------------------


class ForwardLearner:
    """The update shared by AWM and NFT: group advantages, K (t, ε) draws per sample, minibatches, one optimizer
    step per epoch with ``algo.accumulate`` (else one per minibatch), KL to the frozen reference's velocity."""

    name = "forward"
    shard = WHOLE  # this process is the only learner; `diffrl.distributed.learners` sets a Shard in each of N
    sections: tuple[str, ...] = ("group",)  # beside algo and forward, passed by name (see `Learner.sections`)

    def __init__(self, generator: LayoutGenerator, reference: LayoutGenerator, store: ConditionStore,
                 cfg: AlgoConfig, fwd: ForwardConfig, times: Tensor, *, group: GroupConfig | None = None):
        self.generator = generator
        self.group = group or GroupConfig()
        self.reference = reference
        self.store = store
        self.cfg = cfg
        self.fwd = fwd
        self.times = times[times > 0] if fwd.time_sampling == "schedule" else None  # [T] the schedule's times
        self.params = [p for p in generator.denoiser.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([{"params": self.params, "lr": cfg.lr}], weight_decay=0.0)
        self.iteration = 0

    def trainable_modules(self) -> dict[str, nn.Module]:
        denoiser = self.generator.denoiser
        return {"denoiser": TrainableOnly(denoiser) if has_lora(denoiser) else denoiser}

    def policy_loss(self, velocity: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, target: Tensor, advantages: Tensor,
                    index: Tensor, cond) -> Tensor:
        raise NotImplementedError

    def update(self, rollout: TensorDictBase, paired=None) -> dict[str, float]:
        samples = FinalSamples.of(rollout)
        with torch.no_grad():
            advantages = group_advantages(samples.rewards, samples.layout_index, scale=self.group.scale)
        b = samples.x0.shape[0]
        k = self.fwd.timesteps if self.times is None else min(self.fwd.timesteps, self.times.numel())
        logs = self.shard.logs()
        grads = GradSum(self.params)
        chunks = [(j, s) for j in range(k) for s in range(0, b, self.cfg.minibatch_size)]
        per_step = len(chunks) if self.cfg.accumulate else 1
        for epoch in range(self.cfg.epochs):
            t_all, noise_all = group_times_noise(samples.layout_index, k, samples.x0.shape[1:], self.times, self.fwd.crn)
            order = [chunks[i] for i in torch.randperm(len(chunks)).tolist()]
            for first in range(0, len(order), per_step):
                group = [(epoch * len(order) + first + i, j, start)
                         for i, (j, start) in enumerate(order[first : first + per_step])]
                # --learners N: each learner runs its pieces of the step's minibatches (`diffrl.distributed.learners`)
                for piece in self.shard.pieces(group, b, self.cfg.minibatch_size, self.cfg.micro_batch):
                    self.piece_backward(samples, advantages, t_all[piece.step], noise_all[piece.step], piece, grads,
                                        logs, per_step)
                self.shard.sync(self.params, grads)
                grad_norm = self.shard.clip(self.params, self.cfg.max_grad_norm)
                logs.add(group[-1][0], Logs.STEP, "grad_norm", grad_norm, None)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        self.after_iteration()
        result = logs.result()
        result["advantage_abs"] = float(advantages.abs().mean())
        return result

    def piece_backward(self, samples: "FinalSamples", advantages: Tensor, t_all: Tensor, noise_all: Tensor, piece,
                       grads: GradSum, logs, per_step: int) -> None:
        """The loss of one piece of a minibatch (its rows, at its (t, ε) draw), weighed by its share, backpropagated."""
        rows = piece.rows
        x0, index, t, noise = samples.x0[rows], samples.layout_index[rows], t_all[rows], noise_all[rows]
        cond = self.store[index]
        x_t = self.generator.sampler.noisy(x0, noise, t)
        target = self.generator.sampler.target(x0, noise, t)
        velocity = self.generator.velocity(x_t, t, cond)
        policy = self.policy_loss(velocity, x_t, x0, t, target, advantages[rows], index, cond)
        total = policy
        if self.fwd.kl_coef:
            with torch.no_grad():
                ref = self.reference.velocity(x_t, t, cond)
            kl = per_sample_mse(velocity, ref).mean()
            total = total + self.fwd.kl_coef * kl
            logs.add(piece.slot, piece.index, "kl_ref", kl, piece.share)
        grads.backward(weigh(total, piece.share) / per_step)
        logs.add(piece.slot, piece.index, "loss_policy", policy, piece.share)

    def after_iteration(self) -> None:
        pass


@ALGOS.register("awm")
class AWM(ForwardLearner):
    """Advantage Weighted Matching: the flow-matching loss weighted by group-normalised advantages of both signs."""

    name = "awm"

    def policy_loss(self, velocity, x_t, x0, t, target, advantages, index, cond):
        return awm_loss(velocity, target, advantages, t, self.fwd.awm_power)


class OldWeights(nn.Module):
    """θ_old of DiffusionNFT: a copy of the trainable tensors, kept in checkpoints (so a resumed run continues
    with the same v_old)."""

    def __init__(self, named: dict[str, Tensor]):
        super().__init__()
        self.names = list(named)
        for i, value in enumerate(named.values()):
            self.register_buffer(f"p{i}", value.detach().clone())

    def as_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"p{i}") for i, name in enumerate(self.names)}


@ALGOS.register("nft")
class NFT(ForwardLearner):
    """DiffusionNFT: implicit positive and negative policies around the slow-moving v_old."""

    name = "nft"

    def __init__(self, generator, reference, store, cfg, fwd, times, **sections):
        require_flow(cfg.name, generator)
        super().__init__(generator, reference, store, cfg, fwd, times, **sections)
        denoiser = generator.denoiser
        self.old = OldWeights({name: p for name, p in denoiser.named_parameters() if p.requires_grad})
        self.old_module: nn.Module | None = None  # ray.learner_strategy=fsdp: θ_old as a sharded copy (FsdpShard.wrap)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {**super().trainable_modules(), "nft_old": self.old}

    def old_velocity(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        with torch.no_grad():
            if self.old_module is not None:
                velocity = self.old_module(x_t, t, cond)
                self.old_module.reshard()  # FSDP keeps a root's gathered weights after a forward; θ_old moves in place
                return velocity
            return functional_call(self.generator.denoiser, self.old.as_dict(), (x_t, t, cond), strict=False)

    def policy_loss(self, velocity, x_t, x0, t, target, advantages, index, cond):
        r = nft_reward(advantages, self.fwd.adv_clip)
        return nft_loss(velocity, self.old_velocity(x_t, t, cond), x_t, x0, t, r, self.fwd.nft_beta, self.fwd.adv_clip)

    def after_iteration(self) -> None:
        """θ_old ← η·θ_old + (1 − η)·θ with η = min(old_uprate·iteration, old_uphold) (the paper's decay_type=1)."""
        eta = min(self.fwd.old_uprate * self.iteration, self.fwd.old_uphold)
        named = dict(self.generator.denoiser.named_parameters())
        with torch.no_grad():
            for name, old in self.old.as_dict().items():
                old.mul_(eta).add_(named[name].detach(), alpha=1 - eta)
