"""The SD1.x UNet path: diffusers' ``UNet2DConditionModel`` with layout grounding, its DDIM sampler and loader.

Grounding comes in one of two ways (both may be present):

* **our layout adapter** (`diffrl.policies.layout_adapter`), its fusers run as pre-hooks on every
  ``BasicTransformerBlock`` of the UNet (down, up and mid blocks; widths such as 320/640/1280 and token grids
  at 1/1, 1/2, 1/4 … of the latent grid). A plain SD1.x checkpoint gets a fresh one (gates 0: the UNet's own
  output until it trains). I-DRUID's IDM lives in it, so L_dis needs it.
* **GLIGEN's own gated fusers**, in a checkpoint built with ``attention_type="gated"`` (diffusers'
  ``StableDiffusionGLIGENPipeline`` format: a ``position_net`` and a ``fuser`` per block). They are fed the way
  diffusers 0.42 pipelines/deprecated/stable_diffusion_gligen/pipeline_stable_diffusion_gligen.py feeds them:
  ``cross_attention_kwargs={"gligen": {"boxes" [N, 30, 4], "positive_embeddings" [N, 30, P], "masks" [N, 30]}}``,
  padded to GLIGEN's 30 objects, each phrase embedded as the CLIP text model's ``pooler_output``, and the
  unconditional half of CFG given masks 0 (a `Conditioning` with ``instance_mask`` all False). What differs
  from that pipeline: its scheduled sampling (fusers off after the first 30% of steps) is not applied — the
  fusers are on at every step — and inpainting inputs are not supported. Such a checkpoint has no adapter
  unless one is given (``adapter=``), and then IDM is not available.

The denoiser predicts ε (or v, as its scheduler config says) at time t ∈ [0, 1], fed to the UNet as the
integer timestep ``round(t·num_train_timesteps)``. `DDIMSampler` turns it into a step with
`diffrl.policies.sde.ddim_mean_std` (DDIM with η = the policy's noise level).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from diffrl.errors import UserError
from diffrl.policies.layout_adapter import LayoutAdapter, LayoutAdapterConfig
from diffrl.policies.samplers import as_batch_times
from diffrl.policies.sde import ddim_mean_std
from diffrl.policies.text import Conditioning, TextEncoder

GLIGEN_MAX_OBJECTS = 30  # the pipeline's max_objs: GLIGEN was trained with 30 grounding slots


def discrete_timestep(t: Tensor, num_train_timesteps: int) -> Tensor:
    """Times [B] in [0, 1] → the UNet's integer timesteps [B] (int64), ``round(t·N)`` within [0, N − 1]."""
    return (t.float() * num_train_timesteps).round().clamp(0, num_train_timesteps - 1).long()


def transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    """Every ``BasicTransformerBlock`` of the UNet, in module order (down, up, mid blocks as diffusers registers them)."""
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def has_gligen(unet: nn.Module) -> bool:
    """Was the UNet built with GLIGEN's gated fusers (``attention_type="gated"``)?"""
    return getattr(unet, "position_net", None) is not None


def gligen_inputs(cond: Conditioning, dtype: torch.dtype) -> dict[str, Tensor]:
    """The ``cross_attention_kwargs["gligen"]`` of a batch: boxes, phrase embeddings, masks padded to 30 objects."""
    n, k = cond.instance_mask.shape
    if k > GLIGEN_MAX_OBJECTS:
        raise UserError(f"a GLIGEN model grounds at most {GLIGEN_MAX_OBJECTS} instances per layout, got {k}")
    device = cond.boxes.device
    boxes = torch.zeros(n, GLIGEN_MAX_OBJECTS, 4, device=device, dtype=dtype)
    embeds = torch.zeros(n, GLIGEN_MAX_OBJECTS, cond.phrase_embeds.shape[-1], device=device, dtype=dtype)
    masks = torch.zeros(n, GLIGEN_MAX_OBJECTS, device=device, dtype=dtype)
    boxes[:, :k] = cond.boxes.to(dtype)
    embeds[:, :k] = cond.phrase_embeds.to(dtype)
    masks[:, :k] = cond.instance_mask.to(dtype)
    return {"boxes": boxes, "positive_embeddings": embeds, "masks": masks}


