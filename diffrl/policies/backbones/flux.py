"""FLUX.1 (dev and schnell) from a diffusers ``FluxPipeline`` folder, as a `LayoutGenerator`.

Parts, each through its own ``from_pretrained`` in ``model.dtype``: ``transformer/`` (FluxTransformer2DModel, wrapped
with the layout adapter as `LayoutFlux`), ``vae/`` (AutoencoderKL, 16 latent channels with FLUX's shift and scale),
``text_encoder/`` + ``tokenizer/`` (CLIP-L, pooled output only) and ``text_encoder_2/`` + ``tokenizer_2/`` (T5-XXL:
FLUX's prompt tokens, so it is always loaded; ``model.t5`` changes nothing here).

What the env, the learners and the critic see stays the generic one: latents ``[B, 16, h, w]`` and a velocity of
the same shape. `LayoutFlux` packs them into FLUX's tokens (2×2 latent patches → one 64-wide token, row-major over
the (h/2)×(w/2) patch grid), runs the transformer with the latent image ids / text ids FLUX's rotary embedding needs,
and unpacks the output. Packing is a permutation, so the SDE step, its log-prob and the critic are the same on either
layout. The layout adapter's fusers run before every double-stream block (``transformer_blocks``) and every
single-stream block (``single_transformer_blocks``); both receive the image tokens as ``hidden_states`` apart from
the text tokens, so the SD3 adapter's pre-hooks apply unchanged, on the (h/2)×(w/2) patch grid. Gates start at 0.

Guidance: FLUX.1-dev is guidance-distilled. ``model.guidance_scale`` is the value fed to its guidance embedding
(``guidance=`` of the transformer, as ``FluxPipeline(guidance_scale=…)`` does; 3.5 is the pipeline's default) and
there is no classifier-free pass: one forward per step. FLUX.1-schnell has no guidance embedding; it takes only
``model.guidance_scale=1``.

Adapted from diffusers 0.42.1 ``pipelines/flux/pipeline_flux.py``:

* prompt encoding (`FluxTextEncoder`): ``_get_clip_prompt_embeds`` (CLIP's ``pooler_output``),
  ``_get_t5_prompt_embeds`` (T5's last hidden state, ``max_sequence_length`` tokens, padded) and ``encode_prompt``,
  written anew for one string at a time (diffrl's per-string cache); no textual inversion / LoRA scale / negatives.
* ``_pack_latents``, ``_unpack_latents``, ``_prepare_latent_image_ids`` (`pack`, `unpack`, `latent_image_ids`):
  the same reshapes, on latent sizes instead of pixel sizes.
* the time grid (`FluxSampler.times`): ``sigmas = linspace(1, 1/N, N)`` through the folder's
  FlowMatchEulerDiscreteScheduler with ``mu = calculate_shift(image_seq_len, …)`` (dynamic shifting), as
  ``FluxPipeline.__call__`` does; ``image_seq_len`` is fixed by the generator's resolution. ``env.shift`` ≠ 0
  replaces it by a static shift (`diffrl.policies.samplers.flow_sigmas`).
* the transformer call of the denoising loop: ``timestep = (σ·1000 in the model dtype) / 1000`` and ``guidance``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from diffrl.errors import UserError
from diffrl.policies.layout_adapter import LayoutAdapter, LayoutAdapterConfig
from diffrl.policies.samplers import FlowSampler, flow_sigmas
from diffrl.policies.text import Conditioning, TextEncoder

REQUIRED = {  # subfolder → what must be in it
    "transformer": "model weights", "vae": "model weights", "text_encoder": "model weights",
    "text_encoder_2": "model weights", "tokenizer": "tokenizer files", "tokenizer_2": "tokenizer files",
    "scheduler": "scheduler_config.json",
}


class FluxTextEncoder(TextEncoder):
    """CLIP-L pooled + T5 tokens, FLUX's prompt encoding, with `TextEncoder`'s per-string cache (module docstring)."""

    def __init__(self, clip_tokenizer, clip: nn.Module, t5_tokenizer, t5: nn.Module, max_sequence_length: int = 512,
                 cache_size: int = 4096):
        super().__init__(clip_tokenizer, nn.ModuleDict({"clip": clip, "t5": t5}), cache_size)
        self.t5_tokenizer = t5_tokenizer
        self.max_sequence_length = max_sequence_length  # T5 tokens per prompt (FluxPipeline's default: 512)
        self._pooled_cache: OrderedDict[str, Tensor] = OrderedDict()  # phrase → pooled [P] (`encode_phrases`)

    @property
    def pooled_dim(self) -> int:
        return self.model["clip"].config.hidden_size  # CLIPTextModel's pooler_output: no projection

    def encode_one(self, text: str) -> tuple[Tensor, Tensor]:
        """→ (T5 tokens [max_sequence_length, D_t5], CLIP pooled [P])."""
        ids = self.t5_tokenizer([text], padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt").input_ids.to(self.device)
        tokens = self.model["t5"](ids, output_hidden_states=False)[0]  # [1, L, D_t5]
        return tokens[0], self.pooled_one(text)

    def pooled_one(self, text: str) -> Tensor:
        """CLIP's ``pooler_output`` [P] of one string."""
        ids = self.tokenizer([text], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.model["clip"](ids, output_hidden_states=False).pooler_output[0]

    @torch.no_grad()
    def encode_phrases(self, phrases) -> Tensor:
        """Pooled CLIP [N, P] of instance phrases, in a cache of their own: a phrase's T5 tokens (512 × 4096 for
        FLUX.1, 4 MiB in bf16) are never used, so they are neither computed nor kept."""
        cache = self._pooled_cache
        for text in dict.fromkeys(t for t in phrases if t not in cache):  # one string at a time, as `encode`
            cache[text] = self.pooled_one(text)
        pooled = torch.stack([cache[t] for t in phrases])
        for t in phrases:
            cache.move_to_end(t)
        while len(cache) > self.cache_size:  # evict only after this batch is served
            cache.popitem(last=False)
        return pooled


def pack(latents: Tensor) -> Tensor:
    """[B, C, h, w] → [B, (h/2)·(w/2), 4C]: 2×2 patches as tokens, row-major over the patch grid."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """[B, (h/2)·(w/2), 4C] → [B, C, h, w], the inverse of `pack`."""
    b, _, channels = tokens.shape
    x = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def latent_image_ids(grid_h: int, grid_w: int, device, dtype) -> Tensor:
    """[grid_h·grid_w, 3] position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(grid_h, grid_w, 3)
    ids[..., 1] = torch.arange(grid_h)[:, None]
    ids[..., 2] = torch.arange(grid_w)[None, :]
    return ids.reshape(grid_h * grid_w, 3).to(device=device, dtype=dtype)


class LayoutFlux(nn.Module):
    """v = f(x_t, t, prompt, layout) for a FLUX.1 transformer, on unpacked latents [B, C, h, w].

    ``guidance``: the distilled-guidance value fed to the transformer's guidance embedding (dev), None for a model
    without one (schnell)."""

    def __init__(self, transformer: nn.Module, adapter: LayoutAdapter, guidance: float | None = 1.0):
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter
        adapter.attach(flux_blocks(transformer))
        self.guidance = guidance if transformer.config.guidance_embeds else None
        self.num_train_timesteps = 1000  # the pipeline feeds (σ·1000)/1000; the transformer scales by 1000 again

    @classmethod
    def with_new_adapter(cls, transformer: nn.Module, phrase_dim: int, **adapter_kwargs) -> "LayoutFlux":
        cfg = LayoutAdapterConfig(dim=transformer.inner_dim, phrase_dim=phrase_dim,
                                  num_blocks=len(flux_blocks(transformer)), **adapter_kwargs)
        return cls(transformer, LayoutAdapter(cfg))

    def set_guidance(self, scale: float) -> None:
        """``model.guidance_scale``: the distilled guidance of FLUX.1-dev; schnell has none (only 1 is accepted)."""
        if self.transformer.config.guidance_embeds:
            self.guidance = float(scale)
        elif scale != 1:
            raise UserError(f"config model.guidance_scale={scale:g}: this FLUX model (schnell-style) has no guidance "
                            "embedding and diffrl runs no CFG pass for FLUX; set model.guidance_scale=1")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in the backward pass, its fuser with the grounding of its forward."""
        self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=self.adapter.checkpointing_func())

    def forward(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        # x: [B, C, h, w] at flow time sigma [B] in [0, 1]; returns the velocity [B, C, h, w]
        b, _, h, w = x.shape
        dtype = next(self.transformer.parameters()).dtype
        text = cond.prompt_embeds.to(dtype)  # [B, L, D_t5]
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=x.device)
        with self.adapter.grounding(cond.phrase_embeds, cond.boxes, cond.instance_mask, (h // 2, w // 2)):
            out = self.transformer(
                hidden_states=pack(x.to(dtype)),
                timestep=(sigma * self.num_train_timesteps).to(dtype) / self.num_train_timesteps,
                guidance=guidance,
                pooled_projections=cond.pooled.to(dtype),
                encoder_hidden_states=text,
                txt_ids=text.new_zeros(text.shape[1], 3),
                img_ids=latent_image_ids(h // 2, w // 2, x.device, dtype),
                return_dict=False,
            )[0]  # [B, (h/2)·(w/2), 4C]
        return unpack(out, h, w)


def flux_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The blocks that get a fuser: the double-stream blocks, then the single-stream ones."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """``mu`` of FLUX's dynamic time shift: linear in the number of image tokens (diffusers 0.42.1
    pipelines/flux/pipeline_flux.py ``calculate_shift``, unchanged)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


