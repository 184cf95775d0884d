"""A layout-to-image generator as the policy sees it: a denoiser (the `Denoiser` protocol) with its text encoder,
latent space and sampler.

The env, the actor, evaluation and the learners see a backbone only through `LayoutGenerator` and the `Denoiser`
protocol, so SD3's MM-DiT, SD1.x's UNet, FLUX's transformer and the tiny Shapes model train with the same code.
Building one from a folder is `diffrl.policies.generator` (its table of loaders, one per pipeline class); the
backbone modules import this one, never that one, so loading has no import cycle.

A generator turns a model output into a denoising step through its sampler (`diffrl.policies.samplers`):
`LayoutGenerator.step_mean_std` is the one place the env, the actor, evaluation and the learners get a step
from, with classifier-free guidance (``guidance_scale`` ≠ 1) batched into the same forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffrl.errors import UserError
from diffrl.layout import Layout
from diffrl.policies.backbones.mmdit import LayoutMMDiT
from diffrl.policies.layout_adapter import LayoutAdapter, LayoutAdapterConfig
from diffrl.policies.samplers import FlowSampler, Sampler, as_batch_times
from diffrl.policies.text import Conditioning, TextEncoder

CLASS_NAME = "diffrl.LayoutGenerator"


@runtime_checkable
class Denoiser(Protocol):
    """What the trainer needs from a backbone: an ``nn.Module`` (its parameters, state dict, ``to``, ``train`` and
    ``eval`` are how checkpoints, optimizers and devices reach it) that maps noisy latents, their times and a
    layout's conditioning to the model output its generator's `Sampler` turns into a step.

    Met by `LayoutMMDiT` (SD3/SD3.5 and the Shapes model), `diffrl.policies.backbones.unet.LayoutUNet` (SD1.x,
    GLIGEN) and `diffrl.policies.backbones.flux.LayoutFlux`. Two optional parts: the diffusers model as
    ``transformer`` or ``unet`` (where LoRA goes, `diffrl.policies.lora.backbone_of`), and ``set_guidance(scale)``
    for a model whose guidance is an input rather than a CFG pass (FLUX.1-dev)."""

    adapter: LayoutAdapter | None  # the layout adapter RL trains (None: a GLIGEN UNet grounding with its own fusers)
    num_train_timesteps: int  # the backbone's timestep scale: it sees t·num_train_timesteps for t in [0, 1]

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """x [B, C, H, W] latents at times t [B] in [0, 1] → the model output [B, C, H, W] (velocity or ε)."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the backbone's blocks (and the adapter's fusers) in the backward pass."""


@dataclass
class LatentSpace:
    """How images map to the space the flow runs in. ``pixels``: x = 2·image − 1."""

    kind: str  # "pixels"
    channels: int  # C of a latent
    size: int  # H = W of a latent

    def encode(self, images: Tensor) -> Tensor:
        # images: [B, 3, H, W] in [0, 1] → latents [B, C, h, w]
        return images * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        # latents: [B, C, h, w] → images [B, 3, H, W] in [0, 1]
        return ((latents.float() + 1) / 2).clamp(0, 1)

    @property
    def image_size(self) -> int:
        return self.size


