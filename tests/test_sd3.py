"""SD3 / SD3.5 through the real diffusers path: a tiny random StableDiffusion3Pipeline built from configs in code
(tokenizers made locally), saved in the standard pipeline layout, loaded by `diffrl train --model DIR`, trained
with LoRA, exported, and loaded back into plain diffusers."""

import json

import pytest
import torch
from safetensors import safe_open

from diffrl.cli import main
from diffrl.policies.text import build_word_tokenizer
from diffrl.shapes.world import sample_layouts
from tests.conftest import assert_lora_changes_the_output

WORDS = ["a", "an", "and", ",", "red", "green", "blue", "yellow", "white", "black", "square", "circle", "triangle"]
TINY = ["env.layouts_per_iter=2", "env.group_size=2", "env.num_steps=2", "env.levels=[2]", "eval.layouts=2",
        "eval.levels=[2]", "eval.batch_size=2", "eval.grid=2", "algo.lr=1e-3", "model.lora_rank=4", "--quiet"]


def build_tiny_sd3(path, seed: int = 0):
    """A random SD3 pipeline: 2-block MM-DiT on 16-channel 16×16 latents, a 2-level VAE (32×32 images), two tiny
    CLIPs with projection, no T5 — written with save_pretrained like a hub download."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(WORDS, 16)
    clip = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, projection_dim=32, pad_token_id=0, bos_token_id=1,
                eos_token_id=3)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                          caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16,
                          norm_num_groups=8, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
                          use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def test_folder_is_a_standard_diffusers_pipeline(sd3_folder):
    index = json.loads((sd3_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (sd3_folder / sub).is_dir(), sub


def test_prompt_encoding_matches_diffusers(sd3_folder, one_thread):
    """Our SD3 encoding (written anew, one string at a time) equals StableDiffusion3Pipeline.encode_prompt."""
    from diffusers import StableDiffusion3Pipeline

    from diffrl.policies.generator import load_generator

    generator = load_generator(str(sd3_folder))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None)
    prompts = ["a red square and a blue circle", ""]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
    hidden, ours_pooled = generator.text.encode(prompts)
    assert hidden.shape == (2, 16 + 256, 64) and ours_pooled.shape == (2, 64)  # 16 CLIP + 256 (zero) T5 tokens
    torch.testing.assert_close(hidden, embeds)
    torch.testing.assert_close(ours_pooled, pooled)
    # the layout adapter's phrase width is the pooled CLIP width; fresh gates are 0
    assert generator.denoiser.adapter.config.phrase_dim == 64 == generator.text.pooled_dim
    assert generator.latent_shape == (16, 16, 16) and generator.space.image_size == 32


def test_ode_rollout_matches_the_diffusers_pipeline(sd3_folder, one_thread):
    """Noise level 0, guidance 1, fresh adapter: our env + actor sample exactly what StableDiffusion3Pipeline does."""
    from diffusers import StableDiffusion3Pipeline

    from diffrl.eval.evaluate import generate
    from diffrl.policies.generator import load_generator
    from diffrl.layout import Layout

    generator = load_generator(str(sd3_folder))
    layout = Layout("a red square", ["red square"], [[0.1, 0.1, 0.6, 0.6]])
    images = generate(generator, [layout], num_steps=3, seed=7, progress=False)  # [1, 3, 32, 32]
    x_T = torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(7))  # the env's first draw
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None)
    theirs = pipe(layout.prompt, num_inference_steps=3, guidance_scale=1.0, latents=x_T, height=32, width=32,
                  output_type="pt").images
    torch.testing.assert_close(images, theirs, atol=1e-5, rtol=0)


def test_guidance_is_one_batched_forward_of_both_halves(sd3_folder, one_thread):
    from diffrl.policies.generator import load_generator

    generator = load_generator(str(sd3_folder))
    cond = generator.encode_layouts(sample_layouts(2, [2], seed=0))
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([0.9, 0.6])
    with torch.no_grad():
        c = generator.velocity(x, t, cond)
        u = generator.velocity(x, t, generator.null_conditioning(cond))
        generator.guidance_scale = 4.0
        guided = generator.guided_output(x, t, cond)
        mean, std = generator.step_mean_std(x, t, torch.tensor([0.6, 0.3]), cond, 0.0)
    torch.testing.assert_close(guided, u + 4.0 * (c - u), atol=1e-5, rtol=1e-5)
    # the ODE step with guidance: x + (t_next − t)·v_guided, float32
    torch.testing.assert_close(mean, x + torch.tensor([-0.3, -0.3]).view(2, 1, 1, 1) * guided, atol=1e-5, rtol=1e-5)
    assert mean.dtype == std.dtype == torch.float32 and torch.equal(std, torch.zeros(2, 1, 1, 1))


def test_lora_reference_is_the_base_model_without_a_second_backbone(sd3_folder, one_thread):
    from diffrl.algos.replica import frozen_copy
    from diffrl.distributed.ray_workers import trainable_weights
    from diffrl.policies.generator import load_generator
    from diffrl.policies.lora import add_lora, has_lora

    generator = load_generator(str(sd3_folder))
    cond = generator.encode_layouts(sample_layouts(2, [2], seed=0))
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([0.9, 0.6])
    with torch.no_grad():
        base = generator.velocity(x, t, cond)
    add_lora(generator.denoiser, rank=4, alpha=4, targets=None)
    assert has_lora(generator.denoiser)
    with torch.no_grad():
        torch.testing.assert_close(generator.velocity(x, t, cond), base, rtol=0, atol=0)  # lora_B = 0 at first
    reference = frozen_copy(generator)
    assert not list(reference.parameters())  # no weights of its own: it runs the policy's backbone
    with torch.no_grad():
        for name, p in generator.denoiser.named_parameters():
            if "lora_B" in name or "gate" in name:
                p.add_(0.1)  # "train" LoRA and the adapter
        trained = generator.velocity(x, t, cond)
        ref = reference.velocity(x, t, cond)
    assert not torch.allclose(trained, base)
    torch.testing.assert_close(ref, base, rtol=0, atol=1e-6)  # LoRA off + the adapter's initial weights
    weights = trainable_weights(generator)  # what rollout workers receive
    assert weights and all("lora_" in k or k.startswith("adapter.") for k in weights)
    assert all(p.requires_grad for k, p in generator.denoiser.named_parameters() if k in weights)  # flags restored


def test_critic_reads_16_channel_latents_and_2048_pooled_text():
    from diffrl.layout import Layout
    from diffrl.policies.critic import ValueNet
    from diffrl.policies.text import Conditioning, ConditionStore

    store = ConditionStore()
    n = 3
    store.set([Layout("a red square", ["red square"], [[0, 0, 1, 1]])] * n,
              Conditioning(torch.zeros(n, 4, 8), torch.randn(n, 2048), torch.zeros(n, 1, 2048), torch.zeros(n, 1, 4),
                           torch.ones(n, 1, dtype=torch.bool)))
    critic = ValueNet(store, latent_channels=16, text_dim=2048)
    value = critic(torch.randn(n, 16, 128, 128, dtype=torch.bfloat16), torch.rand(n), torch.arange(n))
    assert value.shape == (n, 1) and value.dtype == torch.float32
    assert sum(p.numel() for p in critic.parameters()) < 1_000_000  # cheap features, never a backbone


@pytest.mark.parametrize("algo,extra", [
    ("ppo", []),
    ("grpo", ["model.dtype=bfloat16", "model.guidance_scale=3", "model.gradient_checkpointing=true"]),
    ("awm", []),  # CFG-free, as the forward-process papers train
    ("nft", ["model.guidance_scale=3"]),  # with CFG in the rollouts; the loss trains the conditional velocity
])
def test_train_export_and_load_in_plain_diffusers(sd3_folder, tmp_path, algo, extra, one_thread):
    from diffusers import StableDiffusion3Pipeline

    run = tmp_path / "run"
    assert main(["train", "--model", str(sd3_folder), "--algo", algo, "--iterations", "2", "--out", str(run),
                 "--reward", "shapes", *TINY, *extra]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(abs(line["kl_ref"]) < 1e3 for line in lines)
    # the checkpoint holds LoRA + adapter (+ critic), optimizer and RNG state — never the backbone
    (ckpt,) = (run / "checkpoints").glob("checkpoint-*.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        keys = list(f.keys())
        denoiser_bytes = sum(f.get_tensor(k).numel() * 4 for k in keys if k.startswith("denoiser."))
    denoiser = [k for k in keys if k.startswith("denoiser.")]
    assert denoiser and all("lora_" in k or k.startswith("denoiser.adapter.") for k in denoiser)
    assert all(k.split(".")[0] in ("denoiser", "critic", "optimizer", "rng", "nft_old") for k in keys)
    assert any(k.startswith("nft_old.") for k in keys) == (algo == "nft")  # v_old: LoRA + adapter only, as above
    assert any(k.startswith("critic.") for k in keys) == (algo == "ppo")
    backbone_bytes = sum(p.stat().st_size for p in (sd3_folder / "transformer").glob("*.safetensors"))
    assert denoiser_bytes < 0.5 * backbone_bytes
    if algo != "ppo":
        return
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "layout_adapter" / "config.json").is_file() and (out / "layout_adapter" / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert f"base_model: {sd3_folder}" in card and "ppo" in card and "| final |" in card
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None)
    assert_lora_changes_the_output(pipe, out, size=32)


def test_missing_weights_say_what_to_download(sd3_folder, tmp_path, capsys):
    import shutil

    assert main(["train", "--model", "nobody-here/not-a-cached-model", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "hf download nobody-here/not-a-cached-model --local-dir DIR" in err and "--model DIR" in err
    assert len(err.splitlines()) == 1
    broken = tmp_path / "broken"
    shutil.copytree(sd3_folder, broken)
    shutil.rmtree(broken / "vae")
    assert main(["train", "--model", str(broken), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing vae/" in err and "hf download" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_gradient_checkpointing_recomputes_the_adapter_too(sd3_folder, one_thread):
    """Same loss and gradients with the blocks recomputed in backward (the fusers' grounding comes back)."""
    from diffrl.policies.generator import load_generator

    generator = load_generator(str(sd3_folder))
    for fuser in generator.denoiser.adapter.fusers:
        fuser.gate_attn.data.fill_(0.5)  # grounding matters
    cond = generator.encode_layouts(sample_layouts(2, [2], seed=0))
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([0.9, 0.6])

    def grads():
        generator.denoiser.zero_grad(set_to_none=True)
        generator.velocity(x, t, cond).square().mean().backward()
        return {k: p.grad.clone() for k, p in generator.denoiser.named_parameters() if p.grad is not None}

    plain = grads()
    generator.denoiser.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any(k.startswith("adapter.") for k in plain)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-6)