class FluxSampler(FlowSampler):
    """Rectified flow with FLUX's time grid: the folder's scheduler with a resolution-dependent shift ``mu``."""

    def __init__(self, scheduler_config: dict, image_seq_len: int):
        super().__init__(shift=float(scheduler_config.get("shift", 1.0)))
        self.scheduler_config = scheduler_config
        get = scheduler_config.get
        self.mu = calculate_shift(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                                  get("base_shift", 0.5), get("max_shift", 1.15))

    def times(self, num_steps: int, shift: float = 0.0) -> Tensor:
        if shift:  # env.shift given: a static shift, as for SD3
            return flow_sigmas(num_steps, shift)
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(num_steps if sigmas is None else None, sigmas=sigmas, mu=self.mu)  # mu: ignored
        # by a scheduler without dynamic shifting, as in the pipeline
        return scheduler.sigmas.float()

    def __repr__(self) -> str:
        return f"FluxSampler(mu={self.mu:.4g})"


def check_folder(path: Path) -> None:
    """Every part is on disk, else one line naming what is missing and how to get it."""
    from diffrl.policies.backbones.sd3 import require_parts

    require_parts(path, REQUIRED, "black-forest-labs/FLUX.1-dev, gated: accept its license on the hub first")


def latent_size(vae_config, resolution: int | None) -> tuple[int, int]:
    """(image side, latent side) for ``resolution`` pixels (None: the VAE's sample_size, 1024 for FLUX.1)."""
    factor = 2 ** (len(vae_config.block_out_channels) - 1)  # 8 for FLUX.1
    resolution = int(resolution or vae_config.sample_size)
    if resolution % (2 * factor):
        raise UserError(f"config model.resolution={resolution}: FLUX packs 2×2 latent patches, so the image side must "
                        f"be a multiple of {2 * factor}")
    return resolution, resolution // factor


