"""SD3 / SD3.5 (MM-DiT) from a diffusers ``StableDiffusion3Pipeline`` folder, as a `LayoutGenerator`.

Parts, each through its own ``from_pretrained`` in ``model.dtype``: ``transformer/`` (SD3Transformer2DModel,
wrapped with the layout adapter as `LayoutMMDiT`), ``vae/`` (AutoencoderKL: the flow runs in its 16-channel
latent space and images are decoded only at the last step), ``text_encoder/`` + ``text_encoder_2/`` (CLIP-L
and CLIP-G with projection) and, with ``model.t5``, ``text_encoder_3/`` (T5-XXL; off by default, as diffusers
allows, to save ~9 GiB). The layout adapter is new (gates 0: the base model's output until it trains; its
phrase width is the pooled CLIP width, 2048 for SD3) or loaded from ``model.adapter``.

Prompt encoding (`SD3TextEncoder`) follows diffusers 0.42.1
``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`` (``_get_clip_prompt_embeds``,
``_get_t5_prompt_embeds``, ``encode_prompt``), written anew for one string at a time (diffrl's cache):
CLIP-L's and CLIP-G's penultimate hidden states are concatenated along the width and zero-padded to the
joint attention width (T5's), T5's tokens are appended along the sequence (zeros of ``t5_max_length``
tokens when T5 is off, as diffusers does), and the pooled embedding is both CLIPs' projected pooled outputs
concatenated. Unchanged from diffusers apart from: one string per call, no clip_skip / negative prompts
(CFG's unconditional half is the empty prompt, `LayoutGenerator.null_conditioning`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffrl.errors import UserError
from diffrl.policies.text import TextEncoder

REQUIRED = {  # subfolder → what must be in it
    "transformer": "model weights", "vae": "model weights", "text_encoder": "model weights",
    "text_encoder_2": "model weights", "tokenizer": "tokenizer files", "tokenizer_2": "tokenizer files",
    "scheduler": "scheduler_config.json",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


class SD3TextEncoder(TextEncoder):
    """CLIP-L + CLIP-G (+ T5) prompt encoding of SD3 with `TextEncoder`'s per-string cache (module docstring)."""

    def __init__(self, tokenizers: list, encoders: list[nn.Module], t5_tokenizer=None, t5: nn.Module | None = None,
                 joint_dim: int = 4096, t5_max_length: int = 256, cache_size: int = 4096):
        models = nn.ModuleDict({"clip_l": encoders[0], "clip_g": encoders[1], **({"t5": t5} if t5 is not None else {})})
        super().__init__(tokenizers[0], models, cache_size)
        self.tokenizers = tokenizers
        self.t5_tokenizer = t5_tokenizer
        self.joint_dim = joint_dim  # D of the prompt tokens: the transformer's joint_attention_dim (T5's width)
        self.t5_max_length = t5_max_length

    @property
    def pooled_dim(self) -> int:
        return sum(self.model[k].config.projection_dim for k in ("clip_l", "clip_g"))

    def encode_one(self, text: str) -> tuple[Tensor, Tensor]:
        """→ (prompt tokens [77 + t5_max_length, joint_dim], pooled [P_L + P_G])."""
        max_length = self.tokenizers[0].model_max_length  # diffusers: tokenizer_max_length, used for both CLIPs
        hidden, pooled = [], []
        for tokenizer, key in zip(self.tokenizers, ("clip_l", "clip_g")):
            ids = tokenizer([text], padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = self.model[key](ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # [1, 77, D_clip] penultimate layer
            pooled.append(out.text_embeds)  # [1, P]
        clip = torch.cat(hidden, dim=-1)  # [1, 77, D_L + D_G]
        clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))  # [1, 77, joint_dim]
        if "t5" in self.model:
            ids = self.t5_tokenizer([text], padding="max_length", max_length=self.t5_max_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            t5 = self.model["t5"](ids)[0].to(clip.dtype)  # [1, t5_max_length, joint_dim]
        else:
            t5 = clip.new_zeros(1, self.t5_max_length, self.joint_dim)
        return torch.cat([clip, t5], dim=-2)[0], torch.cat(pooled, dim=-1)[0]


def check_folder(path: Path, index: dict, t5: bool) -> None:
    """Every part this run needs is on disk, else one line naming what is missing and how to get it."""
    needed = dict(REQUIRED)
    if t5:
        if not index.get("text_encoder_3") or index["text_encoder_3"][0] is None:
            raise UserError(f"config model.t5=true but {path} has no T5 text encoder (text_encoder_3 is null in "
                            "model_index.json); set model.t5=false")
        needed.update(text_encoder_3="model weights", tokenizer_3="tokenizer files")
    require_parts(path, needed, "stabilityai/stable-diffusion-3.5-medium")


def require_parts(path: Path, needed: dict[str, str], example: str) -> None:
    """Each pipeline subfolder in ``needed`` (name → "model weights", "scheduler_config.json" or any files) holds
    what it must, else one line naming every missing part and the ``hf download`` (of e.g. ``example``) that brings
    the whole pipeline."""
    missing = []
    for sub, what in needed.items():
        folder = path / sub
        files = [f.name for f in folder.iterdir()] if folder.is_dir() else []
        if what == "model weights":
            ok = "config.json" in files and any(f.endswith(WEIGHT_SUFFIXES) for f in files)
        elif what == "scheduler_config.json":
            ok = "scheduler_config.json" in files
        else:
            ok = bool(files)
        if not ok:
            missing.append(f"{sub}/ ({what})")
    if missing:
        raise UserError(f"--model {path}: missing {', '.join(missing)}; download the complete pipeline with "
                        f"`hf download <repo id> --local-dir {path}` (e.g. {example}) and pass --model "
                        "/path/to/that/folder")


def load_matching_adapter(adapter: str | Path, path: Path, dim: int, phrase_dim: int, blocks: int):
    """``model.adapter``'s layout adapter, checked to fit the backbone at ``path`` (its width, phrase width and block
    count), else one line saying what it was made for."""
    from diffrl.policies.layout_generator import load_adapter

    layout_adapter = load_adapter(Path(adapter))
    cfg = layout_adapter.config
    if cfg.dim != dim or cfg.phrase_dim != phrase_dim or cfg.num_blocks != blocks:
        raise UserError(f"config model.adapter {adapter}: made for width {cfg.dim}, phrase width {cfg.phrase_dim}, "
                        f"{cfg.num_blocks} blocks, but {path} has {dim}, {phrase_dim}, {blocks}; pass the adapter "
                        "trained on this model")
    return layout_adapter


def load_sd3_generator(path: str | Path, dtype: str = "float32", t5: bool = False, adapter: str | Path | None = None,
                       t5_max_length: int = 256):
    """A ``StableDiffusion3Pipeline`` folder as a `LayoutGenerator` (module docstring); LoRA comes on top
    (`diffrl.policies.lora.add_lora`, done by `build_generator`)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    from diffrl.policies.backbones.mmdit import LayoutMMDiT
    from diffrl.policies.layout_generator import LayoutGenerator, VAESpace
    from diffrl.policies.layout_generator import torch_dtype as _dtype
    from diffrl.policies.samplers import FlowSampler

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    check_folder(path, index, t5)
    torch_dtype = _dtype(dtype)
    hf_logging.disable_progress_bar()
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype)
    encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=sub, torch_dtype=torch_dtype)
                for sub in ("text_encoder", "text_encoder_2")]
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
    t5_model = t5_tokenizer = None
    if t5:
        from transformers import T5EncoderModel

        t5_model = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", torch_dtype=torch_dtype)
        t5_tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3")
    text = SD3TextEncoder(tokenizers, encoders, t5_tokenizer, t5_model, joint_dim=transformer.config.joint_attention_dim,
                          t5_max_length=t5_max_length)
    if adapter:
        layout_adapter = load_matching_adapter(adapter, path, transformer.inner_dim, text.pooled_dim,
                                               len(transformer.transformer_blocks))
        denoiser = LayoutMMDiT(transformer, layout_adapter)
    else:
        heads = transformer.config.num_attention_heads  # the adapter's attention splits the width like the blocks'
        denoiser = LayoutMMDiT.with_new_adapter(transformer, phrase_dim=text.pooled_dim, num_heads=heads)
    space = VAESpace(vae, size=transformer.config.sample_size)
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    sampler = FlowSampler(shift=float(scheduler.get("shift", 1.0)))  # SD3's FlowMatchEulerDiscreteScheduler: 3.0
    return LayoutGenerator(denoiser, text, space, sampler, lora_by_default=True)
