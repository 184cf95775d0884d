"""The SD1.x UNet path at tiny size: the layout adapter on a UNet (widths, grids, IDM), GLIGEN's own grounding,
the DDIM sampler against diffusers, loading a saved SD1.5 / GLIGEN pipeline folder, and `diffrl train` on it.

Every model is built from a config in code and, for loading, written with the real pipelines' ``save_pretrained``."""

import json
import math

import pytest
import torch
import yaml

from diffrl.algos.sft import flow_matching_loss
from diffrl.cli import main
from diffrl.config import ModelConfig
from diffrl.errors import UserError
from diffrl.layout import Layout
from diffrl.policies.backbones.tiny import VOCAB
from diffrl.policies.backbones.unet import (
    CLIPTextEncoder,
    DDIMSampler,
    LayoutUNet,
    discrete_timestep,
    gligen_inputs,
    transformer_blocks,
)
from diffrl.policies.generator import Denoiser, LayoutGenerator, VAESpace, build_generator, load_generator
from diffrl.policies.layout_adapter import block_grid
from diffrl.policies.text import Conditioning, build_word_tokenizer
from tests.conftest import assert_lora_changes_the_output

WIDTH = 32  # text width = cross-attention width
# SD1.5's scheduler_config.json (a PNDMScheduler config; the sampler reads it into a DDIMScheduler as the pipelines do)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False)


def tiny_unet(gated: bool = False, seed: int = 0):
    """UNet with transformer blocks at widths 32 (8×8 tokens, down and up) and 64 (4×4, mid)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=4, norm_num_groups=8,
        attention_type="gated" if gated else "default",
    ).eval()


def tiny_text(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_word_tokenizer(VOCAB, 32)
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=3))
    return tokenizer, model


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=16)


def conditioning(n=2, k=3, seed=1, instances=None) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, k, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.2 + 0.3 * torch.rand(n, k, 2, generator=g)], dim=-1).clamp(max=1.0)
    mask = torch.ones(n, k, dtype=torch.bool) if instances is None else instances
    return Conditioning(torch.randn(n, 6, WIDTH, generator=g), torch.randn(n, WIDTH, generator=g),
                        torch.randn(n, k, WIDTH, generator=g) * mask[..., None], boxes * mask[..., None], mask)


def latents(n=2, seed=2):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def bare(unet, x, t, cond, **kwargs):
    return unet(x, discrete_timestep(t, 1000), encoder_hidden_states=cond.prompt_embeds, return_dict=False, **kwargs)[0]


def open_gates(adapter, value=0.5):
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.gate_attn.fill_(value)
            fuser.gate_dense.fill_(value)


# --- the adapter on a UNet -----------------------------------------------------------------------------------

def test_block_grid_is_the_latent_grid_downsampled_with_ceil():
    assert block_grid((8, 8), 64) == (8, 8)
    assert block_grid((8, 8), 16) == (4, 4)
    assert block_grid((5, 7), 12) == (3, 4)  # stride-2 convolutions with padding 1: ceil(5/2) × ceil(7/2)
    assert block_grid((6, 10), 6) == (2, 3)
    with pytest.raises(ValueError):
        block_grid((8, 8), 7)


@torch.no_grad()
def test_fresh_adapter_leaves_the_unet_output_unchanged_and_fits_each_block():
    unet = tiny_unet()
    denoiser = LayoutUNet.with_new_adapter(unet, phrase_dim=WIDTH)
    cfg = denoiser.adapter.config
    # one block down, two up (layers_per_block + 1), one mid: diffusers registers up blocks before the mid block
    assert cfg.dims == [32, 32, 32, 64] and cfg.dim == WIDTH
    assert [f.ground_proj is None for f in denoiser.adapter.fusers] == [True, True, True, False]
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in transformer_blocks(unet)]
    x, t, cond = latents(), torch.tensor([0.9, 0.3]), conditioning()
    out = denoiser(x, t, cond)
    for h in handles:
        h.remove()
    assert torch.equal(out, bare(unet, x, t, cond))
    assert sorted(seen) == [16, 64, 64, 64]  # 8×8 tokens at width 32, 4×4 at width 64


@torch.no_grad()
def test_open_gates_make_the_boxes_matter_and_rows_without_instances_see_no_grounding():
    unet = tiny_unet()
    denoiser = LayoutUNet.with_new_adapter(unet, phrase_dim=WIDTH)
    open_gates(denoiser.adapter)
    x, t = latents(3), torch.full((3,), 0.5)
    none = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    cond = conditioning(3, 3, instances=none)
    out = denoiser(x, t, cond)
    reference = bare(unet, x, t, cond)
    assert not torch.allclose(out[0], reference[0]) and not torch.allclose(out[2], reference[2])
    assert torch.equal(out[1], reference[1])  # no instance: the fusers leave the row alone
    moved = Conditioning(cond.prompt_embeds, cond.pooled, cond.phrase_embeds, cond.boxes.flip(-1), cond.instance_mask)
    assert (denoiser(x, t, moved)[0] - out[0]).abs().max() > 1e-4


def test_idm_off_is_the_plain_adapter_and_on_gives_a_differentiable_l_dis():
    unet = tiny_unet()
    denoiser = LayoutUNet.with_new_adapter(unet, phrase_dim=WIDTH)
    open_gates(denoiser.adapter)
    assert not any("idm" in name for name in denoiser.adapter.state_dict())
    x, t, cond = latents(), torch.tensor([0.8, 0.4]), conditioning()
    with torch.no_grad():
        plain = denoiser(x, t, cond)
    assert denoiser.adapter.last_dis is None

    denoiser.adapter.enable_idm()  # fresh IDM: α = 1/m, the same model
    assert [f.idm.feature_conv.in_channels for f in denoiser.adapter.fusers] == [32, 32, 32, 64]
    out = denoiser(x, t, cond)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)
    dis = denoiser.adapter.last_dis
    assert dis.ndim == 0 and torch.isfinite(dis) and dis.requires_grad
    dis.backward()
    grads = [p.grad for f in denoiser.adapter.fusers for p in f.idm.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_recomputes_the_fusers_with_their_grounding():
    """Same loss and gradients with the UNet's blocks recomputed in backward (IDM on, so L_dis is recomputed too)."""
    unet = tiny_unet()
    denoiser = LayoutUNet.with_new_adapter(unet, phrase_dim=WIDTH, idm=True)
    open_gates(denoiser.adapter)
    x, t, cond = latents(), torch.tensor([0.8, 0.4]), conditioning()

    def grads():
        denoiser.zero_grad(set_to_none=True)
        (denoiser(x, t, cond).square().mean() + denoiser.adapter.last_dis).backward()
        return {k: p.grad.clone() for k, p in denoiser.named_parameters() if p.grad is not None}

    plain = grads()
    denoiser.train()  # diffusers checkpoints only in training mode
    denoiser.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any(".idm." in k for k in plain)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-6)


