"""A layout-to-image generator as the policy sees it: denoiser + text encoder + latent space.

On disk a generator is a folder in the diffusers layout, loaded through each part's own
``from_pretrained`` — the same path whether it is the packaged Shapes model or a user's folder:

    model_index.json      {"_class_name": "diffrl.LayoutGenerator", "space": "pixels", "image_size": 32}
    transformer/          SD3Transformer2DModel.save_pretrained
    text_encoder/         CLIPTextModelWithProjection.save_pretrained
    tokenizer/            PreTrainedTokenizerFast.save_pretrained
    layout_adapter/       config.json + model.safetensors
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
from diffrl.policies.text import Conditioning, TextEncoder

CLASS_NAME = "diffrl.LayoutGenerator"


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


class LayoutGenerator(nn.Module):
    """The denoiser (trainable) with its frozen text encoder and latent space."""

    def __init__(self, denoiser: LayoutMMDiT, text: TextEncoder, space: LatentSpace):
        super().__init__()
        self.denoiser = denoiser
        self.text = text  # not a submodule: frozen, never in the policy's state dict
        self.space = space

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.space.channels, self.space.size, self.space.size)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.denoiser(x, sigma, cond)

    def encode_layouts(self, layouts: list[Layout]) -> Conditioning:
        return self.text.encode_layouts(layouts)

    def to(self, *args, **kwargs):  # the text encoder is not a submodule; move it too
        super().to(*args, **kwargs)
        self.text.model.to(*args, **kwargs)
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


def save_adapter(adapter: LayoutAdapter, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(adapter.config.to_dict(), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(path / "model.safetensors"))


def load_adapter(path: Path) -> LayoutAdapter:
    adapter = LayoutAdapter(LayoutAdapterConfig(**json.loads((path / "config.json").read_text())))
    adapter.load_state_dict(load_file(str(path / "model.safetensors")))
    return adapter


def load_generator(name_or_path: str) -> LayoutGenerator:
    """``--model``: a registered name (``shapes-tiny``) or a local generator folder."""
    from diffrl.registry import MODELS

    if name_or_path in MODELS:
        path = Path(MODELS.get(name_or_path)())
        if not (path / "model_index.json").is_file():
            raise UserError(f"model {name_or_path!r} is not installed at {path}; reinstall diffrl or run `diffrl pretrain`")
        return LayoutGenerator.from_pretrained(path)
    path = Path(name_or_path)
    if path.is_dir():
        return LayoutGenerator.from_pretrained(path)
    raise UserError(
        f"--model {name_or_path!r}: not a registered model ({', '.join(MODELS.names())}) nor a local folder; "
        "this machine cannot download weights, so download the model elsewhere and pass --model /path/to/folder"
    )
