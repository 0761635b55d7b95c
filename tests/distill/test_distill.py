"""Distillation end to end on tiny models: it works, resumes exactly, and refuses mismatched inputs."""

import json

import pytest
import torch
import torch.nn.functional as F
from distill_helpers import make_models, text_class_vectors, tiny_student, tiny_teacher, write_images
from tinyclip import killed_at_call

import promptkd.stages.distill as distill_mod
from promptkd.cli import main
from promptkd.data.transforms import transforms_for
from promptkd.engine import TrainConfig
from promptkd.errors import PromptKDError
from promptkd.metrics import encode_items
from promptkd.models.wrappers import ClassVectors
from promptkd.stages.distill import distill_models


def prototype_class_vectors(teacher, items, names):
    """Class vectors the teacher separates the colours with (random text features would not)."""
    tf = transforms_for(teacher.clip.preprocess_cfg)[1]
    feats, labels = encode_items(teacher.encode_images, items, tf, progress=False)
    proto = torch.stack([feats[labels == k].mean(0) for k in range(len(names))])
    return ClassVectors(F.normalize(proto - proto.mean(0), dim=-1), names, teacher.identity()), feats


def agreement(student, items, tf, cv, teacher_pred):
    student.eval()
    feats, _ = encode_items(student, items, tf, progress=False)
    return ((feats @ cv.vectors.T).argmax(-1) == teacher_pred).float().mean().item()


def test_distillation_raises_agreement_with_the_teacher(tmp_path, tiny_configs):
    teacher, student = make_models(tiny_configs)
    items, names = write_images(tmp_path / "images")
    cv, t_feats = prototype_class_vectors(teacher, items, names)
    teacher_pred = (t_feats @ cv.vectors.T).argmax(-1)
    tf = transforms_for(student.clip.preprocess_cfg)[1]
    before = agreement(student, items, tf, cv, teacher_pred)
    cfg = TrainConfig(epochs=4, batch_size=8, lr=0.01, warmup_epochs=0, progress=False)
    res = distill_models(teacher, student, cv, items, tmp_path / "run", val_items=items[::2], test_items=items,
                         train=cfg, kd_weight=100.0, official_best_on_test=True)
    after = agreement(student, items, tf, cv, teacher_pred)
    assert after >= before + 0.4, (before, after)

    out = tmp_path / "run"
    for f in ("student.safetensors", "student-best-val.safetensors", "class_vectors.safetensors",
              "checkpoint.safetensors", "metrics.jsonl", "metrics.json"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["results"]["last"]["epoch"] == 4
    assert "val" in metrics["history"][0] and "test_accuracy" in metrics["history"][0]
    assert "test data" in metrics["results"]["official_best_on_test"]["note"]
    assert metrics["results"]["best_val"]["val"] == max(h["val"] for h in metrics["history"])
    assert res.student_path == out / "student.safetensors"


def test_resume_after_interruption_gives_identical_weights(tiny_configs, tmp_path):
    items, names = write_images(tmp_path / "images")
    t_cfg, s_cfg = tiny_configs
    teacher = tiny_teacher(t_cfg)
    cv = text_class_vectors(teacher, names)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, warmup_epochs=0, checkpoint_every=1, progress=False)

    ref = tiny_student(s_cfg, teacher.dim)
    distill_models(teacher, ref, cv, items, tmp_path / "ref", val_items=items, train=cfg)

    with killed_at_call(distill_mod, "kd_loss", 5):  # epoch 2, step 2 (3 steps per epoch)
        distill_models(teacher, tiny_student(s_cfg, teacher.dim), cv, items, tmp_path / "run", val_items=items, train=cfg)
    resumed = tiny_student(s_cfg, teacher.dim)
    with torch.no_grad():  # trained state must come from the checkpoint, not from the init
        for p in resumed.parameters():
            if p.requires_grad:
                p.add_(1.0)
    distill_models(teacher, resumed, cv, items, tmp_path / "run", val_items=items, train=cfg, resume=True)
    a, b = ref.trainable_tensors(), resumed.trainable_tensors()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]

    with pytest.raises(PromptKDError, match="kd_weight"):
        distill_models(teacher, resumed, cv, items, tmp_path / "run", train=cfg, resume=True, kd_weight=5.0)