def load_flux_generator(path: str | Path, dtype: str = "float32", adapter: str | Path | None = None,
                        resolution: int | None = None, t5: bool = True, max_sequence_length: int = 512):
    """A ``FluxPipeline`` folder as a `LayoutGenerator` (module docstring); LoRA comes on top
    (`diffrl.policies.lora.add_lora`, done by `build_generator`), and so does ``model.guidance_scale``
    (`LayoutFlux.set_guidance`). ``t5`` is accepted for the shared option set: FLUX always needs its T5."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
    from transformers.utils import logging as hf_logging

    from diffrl.policies.layout_generator import LayoutGenerator, VAESpace
    from diffrl.policies.layout_generator import torch_dtype as _dtype

    path = Path(path)
    check_folder(path)
    torch_dtype = _dtype(dtype)
    hf_logging.disable_progress_bar()
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype)
    clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch_dtype)
    t5_model = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=torch_dtype)
    text = FluxTextEncoder(AutoTokenizer.from_pretrained(path, subfolder="tokenizer"), clip,
                           AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"), t5_model,
                           max_sequence_length=max_sequence_length)
    blocks = len(flux_blocks(transformer))
    if adapter:
        from diffrl.policies.backbones.sd3 import load_matching_adapter

        denoiser = LayoutFlux(transformer, load_matching_adapter(adapter, path, transformer.inner_dim, text.pooled_dim,
                                                                 blocks))
    else:
        heads = transformer.config.num_attention_heads  # the adapter's attention splits the width like the blocks'
        denoiser = LayoutFlux.with_new_adapter(transformer, phrase_dim=text.pooled_dim, num_heads=heads)
    _, size = latent_size(vae.config, resolution)
    space = VAESpace(vae, size=size)
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    sampler = FluxSampler(scheduler, image_seq_len=(size // 2) ** 2)
    return LayoutGenerator(denoiser, text, space, sampler, lora_by_default=True)
