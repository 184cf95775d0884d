"""The denoising process as a TorchRL environment.

One episode = one image: ``reset`` draws a batch of layouts (``layouts_per_reset`` of them, each
repeated ``group_size`` times so GRPO can compare samples of the same layout), encodes their text
once into the `ConditionStore` and draws x_1 ~ N(0, I) (with ``share_noise``, one draw per layout that its whole
group starts from); each ``step`` takes the next latent as the
action; the last step decodes the images and scores them with the reward. Reward is 0 before the
last step (γ = 1, one terminal reward).

Per-step tensordict (batch ``[B]``, B = layouts_per_reset × group_size):
    latent        [B, C, H, W]  x_t
    sigma         [B]           time t of this step (the flow time for a flow model; see the generator's sampler)
    sigma_next    [B]           time after the step (0 at the last step)
    step          [B]           step index 0..T-1
    layout_index  [B]           row of the ConditionStore holding this sample's conditioning
Text embeddings never enter the tensordict.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from diffrl.envs.datasets import LayoutSource
from diffrl.layout import Layout
from diffrl.policies.generator import LayoutGenerator
from diffrl.policies.samplers import flow_sigmas  # noqa: F401  (its old home, where experiments/ imports it)
from diffrl.policies.text import ConditionStore
from diffrl.registry import ENVS
from diffrl.rewards.base import Reward, RewardOutput


@ENVS.register("layout")
class LayoutEnv(EnvBase):
    """Layout-to-image generation as a T-step episode with a terminal reward."""

    def __init__(
        self,
        generator: LayoutGenerator,
        reward: Reward,
        source: LayoutSource,
        store: ConditionStore,
        *,
        layouts_per_reset: int,
        group_size: int = 1,
        num_steps: int = 10,
        shift: float = 0.0,
        seed: int = 0,
        share_noise: bool = False,
        device: str | torch.device = "cpu",
    ):
        super().__init__(device=device, batch_size=torch.Size([layouts_per_reset * group_size]))
        self.generator = generator
        self.reward_fn = reward
        self.source = source
        self.store = store
        self.layouts_per_reset = layouts_per_reset
        self.group_size = group_size
        self.share_noise = share_noise
        self.num_steps = num_steps
        self.sigmas = generator.sampler.times(num_steps, shift).to(self.device)  # [T+1] decreasing, last 0
        self.noise_generator = torch.Generator(device=self.device)
        self.noise_generator.manual_seed(seed)
        self.layout_index = torch.arange(layouts_per_reset, device=self.device).repeat_interleave(group_size)  # [B]
        self.last: tuple[torch.Tensor, list[Layout], RewardOutput] | None = None  # images, layouts, reward of the last episode
        self._make_specs()

    def _make_specs(self) -> None:
        b = self.batch_size
        latent = Unbounded(shape=b + torch.Size(self.generator.latent_shape), device=self.device)
        self.observation_spec = Composite(
            latent=latent,
            sigma=Bounded(0.0, 1.0, shape=b, device=self.device),
            sigma_next=Bounded(0.0, 1.0, shape=b, device=self.device),
            step=Bounded(0, self.num_steps, shape=b, dtype=torch.int64, device=self.device),
            layout_index=Bounded(0, self.layouts_per_reset - 1, shape=b, dtype=torch.int64, device=self.device),
            shape=b,
        )
        self.action_spec = latent.clone()
        self.reward_spec = Unbounded(shape=b + torch.Size([1]), device=self.device)
        done = Categorical(2, shape=b + torch.Size([1]), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(done=done, terminated=done.clone(), truncated=done.clone(), shape=b)

    @property
    def sample_layouts(self) -> list[Layout]:
        """The layout of each of the B samples of the current episode."""
        return [self.store.layouts[i] for i in self.layout_index.tolist()]

    def _observation(self, latent: torch.Tensor, step: int) -> dict:
        b = self.batch_size[0]
        return {
            "latent": latent,
            "sigma": self.sigmas[step].expand(b).clone(),
            "sigma_next": self.sigmas[min(step + 1, self.num_steps)].expand(b).clone(),
            "step": torch.full((b,), step, dtype=torch.int64, device=self.device),
            "layout_index": self.layout_index,
        }

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        layouts = self.source.sample(self.layouts_per_reset)
        self.store.set(layouts, self.generator.encode_layouts(layouts).to(self.device))
        draws = self.layouts_per_reset if self.share_noise else self.batch_size[0]
        latent = torch.randn((draws, *self.generator.latent_shape), generator=self.noise_generator, device=self.device)
        if self.share_noise:  # one x_1 per layout, repeated over its group (DanceGRPO's init_same_noise)
            latent = latent.repeat_interleave(self.group_size, dim=0)
        done = torch.zeros(*self.batch_size, 1, dtype=torch.bool, device=self.device)
        return TensorDict(
            {**self._observation(latent, 0), "done": done, "terminated": done.clone(), "truncated": done.clone()},
            batch_size=self.batch_size,
            device=self.device,
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        latent = tensordict["action"]
        step = int(tensordict["step"][0]) + 1
        last = step == self.num_steps
        reward = torch.zeros(*self.batch_size, 1, device=self.device)
        if last:
            images = self.generator.space.decode(latent)
            layouts = self.sample_layouts
            out = self.reward_fn(images, layouts)
            reward = out.rewards.to(self.device, torch.float32).reshape(-1, 1)
            self.last = (images, layouts, out)
        done = torch.full((*self.batch_size, 1), last, dtype=torch.bool, device=self.device)
        return TensorDict(
            {
                **self._observation(latent, step),  # after the last step: step T, t = 0
                "reward": reward,
                "done": done,
                "terminated": done.clone(),
                "truncated": torch.zeros_like(done),
            },
            batch_size=self.batch_size,
            device=self.device,
        )

    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:
            self.noise_generator.manual_seed(seed)
