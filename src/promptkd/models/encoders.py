"""Prompted image and text encoders over open_clip towers.

We do not fork open_clip's model code: these short forward functions reuse open_clip's own
modules (patch embedding, blocks, norms, projections) and only insert or replace prompt tokens
between blocks, following the official IVLP rules (official-promptkd.md sections 1.1 and 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from promptkd.errors import PromptKDError
from promptkd.models.prompts import DeepPrompts


def _check_batch_first(transformer: nn.Module, what: str) -> None:
    """Prompt insertion indexes (batch, tokens, width); open_clip 3 stacks are batch-first."""
    if not getattr(transformer, "batch_first", True):
        raise PromptKDError(f"{what} runs its transformer sequence-first (batch_first=False); deep prompts "
                            "need open_clip's default batch-first layout")


def _check_vision_tower(visual: nn.Module) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise PromptKDError(
            f"image tower {type(visual).__name__} is not supported yet: prompted encoders need an open_clip "
            "VisionTransformer (OpenAI/LAION ViTs); timm, ConvNeXt and ResNet towers are not supported"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise PromptKDError(
            "image tower pools with "
            f"{'an attention pooler' if getattr(visual, 'attn_pool', None) is not None else visual.pool_type!r}; "
            "deep prompts are only supported for class-token pooling ('tok')"
        )
    _check_batch_first(visual.transformer, "image tower")


@dataclass
class TextTower:
    """The parts of an open_clip text tower that a prompted forward needs."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: torch.Tensor | nn.Linear | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None


def text_tower(clip: nn.Module) -> TextTower:
    """Text-tower parts of an open_clip CLIP (built-in text), a CustomTextCLIP or a bare TextTransformer."""
    from open_clip.transformer import TextTransformer

    text = clip if isinstance(clip, TextTransformer) else getattr(clip, "text", None)
    if text is None and hasattr(clip, "token_embedding") and hasattr(clip, "transformer"):
        return TextTower(
            clip.token_embedding,
            clip.positional_embedding,
            clip.transformer,
            clip.ln_final,
            clip.text_projection,
            clip.attn_mask,
            getattr(clip, "text_pool_type", "argmax"),
            getattr(clip, "text_eos_id", None),
        )
    if isinstance(text, TextTransformer) and text.cls_emb is None and not getattr(text, "use_pad_mask", False):
        return TextTower(
            text.token_embedding,
            text.positional_embedding,
            text.transformer,
            text.ln_final,
            text.text_projection,
            text.attn_mask,
            text.pool_type,
            getattr(text, "eos_id", None),
        )
    raise PromptKDError(
        f"text tower {type(text or clip).__name__} is not supported yet: prompted encoders need an open_clip "
        "TextTransformer without class token or padding mask (OpenAI/LAION CLIP text towers)"
    )


def _batch_first_attention(attn: nn.MultiheadAttention, x: torch.Tensor, attn_mask) -> torch.Tensor:
    """The block's attention on a (B, L, E) input without transposing it first.

    nn.MultiheadAttention(batch_first=True) transposes to (L, B, E) and projects that strided
    view, which CPU BLAS runs at about half speed; here the projection is one GEMM on the
    contiguous input. Same weights, same function (to float rounding).
    """
    b, n, e = x.shape
    h = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # MHA: True = blocked; SDPA: True = allowed
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if attn_mask is None else attn_mask.to(q.dtype))
    return F.linear(out.transpose(1, 2).reshape(b, n, e), attn.out_proj.weight, attn.out_proj.bias)