class LayoutUNet(nn.Module):
    """ε = f(x_t, t, prompt, layout) for an SD1.x UNet, grounded by our adapter and/or GLIGEN's fusers."""

    def __init__(self, unet: nn.Module, adapter: LayoutAdapter | None, num_train_timesteps: int = 1000):
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        self.num_train_timesteps = num_train_timesteps
        self.gligen = has_gligen(unet)
        if adapter is None and not self.gligen:
            raise ValueError("a UNet without GLIGEN's fusers needs a layout adapter to see layouts")
        if adapter is not None:
            adapter.attach(transformer_blocks(unet))  # a plain list: the blocks stay registered under unet only

    @classmethod
    def with_new_adapter(cls, unet: nn.Module, phrase_dim: int, num_train_timesteps: int = 1000,
                         **adapter_kwargs) -> "LayoutUNet":
        """The UNet with a fresh adapter (gates 0): grounding tokens at the text width, one fuser per block."""
        return cls(unet, LayoutAdapter(new_adapter_config(unet, phrase_dim, **adapter_kwargs)), num_train_timesteps)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the UNet's blocks in the backward pass (our fusers with the grounding of their forward)."""
        func = self.adapter.checkpointing_func() if self.adapter is not None else None
        self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=func)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        # x: [B, C, H, W] latents at times t [B] in [0, 1]; returns the UNet's prediction (ε) [B, C, H, W]
        dtype = self.unet.dtype
        kwargs = {}
        if self.gligen:
            kwargs["cross_attention_kwargs"] = {"gligen": gligen_inputs(cond, dtype)}
        if self.adapter is not None:
            grounding = self.adapter.grounding(cond.phrase_embeds, cond.boxes, cond.instance_mask,
                                               (x.shape[-2], x.shape[-1]))  # the finest token grid: the latent's
        else:
            grounding = contextlib.nullcontext()
        with grounding:
            return self.unet(
                x.to(dtype),
                discrete_timestep(t, self.num_train_timesteps),
                encoder_hidden_states=cond.prompt_embeds.to(dtype),
                return_dict=False,
                **kwargs,
            )[0]


def new_adapter_config(unet: nn.Module, phrase_dim: int, **adapter_kwargs) -> LayoutAdapterConfig:
    """A layout adapter's sizes for this UNet: tokens at the cross-attention width, one fuser per block at its width,
    as many heads as the UNet's attention (when it is one number dividing every width) or 8."""
    blocks = transformer_blocks(unet)
    dims = [block.attn1.to_q.in_features for block in blocks]
    heads = unet.config.num_attention_heads or unet.config.attention_head_dim
    if not isinstance(heads, int) or any(d % heads for d in dims):
        heads = 8
    token_dim = unet.config.cross_attention_dim
    if not isinstance(token_dim, int):
        token_dim = max(dims)
    adapter_kwargs.setdefault("num_heads", heads)
    return LayoutAdapterConfig(dim=token_dim, phrase_dim=phrase_dim, num_blocks=len(blocks), dims=dims,
                               **adapter_kwargs)


