"""Teacher stage: PromptSRC loss terms, GPA, CE-only mode, resume, artifact and config."""

import json
import math

import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from tinyclip import killed_at_call

from promptkd.artifacts import load_artifact
from promptkd.cli import main
from promptkd.errors import PromptKDError
from promptkd.models.wrappers import Teacher
from promptkd.stages import teacher as teacher_stage
from promptkd.stages.teacher import (
    PromptAggregate,
    TeacherConfig,
    TeacherObjective,
    gpa_weights,
    train_teacher,
    train_teacher_on,
)
from promptkd.stages.templates import IMAGENET_TEMPLATES


def test_templates_are_60_of_clips_imagenet_templates():
    clip80 = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 60
    assert IMAGENET_TEMPLATES[0] == "a photo of a {}."
    assert all(t in clip80 for t in IMAGENET_TEMPLATES)


def test_gpa_weights_are_the_normalised_gaussian():
    w = gpa_weights(20, 15, 1)
    pdf = [math.exp(-0.5 * (e - 15) ** 2) / math.sqrt(2 * math.pi) for e in range(1, 21)]
    assert w == pytest.approx([p / sum(pdf) for p in pdf])
    assert sum(w[13:16]) == pytest.approx(0.88, abs=0.01)  # epochs 14-16 carry ~88% (official-promptkd §1.2)
    assert all(math.isfinite(x) for x in gpa_weights(3, 15, 1))  # far-away mean: still a distribution


def _batch(teacher):
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 3, 1])


def test_each_promptsrc_term_equals_its_direct_formula(make_teacher, make_config):
    teacher = make_teacher()
    names = ["apple", "banana", "cherry", "green_grape"]
    cfg = make_config()
    terms = TeacherObjective(teacher, names, cfg).terms(*_batch(teacher))
    images, labels = _batch(teacher)

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        w = unit(teacher.text(teacher.text.tokenize_classnames(names)))  # prompted text features
        u = unit(teacher.image(images))  # prompted image features
        model, tok = teacher.clip.model, teacher.clip.tokenizer
        per_template = [model.encode_text(tok([t.format(n.replace("_", " ")) for n in names])) for t in IMAGENET_TEMPLATES]
        f = unit(torch.stack(per_template).mean(0))  # frozen text, averaged unnormalised, then normalised
        z = unit(model.encode_image(images))  # frozen, prompt-free image features
        s = model.logit_scale.exp()
        logits, zs = s * u @ w.T, s * z @ f.T
        B, C = logits.shape
        log_p = logits - logits.logsumexp(-1, keepdim=True)
        log_q = zs - zs.logsumexp(-1, keepdim=True)
        ce = -log_p[torch.arange(B), labels].mean()
        text_l1 = 25 * (w - f).abs().sum() / w.numel()
        image_l1 = 10 * (u - z).abs().sum() / u.numel()
        kl = (log_q.exp() * (log_q - log_p)).sum() / (B * C)
    assert set(terms) == {"ce", "text_l1", "image_l1", "logits_kl"}
    for name, want in (("ce", ce), ("text_l1", text_l1), ("image_l1", image_l1), ("logits_kl", kl)):
        assert torch.allclose(terms[name], want, rtol=1e-4, atol=1e-6), name
    loss, logs = TeacherObjective(teacher, names, cfg)((images, labels, None))
    assert torch.allclose(loss, ce + text_l1 + image_l1 + kl, rtol=1e-4)


def test_text_chunk_gives_the_same_loss_and_gradients(make_teacher, make_config):
    names = ["apple", "banana", "cherry", "grape", "kiwi"]
    grads = []
    for chunk in (None, 2):
        teacher = make_teacher()
        teacher.text.grad_checkpointing = bool(chunk)
        loss, _ = TeacherObjective(teacher, names, make_config(text_chunk=chunk))((*_batch(teacher), None))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in teacher.text.prompts.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):  # equal up to float summation order
        assert (a - b).norm() <= 1e-4 * a.norm()


def test_ce_mode_trains_with_cross_entropy_only(make_teacher, make_config, fruit, tmp_path):
    teacher = make_teacher()
    cfg = make_config(mode="ce")
    assert cfg.gpa is False  # the official IVLP trainer has no GPA
    objective = TeacherObjective(teacher, fruit.classnames, cfg)
    assert objective.text_reference is None  # no frozen references are even computed
    images, labels = _batch(teacher)
    loss, logs = objective((images, labels, None))
    assert set(logs) == {"ce"}
    logits = teacher.logit_scale * teacher.encode_images(images) @ teacher.encode_classnames(fruit.classnames).T
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, labels))

    path = train_teacher_on(teacher, fruit.train, fruit.val, fruit.classnames, cfg, tmp_path)
    _, meta = load_artifact(path, kind="teacher")
    assert set(meta["loss_curves"]) == {"loss", "ce"}
    assert meta["loss_curves"]["loss"] == meta["loss_curves"]["ce"]
    assert meta["gpa_weights"] is None