class VAESpace:
    """Latents of a diffusers ``AutoencoderKL``: ``z = (E(2·image − 1) − shift)·scale`` (the posterior mean),
    decoded by the inverse; ``shift`` is 0 when the VAE's config has no ``shift_factor`` (SD1.x)."""

    kind = "vae"

    def __init__(self, vae: nn.Module, size: int):
        self.vae = vae.eval().requires_grad_(False)
        self.channels = vae.config.latent_channels  # C (16 for SD3)
        self.size = size  # h = w of a latent
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.image_size = size * 2 ** (len(vae.config.block_out_channels) - 1)  # H = W of an image

    def encode(self, images: Tensor) -> Tensor:
        # images: [B, 3, H, W] in [0, 1] → latents [B, C, h, w] (float32)
        vae = self.vae
        with torch.no_grad():
            mean = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
        return ((mean.float() - self.shift) * self.scale).to(images.device)

    def decode(self, latents: Tensor) -> Tensor:
        # latents: [B, C, h, w] → images [B, 3, H, W] in [0, 1] (float32)
        vae = self.vae
        with torch.no_grad():
            images = vae.decode((latents.float() / self.scale + self.shift).to(vae.device, vae.dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1).to(latents.device)

    def to(self, *args, **kwargs) -> "VAESpace":
        self.vae.to(*args, **kwargs)
        return self


class LayoutGenerator(nn.Module):
    """The denoiser (trainable) with its frozen text encoder, latent space and sampler.

    ``guidance_scale`` s ≠ 1 turns on classifier-free guidance in every step (rollout and training alike):
    the conditional and unconditional halves run as one batch of 2B and ``out = u + s·(c − u)``. The
    unconditional half is the empty prompt with no instances (`null_conditioning`).
    ``lora_by_default``: whether ``model.lora_rank=-1`` (auto) gives this backbone LoRA (real models).
    """

    def __init__(self, denoiser: Denoiser, text: TextEncoder, space, sampler: Sampler | None = None,
                 guidance_scale: float = 1.0, lora_by_default: bool = False):
        super().__init__()
        self.denoiser = denoiser
        self.text = text  # not a submodule: frozen, never in the policy's state dict
        self.space = space
        self.sampler = sampler if sampler is not None else FlowSampler()
        self.guidance_scale = guidance_scale
        self.lora_by_default = lora_by_default
        self.source = ""  # the --model it was loaded from ("" when built in code)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.space.channels, self.space.size, self.space.size)

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The denoiser's raw output (the velocity for a flow model), conditional, without guidance."""
        return self.denoiser(x, t, cond)

    def guided_output(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The model output a step uses: with guidance, ``u + s·(c − u)`` (float32) from one batched forward."""
        if self.guidance_scale == 1:
            return self.denoiser(x, t, cond)
        return guided(self.denoiser, x, t, cond, self.null_conditioning(cond), self.guidance_scale)

    def step_mean_std(self, x: Tensor, t: Tensor | float, t_next: Tensor | float, cond: Conditioning,
                      noise_level: Tensor | float) -> tuple[Tensor, Tensor]:
        """(mean [B, C, H, W], std [B, 1, 1, 1]) of the step from x at t to t_next, both float32."""
        output = self.guided_output(x, as_batch_times(t, x.shape[0], x.device), cond)
        return self.sampler.mean_std(output, t, t_next, x, noise_level)

    def null_conditioning(self, like: Conditioning) -> Conditioning:
        """The unconditional half of CFG for ``like``'s N rows: the empty prompt, no instances."""
        hidden, pooled = self.text.encode([""])  # [1, L, D], [1, P]
        n = len(like)
        device = like.boxes.device
        return Conditioning(hidden.to(device).expand(n, -1, -1), pooled.to(device).expand(n, -1),
                            torch.zeros_like(like.phrase_embeds), torch.zeros_like(like.boxes),
                            torch.zeros_like(like.instance_mask))

    def encode_layouts(self, layouts: list[Layout]) -> Conditioning:
        return self.text.encode_layouts(layouts)

    def to(self, *args, **kwargs):  # the text encoder and the latent space are not submodules; move them too
        super().to(*args, **kwargs)
        self.text.model.to(*args, **kwargs)
        if hasattr(self.space, "to"):
            self.space.to(*args, **kwargs)
        return self

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": CLASS_NAME, "space": self.space.kind, "channels": self.space.channels,
                 "image_size": self.space.size}
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        self.denoiser.transformer.save_pretrained(path / "transformer")
        self.text.model.save_pretrained(path / "text_encoder")
        self.text.tokenizer.save_pretrained(path / "tokenizer")
        save_adapter(self.denoiser.adapter, path / "layout_adapter")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LayoutGenerator":
        from diffusers import SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        path = Path(path)
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise UserError(f"{path} is not a diffrl generator folder (no model_index.json)")
        index = json.loads(index_file.read_text())
        if index.get("_class_name") != CLASS_NAME:
            raise UserError(f"{path}/model_index.json is for {index.get('_class_name')!r}, not a diffrl generator")
        from transformers.utils import logging as hf_logging

        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", low_cpu_mem_usage=False)
        hf_logging.disable_progress_bar()  # one tiny file: a bar is noise
        text_model = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        adapter = load_adapter(path / "layout_adapter")
        space = LatentSpace(index["space"], index["channels"], index["image_size"])
        return cls(LayoutMMDiT(transformer, adapter), TextEncoder(tokenizer, text_model), space)


def guided(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, scale: float) -> Tensor:
    """Classifier-free guidance ``u + s·(c − u)`` (float32) from one forward of the unconditional and conditional
    halves batched together: x [B, C, H, W], t [B], ``cond`` and ``uncond`` with B rows each."""
    n = x.shape[0]
    both = Conditioning(*(torch.cat([u, c.to(u.dtype)]) for u, c in zip(uncond.tensors(), cond.tensors())))
    out = denoiser(torch.cat([x, x]), torch.cat([t.reshape(n), t.reshape(n)]), both)  # [2B, C, H, W]
    u, c = out[:n].float(), out[n:].float()
    return u + scale * (c - u)


def save_adapter(adapter: LayoutAdapter, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(adapter.config.to_dict(), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(path / "model.safetensors"))


def load_adapter(path: Path) -> LayoutAdapter:
    adapter = LayoutAdapter(LayoutAdapterConfig(**json.loads((path / "config.json").read_text())))
    adapter.load_state_dict(load_file(str(path / "model.safetensors")))
    return adapter


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
