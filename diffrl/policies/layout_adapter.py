"""The layout adapter: GLIGEN-style grounding tokens injected by zero-initialised gated attention.

Adapted in idea from GLIGEN (gligen/ldm/modules/attention.py ``GatedSelfAttentionDense`` and
gligen/ldm/modules/diffusionmodules/text_grounding_net.py ``PositionNet``) as diffusers 0.42 carries it
(diffusers/models/attention.py ``GatedSelfAttentionDense``, models/embeddings.py
``GLIGENTextBoundingboxProjection``). Written anew here for the MM-DiT stream, with two changes:

* each grounding token is an MLP of the phrase embedding and a Fourier embedding of its box;
* image tokens can be restricted (``box_mask=True``) to attend only to the grounding tokens of the
  boxes they overlap — region-aware grounding as in MIGC / InstanceDiffusion — which makes the
  tiny default learn placement in minutes instead of hours.

The fusers run as forward pre-hooks on the backbone's transformer blocks, so the backbone keeps
its own class, state dict and ``save_pretrained`` format; adapter weights live apart.
Both gates start at zero: a fresh adapter leaves the backbone's output unchanged. A layout with no instance
(``instance_mask`` all False, as in the unconditional half of classifier-free guidance) means no grounding: its
rows pass the fusers unchanged.

One adapter serves both backbones. On the MM-DiT every block sees the same [h, w] patch grid at one width
``dim``. On a UNet (`diffrl.policies.backbones.unet`) the BasicTransformerBlocks have their own widths
(``dims``, e.g. SD1.5's 320/640/1280) and token grids (the latent grid downsampled by 2, 4, 8 …): the grounding
tokens are made once at width ``dim`` and each fuser whose width differs projects them to its own (as GLIGEN's
``GatedSelfAttentionDense.linear`` does), and each block's grid is inferred from its token count and the
latent grid given to `LayoutAdapter.grounding` (`block_grid`). With ``dims=None`` nothing of this exists: the
MM-DiT adapter's weights, state dict and outputs are what they were.

With ``idm=True`` every fuser carries I-DRUID's Instance-Disentangled Module (`diffrl.policies.idm`).
In this MM-DiT adapter its inputs and the IDC loss's attention maps are:

* **E, the enhanced features** — the fuser's attention output split by key. For image token t, head h,
  ``Attn(x; [x, g])_t = Σ_j p_tj·v_j`` over image keys j plus ``Σ_i p_ti·v_i`` over grounding tokens i, so
  ``E_i[t] = p_ti·v_i`` (all heads, [C = dim]) is what instance i contributes at t, and the global feature
  ``E_{n+1}[t] = Σ_j p_tj·v_j`` is the layout-free part every token sees (the role MIGC's global-prompt
  cross-attention plays; SD3's prompt tokens themselves are attended inside the block that follows).
  ``Σ_i E_i`` is exactly the plain attention output. Tokens form the [h, w] patch grid, row-major.
  The probabilities p_ti come from the same fused attention call, by appending one one-hot channel per
  grounding token to the values, so no T×T attention matrix is materialised.
* **M, the masks** — the token cells a box overlaps (`box_token_mask`, whatever ``box_mask`` says);
  all ones for the global feature.
* the fuser then uses ``m · Σ_i R⁺_i`` (m = real instances + 1) in place of ``Σ_i E_i``: at init α = 1/m,
  so a fresh IDM changes nothing.
* **R±_CA, the attention maps** — per instance, the box-average of R±_i is a descriptor d±_i; it is
  projected as a key (``to_kv``'s key half of ``norm1(to_out(d±_i))``) and every image token's query
  (the fuser's own) attends to it: ``R±_CA,i = mean over heads of softmax over tokens of q_t·k_i/√d``,
  an [h, w] map summing to 1. A descriptor made of the instance's relevant channels should match only
  its own box; CAS measures how unevenly it matches outside. L_dis of a forward is the mean over fusers
  (`LayoutAdapter.last_dis`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffrl.policies.idm import InstanceDisentangler, disentangle_loss, split


@dataclass
class LayoutAdapterConfig:
    """Sizes of the adapter; saved beside its weights."""

    dim: int  # width of the grounding tokens, and of every block's image tokens unless `dims` says otherwise
    phrase_dim: int  # width of a pooled phrase embedding
    num_blocks: int  # how many transformer blocks get a gated fuser
    num_heads: int = 4  # heads of the gated attention
    fourier_freqs: int = 8  # frequencies per box coordinate in the Fourier embedding
    box_mask: bool = True  # image tokens attend only to grounding tokens of boxes they overlap
    idm: bool = False  # I-DRUID's Instance-Disentangled Module in every fuser (and its L_dis); False: the plain adapter
    dims: list[int] | None = None  # width of each block's image tokens (UNet); None: every block has `dim` (MM-DiT)

    def block_dims(self) -> list[int]:
        return list(self.dims) if self.dims is not None else [self.dim] * self.num_blocks

    def to_dict(self) -> dict:
        return asdict(self)


def fourier_embed(boxes: Tensor, num_freqs: int) -> Tensor:
    """[..., 4] box coordinates → [..., 4·2·num_freqs] sin/cos features (GLIGEN's FourierEmbedder)."""
    freqs = 100 ** (torch.arange(num_freqs, device=boxes.device, dtype=boxes.dtype) / num_freqs)
    angles = boxes.unsqueeze(-1) * freqs  # [..., 4, F]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def block_grid(grid: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The [h, w] grid of a block with ``tokens`` image tokens, given the finest grid (h0, w0).

    A UNet block at depth k sees the latent grid downsampled k times by stride-2 convolutions (padding 1), i.e.
    (ceil(h0 / 2^k), ceil(w0 / 2^k)); the MM-DiT's blocks all see the finest grid."""
    h0, w0 = grid
    factor = 1
    while factor <= max(h0, w0):
        h, w = -(-h0 // factor), -(-w0 // factor)
        if h * w == tokens:
            return h, w
        factor *= 2
    raise ValueError(f"{tokens} image tokens are no downsampling of the {h0}×{w0} token grid")


def box_token_mask(boxes: Tensor, instance_mask: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """[N, h·w, K] bool: does token (row-major cell of an h×w grid) overlap instance k's box?"""
    rows = torch.arange(grid_h, device=boxes.device, dtype=boxes.dtype)
    cols = torch.arange(grid_w, device=boxes.device, dtype=boxes.dtype)
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))  # [N, K, 1, 1]
    overlap_x = (torch.minimum(x1, (cols + 1) / grid_w) - torch.maximum(x0, cols / grid_w)) > 0  # [N,K,1,w]
    overlap_y = (torch.minimum(y1, (rows[:, None] + 1) / grid_h) - torch.maximum(y0, rows[:, None] / grid_h)) > 0
    inside = (overlap_x & overlap_y) & instance_mask[..., None, None]  # [N, K, h, w]
    return inside.flatten(2).transpose(1, 2)


class GroundingTokens(nn.Module):
    """Phrase embedding + Fourier box embedding → one grounding token per instance."""

    def __init__(self, cfg: LayoutAdapterConfig):
        super().__init__()
        in_dim = cfg.phrase_dim + 4 * 2 * cfg.fourier_freqs
        self.num_freqs = cfg.fourier_freqs
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )

    def forward(self, phrase_embeds: Tensor, boxes: Tensor) -> Tensor:
        # phrase_embeds: [N, K, P], boxes: [N, K, 4] → [N, K, dim]
        return self.mlp(torch.cat([phrase_embeds, fourier_embed(boxes, self.num_freqs)], dim=-1))