# --- the DDIM sampler ------------------------------------------------------------------------------------------

def test_ddim_sampler_times_and_steps_are_diffusers_ddim_on_the_sd15_schedule():
    from diffusers import DDIMScheduler

    sampler = DDIMSampler(SD15_SCHEDULER)
    reference = DDIMScheduler.from_config(SD15_SCHEDULER)
    reference.set_timesteps(5)
    times = sampler.times(5)
    assert torch.equal(times, torch.tensor([801, 601, 401, 201, 1, 0]) / 1000)
    assert torch.equal(discrete_timestep(times[:-1], 1000), reference.timesteps)
    x, eps = latents(), latents(seed=3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    for i, timestep in enumerate(reference.timesteps):
        mean, std = sampler.mean_std(eps, times[i], times[i + 1], x, 1.0)
        expected = reference.step(eps, timestep, x, eta=1.0, variance_noise=noise).prev_sample
        assert torch.equal(mean + std * noise, expected)


def test_ddim_sampler_noising_and_targets_are_diffusers():
    from diffusers import DDIMScheduler

    x0, noise, t = latents(), latents(seed=5), torch.tensor([0.25, 0.9])
    timesteps = discrete_timestep(t, 1000)
    for prediction in ("epsilon", "v_prediction"):
        config = {**SD15_SCHEDULER, "prediction_type": prediction}
        sampler, reference = DDIMSampler(config), DDIMScheduler.from_config(config)
        torch.testing.assert_close(sampler.noisy(x0, noise, t), reference.add_noise(x0, noise, timesteps))
        expected = noise if prediction == "epsilon" else reference.get_velocity(x0, noise, timesteps)
        torch.testing.assert_close(sampler.target(x0, noise, t), expected)


def test_l_ldm_through_the_ddim_target_trains_the_unet_and_the_adapter():
    tokenizer, text_model = tiny_text()
    denoiser = LayoutUNet.with_new_adapter(tiny_unet(), phrase_dim=WIDTH)
    generator = LayoutGenerator(denoiser, CLIPTextEncoder(tokenizer, text_model), VAESpace(tiny_vae(), 8),
                                DDIMSampler(SD15_SCHEDULER))
    layouts = [Layout("a red square", ["red square"], [[0.1, 0.1, 0.6, 0.6]]),
               Layout("a blue circle and a red square", ["blue circle", "red square"], [[0, 0, 0.5, 1], [0.5, 0, 1, 1]])]
    cond = generator.encode_layouts(layouts)
    assert cond.prompt_embeds.shape == (2, 32, WIDTH) and cond.phrase_embeds.shape == (2, 2, WIDTH)
    loss = flow_matching_loss(generator, latents(), cond, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert denoiser.unet.conv_in.weight.grad.abs().sum() > 0
    assert denoiser.adapter.fusers[0].gate_attn.grad is not None  # gates at 0 still get a gradient


# --- GLIGEN ----------------------------------------------------------------------------------------------------

def pipeline_gligen_kwargs(cond: Conditioning, row: int, uncond: bool) -> dict:
    """What StableDiffusionGLIGENPipeline.__call__ (diffusers 0.42) builds for one layout (step 5.1), re-done here."""
    k = int(cond.instance_mask[row].sum())
    boxes = torch.zeros(30, 4)
    boxes[:k] = cond.boxes[row, :k]
    embeds = torch.zeros(30, WIDTH)
    embeds[:k] = cond.phrase_embeds[row, :k]
    masks = torch.zeros(30)
    masks[:k] = 0 if uncond else 1  # the unconditional half keeps boxes and phrases, masks 0
    return {"gligen": {"boxes": boxes[None], "positive_embeddings": embeds[None], "masks": masks[None]}}


@torch.no_grad()
def test_gligen_unet_is_grounded_as_the_diffusers_pipeline_does():
    unet = tiny_unet(gated=True)
    fusers = [b.fuser for b in transformer_blocks(unet)]
    for fuser in fusers:  # GLIGEN's gates start at 0: open them so the grounding shows
        fuser.alpha_attn.fill_(1.0)
        fuser.alpha_dense.fill_(1.0)
    denoiser = LayoutUNet(unet, adapter=None)
    x, t = latents(), torch.tensor([0.7, 0.7])
    cond = conditioning(2, 3, instances=torch.tensor([[True, True, True], [True, False, False]]))
    out = denoiser(x, t, cond)
    for row in range(2):
        expected = bare(unet, x[row:row + 1], t[row:row + 1], cond[torch.tensor([row])],
                        cross_attention_kwargs=pipeline_gligen_kwargs(cond, row, uncond=False))
        torch.testing.assert_close(out[row:row + 1], expected, rtol=1e-5, atol=1e-6)
    assert gligen_inputs(cond, torch.float32)["masks"].shape == (2, 30)
    # moving the boxes changes the output; no instances is the pipeline's unconditional half
    moved = Conditioning(cond.prompt_embeds, cond.pooled, cond.phrase_embeds, cond.boxes.flip(-1), cond.instance_mask)
    assert (denoiser(x, t, moved) - out).abs().max() > 1e-4
    empty = Conditioning(cond.prompt_embeds, cond.pooled, torch.zeros_like(cond.phrase_embeds),
                         torch.zeros_like(cond.boxes), torch.zeros_like(cond.instance_mask))
    expected = bare(unet, x[:1], t[:1], cond[torch.tensor([0])], cross_attention_kwargs=pipeline_gligen_kwargs(cond, 0, True))
    torch.testing.assert_close(denoiser(x, t, empty)[:1], expected, rtol=1e-5, atol=1e-6)


# --- loading saved pipeline folders, and `diffrl train` on them -----------------------------------------------

def save_pipeline(path, gated: bool):
    from diffusers import PNDMScheduler, StableDiffusionGLIGENPipeline, StableDiffusionPipeline

    tokenizer, text_model = tiny_text()
    cls = StableDiffusionGLIGENPipeline if gated else StableDiffusionPipeline
    pipe = cls(vae=tiny_vae(), text_encoder=text_model, tokenizer=tokenizer, unet=tiny_unet(gated),
               scheduler=PNDMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k != "clip_sample"}),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("sd15"), gated=False)


