"""FLUX.1 through the real diffusers path: a tiny random FluxPipeline (dev-style, with guidance embeds) built from
configs in code (CLIP and T5 tokenizers made locally), saved in the standard pipeline layout, loaded by
`diffrl train --model DIR`, trained with LoRA by PPO and GRPO, exported, and loaded back into plain diffusers."""

import json

import pytest
import torch
from safetensors import safe_open

from diffrl.cli import main
from diffrl.layout import Layout
from diffrl.policies.text import build_word_tokenizer
from diffrl.shapes.world import sample_layouts
from tests.conftest import assert_lora_changes_the_output

WORDS = ["a", "an", "and", ",", "red", "green", "blue", "yellow", "white", "black", "square", "circle", "triangle"]
TINY = ["env.layouts_per_iter=2", "env.group_size=2", "env.num_steps=2", "eval.layouts=2", "eval.levels=[2]",
        "eval.batch_size=2", "eval.grid=2", "algo.lr=1e-3", "model.lora_rank=4", "--quiet"]
T5_TOKENS = 32  # max_sequence_length of the tiny tests (FluxPipeline's default is 512)


def t5_tokenizer(words):
    """A T5 tokenizer made locally (no sentencepiece download): T5's layout — <pad> 0, </s> 1, <unk> 2, '▁' — with
    one Unigram piece per word; it saves and loads back as a plain ``T5Tokenizer``."""
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab = specials + [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_flux(path, guidance_embeds: bool = True, seed: int = 0):
    """A random FLUX.1 pipeline: 1 double- and 2 single-stream blocks on 16-channel 16×16 latents (8×8 packed
    tokens), a 2-level VAE (32×32 images), a tiny CLIP and a tiny T5, FLUX.1-dev's scheduler config — written with
    save_pretrained like a hub download. ``guidance_embeds=False``: schnell-style."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_word_tokenizer(WORDS, 16), t5_tokenizer(WORDS)
    clip = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=32, pad_token_id=0,
                          bos_token_id=1, eos_token_id=3)
    t5 = T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                           axes_dims_rope=(4, 6, 6)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16,
                          norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
                          use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(clip), tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux-dev"))


def load(folder, guidance: float = 1.0):
    from diffrl.policies.backbones.flux import load_flux_generator

    generator = load_flux_generator(folder, max_sequence_length=T5_TOKENS)
    generator.denoiser.set_guidance(guidance)
    return generator


def test_prompt_encoding_matches_diffusers(flux_folder, one_thread):
    """CLIP pooled + T5 tokens (written anew, one string at a time) equal FluxPipeline.encode_prompt's."""
    from diffusers import FluxPipeline

    from diffrl.policies.generator import load_generator

    index = json.loads((flux_folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["tokenizer_2"] == ["transformers", "T5Tokenizer"]
    generator = load_generator(str(flux_folder))  # the --model dispatch: FluxPipeline → backbones.flux
    assert type(generator.denoiser).__name__ == "LayoutFlux" and generator.text.max_sequence_length == 512
    generator.text.max_sequence_length = T5_TOKENS
    pipe = FluxPipeline.from_pretrained(flux_folder)
    for prompt in ["a red square and a blue circle", ""]:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, max_sequence_length=T5_TOKENS)
        hidden, ours_pooled = generator.text.encode([prompt])
        assert hidden.shape == (1, T5_TOKENS, 32) and ours_pooled.shape == (1, 32) and text_ids.shape == (T5_TOKENS, 3)
        torch.testing.assert_close(hidden, embeds)  # float32 defaults: within 1e-5 (measured: one element 1 ulp off)
        torch.testing.assert_close(ours_pooled, pooled)
    cond = generator.encode_layouts([Layout("a red square", ["blue circle"], [[0, 0, 1, 1]])])
    assert "blue circle" not in generator.text._cache  # a phrase's (unused) T5 tokens are never computed or kept
    _, blue_circle = generator.text.encode(["blue circle"])
    torch.testing.assert_close(cond.phrase_embeds[0], blue_circle, rtol=0, atol=0)  # phrases: the pooled CLIP
    adapter = generator.denoiser.adapter  # one fuser per double- and single-stream block
    assert adapter.config.phrase_dim == 32 == generator.text.pooled_dim and adapter.config.num_blocks == 3
    assert generator.latent_shape == (16, 16, 16) and generator.space.image_size == 32


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_ode_rollout_matches_the_diffusers_pipeline(flux_folder, tmp_path, guidance_embeds, one_thread):
    """Noise level 0, fresh adapter: our env + actor sample what FluxPipeline does — the same packed tokens, image
    ids, dynamically shifted sigmas and (dev) distilled guidance, one forward per step."""
    from diffusers import FluxPipeline

    from diffrl.eval.evaluate import generate
    from diffrl.policies.backbones.flux import pack

    folder = flux_folder if guidance_embeds else build_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    guidance = 3.5 if guidance_embeds else 1.0
    generator = load(folder, guidance)
    layout = Layout("a red square", ["red square"], [[0.1, 0.1, 0.6, 0.6]])
    images = generate(generator, [layout], num_steps=3, seed=7, progress=False)  # [1, 3, 32, 32]
    x_T = torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(7))  # the env's first draw
    pipe = FluxPipeline.from_pretrained(folder)
    kwargs = dict(num_inference_steps=3, guidance_scale=guidance, latents=pack(x_T), height=32, width=32,
                  max_sequence_length=T5_TOKENS)
    theirs = pipe(layout.prompt, output_type="pt", **kwargs).images
    torch.testing.assert_close(images, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(generator.sampler.times(3), pipe.scheduler.sigmas, rtol=0, atol=0)  # mu from 64 tokens
    if guidance_embeds:  # the guidance value reaches the model: another one samples something else
        other = pipe(layout.prompt, output_type="pt", **{**kwargs, "guidance_scale": 1.0}).images
        assert not torch.allclose(other, theirs, atol=1e-3)
    else:
        from diffrl.errors import UserError

        with pytest.raises(UserError, match="no guidance embedding"):
            generator.denoiser.set_guidance(3.5)


def test_adapter_grounds_both_block_kinds_and_checkpoints(flux_folder, one_thread):
    """Open gates change the velocity through fusers on double- and single-stream blocks, and gradient
    checkpointing (blocks called positionally) recomputes them with the same gradients."""
    generator = load(flux_folder, guidance=3.5)
    denoiser = generator.denoiser
    from diffrl.policies.generator import Denoiser

    assert isinstance(denoiser, Denoiser)  # what the trainer needs of a backbone
    cond = generator.encode_layouts(sample_layouts(2, [2], seed=0))
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([0.9, 0.6])
    with torch.no_grad():
        base = generator.velocity(x, t, cond)
        outputs = []
        for i in range(3):  # fuser 0 before the double-stream block, 1 and 2 before the single-stream ones
            denoiser.adapter.fusers[i].gate_attn.data.fill_(0.5)
            outputs.append(generator.velocity(x, t, cond))
            denoiser.adapter.fusers[i].gate_attn.data.zero_()
    assert all(not torch.allclose(out, base) for out in outputs)
    for fuser in denoiser.adapter.fusers:
        fuser.gate_attn.data.fill_(0.5)

    def grads():
        denoiser.zero_grad(set_to_none=True)
        generator.velocity(x, t, cond).square().mean().backward()
        return {k: p.grad.clone() for k, p in denoiser.named_parameters() if p.grad is not None}

    plain = grads()
    denoiser.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any(k.startswith("adapter.fusers.2.") for k in plain)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-6)


def write_layouts(path):
    layouts = [{"prompt": "a red square and a blue circle", "phrases": ["red square", "blue circle"],
                "boxes": [[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]]},
               {"prompt": "a green triangle", "phrases": ["green triangle"], "boxes": [[0.2, 0.3, 0.8, 0.9]]},
               {"prompt": "a white circle and a black square", "phrases": ["white circle", "black square"],
                "boxes": [[0.0, 0.0, 0.4, 0.6], [0.5, 0.1, 1.0, 0.5]]}]
    path.write_text("".join(json.dumps(layout) + "\n" for layout in layouts))
    return path


def registered_learners() -> list[str]:
    import diffrl.algos.trainer  # noqa: F401  (registers every learner)
    from diffrl.registry import ALGOS

    return ALGOS.names()


EXTRA = {"grpo": ["model.dtype=bfloat16", "model.gradient_checkpointing=true"]}


@pytest.mark.parametrize("algo", registered_learners())  # every registered learner, whichever exist
def test_train_export_and_load_in_plain_diffusers(flux_folder, tmp_path, algo, one_thread):
    from diffusers import FluxPipeline

    run = tmp_path / "run"
    extra = EXTRA.get(algo, [])
    # PPO and GRPO read a layouts file; the others train on the Shapes data (SFT needs its paired renders)
    data = ["--data", str(write_layouts(tmp_path / "layouts.jsonl"))] if algo in ("ppo", "grpo") else ["env.levels=[2]"]
    assert main(["train", "--model", str(flux_folder), *data, "--algo", algo, "--iterations", "2", "--out", str(run),
                 "--reward", "shapes", "model.guidance_scale=3.5", *TINY, *extra]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(abs(line.get("kl_ref", 0)) < 1e3 for line in lines)
    (ckpt,) = (run / "checkpoints").glob("checkpoint-*.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:  # LoRA + adapter (+ critic), never the backbone
        denoiser = [k for k in f.keys() if k.startswith("denoiser.")]
        lora = [k for k in denoiser if "lora_" in k]
        # peft's defaults hit the attention projections of both block kinds
        assert any(".transformer_blocks." in k for k in lora) and any(".single_transformer_blocks." in k for k in lora)
        assert all("lora_" in k or k.startswith("denoiser.adapter.") for k in denoiser)
        trained = {k: f.get_tensor(k) for k in lora if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in trained.values())  # lora_B started at 0 and moved
    if algo != "ppo":
        return
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "layout_adapter" / "config.json").is_file()
    assert "FluxPipeline.from_pretrained" in (out / "README.md").read_text()
    assert_lora_changes_the_output(FluxPipeline.from_pretrained(flux_folder), out, size=32)


def test_missing_parts_say_what_to_download(flux_folder, tmp_path, capsys):
    import shutil

    assert main(["train", "--model", "black-forest-labs/FLUX.1-dev", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()  # a hub id not in the local cache (this machine has no network)
    assert "hf download black-forest-labs/FLUX.1-dev" in err and "--model " in err and len(err.splitlines()) == 1
    broken = tmp_path / "broken"
    shutil.copytree(flux_folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    assert main(["train", "--model", str(broken), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing text_encoder_2/" in err and "hf download" in err and "FLUX.1-dev" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "b").exists()
    assert main(["train", "--model", str(flux_folder), "model.resolution=30", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.resolution=30" in err and "multiple of 4" in err and len(err.splitlines()) == 1


def test_resolution_sets_the_latent_grid_and_the_time_shift(flux_folder, tmp_path, capsys, one_thread):
    """model.resolution=16: 8×8 latents, 16 packed tokens, mu of 16 tokens — still FluxPipeline's rollout there."""
    from diffusers import FluxPipeline

    from diffrl.eval.evaluate import generate
    from diffrl.policies.backbones.flux import calculate_shift, load_flux_generator, pack

    generator = load_flux_generator(flux_folder, resolution=16, max_sequence_length=T5_TOKENS)
    assert generator.latent_shape == (16, 8, 8) and generator.space.image_size == 16
    assert generator.sampler.mu == pytest.approx(calculate_shift(16)) and generator.sampler.mu != calculate_shift(64)
    layout = Layout("a blue circle", ["blue circle"], [[0.2, 0.2, 0.9, 0.9]])
    images = generate(generator, [layout], num_steps=2, seed=3, progress=False)
    x_T = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(3))
    theirs = FluxPipeline.from_pretrained(flux_folder)(layout.prompt, num_inference_steps=2, guidance_scale=1.0,
                                                       latents=pack(x_T), height=16, width=16, output_type="pt",
                                                       max_sequence_length=T5_TOKENS).images
    torch.testing.assert_close(images, theirs, atol=1e-5, rtol=0)
    capsys.readouterr()  # the pipeline's progress bars
    assert main(["train", "model.resolution=64", "--out", str(tmp_path / "d"), "--quiet"]) == 2  # not a FLUX model
    err = capsys.readouterr().err.strip()
    assert "model.resolution" in err and "only FLUX" in err and len(err.splitlines()) == 1