class GatedFuser(nn.Module):
    """x ← x + tanh(γ_a)·Attn(x; [x, g]) ; x ← x + tanh(γ_d)·FF(x), with γ_a = γ_d = 0 at init."""

    def __init__(self, dim: int, num_heads: int, idm: bool = False, token_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        # grounding tokens of another width are projected to this block's (UNet); None: no weights (MM-DiT)
        self.ground_proj = nn.Linear(token_dim, dim) if token_dim not in (None, dim) else None
        self.norm1 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_dense = nn.Parameter(torch.zeros(1))
        self.idm = InstanceDisentangler(dim) if idm else None  # None: no IDM weights in the state dict

    def forward(self, x: Tensor, grounding: Tensor, key_mask: Tensor) -> Tensor:
        # x: [N, T, D] image tokens; grounding: [N, K, D]; key_mask: [N, T, K] bool (may see instance k)
        n, t, d = x.shape
        h = self.num_heads
        both = self.norm1(torch.cat([x, grounding], dim=1))  # [N, T+K, D]
        q = self.to_q(both[:, :t]).view(n, t, h, d // h).transpose(1, 2)
        k, v = self.to_kv(both).view(n, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        sees_image = key_mask.new_ones(n, t, t)
        attn_mask = torch.cat([sees_image, key_mask], dim=2)[:, None]  # [N, 1, T, T+K]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.to_out(out.transpose(1, 2).reshape(n, t, d))
        x = x + torch.tanh(self.gate_attn).to(x.dtype) * out
        return x + torch.tanh(self.gate_dense).to(x.dtype) * self.ff(self.norm2(x))

    def features(self, x: Tensor, grounding: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The attention of `forward` split by key → (queries [N, h, T, d/h], E [N, K+1, D, T]).

        E[:, i] (i < K) is what grounding token i adds to each image token's attention output, E[:, K] the
        part from image keys; E.sum(1) is the attention output `forward` feeds to ``to_out``."""
        n, t, d = x.shape
        h, k_count = self.num_heads, grounding.shape[1]
        both = self.norm1(torch.cat([x, grounding], dim=1))  # [N, T+K, D]
        q = self.to_q(both[:, :t]).view(n, t, h, d // h).transpose(1, 2)
        k, v = self.to_kv(both).view(n, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # [N, h, T+K, d/h] each
        reads = torch.cat([v.new_zeros(t, k_count), torch.eye(k_count, dtype=v.dtype, device=v.device)])  # [T+K, K]
        values = torch.cat([v, reads.expand(n, h, -1, -1)], dim=-1)  # one-hot channels read p_ti out
        attn_mask = torch.cat([key_mask.new_ones(n, t, t), key_mask], dim=2)[:, None]  # [N, 1, T, T+K]
        out = F.scaled_dot_product_attention(q, k, values, attn_mask=attn_mask)  # [N, h, T, d/h + K]
        total, probs = out[..., : d // h], out[..., d // h :]  # [N, h, T, d/h], [N, h, T, K]
        per_instance = probs[..., None] * v[:, :, None, t:]  # [N, h, T, K, 1]·[N, h, 1, K, d/h]
        image_part = total - per_instance.sum(dim=3)
        e = torch.cat([per_instance, image_part[:, :, :, None]], dim=3)  # [N, h, T, K+1, d/h]
        return q, e.permute(0, 3, 1, 4, 2).reshape(n, k_count + 1, d, t)  # channel = head·(d/h) + j, as `forward`

    def forward_idm(self, x: Tensor, grounding: Tensor, key_mask: Tensor, box_masks: Tensor, instance_mask: Tensor,
                    grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """`forward` with IDM between the attention and ``to_out`` → (fused tokens [N, T, D], L_dis scalar).

        box_masks: [N, T, K] bool, token overlaps box i; instance_mask: [N, K] bool; grid: (h, w), h·w = T."""
        n, t, d = x.shape
        q, e = self.features(x, grounding, key_mask)  # [N, h, T, d/h], [N, m, D, T]
        m = e.shape[1]
        masks = torch.cat([box_masks.transpose(1, 2), box_masks.new_ones(n, 1, t)], dim=1).to(e.dtype)  # [N, m, T]
        valid = torch.cat([instance_mask, instance_mask.new_ones(n, 1)], dim=1)  # [N, m]
        alpha = self.idm(e.view(n, m, d, *grid), masks.view(n, m, *grid), valid)  # [N, m, D]
        pos, neg = split(alpha, e)  # [N, m, D, T] each
        fused = valid.sum(dim=1).to(e.dtype)[:, None, None] * pos.sum(dim=1)  # [N, D, T]; = Σ E when α = 1/m
        out = self.to_out(fused.transpose(1, 2))
        x = x + torch.tanh(self.gate_attn).to(x.dtype) * out
        x = x + torch.tanh(self.gate_dense).to(x.dtype) * self.ff(self.norm2(x))
        inst_masks = masks[:, :-1].view(n, m - 1, *grid)
        maps_pos = self.instance_maps(q, pos[:, :-1], masks[:, :-1]).view(n, m - 1, *grid)
        maps_neg = self.instance_maps(q, neg[:, :-1], masks[:, :-1]).view(n, m - 1, *grid)
        return x, disentangle_loss(maps_pos, maps_neg, inst_masks, instance_mask)

    def instance_maps(self, q: Tensor, features: Tensor, masks: Tensor) -> Tensor:
        """R_CA: queries [N, h, T, d/h], per-instance features [N, K, D, T], masks [N, K, T] → maps [N, K, T].

        Each instance's features, averaged over its box, are keyed like a token; the map is where the image
        tokens' queries look for that key (softmax over tokens, mean over heads)."""
        n, h, t, hd = q.shape
        area = masks.sum(dim=-1, keepdim=True).clamp(min=1.0)  # [N, K, 1]
        descriptor = (features * masks[:, :, None]).sum(dim=-1) / area  # [N, K, D]
        key = self.to_kv(self.norm1(self.to_out(descriptor)))[..., : h * hd].view(n, -1, h, hd).transpose(1, 2)
        logits = q @ key.transpose(-1, -2) / hd**0.5  # [N, h, T, K]
        return torch.softmax(logits, dim=2).mean(dim=1).transpose(1, 2)  # [N, K, T]


@dataclass
class ActiveGrounding:
    """What the attached blocks see during one forward (see `LayoutAdapter.grounding`)."""

    tokens: Tensor  # [N, K, D] grounding tokens
    boxes: Tensor  # [N, K, 4] normalised xyxy
    instance_mask: Tensor  # [N, K] bool, real instance
    grid: tuple[int, int]  # (h, w) finest token grid (MM-DiT: the patch grid; UNet: the latent grid)
    box_mask: bool  # restrict image tokens to the grounding tokens of boxes they overlap
    _masks: dict = field(default_factory=dict)  # token count → BlockMasks, made once per forward

    def masks(self, tokens: int) -> "BlockMasks":
        """The masks of a block with ``tokens`` image tokens."""
        if tokens not in self._masks:
            grid = block_grid(self.grid, tokens)
            box_masks = box_token_mask(self.boxes, self.instance_mask, *grid)
            if self.box_mask:
                key_mask = box_masks
            else:
                key_mask = self.instance_mask[:, None, :].expand(-1, tokens, -1)
            self._masks[tokens] = BlockMasks(key_mask, box_masks, grid)
        return self._masks[tokens]


class BlockMasks(NamedTuple):
    key_mask: Tensor  # [N, T, K] bool, image token t may attend to grounding token k
    box_masks: Tensor  # [N, T, K] bool, token t overlaps box k (IDM's masks)
    grid: tuple[int, int]  # (h, w), h·w = T


class FuserHook:
    """The pre-hook of block i: fuse the adapter's active grounding into the block's image tokens.

    An object rather than a closure so that ``copy.deepcopy`` of a backbone together with its adapter
    (the frozen reference policy) gives hooks that point at the *copied* adapter.
    """

    def __init__(self, adapter: "LayoutAdapter", index: int):
        self.adapter = adapter
        self.index = index

    def __call__(self, module, args, kwargs):
        active = self.adapter._active
        if active is None:
            return None
        fuser = self.adapter.fusers[self.index]

        def fuse(x: Tensor) -> Tensor:
            dtype, x = x.dtype, x.to(fuser.gate_attn.dtype)  # the adapter computes in its own (float32) weights' dtype
            masks = active.masks(x.shape[1])
            tokens = active.tokens if fuser.ground_proj is None else fuser.ground_proj(active.tokens)
            if fuser.idm is None:
                fused = fuser(x, tokens, masks.key_mask)
            else:
                fused, dis = fuser.forward_idm(x, tokens, masks.key_mask, masks.box_masks, active.instance_mask,
                                               masks.grid)
                self.adapter._dis_terms.append(dis)
            grounded = active.instance_mask.any(dim=1)  # [N]; a row with no instance (CFG's unconditional half)
            fused = fused if bool(grounded.all()) else torch.where(grounded[:, None, None], fused, x)  # is not fused
            return fused.to(dtype)

        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = fuse(kwargs["hidden_states"])
        else:  # gradient checkpointing passes positionally
            args = (fuse(args[0]), *args[1:])
        return args, kwargs


class LayoutAdapter(nn.Module):
    """Grounding tokens plus one gated fuser per transformer block, attached by pre-hooks."""

    def __init__(self, cfg: LayoutAdapterConfig):
        super().__init__()
        self.config = cfg
        self.tokens = GroundingTokens(cfg)
        if cfg.dims is not None and len(cfg.dims) != cfg.num_blocks:
            raise ValueError(f"adapter config: {len(cfg.dims)} dims for {cfg.num_blocks} blocks")
        self.fusers = nn.ModuleList(GatedFuser(d, cfg.num_heads, cfg.idm, token_dim=cfg.dim) for d in cfg.block_dims())
        self._active: ActiveGrounding | None = None  # set during a forward
        self._handles: list = []
        self._dis_terms: list[Tensor] = []  # L_dis of each IDM fuser in the running forward
        self.last_dis: Tensor | None = None  # L_dis of the last forward (mean over fusers); None without IDM

    def enable_idm(self) -> None:
        """Give every fuser a fresh IDM (a no-op if it has one): the outputs stay the same until it trains."""
        if self.config.idm:
            return
        self.config.idm = True
        like = self.fusers[0].gate_attn
        for fuser, dim in zip(self.fusers, self.config.block_dims()):
            fuser.idm = InstanceDisentangler(dim).to(device=like.device, dtype=like.dtype)

    def __getstate__(self):  # copies and pickles never carry the last forward's graph
        state = super().__getstate__()
        state.update(last_dis=None, _dis_terms=[], _active=None)
        return state

    def attach(self, blocks: nn.ModuleList) -> None:
        """Run fuser i before block i; the block receives the fused image tokens."""
        if len(blocks) != len(self.fusers):
            raise ValueError(f"adapter has {len(self.fusers)} fusers but the backbone has {len(blocks)} blocks")
        for handle in self._handles:
            handle.remove()
        self._handles = [
            block.register_forward_pre_hook(FuserHook(self, i), with_kwargs=True) for i, block in enumerate(blocks)
        ]

    def checkpointing_func(self):
        """diffusers' gradient-checkpointing function for the backbone this adapter is attached to.

        The fusers run in the blocks' pre-hooks and read the grounding active during a forward; a checkpointed
        block is recomputed in backward, after that context has closed, and would then fuse nothing. This
        function binds the grounding of the forward to the block's recomputation, so both compute the same graph.
        Pass it as ``backbone.enable_gradient_checkpointing(gradient_checkpointing_func=...)``.
        """
        from torch.utils.checkpoint import checkpoint

        def run_checkpointed(block, *args):
            active = self._active  # this forward's grounding (None outside one)

            def run(*inner):
                previous, self._active = self._active, active
                try:
                    return block(*inner)
                finally:
                    self._active = previous

            return checkpoint(run, *args, use_reentrant=False)

        return run_checkpointed

    @contextlib.contextmanager
    def grounding(self, phrase_embeds: Tensor, boxes: Tensor, instance_mask: Tensor, grid: tuple[int, int]):
        """Within this context the attached blocks see these layouts' grounding tokens.

        ``grid``: the finest token grid (h, w) — the MM-DiT's patch grid, a UNet's latent grid; a block with
        fewer tokens gets its downsampled grid (`block_grid`)."""
        weights = self.fusers[0].gate_attn.dtype
        tokens = self.tokens(phrase_embeds.to(weights), boxes.to(weights))
        self._active = ActiveGrounding(tokens, boxes, instance_mask, tuple(grid), self.config.box_mask)
        self._dis_terms = []
        try:
            yield
            if self._dis_terms:
                self.last_dis = torch.stack(self._dis_terms).mean()
        finally:
            self._active = None
            self._dis_terms = []