def test_bf16_backbone_trains_a_float32_adapter(sd3_folder, one_thread):
    """A bf16 model's trainable layout adapter stays float32: an lr-1e-5 step on bf16 weights would round away."""
    from diffrl.config import ModelConfig
    from diffrl.policies.generator import build_generator

    generator = build_generator(ModelConfig(name=str(sd3_folder), dtype="bfloat16", lora_rank=0), train="adapter")
    denoiser = generator.denoiser
    assert {p.dtype for p in denoiser.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in denoiser.adapter.parameters()} == {torch.float32}
    for fuser in denoiser.adapter.fusers:
        fuser.gate_attn.data.fill_(0.5)
    cond = generator.encode_layouts(sample_layouts(2, [2], seed=0))
    out = generator.velocity(torch.randn(2, 16, 16, 16), torch.tensor([0.9, 0.6]), cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in denoiser.adapter.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_the_folders_scheduler_shift_is_the_default_time_shift(sd3_folder, tmp_path):
    import shutil

    from diffrl.policies.generator import load_generator
    from diffrl.policies.samplers import flow_sigmas

    folder = tmp_path / "sd3-shift3"
    shutil.copytree(sd3_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "shift": 3.0}))
    sampler = load_generator(str(folder)).sampler
    assert torch.equal(sampler.times(10), flow_sigmas(10, 3.0))  # env.shift=0: the model's own
    assert torch.equal(sampler.times(10, 2.0), flow_sigmas(10, 2.0))  # any other value overrides it
    assert not torch.equal(flow_sigmas(10, 3.0), flow_sigmas(10, 1.0))