def test_mismatched_class_vectors_say_what_differs(tmp_path, tiny_configs):
    teacher, student = make_models(tiny_configs)
    items, names = write_images(tmp_path / "images")
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False)
    wrong_names = text_class_vectors(teacher, ["red", "green", "blue", "purple"])
    with pytest.raises(PromptKDError, match="1 missing.*yellow"):
        distill_models(teacher, student, wrong_names, items, tmp_path / "a", train=cfg,
                       protocol=_protocol(names, items))
    wrong_dim = ClassVectors(torch.randn(4, 7), names, teacher.identity())
    with pytest.raises(PromptKDError, match="dim 7"):
        distill_models(teacher, student, wrong_dim, items, tmp_path / "b", train=cfg)
    other = tiny_teacher(tiny_configs[0])
    torch.nn.init.normal_(other.image.prompts.input)
    with pytest.raises(PromptKDError, match="another teacher"):
        distill_models(teacher, student, text_class_vectors(other, names), items, tmp_path / "c", train=cfg)


def _protocol(names, items):
    from promptkd.data.protocols import EvalSplit, Protocol

    return Protocol("cross", "colours", names, items, {}, {"accuracy": EvalSplit(items)})


def _clip_file(bundle, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(path))
    return path


def test_cli_distill_then_eval(tiny_configs, tmp_path, capsys):
    """Files in, files out: teacher artifact + labelled folder -> student -> `promptkd eval`."""
    from promptkd.models import load_clip
    from promptkd.models.wrappers import Teacher

    t_cfg, s_cfg = tiny_configs
    for split in ("train", "val", "test"):
        write_images(tmp_path / "data" / split, per_class=2 if split != "train" else 4, seed=len(split))
    t_weights = _clip_file(load_clip(str(t_cfg)), tmp_path / "teacher-clip.safetensors")
    teacher = Teacher(load_clip(str(t_cfg), str(t_weights)), 2, 2, 2, 2)
    teacher.save(tmp_path / "teacher.safetensors")
    s_weights = _clip_file(load_clip(str(s_cfg)), tmp_path / "student-clip.safetensors")
    (tmp_path / "preset.yaml").write_text("vision_depth: 2\nn_ctx_vision: 2\nprotocol: cross\n"
                                          "train: {epochs: 2, batch_size: 8, warmup_epochs: 0}\n")
    common = ["--teacher", str(tmp_path / "teacher.safetensors"), "--teacher-model", str(t_cfg),
              "--teacher-weights", str(t_weights)]
    code = main(["distill", "--config", str(tmp_path / "preset.yaml"), "--dataset", f"folder:{tmp_path / 'data'}",
                 *common, "--student-model", str(s_cfg), "--student-weights", str(s_weights), "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # a folder is not one of the paper's datasets: the per-image default, x 4 classes (official reduction)
    assert metrics["kd_weight"] == distill_mod.CUSTOM_KD_PER_IMAGE * 4 and metrics["config"]["vision_depth"] == 2
    assert set(metrics["results"]) == {"last", "best_val"}
    assert set(metrics["baseline"]["student_zero_shot"]) == set(metrics["baseline"]["teacher"]) == {"accuracy"}
    printed = capsys.readouterr().out
    assert "student:" in printed
    table = printed[printed.index("accuracy\n"):].splitlines()  # the baseline table closes the output
    assert [row.split("  ")[0].strip() for row in table[1:4]] == ["student zero-shot", "teacher",
                                                                  "distilled student (last epoch)"]
    assert float(table[3].split()[-1]) == pytest.approx(metrics["results"]["last"]["accuracy"], abs=0.005)

    out = tmp_path / "eval.json"
    code = main(["eval", "--dataset", f"folder:{tmp_path / 'data'}", "--protocol", "cross",
                 "--student", str(tmp_path / "run" / "student.safetensors"), "--student-model", str(s_cfg),
                 "--student-weights", str(s_weights), "--class-vectors", str(tmp_path / "run" / "class_vectors.safetensors"),
                 "--no-progress", "--out", str(out)])
    assert code == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["images"] == {"accuracy": 8}
    assert evaluated["results"]["accuracy"] == pytest.approx(metrics["results"]["last"]["accuracy"])
    code = main(["eval", "--dataset", f"folder:{tmp_path / 'data'}", "--protocol", "cross", *common,
                 "--no-progress"])
    assert code == 0
    assert "accuracy" in capsys.readouterr().out


def test_missing_teacher_is_a_one_line_error(tmp_path, capsys):
    code = main(["distill", "--dataset", f"folder:{tmp_path}", "--teacher", str(tmp_path / "nope.safetensors"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "teacher file or run folder not found" in err


def test_unknown_config_key_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("kd_wieght: 3\n")
    with pytest.raises(PromptKDError, match="kd_wieght"):
        distill_mod.DistillConfig.from_yaml(tmp_path / "bad.yaml")


def test_presets_load(tmp_path):
    from pathlib import Path

    for p in sorted((Path(__file__).parents[2] / "configs" / "distill").glob("*.yaml")):
        cfg = distill_mod.DistillConfig.from_yaml(p)
        assert cfg.train.batch_size == 8 and cfg.train.epochs == 20 and cfg.train.lr == 0.005
