"""Text and layout conditioning: encoding prompts and phrases once, and keeping them in a cache.

The per-step tensordict of a rollout carries only a ``layout_index``; the embeddings it points to
live in a `ConditionStore` held by the worker (an SD3 prompt embedding is 333×4096 floats — copying
it into every step of every sample would cost GiBs per batch).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from diffrl.layout import Layout


@dataclass
class Conditioning:
    """Everything the denoiser needs about a batch of layouts, batch-first."""

    prompt_embeds: Tensor  # [N, L, D_text] token embeddings of the global prompt
    pooled: Tensor  # [N, P] pooled prompt embedding
    phrase_embeds: Tensor  # [N, K, P] pooled embedding of each instance phrase (zeros where padded)
    boxes: Tensor  # [N, K, 4] normalised xyxy (zeros where padded)
    instance_mask: Tensor  # [N, K] bool, True for real instances

    def __getitem__(self, index: Tensor) -> "Conditioning":
        return Conditioning(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> "Conditioning":
        return Conditioning(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        """The fields in declaration order (``Conditioning(*tensors)`` rebuilds it)."""
        return tuple(getattr(self, f.name) for f in fields(self))


class TextEncoder:
    """A transformers text encoder with projection (CLIP-style) and its tokenizer, with a string cache.

    ``encode(texts)`` returns per-token embeddings [N, L, D] (padded to the tokenizer's
    ``model_max_length``) and pooled embeddings [N, P]. Results are cached per string (LRU,
    ``cache_size`` entries). Each new string is encoded on its own: a batched forward gives the same
    values only up to the last bits, which would then depend on the batch a string first came in,
    and a run resumed in a fresh process would drift from the uninterrupted one.
    """

    def __init__(self, tokenizer, model: torch.nn.Module, cache_size: int = 4096):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pooled_dim(self) -> int:
        """P, the width of the pooled (and phrase) embeddings."""
        return self.model.config.projection_dim

    def encode_one(self, text: str) -> tuple[Tensor, Tensor]:
        """One string → (token embeddings [L, D], pooled [P]); subclasses encode differently (SD3: CLIP-L/G + T5)."""
        tokens = self.tokenizer(
            [text],
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(input_ids=tokens["input_ids"])
        return out.last_hidden_state[0], out.text_embeds[0]

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for text in missing:  # one at a time: a string's embedding never depends on its batch (class doc)
            self._cache[text] = self.encode_one(text)
        hidden = torch.stack([self._cache[t][0] for t in texts])
        pooled = torch.stack([self._cache[t][1] for t in texts])
        for t in texts:
            self._cache.move_to_end(t)
        while len(self._cache) > self.cache_size:  # evict only after this batch is served
            self._cache.popitem(last=False)
        return hidden, pooled

    def encode_phrases(self, phrases: Sequence[str]) -> Tensor:
        """Pooled embeddings [N, P] of instance phrases (a subclass may skip the token embeddings, FLUX's T5)."""
        return self.encode(phrases)[1]

    def encode_layouts(self, layouts: Sequence[Layout]) -> Conditioning:
        """Prompt and phrase embeddings plus padded boxes for a batch of layouts."""
        prompt_embeds, pooled = self.encode([layout.prompt for layout in layouts])
        k = max(layout.n for layout in layouts)
        phrases = [p for layout in layouts for p in layout.phrases]
        phrase_pooled = self.encode_phrases(phrases)
        n = len(layouts)
        phrase_embeds = phrase_pooled.new_zeros(n, k, phrase_pooled.shape[-1])
        boxes = torch.zeros(n, k, 4, device=phrase_pooled.device)
        mask = torch.zeros(n, k, dtype=torch.bool, device=phrase_pooled.device)
        start = 0
        for i, layout in enumerate(layouts):
            phrase_embeds[i, : layout.n] = phrase_pooled[start : start + layout.n]
            boxes[i, : layout.n] = torch.tensor(layout.boxes, dtype=torch.float32)
            mask[i, : layout.n] = True
            start += layout.n
        return Conditioning(prompt_embeds, pooled, phrase_embeds, boxes, mask)


class ConditionStore:
    """The per-worker cache of the current batch's conditioning, indexed by ``layout_index``.

    The env fills it at reset; the actor, the critic and the learner read it. Only the index
    travels in tensordicts.
    """

    def __init__(self) -> None:
        self.layouts: list[Layout] = []
        self.conditioning: Conditioning | None = None

    def set(self, layouts: Sequence[Layout], conditioning: Conditioning) -> None:
        self.layouts = list(layouts)
        self.conditioning = conditioning

    def __getitem__(self, layout_index: Tensor) -> Conditioning:
        if self.conditioning is None:
            raise RuntimeError("ConditionStore is empty: reset the env before running the policy")
        return self.conditioning[layout_index.reshape(-1).to(self.conditioning.boxes.device)]


def build_word_tokenizer(words: Sequence[str], max_length: int):
    """A word-level tokenizer made locally (no download): ``<bos> words… <eos>`` padded with ``<pad>``.

    Ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<unk>``, 3 ``<eos>``, then ``words``. (CLIP's pooling treats
    ``eos_token_id == 2`` as a legacy checkpoint and pools at the largest id, so ``<eos>`` is not 2.)
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<unk>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in dict.fromkeys(words) if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )
