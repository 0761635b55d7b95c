"""Contrastive pretraining: a few steps lower the loss and write loadable weights."""

import json

import torch

from promptkd.toy.commands import main
from promptkd.toy.models import build_toy_clip, read_toy_metadata
from promptkd.toy.pretrain import contrastive_loss, pretrain


def test_contrastive_loss_uses_all_true_captions():
    feats = torch.eye(4)
    matches = torch.eye(4, dtype=torch.bool)
    low = contrastive_loss(feats, feats, torch.tensor(3.0), matches)
    # two identical pairs: a loss that treats the twin as a negative would stay high
    twin = feats.clone()
    twin[1] = twin[0]
    m2 = matches.clone()
    m2[0, 1] = m2[1, 0] = True
    assert contrastive_loss(twin, twin, torch.tensor(3.0), m2) < low + 1.0
    assert low < contrastive_loss(feats, feats.flip(0), torch.tensor(3.0), matches)


def test_a_few_steps_decrease_the_loss(tmp_path):
    summary = pretrain("toy-student", tmp_path, seed=0, steps=30, batch_size=32, lr=2e-3, warmup_steps=5,
                       eval_every_s=0, checkpoint_every_s=0, eval_n_per_class=2, log=lambda s: None)
    records = [json.loads(line) for line in (tmp_path / "toy-student.log.jsonl").read_text().splitlines()]
    first = pretrain_first_loss(tmp_path)
    assert summary["steps"] == 30
    assert summary["loss"] < first
    assert records[-1]["event"] == "done"
    model, _, _ = build_toy_clip("toy-student", weights=summary["weights"])
    assert json.loads(read_toy_metadata(summary["weights"])["steps"]) == 30
    assert model is not None


def pretrain_first_loss(tmp_path):
    """The loss of a fresh model on the first batch, measured the same way as training."""
    import open_clip

    from promptkd.toy.models import create_toy_model
    from promptkd.toy.pretrain import normalize_images
    from promptkd.toy.world import World, _seed_of

    torch.manual_seed(0)
    model = create_toy_model("toy-student")
    tok = open_clip.get_tokenizer("toy-student")
    gen = torch.Generator().manual_seed(_seed_of("pretrain", 0))
    images, captions, t, s = World(0).pretrain_batch(32, gen, return_attributes=True)
    with torch.no_grad():
        return contrastive_loss(model.encode_image(normalize_images(images)), model.encode_text(tok(captions)),
                                model.logit_scale, World.caption_matches(t, s)).item()


def test_pretrain_is_reproducible_from_the_seed(tmp_path):
    kw = dict(seed=3, steps=3, batch_size=8, eval_every_s=0, checkpoint_every_s=0, eval_n_per_class=1,
              log=lambda s: None)
    a = pretrain("toy-student", tmp_path / "a", **kw)
    b = pretrain("toy-student", tmp_path / "b", **kw)
    ma, _, _ = build_toy_clip("toy-student", weights=a["weights"])
    mb, _, _ = build_toy_clip("toy-student", weights=b["weights"])
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_main_cli(tmp_path, capsys):
    assert main(["student", "--out", str(tmp_path), "--steps", "2", "--batch-size", "8", "--eval-seconds", "0",
                 "--checkpoint-seconds", "0", "--eval-n-per-class", "1"]) == 0
    assert (tmp_path / "toy-student.safetensors").is_file()


def test_stop_after_steps_gives_that_step_of_the_longer_schedule(tmp_path):
    """How the shipped student was made: its weights are a step of a longer run, not a short run."""
    kw = dict(seed=1, steps=6, batch_size=8, warmup_steps=2, eval_every_s=0, eval_n_per_class=1, log=lambda s: None)
    full = pretrain("toy-student", tmp_path / "full", checkpoint_every_s=1e-9, **kw)  # a checkpoint every step
    cut = pretrain("toy-student", tmp_path / "cut", checkpoint_every_s=0, stop_after_steps=3, **kw)
    short = pretrain("toy-student", tmp_path / "short", checkpoint_every_s=0,
                     **{**kw, "steps": 3})  # its own 3-step schedule anneals to 0

    def state(path):
        return build_toy_clip("toy-student", weights=path)[0].state_dict()

    at3, mid, end, own = (state(p) for p in (tmp_path / "full" / "toy-student-step000003.safetensors",
                                              cut["weights"], full["weights"], short["weights"]))
    assert cut["steps"] == 3 and json.loads(read_toy_metadata(cut["weights"])["steps"]) == 3
    assert all(torch.equal(at3[k], mid[k]) for k in at3)
    assert not all(torch.equal(end[k], mid[k]) for k in end)
    assert not all(torch.equal(own[k], mid[k]) for k in own)


def test_promptkd_toy_pretrain_command(tmp_path, capsys):
    from promptkd.cli import main as cli_main

    out = tmp_path / "run"
    common = ["toy", "pretrain", "student", "--out", str(out), "--batch-size", "8", "--eval-seconds", "0",
              "--checkpoint-seconds", "0", "--eval-n-per-class", "1"]
    assert cli_main([*common, "--steps", "2"]) == 0
    assert json.loads(read_toy_metadata(out / "toy-student.safetensors")["steps"]) == 2
    assert cli_main([*common, "--steps", "2", "--stop-after-steps", "3"]) == 2
    assert "--stop-after-steps" in capsys.readouterr().err
