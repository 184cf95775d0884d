"""Shared fixtures: a tiny random generator and a tiny Grounding DINO, built from configs in code (no downloads),
and the check that an exported LoRA changes a plain diffusers pipeline."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_generator():
    from diffrl.policies.backbones.tiny import build_tiny_generator

    return build_tiny_generator(seed=0)


@pytest.fixture(scope="session")
def saved_generator(tmp_path_factory, tiny_generator):
    """The tiny generator written with save_pretrained, as a user's local model folder."""
    path = tmp_path_factory.mktemp("generator")
    tiny_generator.save_pretrained(path)
    return path


WORDS = ["red", "yellow", "green", "blue", "white", "black", "square", "circle", "triangle"]


def tiny_vocab() -> dict[str, int]:
    """A BERT vocab whose special tokens sit at bert-base-uncased's ids, which Grounding DINO hard-codes
    ([CLS] 101, [SEP] 102, '.' 1012, '?' 1029) to split the text query into phrases."""
    tokens = [f"[unused{i}]" for i in range(1030)]
    for i, token in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}.items():
        tokens[i] = token
    tokens[104: 104 + len(WORDS)] = WORDS
    return {token: i for i, token in enumerate(tokens)}


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; more only wait on each other (badly so on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_gdino(tmp_path_factory):
    """A random tiny Grounding DINO and its processor, written with save_pretrained like a hub download."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    torch.manual_seed(0)
    swin = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2,
                      out_features=["stage1", "stage2"])
    bert = BertConfig(vocab_size=1030, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16,
                      max_position_embeddings=64)
    config = GroundingDinoConfig(
        backbone_config=swin, text_config=bert, num_queries=12, d_model=32, num_feature_levels=2, max_text_len=32,
        encoder_layers=1, decoder_layers=2, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_attention_heads=2,
        decoder_attention_heads=1, encoder_n_points=1, decoder_n_points=1,
    )  # the smallest that builds: d_model ≥ 32 (GroupNorm(32, d_model)), 2 encoder heads (the text enhancer
    # halves them), 2 decoder layers (the box heads of layers 1.. are tied to layer 0's)
    path = tmp_path_factory.mktemp("grounding-dino-tiny")
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    processor = GroundingDinoProcessor(GroundingDinoImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 32}),
                                       BertTokenizer(vocab=tiny_vocab()))
    processor.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` truly need CUDA: skipped, saying so, on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_lora_changes_the_output(pipe, lora_folder, size: int) -> None:
    """A plain diffusers pipeline samples differently (same seed, 2 steps, latents out) once it has loaded the
    LoRA `diffrl export` wrote into ``lora_folder``."""
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, height=size, width=size, output_type="latent")
    before = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(lora_folder)
    after = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.allclose(before, after)
