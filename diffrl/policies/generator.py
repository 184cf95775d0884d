"""Loading a generator: ``--model`` → a folder → a `LayoutGenerator`, through a table of loaders, one per
pipeline class.

On disk a generator is a folder in the diffusers layout, loaded through each part's own
``from_pretrained`` — the same path whether it is the packaged Shapes model or a user's folder:

    model_index.json      {"_class_name": "diffrl.LayoutGenerator", "space": "pixels", "image_size": 32}
    transformer/          SD3Transformer2DModel.save_pretrained
    text_encoder/         CLIPTextModelWithProjection.save_pretrained
    tokenizer/            PreTrainedTokenizerFast.save_pretrained
    layout_adapter/       config.json + model.safetensors

`load_generator` also takes a user's diffusers pipeline folder (or a hub id already in the local Hugging Face
cache) and looks its ``model_index.json`` ``_class_name`` up in `LOADERS`: ``StableDiffusion3Pipeline`` →
`diffrl.policies.backbones.sd3`, ``FluxPipeline`` → `diffrl.policies.backbones.flux`, ``StableDiffusionPipeline`` /
``StableDiffusionGLIGENPipeline`` → `diffrl.policies.backbones.unet`. Each loader imports its backbone module when
it runs (a CPU install never imports FLUX's), and the backbone modules import `diffrl.policies.layout_generator`,
never this module: no import cycle. A new backbone is one loader function and one row of the table
(docs/extending.md). `build_generator` adds what a run's ``model.*`` config asks for on top (LoRA, guidance, dtype,
gradient checkpointing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from diffrl.errors import UserError
from diffrl.policies.layout_generator import (CLASS_NAME, Denoiser, LatentSpace, LayoutGenerator,  # noqa: F401
                                              VAESpace, guided, load_adapter, save_adapter, torch_dtype)

SD3_CLASS = "StableDiffusion3Pipeline"
FLUX_CLASS = "FluxPipeline"
SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionGLIGENPipeline")


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


def load_diffrl_generator(path: Path, dtype: str | None = None, **_) -> LayoutGenerator:
    """A diffrl generator folder (the Shapes model, or one `diffrl pretrain` wrote), in ``dtype`` (the adapter's
    trained weights stay float32, as in the real-model loaders)."""
    generator = LayoutGenerator.from_pretrained(path)
    if dtype not in (None, "float32"):
        generator.to(torch_dtype(dtype))
        generator.denoiser.adapter.float()
    return generator


def load_sd3(path: Path, **options) -> LayoutGenerator:
    from diffrl.policies.backbones.sd3 import load_sd3_generator

    return load_sd3_generator(path, **options)


def load_flux(path: Path, **options) -> LayoutGenerator:
    from diffrl.policies.backbones.flux import load_flux_generator

    return load_flux_generator(path, **options)


def load_sd(path: Path, **options) -> LayoutGenerator:
    from diffrl.policies.backbones.unet import load_sd_generator

    return load_sd_generator(path, **options)


# model_index.json's _class_name → the loader that builds a LayoutGenerator from such a folder, with the options
# (dtype, t5, adapter, resolution) the run's model.* config gives; each meets the `Denoiser` protocol.
LOADERS: dict[str, Callable[..., LayoutGenerator]] = {
    CLASS_NAME: load_diffrl_generator,
    SD3_CLASS: load_sd3,
    FLUX_CLASS: load_flux,
    **{name: load_sd for name in SD_CLASSES},
}


def load_generator(name_or_path: str, **options) -> LayoutGenerator:
    """``--model``: a registered name (``shapes-tiny``), a generator or diffusers pipeline folder, or a hub id in
    the local HF cache, loaded by its pipeline class's row of `LOADERS`. ``options`` (dtype, t5, adapter,
    resolution) go to the loader; None means its default."""
    path = resolve_model(name_or_path)
    options = {k: v for k, v in options.items() if v is not None}
    kind = read_index(path).get("_class_name")
    if "resolution" in options and kind != FLUX_CLASS:
        raise UserError(f"config model.resolution: only FLUX folders take it; --model {name_or_path} is {kind!r}, "
                        "set model.resolution=0")
    loader = LOADERS.get(kind)
    if loader is None:
        raise UserError(f"--model {name_or_path}: model_index.json is for {kind!r}; diffrl loads {', '.join(LOADERS)}")
    generator = loader(path, **options)
    generator.source = name_or_path
    return generator


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
