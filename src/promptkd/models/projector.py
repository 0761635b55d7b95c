"""The student's projector: student embedding -> teacher embedding (official: 2-layer MLP, BN between)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks too (each rank's loss depends
    on every rank's inputs through the shared statistics)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics are over the *global* batch under DDP.

    Each rank holds a slice of every global batch, so per-rank statistics would make a 2-process
    run differ from a 1-process run with the same batch. The statistics are all-reduced with
    a differentiable all-reduce, whose backward all-reduces the gradients too, so the engine's
    gradient average equals the single-process gradient. Mean and variance take two reductions
    (sum, then squared deviations) for the same numerics as BatchNorm's two-pass variance.
    Without a process group (or in eval mode) it is plain BatchNorm1d; state-dict names match.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        xf = x.float()
        head = torch.cat([xf.sum(0), xf.new_tensor([float(x.shape[0])])])
        head = all_reduce(head)
        total, count = head[:-1], head[-1]
        mean = total / count
        var = all_reduce(((xf - mean) ** 2).sum(0)) / count  # biased, as used for normalising
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


class Projector(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear.

    The official module uses 1x1 convs on a (B, C, 1, 1) view, which is the same function as
    these Linear layers; weights convert by dropping the trailing 1x1 dims.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.bn = GlobalBatchNorm1d(out_dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(out_dim, out_dim)
        # PyTorch's Conv2d and Linear share the same default (Kaiming-uniform) initialisation.

    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(x))))