@pytest.fixture(scope="module")
def gligen_folder(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("gligen"), gated=True)


def test_load_generator_reads_an_sd15_pipeline_folder(sd_folder):
    assert json.loads((sd_folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    generator = load_generator(str(sd_folder))
    assert isinstance(generator.denoiser, LayoutUNet) and generator.denoiser.adapter is not None
    assert isinstance(generator.denoiser, Denoiser)  # what the trainer needs of a backbone
    assert isinstance(generator.sampler, DDIMSampler) and generator.sampler.prediction == "epsilon"
    assert generator.space.scale == 0.18215 and generator.space.shift == 0.0
    assert generator.latent_shape == (4, 8, 8) and generator.space.image_size == 16
    images = torch.rand(2, 3, 16, 16)
    assert generator.space.encode(images).shape == (2, 4, 8, 8)
    layouts = [Layout("a red square", ["red square"], [[0.1, 0.1, 0.6, 0.6]])] * 2
    cond = generator.encode_layouts(layouts)
    with torch.no_grad():
        mean, std = generator.step_mean_std(latents(), 0.801, 0.601, cond, 1.0)
    assert mean.shape == (2, 4, 8, 8) and std.shape == (2, 1, 1, 1) and torch.all(std > 0)
    with pytest.raises(UserError, match="model.t5 is for SD3"):
        load_generator(str(sd_folder), t5=True)


def test_a_gligen_folder_grounds_with_its_own_fusers_and_idm_needs_an_adapter(gligen_folder, tmp_path):
    generator = load_generator(str(gligen_folder))
    assert generator.denoiser.gligen and generator.denoiser.adapter is None
    with pytest.raises(UserError, match="no layout adapter to carry IDM"):
        build_generator(ModelConfig(name=str(gligen_folder), idm=True))
    # with our adapter beside GLIGEN's fusers, IDM is there
    from diffrl.policies.generator import save_adapter

    plain = load_generator(str(gligen_folder))
    adapter = LayoutUNet.with_new_adapter(plain.denoiser.unet, phrase_dim=WIDTH).adapter
    save_adapter(adapter, tmp_path / "adapter")
    both = build_generator(ModelConfig(name=str(gligen_folder), adapter=str(tmp_path / "adapter"), idm=True))
    assert both.denoiser.gligen and both.denoiser.adapter.config.idm
    run = tmp_path / "run"
    assert main(["train", "--model", str(gligen_folder), "--out", str(run), "joint.dis_coef=0.1"]) == 2


SMALL = {"env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 3},
         "eval": {"layouts": 2, "batch_size": 2, "grid": 2, "levels": [2]}}


@pytest.mark.parametrize("which", ["sd15", "gligen"])
@pytest.mark.parametrize("algo, lora_rank", [("ppo", -1), ("grpo", 0)])  # -1: LoRA (real models' default), 0: full
def test_diffrl_train_runs_two_iterations_on_a_saved_pipeline_folder(which, algo, lora_rank, sd_folder, gligen_folder,
                                                                      tmp_path):
    folder = sd_folder if which == "sd15" else gligen_folder
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    run = tmp_path / "run"
    code = main(["train", "--model", str(folder), "--algo", algo, "--iterations", "2", "--out", str(run),
                 "--config", str(config), "--quiet", "policy.noise_level=1.0", f"model.lora_rank={lora_rank}"])
    assert code == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(line["loss_objective"])) for line in lines)
    assert lines[0]["kl_ref"] == 0 and lines[1]["kl_ref"] > 0  # the first update moved the policy off π_ref
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == str(folder)