def _fast_block(block: nn.Module, x: torch.Tensor, attn_mask) -> torch.Tensor:
    x = x + block.ls_1(_batch_first_attention(block.attn, block.ln_1(x), attn_mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _has_fast_path(block: nn.Module) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn.in_proj_weight is not None
            and attn.bias_k is None and (attn.dropout == 0.0 or not attn.training))


def _run_block(block: nn.Module, x: torch.Tensor, attn_mask, use_checkpoint: bool) -> torch.Tensor:
    """One open_clip block. With gradients (training), standard blocks take the batch-first
    attention above; without, open_clip's own forward runs, so inference equals open_clip exactly."""
    if not torch.is_grad_enabled() or not _has_fast_path(block):
        if use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        return block(x, attn_mask=attn_mask)
    if use_checkpoint:
        return checkpoint(_fast_block, block, x, attn_mask, use_reentrant=False)
    return _fast_block(block, x, attn_mask)


class PromptedImageEncoder(nn.Module):
    """An open_clip ViT image tower with deep vision prompts (VPT-deep / IVLP vision side).

    Prompts are appended after [CLS + patches] once positional embeddings are added (they get
    none), before ln_pre; at blocks 1..depth-1 the last n_ctx tokens are replaced by that block's
    prompts. Depth 0 is plain CLIP. Output: pooled, projected, *unnormalised* features.
    """

    def __init__(self, visual: nn.Module, depth: int = 0, n_ctx: int = 4, grad_checkpointing: bool = False):
        super().__init__()
        _check_vision_tower(visual)
        self.visual = visual
        width = visual.conv1.out_channels
        if depth > len(visual.transformer.resblocks):
            raise PromptKDError(f"vision prompt depth {depth} exceeds the tower's {len(visual.transformer.resblocks)} blocks")
        self.prompts = DeepPrompts(depth, n_ctx if depth > 0 else 0, width)
        self.grad_checkpointing = grad_checkpointing

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def output_dim(self) -> int:
        return self.visual.output_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        dtype = v.conv1.weight.dtype
        x = v.conv1(images.to(dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        p = self.prompts
        if p.input is not None:
            x = torch.cat([x, p.input.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x)
        for i, block in enumerate(v.transformer.resblocks):
            deep = p.at_block(i)
            if deep is not None:
                x = torch.cat([x[:, : -p.n_ctx], deep.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
            x = _run_block(block, x, None, self.grad_checkpointing)
        pooled = v.ln_post(x[:, 0])
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled


class PromptedTextEncoder(nn.Module):
    """An open_clip text tower with deep text prompts (IVLP text side).

    Class prompts are tokenised as "<ctx words> <class name>." where the context words are
    `ctx_init` ("a photo of a") when it has at least n_ctx tokens, else n_ctx "X"s with random
    context vectors. Token positions 1..n_ctx are replaced by the input context; blocks
    1..depth-1 replace them with their own prompts. Depth 0 is plain CLIP on "a photo of a {c}.".
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        depth: int = 0,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        tower = text_tower(clip)
        _check_batch_first(tower.transformer, "text tower")
        # Register the open_clip modules as children so .to()/.eval() reach them.
        self.token_embedding = tower.token_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.positional_embedding = tower.positional_embedding
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.pool_type, self.eos_id = tower.pool_type, tower.eos_id
        self.tokenizer = tokenizer
        self.grad_checkpointing = grad_checkpointing
        width = tower.token_embedding.embedding_dim
        if depth > len(tower.transformer.resblocks):
            raise PromptKDError(f"text prompt depth {depth} exceeds the tower's {len(tower.transformer.resblocks)} blocks")
        n_ctx = n_ctx if depth > 0 else 0
        init = None
        prefix = ctx_init or ""
        if depth > 0:
            # Official rule: with ctx_init of at least n_ctx tokens, the context starts as the
            # embeddings of its first n_ctx tokens and prompts read "<ctx_init> <name>."; else the
            # context is random and prompts read "X X .. X <name>.".
            init_ids = self._tokenize([ctx_init])[0] if ctx_init else None
            n_init = int((init_ids > 0).sum()) - 2 if init_ids is not None else -1  # minus SOS, EOT
            if ctx_init and n_ctx <= n_init:
                with torch.no_grad():
                    init = tower.token_embedding(init_ids[1 : 1 + n_ctx].to(tower.token_embedding.weight.device)).float()
            else:
                prefix = " ".join(["X"] * n_ctx)
        self.prefix = prefix
        self.prompts = DeepPrompts(depth, n_ctx, width, init=init)

    @property
    def output_dim(self) -> int:
        proj = self.text_projection
        if proj is None:
            return self.token_embedding.embedding_dim
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def prompt_texts(self, classnames: list[str]) -> list[str]:
        """The text each class is tokenised from (official: prefix + ' ' + name + '.')."""
        names = [c.replace("_", " ") for c in classnames]
        return [f"{self.prefix} {n}." if self.prefix else f"{n}." for n in names]

    def tokenize_classnames(self, classnames: list[str]) -> torch.Tensor:
        return self._tokenize(self.prompt_texts(classnames))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features (unnormalised) for class prompts tokenised by `tokenize_classnames`."""
        return self._forward(tokens, self.grad_checkpointing)

    def _forward(self, tokens: torch.Tensor, block_checkpoint: bool) -> torch.Tensor:
        dtype = self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") else torch.float32
        tokens = tokens.to(self.token_embedding.weight.device)
        x = self.token_embedding(tokens).to(dtype)
        p = self.prompts
        if p.input is not None:
            x = self._replace(x, p.input)
        x = x + self.positional_embedding[: x.shape[1]].to(dtype)
        mask = self.attn_mask
        if mask is not None:
            mask = mask[: x.shape[1], : x.shape[1]]
        for i, block in enumerate(self.transformer.resblocks):
            deep = p.at_block(i)
            if deep is not None:
                x = self._replace(x, deep)
            x = _run_block(block, x, mask, block_checkpoint)
        x = self.ln_final(x)
        from open_clip.transformer import text_global_pool

        pooled = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        proj = self.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return pooled

    def _replace(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        n = ctx.shape[0]
        return torch.cat([x[:, :1], ctx.to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)

    def encode(self, tokens: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Forward in class chunks; same result as one forward.

        With grad checkpointing, each chunk keeps only its input for backward and is recomputed
        there, so training memory is bounded by one chunk instead of all classes (the official
        ViT-L/14 ImageNet teacher runs 1000 class prompts with gradients at every step).
        """
        if not chunk_size or tokens.shape[0] <= chunk_size:
            return self(tokens)
        chunks = tokens.split(chunk_size)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.cat([checkpoint(self._forward, t, False, use_reentrant=False) for t in chunks], dim=0)
        return torch.cat([self(t) for t in chunks], dim=0)
