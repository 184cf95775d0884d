"""Rollout and train-step cost of an SD3.5-Medium-sized layout policy, built with random weights (no download).

    python benchmarks/sd35_step.py                       # full size on a CUDA GPU, tiny size on a CPU
    python benchmarks/sd35_step.py --size full --batch 4 --resolution 1024
    python benchmarks/sd35_step.py --size tiny --configs fp32-lora fp32-full

The model is diffusers' ``SD3Transformer2DModel`` with the SD3.5-Medium config (24 joint blocks of width 1536,
dual attention in blocks 0–12, RMS q/k norm, 16 latent channels, 2×2 patches) plus diffrl's layout adapter
(`LayoutMMDiT.with_new_adapter`), fed random conditioning of the real shapes: 333 prompt tokens of width 4096
(77 CLIP + 256 T5 positions, zeros when T5 is off — the same length either way), a 2048-d pooled vector and
6 grounding boxes. ``--size tiny`` keeps the structure at a width a CPU runs in seconds.

Per configuration (dtype × LoRA or full fine-tuning × gradient checkpointing) it reports:

* **rollout latents/s** — latents advanced one denoising step per second: one no-grad forward of the policy with
  classifier-free guidance (conditional and unconditional halves in one batch), the SDE mean/std and a sampled
  next latent with its fp32 log-prob;
* **train step s** — one PPO-style step on a window step: the policy forward with gradients, the reference
  forward (LoRA: `LoraReference`, the same weights with LoRA off; full: a frozen copy), the clipped-ratio loss plus the
  KL term in fp32, backward, gradient clipping and an AdamW step;
* **peak memory** — ``torch.cuda.max_memory_allocated`` over the configuration on a GPU; the process's peak RSS on
  a CPU (monotonic over the run, so read it as an upper bound);
* **TFLOP/s** — the FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts for the rollout step and for the
  train step, divided by their measured times.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffrl.policies.backbones.mmdit import LayoutMMDiT
from diffrl.policies.generator import guided
from diffrl.policies.lora import LoraReference, add_lora
from diffrl.policies.sde import gaussian_log_prob, sde_mean_std
from diffrl.policies.text import Conditioning

# SD3.5-Medium's transformer/config.json (stabilityai/stable-diffusion-3.5-medium)
FULL = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
TINY = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
    pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm",
)
PROMPT_TOKENS = 333  # 77 CLIP-L/G + 256 T5 positions
INSTANCES = 6


@dataclass
class Setup:
    name: str
    dtype: torch.dtype
    lora: bool
    checkpointing: bool


SETUPS = {
    "bf16-lora-ckpt": Setup("bf16-lora-ckpt", torch.bfloat16, True, True),
    "bf16-lora": Setup("bf16-lora", torch.bfloat16, True, False),
    "bf16-full-ckpt": Setup("bf16-full-ckpt", torch.bfloat16, False, True),
    "fp32-lora-ckpt": Setup("fp32-lora-ckpt", torch.float32, True, True),
    "fp32-lora": Setup("fp32-lora", torch.float32, True, False),
    "fp32-full": Setup("fp32-full", torch.float32, False, False),
}


def build_policy(config: dict, setup: Setup, lora_rank: int, device: torch.device):
    """The layout policy and its reference: adapters disabled (LoRA) or a frozen copy (full fine-tuning)."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(**config)
    policy = LayoutMMDiT.with_new_adapter(transformer, phrase_dim=config["pooled_projection_dim"], num_heads=4)
    with torch.no_grad():  # open the gates so the adapter's cost is the cost of a trained one
        for name, p in policy.adapter.named_parameters():
            if "gate" in name:
                p.fill_(0.1)
    policy.to(device, setup.dtype)
    if setup.lora:  # LoRA in fp32 on the frozen backbone; π_ref = LoRA off + the adapter's initial weights
        add_lora(policy, rank=lora_rank, alpha=lora_rank)
        reference = LoraReference(policy)
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
    if setup.checkpointing:
        policy.enable_gradient_checkpointing()
    return policy, reference


def random_conditioning(batch: int, config: dict, device: torch.device, generator: torch.Generator) -> Conditioning:
    boxes = torch.rand(batch, INSTANCES, 2, generator=generator) * 0.5
    boxes = torch.cat([boxes, boxes + 0.2 + torch.rand(batch, INSTANCES, 2, generator=generator) * 0.3], dim=-1)
    return Conditioning(
        prompt_embeds=torch.randn(batch, PROMPT_TOKENS, config["joint_attention_dim"], generator=generator),
        pooled=torch.randn(batch, config["pooled_projection_dim"], generator=generator),
        phrase_embeds=torch.randn(batch, INSTANCES, config["pooled_projection_dim"], generator=generator),
        boxes=boxes.clamp(0, 1),
        instance_mask=torch.ones(batch, INSTANCES, dtype=torch.bool),
    ).to(device)