class DDIMSampler:
    """DDIM with η for an ε- (or v-) predicting UNet, from a diffusers scheduler config (the pipeline's ``scheduler/``).

    Times are ``timestep / num_train_timesteps`` on the schedule ``DDIMScheduler.set_timesteps`` gives, then 0
    after the last step; a step goes from ᾱ at its time to ᾱ at the next (ᾱ of time 0 is the scheduler's
    ``final_alpha_cumprod``), which is diffusers' own step on SD1.x's "leading" spacing. The noise level is η.
    """

    def __init__(self, scheduler_config: dict | None = None):
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(dict(scheduler_config or {}))
        cfg = self.scheduler.config
        if cfg.thresholding:
            raise UserError("the scheduler config asks for dynamic thresholding, which the DDIM policy step does not do")
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"scheduler prediction_type {cfg.prediction_type!r}: diffrl's UNet path trains epsilon or "
                            "v_prediction models")
        self.prediction = cfg.prediction_type
        self.num_train_timesteps = cfg.num_train_timesteps
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float()  # [N] ᾱ of each training timestep
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        self.clip_sample = cfg.clip_sample_range if cfg.clip_sample else None

    def times(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """[T+1]: the DDIM timesteps / N, then 0 (``shift`` is a flow-schedule setting and is ignored here)."""
        self.scheduler.set_timesteps(num_steps)
        timesteps = self.scheduler.timesteps
        if (timesteps == 0).any() and self.final_alpha_cumprod != float(self.alphas_cumprod[0]):
            raise UserError("the scheduler config's schedule reaches timestep 0 with set_alpha_to_one=true, so time 0 "
                            "would mean two noise levels; use steps_offset=1 (as SD1.x does)")
        return torch.cat([timesteps.float() / self.num_train_timesteps, torch.zeros(1)])

    def alpha_bar(self, t: Tensor, last_is_final: bool = False) -> Tensor:
        """ᾱ [B] at times t [B]; with ``last_is_final``, time 0 is after the last step (``final_alpha_cumprod``)."""
        alphas = self.alphas_cumprod.to(t.device)[discrete_timestep(t, self.num_train_timesteps)]
        if last_is_final:
            alphas = torch.where(t <= 0, torch.full_like(alphas, self.final_alpha_cumprod), alphas)
        return alphas

    def mean_std(self, model_output: Tensor, t, t_next, sample: Tensor, noise_level) -> tuple[Tensor, Tensor]:
        b, device = sample.shape[0], sample.device
        alpha = self.alpha_bar(as_batch_times(t, b, device))
        alpha_prev = self.alpha_bar(as_batch_times(t_next, b, device), last_is_final=True)
        return ddim_mean_std(model_output, alpha, alpha_prev, sample, noise_level, self.prediction, self.clip_sample)

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε (diffusers' ``add_noise``) at the timestep of each t [B]."""
        a = self.alpha_bar(t).view(-1, *([1] * (x0.ndim - 1)))  # [B, 1, 1, 1]
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """ε, or v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 for a v-prediction model (diffusers' ``get_velocity``)."""
        if self.prediction == "epsilon":
            return noise
        a = self.alpha_bar(t).view(-1, *([1] * (x0.ndim - 1)))
        return a**0.5 * noise - (1 - a) ** 0.5 * x0

    def __repr__(self) -> str:
        return f"DDIMSampler(prediction={self.prediction!r}, num_train_timesteps={self.num_train_timesteps})"


class CLIPTextEncoder(TextEncoder):
    """SD1.x's ``CLIPTextModel``: the last hidden state [77, 768] as the prompt tokens, ``pooler_output`` [768]
    as the pooled embedding and as each phrase's embedding (what GLIGEN feeds its position net)."""

    @property
    def pooled_dim(self) -> int:
        return self.model.config.hidden_size

    def encode_one(self, text: str) -> tuple[Tensor, Tensor]:
        tokens = self.tokenizer(
            [text], padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(input_ids=tokens["input_ids"])
        return out.last_hidden_state[0], out.pooler_output[0]


def load_sd_generator(path: str | Path, dtype: str = "float32", adapter: str | Path | None = None, t5: bool = False):
    """An SD1.x / GLIGEN pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) as a `LayoutGenerator`.

    ``adapter``: a layout adapter folder (config.json + model.safetensors); without one, the folder's own
    ``layout_adapter/`` if it has one, else a fresh adapter for a plain SD1.x UNet and none for a GLIGEN UNet.
    IDM comes on top, like LoRA (`diffrl.policies.generator.build_generator`, ``model.idm``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel
    from transformers.utils import logging as hf_logging

    from diffrl.policies.layout_generator import LayoutGenerator, VAESpace, load_adapter
    from diffrl.policies.layout_generator import torch_dtype as _dtype

    if t5:
        raise UserError("config model.t5 is for SD3; an SD1.x model has one CLIP text encoder (set model.t5=false)")
    path = Path(path)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / part).is_dir():
            raise UserError(f"--model {path}: an SD1.x pipeline folder needs {part}/, and it is missing")
    torch_dtype = _dtype(dtype)
    hf_logging.disable_progress_bar()
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype)
    text_model = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    sampler = DDIMSampler(scheduler_config)

    if adapter is None and (path / "layout_adapter" / "config.json").is_file():
        adapter = path / "layout_adapter"
    if adapter is not None:
        layout_adapter = load_adapter(Path(adapter))
        if len(layout_adapter.fusers) != len(transformer_blocks(unet)):
            raise UserError(f"layout adapter {adapter} has {len(layout_adapter.fusers)} fusers but the UNet in {path} "
                            f"has {len(transformer_blocks(unet))} transformer blocks: it was made for another model")
    elif has_gligen(unet):
        layout_adapter = None
    else:
        layout_adapter = LayoutAdapter(new_adapter_config(unet, text_model.config.hidden_size))
    denoiser = LayoutUNet(unet, layout_adapter, sampler.num_train_timesteps)
    space = VAESpace(vae, size=unet.config.sample_size)
    return LayoutGenerator(denoiser, CLIPTextEncoder(tokenizer, text_model), space, sampler, lora_by_default=True)
