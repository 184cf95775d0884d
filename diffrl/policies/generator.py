"""A layout-to-image generator as the policy sees it: denoiser + text encoder + latent space.

On disk a generator is a folder in the diffusers layout, loaded through each part's own
``from_pretrained`` — the same path whether it is the packaged Shapes model or a user's folder:

    model_index.json      {"_class_name": "diffrl.LayoutGenerator", "space": "pixels", "image_size": 32}
    transformer/          SD3Transformer2DModel.save_pretrained
    text_encoder/         CLIPTextModelWithProjection.save_pretrained
    tokenizer/            PreTrainedTokenizerFast.save_pretrained
    layout_adapter/       config.json + model.safetensors

`load_generator` also takes a user's diffusers pipeline folder (or a hub id already in the local
Hugging Face cache) and dispatches on its ``model_index.json`` ``_class_name``:
``StableDiffusion3Pipeline`` → `diffrl.policies.backbones.sd3`, ``FluxPipeline`` → `diffrl.policies.backbones.flux`,
``StableDiffusionPipeline`` /
``StableDiffusionGLIGENPipeline`` → `diffrl.policies.backbones.unet`. `build_generator` adds what a run's
``model.*`` config asks for on top (LoRA, guidance, dtype, gradient checkpointing).

A generator turns a model output into a denoising step through its sampler (`diffrl.policies.samplers`):
`LayoutGenerator.step_mean_std` is the one place the env, the actor, evaluation and the learners get a step
from, with classifier-free guidance (``guidance_scale`` ≠ 1) batched into the same forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
SD3_CLASS = "StableDiffusion3Pipeline"
FLUX_CLASS = "FluxPipeline"
SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionGLIGENPipeline")


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

    def __init__(self, denoiser: nn.Module, text: TextEncoder, space, sampler: Sampler | None = None,
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


def guided(denoiser: nn.Module, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, scale: float) -> Tensor:
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


def resolve_model(name_or_path: str) -> Path:
    """``--model`` → a local folder: a registered name, a folder, or a hub id already in the local HF cache.
    Anything else is one line saying what to download and which flag points at it."""
    from diffrl.registry import MODELS

    if name_or_path in MODELS:
        path = Path(MODELS.get(name_or_path)())
        if not (path / "model_index.json").is_file():
            raise UserError(f"model {name_or_path!r} is not installed at {path}; reinstall diffrl or run `diffrl pretrain`")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if _looks_like_hub_id(name_or_path):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:  # noqa: BLE001  (not in the cache: say what to do)
            raise UserError(
                f"--model {name_or_path}: its weights are not in the local Hugging Face cache and diffrl does not "
                f"download generators; run `hf download {name_or_path} --local-dir DIR` where there is network (accept "
                "the model's license on the hub first if it is gated), then pass --model DIR"
            ) from None
    raise UserError(
        f"--model {name_or_path!r}: not a registered model ({', '.join(MODELS.names())}), a local folder or a hub id "
        "(owner/name); download the model elsewhere and pass --model /path/to/folder"
    )


def _looks_like_hub_id(name: str) -> bool:
    import re

    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def read_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"--model {path}: no model_index.json there; pass a diffusers pipeline folder or a diffrl "
                        "generator folder")
    return json.loads(index_file.read_text())


def load_generator(name_or_path: str, **options) -> LayoutGenerator:
    """``--model``: a registered name (``shapes-tiny``), a generator or diffusers pipeline folder, or a hub id in
    the local HF cache. ``options`` (dtype, t5, adapter) go to the real-model loaders; None means their default."""
    path = resolve_model(name_or_path)
    options = {k: v for k, v in options.items() if v is not None}
    kind = read_index(path).get("_class_name")
    if "resolution" in options and kind != FLUX_CLASS:
        raise UserError(f"config model.resolution: only FLUX folders take it; --model {name_or_path} is {kind!r}, "
                        "set model.resolution=0")
    if kind == CLASS_NAME:
        generator = LayoutGenerator.from_pretrained(path)
        if options.get("dtype") not in (None, "float32"):
            generator.to(_dtype(options["dtype"]))
            generator.denoiser.adapter.float()  # trained weights stay float32, as in the real-model loaders
    elif kind == SD3_CLASS:
        from diffrl.policies.backbones.sd3 import load_sd3_generator

        generator = load_sd3_generator(path, **options)
    elif kind == FLUX_CLASS:
        from diffrl.policies.backbones.flux import load_flux_generator

        generator = load_flux_generator(path, **options)
    elif kind in SD_CLASSES:
        from diffrl.policies.backbones.unet import load_sd_generator

        generator = load_sd_generator(path, **options)
    else:
        raise UserError(f"--model {name_or_path}: model_index.json is for {kind!r}; diffrl loads {CLASS_NAME}, "
                        f"{SD3_CLASS}, {FLUX_CLASS}, {', '.join(SD_CLASSES)}")
    generator.source = name_or_path
    return generator


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_generator(model_cfg, train: str = "all") -> LayoutGenerator:
    """The generator a run's ``model.*`` config describes (on the CPU; the caller moves it): loaded with its
    dtype / T5 / adapter options, LoRA on the backbone when ``lora_rank`` asks (``-1``: on for real models, off
    for the Shapes model; never with ``train='adapter'``), guidance scale (CFG; for FLUX the distilled guidance its
    denoiser takes as input, `LayoutFlux.set_guidance`), gradient checkpointing."""
    from diffrl.policies.lora import add_lora, backbone_of

    generator = load_generator(model_cfg.name, dtype=model_cfg.dtype, t5=model_cfg.t5 or None,
                               adapter=model_cfg.adapter or None, resolution=model_cfg.resolution or None)
    generator.text.cache_size = model_cfg.text_cache
    if hasattr(generator.denoiser, "set_guidance"):  # FLUX: distilled guidance is the model's input, no CFG pass
        generator.denoiser.set_guidance(model_cfg.guidance_scale)
    else:
        generator.guidance_scale = model_cfg.guidance_scale
    if model_cfg.idm:
        adapter = getattr(generator.denoiser, "adapter", None)
        if adapter is None:
            raise UserError(f"model.idm: --model {model_cfg.name} has no layout adapter to carry IDM (a GLIGEN checkpoint "
                            "grounds with its own fusers); give it one with model.adapter=DIR")
        adapter.enable_idm()  # before LoRA and the reference copy: IDM trains, and π_ref starts with the same fresh IDM
    rank = model_cfg.lora_rank if model_cfg.lora_rank >= 0 else (16 if generator.lora_by_default else 0)
    if train == "adapter":
        backbone_of(generator.denoiser).requires_grad_(False)
        if getattr(generator.denoiser, "adapter", None) is None:
            raise UserError(f"policy.train=adapter: --model {model_cfg.name} has no layout adapter (a GLIGEN checkpoint "
                            "grounds with its own fusers), so nothing would train; use policy.train=all, or give it "
                            "one with model.adapter=DIR")
    elif rank > 0:
        add_lora(generator.denoiser, rank=rank, alpha=model_cfg.lora_alpha or rank, targets=model_cfg.lora_targets)
    if model_cfg.gradient_checkpointing:
        generator.denoiser.enable_gradient_checkpointing()  # the denoiser's switch: its adapter is recomputed too
    return generator