def unconditional(cond: Conditioning) -> Conditioning:
    """CFG's unconditional half: no prompt (zeros: the benchmark has no text encoder), no grounding."""
    return Conditioning(torch.zeros_like(cond.prompt_embeds), torch.zeros_like(cond.pooled),
                        torch.zeros_like(cond.phrase_embeds), cond.boxes, torch.zeros_like(cond.instance_mask))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocator, kernels, autotuning)
    synchronize(device)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - tic)
    return min(times)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench(config: dict, setup: Setup, args, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(0)
    policy, reference = build_policy(config, setup, args.lora_rank, device)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)
    size = config["sample_size"]
    b = args.batch
    x = torch.randn(b, config["in_channels"], size, size, generator=gen).to(device)
    t = torch.full((b,), 0.9, device=device)
    t_next = torch.full((b,), 0.8, device=device)
    cond = random_conditioning(b, config, device, gen)
    uncond = unconditional(cond)
    advantages = torch.randn(b, generator=gen).to(device)

    @torch.no_grad()
    def rollout_step():
        v = guided(policy, x, t, cond, uncond, args.guidance)
        mean, std = sde_mean_std(v, t, t_next, x, args.noise_level)
        sample = mean + std * torch.randn_like(mean)
        return sample, gaussian_log_prob(sample, mean, std)

    sample, old_log_prob = rollout_step()

    def train_step():
        mean, std = sde_mean_std(guided(policy, x, t, cond, uncond, args.guidance), t, t_next, x, args.noise_level)
        log_prob = gaussian_log_prob(sample, mean, std) / mean[0].numel()
        ratio = torch.exp(log_prob - old_log_prob / mean[0].numel())
        clipped = torch.clamp(ratio, 0.8, 1.2)
        loss = -torch.minimum(ratio * advantages, clipped * advantages).mean()
        with torch.no_grad():
            ref_mean, _ = sde_mean_std(guided(reference, x, t, cond, uncond, args.guidance),
                                       t, t_next, x, args.noise_level)
        kl = ((mean - ref_mean) ** 2).flatten(1).sum(1) / (2 * std.flatten() ** 2)
        loss = loss + 0.01 * kl.mean() / mean[0].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rollout_s = timed(rollout_step, args.repeats, device)
    train_s = timed(train_step, args.repeats, device)
    rollout_flops = count_flops(rollout_step)
    train_flops = count_flops(train_step)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "config": setup.name,
        "params_M": sum(p.numel() for p in policy.parameters()) / 1e6,
        "trainable_M": sum(p.numel() for p in trainable) / 1e6,
        "rollout_latents_per_s": b / rollout_s,
        "rollout_tflops": rollout_flops / rollout_s / 1e12,
        "train_step_s": train_s,
        "train_tflops": train_flops / train_s / 1e12,
        "rollout_gflop": rollout_flops / 1e9,
        "train_gflop": train_flops / 1e9,
        "peak_gib": peak / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["auto", "full", "tiny"], default="auto",
                        help="SD3.5-Medium size or a tiny one (auto: full on CUDA, tiny on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=0, help="image side in pixels (0: 1024 full, 128 tiny)")
    parser.add_argument("--batch", type=int, default=0, help="latents per step before CFG doubling (0: 4 full, 2 tiny)")
    parser.add_argument("--configs", nargs="+", choices=list(SETUPS), default=None,
                        help="configurations to run (default: bf16 ones on CUDA, fp32 ones on CPU)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: 64 full, 8 tiny)")
    parser.add_argument("--guidance", type=float, default=4.5, help="CFG scale (SD3.5-Medium's usual value)")
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "tiny")
    config = dict(FULL if size == "full" else TINY)
    resolution = args.resolution or (1024 if size == "full" else 128)
    config["sample_size"] = resolution // 8  # the VAE's 8× downsampling
    args.batch = args.batch or (4 if size == "full" else 2)
    args.lora_rank = args.lora_rank or (64 if size == "full" else 8)
    configs = args.configs or ([k for k in SETUPS if k.startswith("bf16")] if device.type == "cuda"
                               else [k for k in SETUPS if k.startswith("fp32")])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tokens = (config["sample_size"] // config["patch_size"]) ** 2
    print(f"# {size} SD3.5-Medium-shaped policy on {name}: {resolution}px ({tokens} image tokens + {PROMPT_TOKENS} "
          f"text tokens), batch {args.batch} (×2 with CFG {args.guidance}), LoRA rank {args.lora_rank}")
    header = ("config", "params M", "trainable M", "rollout latents/s", "rollout TFLOP/s", "train step s",
              "train TFLOP/s", "GFLOP rollout/train", "peak GiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key in configs:
        setup = SETUPS[key]
        with contextlib.suppress(torch.cuda.OutOfMemoryError) if device.type == "cuda" else contextlib.nullcontext():
            r = bench(config, setup, args, device)
            print(f"| {r['config']} | {r['params_M']:.1f} | {r['trainable_M']:.2f} | {r['rollout_latents_per_s']:.2f} | "
                  f"{r['rollout_tflops']:.3f} | {r['train_step_s']:.3f} | {r['train_tflops']:.3f} | "
                  f"{r['rollout_gflop']:.1f} / {r['train_gflop']:.1f} | {r['peak_gib']:.2f} |", flush=True)
            continue
        print(f"| {setup.name} | out of memory at batch {args.batch} |")


if __name__ == "__main__":
    main()
