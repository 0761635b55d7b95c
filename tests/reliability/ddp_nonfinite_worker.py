"""One rank of the data-parallel non-finite test: `python ddp_nonfinite_worker.py OUT_DIR` with
torchrun-style environment variables. Rank 1 alone gets a NaN loss at its second step; the run is
done once with on_nonfinite="stop", then once with "skip"."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from promptkd.engine import TrainConfig, train_loop
from promptkd.errors import PromptKDError


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def main(policy: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    rank = dist.get_rank()
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        if rank == 1 and calls["n"] == 2:
            loss = loss * float("nan")
        return loss, {}

    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.1, warmup_epochs=0, on_nonfinite=policy, progress=False)
    try:
        res = train_loop(model, loss_fn, Data(), cfg, Path(out))
    except PromptKDError as e:
        print("STOPPED" + str(e).split("non-finite loss or gradients")[1].split(";")[0], flush=True)
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, Path(out) / "params.pt")
    print(f"SKIPPED {res.skipped_steps}", flush=True)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for policy in ("stop", "skip"):
            main(policy, str(Path(sys.argv[1]) / policy))
    finally:
        dist.destroy_process_group()
