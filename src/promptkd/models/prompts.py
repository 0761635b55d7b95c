"""Deep prompt tokens (IVLP / VPT-deep): one set at the input, one more per block 1..depth-1."""

from __future__ import annotations

import torch
from torch import nn


class DeepPrompts(nn.Module):
    """`depth` sets of `n_ctx` learnable tokens of size `width`.

    `input` is inserted before the first block; `deep[i-1]` replaces the prompt tokens at the
    entry of block i (1 <= i < depth). Depth 0 means no prompts at all (plain CLIP).
    """

    def __init__(self, depth: int, n_ctx: int, width: int, init: torch.Tensor | None = None, std: float = 0.02):
        super().__init__()
        if depth < 0 or n_ctx < 0:
            raise ValueError("prompt depth and n_ctx must be >= 0")
        if depth > 0 and n_ctx == 0:
            raise ValueError("prompt depth > 0 needs n_ctx >= 1")
        self.depth, self.n_ctx, self.width = depth, n_ctx, width
        if depth == 0:
            self.input = None
        else:
            first = init.detach().clone().float() if init is not None else torch.randn(n_ctx, width) * std
            if first.shape != (n_ctx, width):
                raise ValueError(f"prompt init has shape {tuple(first.shape)}, expected {(n_ctx, width)}")
            self.input = nn.Parameter(first)
        self.deep = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, width) * std) for _ in range(max(depth - 1, 0))]
        )

    def at_block(self, i: int) -> torch.Tensor | None:
        """Prompts that replace the previous ones at the entry of block i, or None."""
        if 1 <= i < self.depth:
            return self.deep[i - 1]
        return None

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map for artifacts."""
        out = {}
        if self.input is not None:
            out[f"{prefix}.input"] = self.input
        for i, p in enumerate(self.deep, start=1):
            out[f"{prefix}.deep.{i}"] = p
        return out

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, source: str = "artifact") -> None:
        """Load exactly the tensors this module has; a missing, extra or misshapen one is an error."""
        from promptkd.errors import PromptKDError

        mine = self.tensors(prefix)
        theirs = {k: v for k, v in tensors.items() if k == f"{prefix}.input" or k.startswith(f"{prefix}.deep.")}
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        if missing or extra:
            raise PromptKDError(
                f"{source}: prompt tensors do not match (depth {self.depth}): "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {extra}" if extra else "")
            )
        for k, p in mine.items():
            if tuple(theirs[k].shape) != tuple(p.shape):
                raise PromptKDError(f"{source}: {k} has shape {tuple(theirs[k].shape)}, expected {tuple(p.shape)}")
            if not theirs[k].is_floating_point() or not torch.isfinite(theirs[k]).all():
                raise PromptKDError(f"{source}: {k} must hold finite floating-point numbers")
            p.copy_(theirs[k].to(p.dtype))
