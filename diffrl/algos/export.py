"""`diffrl export RUN --out DIR`: a run's trained weights in the formats plain diffusers loads.

    DIR/pytorch_lora_weights.safetensors   LoRA of the backbone: ``pipe.load_lora_weights(DIR)`` (SD3 / FLUX: written
                                           by ``StableDiffusion3Pipeline`` / ``FluxPipeline.save_lora_weights``
                                           from peft's ``get_peft_model_state_dict``, with the LoRA config as
                                           metadata)
    DIR/layout_adapter/                    the layout adapter: config.json + model.safetensors (``model.adapter``)
    DIR/README.md                          a model card: base model, reward, algorithm, the run's metrics
A run without LoRA (the Shapes model, or ``policy.train=all`` with ``model.lora_rank=0``) exports its whole
generator folder instead (``--model DIR`` loads it), or for a diffusers model its ``transformer/``/``unet/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


from diffrl.algos.checkpoint import latest_checkpoint, read_checkpoint
from diffrl.config import TrainConfig, build_config, load_yaml, upgrade_saved
from diffrl.errors import UserError
from diffrl.policies.generator import (CLASS_NAME, FLUX_CLASS, SD3_CLASS, LayoutGenerator, build_generator, read_index,
                                      resolve_model)
from diffrl.policies.lora import TrainableOnly, backbone_of, has_lora


def load_run(run: Path) -> tuple[TrainConfig, LayoutGenerator]:
    """A run's generator with its last checkpoint's trained weights (on the CPU)."""
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None or not (run / "config.yaml").is_file():
        raise UserError(f"{run}: no config.yaml and checkpoints/ there; pass a run folder of `diffrl train`")
    cfg = build_config(upgrade_saved(load_yaml(run / "config.yaml")))
    generator = build_generator(cfg.model, cfg.policy.train)
    weights = {k[len("denoiser."):]: v for k, v in read_checkpoint(ckpt)[0].items() if k.startswith("denoiser.")}
    denoiser = generator.denoiser
    (TrainableOnly(denoiser) if has_lora(denoiser) else denoiser).load_state_dict(weights)
    return cfg, generator


def export_run(run: str | Path, out: str | Path) -> list[Path]:
    """Write the run's weights and model card into ``out`` → the paths written."""
    run, out = Path(run), Path(out)
    cfg, generator = load_run(run)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    denoiser = generator.denoiser
    base = resolve_model(cfg.model.name)
    kind = read_index(base).get("_class_name")
    written = []
    if has_lora(denoiser):
        from peft.utils import get_peft_model_state_dict

        backbone = backbone_of(denoiser)
        layers = get_peft_model_state_dict(backbone)
        metadata = backbone.peft_config["default"].to_dict()
        if kind == SD3_CLASS:
            from diffusers import StableDiffusion3Pipeline

            StableDiffusion3Pipeline.save_lora_weights(out, transformer_lora_layers=layers,
                                                       transformer_lora_adapter_metadata=metadata)
        elif kind == FLUX_CLASS:
            from diffusers import FluxPipeline

            FluxPipeline.save_lora_weights(out, transformer_lora_layers=layers,
                                           transformer_lora_adapter_metadata=metadata)
        else:
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
        written.append(out / "pytorch_lora_weights.safetensors")
    elif kind == CLASS_NAME:
        generator.save_pretrained(out)
        written.append(out / "model_index.json")
        if (record := base / "pretrain.json").is_file():  # its world: env.data='' reads it
            shutil.copyfile(record, out / "pretrain.json")
            written.append(out / "pretrain.json")
    else:
        name = "transformer" if kind in (SD3_CLASS, FLUX_CLASS) else "unet"
        backbone_of(denoiser).save_pretrained(out / name)
        written.append(out / name)
    if getattr(denoiser, "adapter", None) is not None and kind != CLASS_NAME:
        from diffrl.policies.generator import save_adapter

        save_adapter(denoiser.adapter, out / "layout_adapter")
        written.append(out / "layout_adapter")
    card = out / "README.md"
    card.write_text(model_card(cfg, run, kind, has_lora(denoiser)))
    written.append(card)
    return written


def model_card(cfg: TrainConfig, run: Path, kind: str, lora: bool) -> str:
    """A Hugging Face model card: base model, reward, algorithm and the run's base/final metrics."""
    summary_file = run / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    base = cfg.model.name
    rank = f", LoRA rank {cfg.model.lora_rank if cfg.model.lora_rank > 0 else 16}" if lora else ""
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags: [diffrl, layout-to-image, reinforcement-learning" + (", lora" if lora else "") + "]",
        "---",
        "",
        f"# {base} fine-tuned by diffrl ({cfg.algo.name.upper()}, reward {cfg.reward.name})",
        "",
        f"- base model: `{base}` ({kind})",
        f"- reward: `{cfg.reward.name}`" + (f" (detector {cfg.reward.model})" if cfg.reward.model else ""),
        f"- algorithm: {cfg.algo.name} (lr {cfg.algo.lr}, KL {cfg.algo.kl_coef}, noise level {cfg.policy.noise_level}, "
        f"RL window {cfg.policy.window}){rank}",
        f"- sampling: {cfg.env.num_steps} steps, shift {cfg.env.shift or 'of the model'}, guidance scale {cfg.model.guidance_scale}, "
        f"dtype {cfg.model.dtype}",
        f"- data: `{cfg.env.data}`, {cfg.iterations} iterations of {cfg.env.layouts_per_iter} layouts × "
        f"{cfg.env.group_size}",
        "",
    ]
    if summary:
        lines += ["## Held-out evaluation", "", "|        | ISR | mIoU | reward |", "|---|---|---|---|"]
        for name in ("base", "final"):
            m = summary[name]
            reward = f"{m['reward']:.3f}" if m.get("reward") is not None else "–"
            isr, miou = (f"{m[k]:.3f}" if m[k] is not None else "–" for k in ("isr", "miou"))
            lines.append(f"| {name} | {isr} | {miou} | {reward} |")
        where = summary.get("eval_data", f"{summary['eval_layouts']} held-out layouts")
        lines += ["", f"Evaluated on {where}; {summary['iterations']} iterations, "
                  f"{summary['wall_seconds']:.0f} s.", ""]
    if lora:
        pipeline = {SD3_CLASS: "StableDiffusion3Pipeline", FLUX_CLASS: "FluxPipeline"}.get(kind,
                                                                                            "StableDiffusionPipeline")
        lines += ["## Use", "", "```python", f"from diffusers import {pipeline}",
                  f"pipe = {pipeline}.from_pretrained({base!r})", "pipe.load_lora_weights('path/to/this/folder')",
                  "```", "",
                  "The layout adapter (boxes → grounding) is in `layout_adapter/`; diffrl loads it with "
                  "`model.adapter=path/to/this/folder/layout_adapter`. Without it the LoRA alone is a prompt-only "
                  "fine-tune.", ""]
    return "\n".join(lines)
