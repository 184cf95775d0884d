"""LoRA on a generator's backbone through ``peft``, and the reference policy it makes free.

`add_lora` freezes the backbone and injects LoRA layers with diffusers' own ``add_adapter`` (peft's
``inject_adapter_in_model``), so the adapted modules keep diffusers' names and `diffrl.algos.export`
can hand them to ``StableDiffusion3Pipeline.save_lora_weights`` unchanged. ``lora_B`` starts at zero, so the
LoRA'd model is the base model until it trains. The layout adapter stays trainable beside LoRA.

The KL term needs π_ref = the initial policy. With LoRA that is the same backbone with its LoRA layers
switched off plus the layout adapter's initial weights, so `LoraReference` keeps no second copy of the
backbone: only a frozen copy of the small adapter's tensors, swapped in for its forward
(``torch.func.functional_call``). Trainable parameters are LoRA's and the adapter's — all a checkpoint
(`TrainableOnly`) or a rollout worker needs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# SD3's joint-attention projections (image and text streams), as diffusers' train_dreambooth_lora_sd3.py targets them;
# as suffixes they also hit FLUX's: both streams of its double-stream blocks, to_q/k/v of its single-stream blocks


def backbone_of(denoiser: nn.Module) -> nn.Module:
    """The diffusers model inside a denoiser (``transformer`` of an MM-DiT, ``unet`` of a UNet)."""
    for name in ("backbone", "transformer", "unet"):
        module = getattr(denoiser, name, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(denoiser).__name__} has no backbone (transformer/unet) for LoRA")


def add_lora(denoiser: nn.Module, rank: int, alpha: float, targets: list[str] | None = None) -> None:
    """Freeze the backbone and give it trainable LoRA layers (float32, whatever the backbone's dtype)."""
    from diffrl.errors import UserError

    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError("LoRA needs peft, a dependency of diffrl: pip install 'peft>=0.17' (or set model.lora_rank=0)") from None
    backbone = backbone_of(denoiser)
    backbone.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets or DEFAULT_TARGETS))
    try:
        backbone.add_adapter(config)
    except ValueError as err:  # peft: none of the target modules exist in this backbone
        raise UserError(f"config model.lora_targets {list(targets or DEFAULT_TARGETS)}: {str(err).splitlines()[0]}") from None
    for name, p in backbone.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # trained in float32 (diffusers' cast_training_params)
            p.requires_grad_(True)


def has_lora(denoiser: nn.Module) -> bool:
    try:
        backbone = backbone_of(denoiser)
    except TypeError:
        return False
    return any("lora_" in name for name, _ in backbone.named_parameters())


@contextlib.contextmanager
def lora_disabled(backbone: nn.Module):
    """The backbone without its LoRA layers inside the context (peft's switch; requires_grad flags restored)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    flags = {p: p.requires_grad for n, p in backbone.named_parameters() if "lora_" in n}
    layers = [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


class LoraReference(nn.Module):
    """π_ref's denoiser: the policy's denoiser with LoRA off and the layout adapter at its initial weights.

    Holds the policy denoiser outside its submodules (its weights are not this module's) and the
    adapter's initial tensors as buffers; forward has the denoiser's signature.
    """

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self._policy = (denoiser,)  # a tuple: not a submodule, never copied or saved with the reference
        adapter = denoiser.adapter  # None: a GLIGEN UNet grounded by its own fusers only (their LoRA switches off)
        state = adapter.state_dict() if adapter is not None else {}
        self.adapter_state = {f"adapter.{k}": v.detach().clone() for k, v in state.items()}

    @property
    def adapter(self):  # the adapter object the reference runs (its config, IDM flags …)
        return self._policy[0].adapter

    def forward(self, x: Tensor, t: Tensor, cond) -> Tensor:
        (denoiser,) = self._policy
        if denoiser.adapter is None:
            with lora_disabled(backbone_of(denoiser)):
                return denoiser(x, t, cond)
        last_dis = denoiser.adapter.last_dis  # the policy's L_dis of its last forward stays the policy's
        try:
            with lora_disabled(backbone_of(denoiser)):
                return torch.func.functional_call(denoiser, self.adapter_state, (x, t, cond), strict=False)
        finally:
            denoiser.adapter.last_dis = last_dis


class TrainableOnly(nn.Module):
    """A view of a module whose state dict is its trainable parameters only (LoRA + adapter): what a
    checkpoint of a LoRA run holds instead of the whole backbone."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._module = (module,)

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        (module,) = self._module
        return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True, assign: bool = False):
        (module,) = self._module
        params = dict(module.named_parameters())
        wanted = {name for name, p in params.items() if p.requires_grad}
        if strict and set(state) != wanted:
            missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
            raise KeyError(f"trainable weights do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        return None