def test_gpa_writes_the_gaussian_average_of_epoch_snapshots(make_teacher, make_config, fruit, tmp_path, monkeypatch):
    snapshots = []
    original = PromptAggregate.add

    def recording_add(self, epoch):
        snapshots.append({k: v.detach().clone() for k, v in self.teacher.prompt_tensors().items()})
        return original(self, epoch)

    monkeypatch.setattr(PromptAggregate, "add", recording_add)
    cfg = make_config(train={"epochs": 3}, gpa_mean=2.0, gpa_std=0.8)
    path = train_teacher_on(make_teacher(), fruit.train, fruit.val, fruit.classnames, cfg, tmp_path)
    assert len(snapshots) == 3
    g = [math.exp(-0.5 * ((e - 2.0) / 0.8) ** 2) for e in (1, 2, 3)]
    g = [x / sum(g) for x in g]
    saved, meta = load_artifact(path, kind="teacher")
    assert not torch.equal(snapshots[0]["text.input"], snapshots[2]["text.input"])  # it did train
    for k in snapshots[0]:
        want = sum(w * s[k] for w, s in zip(g, snapshots))
        assert torch.allclose(saved[k], want, atol=1e-6), k
    assert meta["gpa_weights"] == pytest.approx(g)


def test_artifact_has_val_accuracy_loss_curves_and_reloads(make_teacher, make_config, fruit, tiny_clip, tmp_path):
    cfg = make_config(val_every=1)
    path = train_teacher_on(make_teacher(), fruit.train, fruit.val, fruit.classnames, cfg, tmp_path)
    tensors, meta = load_artifact(path, kind="teacher")
    assert 0 <= meta["val_acc"] <= 100 and 0 <= meta["zero_shot_val_acc"] <= 100
    assert meta["n_val"] == len(fruit.val) == 8  # the split's val set, not test
    curves = meta["loss_curves"]
    assert set(curves) == {"loss", "ce", "text_l1", "image_l1", "logits_kl"}
    assert all(len(v) == 2 for v in curves.values())
    for e in range(2):  # the total is the sum of the per-term epoch means
        assert curves["loss"][e] == pytest.approx(sum(curves[k][e] for k in curves if k != "loss"), rel=1e-5)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val_acc"] == meta["val_acc"] and metrics["loss_curves"] == curves
    assert [r["epoch"] for r in metrics["history"]] == [1, 2] and "val_acc" in metrics["history"][0]
    from promptkd.models import load_clip

    again = Teacher.load(path, clip=load_clip(*tiny_clip))
    assert all(torch.equal(again.prompt_tensors()[k], v) for k, v in tensors.items())
    assert again.identity()["prompts_hash"] == meta["prompts_hash"]


@pytest.mark.parametrize("kill_call, at", [
    (7, (1, 2)),  # epoch 2, step 3: resumes from the mid-epoch checkpoint of step 2, after the epoch-1 GPA update
    (9, (2, 0)),  # epoch 3, step 1: resumes from the end-of-epoch-2 checkpoint, two epochs in the GPA sum
])
def test_resume_after_a_gpa_update_gives_identical_prompts(make_teacher, make_config, fruit, tmp_path, kill_call, at):
    cfg = make_config(train={"epochs": 3, "checkpoint_every": 1})  # 16 images, batch 4: 4 steps per epoch
    full = train_teacher_on(make_teacher(), fruit.train, fruit.val, fruit.classnames, cfg, tmp_path / "full")

    with killed_at_call(TeacherObjective, "__call__", kill_call):
        train_teacher_on(make_teacher(), fruit.train, fruit.val, fruit.classnames, cfg, tmp_path / "cut")
    tensors, meta = load_artifact(tmp_path / "cut" / "checkpoint.safetensors", kind="checkpoint")
    assert (meta["epoch"], meta["step"]) == at
    gpa_sum = {k: v for k, v in tensors.items() if k.startswith("extra0.")}
    assert gpa_sum and all(v.abs().min() > 0 for v in gpa_sum.values())  # the aggregate holds a non-zero sum

    resumed = train_teacher_on(make_teacher(seed=99), fruit.train, fruit.val, fruit.classnames, cfg,
                               tmp_path / "cut", resume=True)
    a, meta_a = load_artifact(full, kind="teacher")
    b, meta_b = load_artifact(resumed, kind="teacher")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for k, curve in meta_a["loss_curves"].items():
        assert curve == pytest.approx(meta_b["loss_curves"][k])
    ca = load_artifact(tmp_path / "full" / "checkpoint.safetensors", kind="checkpoint")[0]
    cb = load_artifact(tmp_path / "cut" / "checkpoint.safetensors", kind="checkpoint")[0]
    assert set(ca) == set(cb) and all(torch.equal(ca[k], cb[k]) for k in ca)  # the final GPA sum too

    with pytest.raises(PromptKDError, match="mode"):
        train_teacher_on(make_teacher(), fruit.train, fruit.val, fruit.classnames, make_config(mode="ce"),
                         tmp_path / "cut", resume=True)


