"""A tiny training world for the engine tests: a noisy 3-class dataset that augments like the image
datasets, a small model with a frozen part and BatchNorm, and its cross-entropy loss."""

import torch
from torch import nn


class Noisy(torch.utils.data.Dataset):
    """(x, y, index) with an augmentation drawn from (seed, epoch, index), like the image datasets."""

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.epoch = 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(hash((1, self.epoch, i)) % 2**31)
        return self.x[i] + 0.1 * torch.randn(6, generator=g), self.y[i], i


def make_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    m[0].weight.requires_grad_(False)  # a frozen part, like the CLIP towers
    return m


def ce_loss(model):
    return lambda batch: (nn.functional.cross_entropy(model(batch[0]), batch[1]), {})
