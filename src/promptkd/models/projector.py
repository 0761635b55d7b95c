"""The student's projector: student embedding -> teacher embedding (official: 2-layer MLP, BN between)."""

from __future__ import annotations

from torch import nn


class Projector(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear.

    The official module uses 1x1 convs on a (B, C, 1, 1) view, which is the same function as
    these Linear layers; weights convert by dropping the trailing 1x1 dims.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(out_dim, out_dim)
        # PyTorch's Conv2d and Linear share the same default (Kaiming-uniform) initialisation.

    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(x))))