def test_joint_loss_with_a_fresh_idm_trains_a_saved_sd15_folder(sd_folder, tmp_path):
    """I-DRUID's L = λ_ldm·L_ldm + λ_dis·L_dis + L_rl on the UNet: model.idm gives the adapter a fresh IDM, the
    paired Shapes renders go through the VAE for L_ldm (ε target), and every term is logged."""
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    run = tmp_path / "run"
    code = main(["train", "--model", str(sd_folder), "--algo", "ppo", "--iterations", "2", "--out", str(run),
                 "--config", str(config), "--quiet", "policy.noise_level=1.0", "model.idm=true",
                 "joint.dis_coef=0.1", "joint.ldm_coef=0.5"])
    assert code == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["loss_dis"] > 0 and line["loss_ldm"] > 0 and math.isfinite(line["loss_objective"])
    assert lines[1]["kl_ref"] > 0


def test_dis_coef_without_idm_on_a_plain_sd15_folder_is_one_line(sd_folder, tmp_path, capsys):
    code = main(["train", "--model", str(sd_folder), "--algo", "ppo", "--out", str(tmp_path / "run"), "--quiet",
                 "joint.dis_coef=0.1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.idm=true" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_exported_unet_lora_loads_into_a_plain_sd_pipeline_and_changes_its_output(sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--model", str(sd_folder), "--algo", "grpo", "--iterations", "1", "--out", str(run),
                 "--config", str(config), "--quiet", "policy.noise_level=1.0", "algo.lr=1e-3"]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "layout_adapter" / "config.json").is_file()
    assert "StableDiffusionPipeline" in (out / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    assert_lora_changes_the_output(pipe, out, size=16)


def test_awm_trains_an_sd15_folder_in_its_epsilon_parameterisation_and_nft_says_it_is_flow_only(sd_folder, tmp_path,
                                                                                                 capsys):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    run = tmp_path / "awm"
    assert main(["train", "--model", str(sd_folder), "--algo", "awm", "--iterations", "2", "--out", str(run),
                 "--config", str(config), "--quiet", "forward.kl_coef=0.1"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["loss_policy"]) for line in lines) and lines[1]["kl_ref"] > 0
    capsys.readouterr()
    code = main(["train", "--model", str(sd_folder), "--algo", "nft", "--out", str(tmp_path / "nft"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "flow-only" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nft").exists()
