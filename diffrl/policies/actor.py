"""The generator as a TorchRL policy: one denoising step = one action.

`SDEPolicyNet` maps an observation (latent x_t, times, step, layout index) to the mean and
std of the generator's stochastic step (`LayoutGenerator.step_mean_std`: its sampler, with CFG when on);
`make_actor` wraps it as a ``ProbabilisticActor``
over `LatentGaussian`. Steps inside the RL window (``window_steps`` steps from ``window_start``, by default
the first ones; I-DRUID trains on the first 20%) use noise level ``a``; the other steps are the deterministic
ODE step (std 0, log-prob 0), so they cost a forward in rollout and nothing in training.

Remember: a ``ProbabilisticActor`` samples only under ``set_exploration_type(ExplorationType.RANDOM)``;
otherwise it returns the mean, which is exactly the ODE sampler when ``a = 0`` everywhere.
"""

from __future__ import annotations

import torch
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from torch.distributions import Distribution
from torchrl.modules import ProbabilisticActor

from diffrl.policies.generator import LayoutGenerator
from diffrl.policies.sde import gaussian_log_prob
from diffrl.policies.text import ConditionStore

OBSERVATION_KEYS = ["latent", "sigma", "sigma_next", "step", "layout_index"]
LOG_PROB_KEY = "action_log_prob"


class SDEPolicyNet(nn.Module):
    """(x_t, t, t_next, step, layout index) → (mean [B,C,H,W], std [B,1,1,1]) of the next latent."""

    def __init__(self, generator: LayoutGenerator, store: ConditionStore, noise_level: float, window_steps: int,
                 window_start: int = 0):
        super().__init__()
        self.generator = generator
        self.store = store
        self.noise_level = noise_level
        self.window_steps = window_steps
        self.window_start = window_start

    @property
    def window_end(self) -> int:
        """The first step after the RL window."""
        return self.window_start + self.window_steps

    def step_noise(self, step: Tensor) -> Tensor:
        """Noise level a for each sample's step: a inside the RL window, 0 outside it."""
        inside = (step >= self.window_start) & (step < self.window_end)
        return torch.where(inside, self.noise_level, 0.0).float()

    def forward(self, latent: Tensor, sigma: Tensor, sigma_next: Tensor, step: Tensor, layout_index: Tensor):
        return self.mean_std(latent, sigma, sigma_next, layout_index, self.step_noise(step))

    def mean_std(self, latent: Tensor, sigma: Tensor, sigma_next: Tensor, layout_index: Tensor, noise_level):
        """The step's mean and std (float32) at an explicit noise level (a scalar or per sample)."""
        return self.generator.step_mean_std(latent, sigma, sigma_next, self.store[layout_index], noise_level)


class LatentGaussian(Distribution):
    """N(loc, scale²) over [C, H, W] latents with a per-sample scale that may be 0 (a point mass).

    ``log_prob`` is the exact log-density summed over C, H, W (0 for point masses), divided by
    C·H·W when ``reduce="mean"`` (the per-dimension scale Flow-GRPO uses for its ratios).
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor, reduce: str = "sum"):
        # loc: [*batch, C, H, W]; scale: [*batch, 1, 1, 1]
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        self.loc, self.scale, self.reduce = loc, scale, reduce
        super().__init__(loc.shape[:-3], loc.shape[-3:], validate_args=False)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        noise = torch.randn(torch.Size(sample_shape) + self.loc.shape, device=self.loc.device, dtype=self.loc.dtype)
        return self.loc + self.scale * noise

    def log_prob(self, value: Tensor) -> Tensor:
        event = self.loc.shape[-3:]
        flat = gaussian_log_prob(value.reshape(-1, *event), self.loc.reshape(-1, *event), self.scale.reshape(-1, 1, 1, 1))
        if self.reduce == "mean":
            flat = flat / event.numel()
        return flat.reshape(self.batch_shape)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def deterministic_sample(self) -> Tensor:
        return self.loc


def make_actor(net: SDEPolicyNet, action_spec=None, log_prob_reduce: str = "sum") -> ProbabilisticActor:
    """The ``ProbabilisticActor`` that writes ``action`` and its log-prob into the tensordict."""
    module = TensorDictModule(net, in_keys=OBSERVATION_KEYS, out_keys=["loc", "scale"])
    return ProbabilisticActor(
        module,
        in_keys=["loc", "scale"],
        distribution_class=LatentGaussian,
        distribution_kwargs={"reduce": log_prob_reduce},
        return_log_prob=True,
        log_prob_key=LOG_PROB_KEY,
        spec=action_spec,
    )
