"""The embedded default generator: the real SD3 MM-DiT and CLIP classes at a tiny size, in pixel space.

32×32 RGB images, 4×4 patches (an 8×8 token grid), 4 joint blocks of width 128, a 2-layer CLIP
text encoder of width 64 with a word-level tokenizer made locally from the Shapes vocabulary.
`build_tiny_generator` makes a fresh one from these configs (what `diffrl pretrain` starts from);
the pre-trained one ships in ``diffrl/assets/shapes-tiny`` and is registered as ``--model shapes-tiny``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffrl.policies.backbones.mmdit import LayoutMMDiT
from diffrl.policies.layout_generator import LatentSpace, LayoutGenerator
from diffrl.policies.text import TextEncoder, build_word_tokenizer
from diffrl.registry import MODELS
from diffrl.shapes.world import COLORS, SHAPES

IMAGE_SIZE = 32
MAX_PROMPT_TOKENS = 32  # "<bos> a red square , … and a blue circle <eos>" for 6 instances is 25 tokens

TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    patch_size=4,
    in_channels=3,
    out_channels=3,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,  # = text encoder hidden size
    caption_projection_dim=128,  # = transformer width (heads × head dim)
    pooled_projection_dim=64,  # = text encoder projection size
    pos_embed_max_size=IMAGE_SIZE // 4,
)

TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_PROMPT_TOKENS,
    projection_dim=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=3,
)

# Words the tokenizer knows; anything else becomes <unk>.
VOCAB = [",", ".", "a", "an", "and", "the", "with", "on", "of", "in", "image", "photo", "background", *COLORS, *SHAPES]


def build_tiny_generator(seed: int = 0, box_mask: bool = True) -> LayoutGenerator:
    """A fresh, randomly initialised tiny generator (deterministic given the seed)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = build_word_tokenizer(VOCAB, MAX_PROMPT_TOKENS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
        text_model = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG))
        denoiser = LayoutMMDiT.with_new_adapter(
            transformer, phrase_dim=TEXT_CONFIG["projection_dim"], num_heads=4, box_mask=box_mask
        )
    space = LatentSpace("pixels", channels=3, size=IMAGE_SIZE)
    return LayoutGenerator(denoiser, TextEncoder(tokenizer, text_model), space)


ASSETS = Path(__file__).resolve().parents[2] / "assets"
PACKAGED = ASSETS / "shapes-tiny"


@MODELS.register("shapes-tiny")
def shapes_tiny() -> Path:
    """The pre-trained tiny Shapes generator shipped in the package: the classic world (`--data shapes`), the hard
    benchmark."""
    return PACKAGED


@MODELS.register("shapes-mislabeled")
def shapes_mislabeled() -> Path:
    """The default base: shapes-tiny pre-trained further in the loose-box world (`--data shapes-loose`) on phrases
    whose colour word a noisy captioner swapped for its look-alike (its folder's pretrain.json has the command)."""
    return ASSETS / "shapes-mislabeled"