def test_config_presets_and_overrides(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    official = TeacherConfig.from_yaml(root / "configs/teacher/vit_l14.yaml")
    default = TeacherConfig()
    assert official.to_dict() == default.to_dict()  # the defaults are the official preset
    t = official.train
    assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs, t.warmup_epochs, t.warmup_lr) == (
        0.005, 0.9, 5e-4, 8, 20, 1, 1e-5)
    assert (official.gpa_mean, official.gpa_std, official.text_loss_weight, official.image_loss_weight) == (15, 1, 25, 10)
    assert TeacherConfig.from_yaml(root / "configs/teacher/ivlp_vit_l14.yaml").mode == "ce"
    TeacherConfig.from_yaml(root / "configs/teacher/vit_b16.yaml")

    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: ViT-B-16\n")
    with pytest.raises(PromptKDError, match="modle"):
        TeacherConfig.from_yaml(bad)

    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    teacher_stage.register(sub)
    args = parser.parse_args(["teacher", "--out", "x", "--config", str(root / "configs/teacher/vit_l14.yaml"),
                              "--lr", "0.01", "--text-chunk", "100", "--set", "image_loss_weight=5",
                              "--set", "train.grad_clip=1.0"])
    cfg = teacher_stage.config_from_args(args)
    assert (cfg.train.lr, cfg.text_chunk, cfg.image_loss_weight, cfg.train.grad_clip) == (0.01, 100, 5, 1.0)
    assert cfg.train.batch_size == 8


def test_precision_is_top_level_as_in_distill(tmp_path, caplog):
    """`precision` is a top-level setting in teacher and distill configs alike; the old place under
    `train` is still read for one release, with a warning naming the new one."""
    assert TeacherConfig.from_dict({"precision": "bf16"}).precision == "bf16"
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  precision: bf16\n  epochs: 3\n")
    with caplog.at_level("WARNING", logger="promptkd"):
        cfg = TeacherConfig.from_yaml(old)
    assert (cfg.precision, cfg.train.epochs) == ("bf16", 3)
    assert "'train.precision' is deprecated; use 'precision'" in caplog.text
    with pytest.raises(PromptKDError, match="both"):
        TeacherConfig.from_dict({"precision": "fp32", "train": {"precision": "bf16"}})
    with pytest.raises(PromptKDError, match="precision must be"):
        TeacherConfig.from_dict({"precision": "fp64"})


def test_cli_teacher_on_a_folder(tiny_clip, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["-q", "teacher", "--dataset", f"folder:{image_folder}", "--teacher-model", tiny_clip[0],
                 "--teacher-weights", tiny_clip[1], "--vision-depth", "2", "--text-depth", "2", "--n-ctx-vision", "2",
                 "--n-ctx-text", "2", "--epochs", "1", "--batch-size", "4", "--set", "train.progress=false",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    _, meta = load_artifact(out / "teacher.safetensors", kind="teacher")
    assert meta["classnames"] == ["apple", "banana"]  # base classes: first ceil(4/2)
    assert meta["n_train"] == 8 and meta["n_val"] == 4 and meta["shots"] == 16
    assert main(["teacher", "--out", str(out)]) == 2  # no dataset: one-line error
    assert "no dataset" in capsys.readouterr().err


def test_train_teacher_needs_a_dataset():
    with pytest.raises(PromptKDError, match="no dataset"):
        train_teacher(TeacherConfig(), "unused")


def test_the_recipe_returns_what_it_wrote(make_teacher, make_config, fruit, tmp_path):
    """TeacherRecipe.run() returns the artifact, the metrics and the training record: a caller needs
    not read metrics.json back, and what it gets is what the file says."""
    from promptkd.stages.teacher import TeacherRecipe

    result = TeacherRecipe(make_teacher(), fruit.train, fruit.val, fruit.classnames, make_config(mode="ce"),
                           tmp_path).run()
    assert result.path == tmp_path / "teacher.safetensors" and result.path.is_file()
    assert result.metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert result.metrics["history"] == result.train.history and len(result.train.history) >= 1
    assert result.metrics["val_acc"] == load_artifact(result.path, kind="teacher")[1]["val_acc"]
