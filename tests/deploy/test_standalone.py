"""The one-file student (`promptkd export --format safetensors`): everything to classify in one safe
file, used with no CLIP file present, predicting what the run folder predicts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tinyclip import openai_config, openai_state_dict

from promptkd.artifacts import load_artifact, read_artifact_meta, save_artifact
from promptkd.cli import main
from promptkd.deploy import StudentClassifier
from promptkd.errors import PromptKDError
from promptkd.models import load_clip
from promptkd.models.wrappers import Student

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def run_folder(tiny_kd, tmp_path):
    """A student on an OpenAI-format CLIP (QuickGELU, heads inferred: its config sets none) whose
    weights and config are files, as in a real run folder; BatchNorm statistics made non-trivial."""
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "tiny-oa.json").write_text(json.dumps(openai_config(embed=24)))
    torch.save(openai_state_dict(embed=24, seed=9), clips / "tiny-oa.pt")
    clip = load_clip(str(clips / "tiny-oa.json"), str(clips / "tiny-oa.pt"))
    torch.manual_seed(4)
    student = Student(clip, tiny_kd.teacher.dim, 2, 2)
    bn = student.projector.bn
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 1.5)
    run = tmp_path / "run"
    student.save(run / "student.safetensors", teacher=tiny_kd.teacher.identity())
    shutil.copy(tiny_kd.paths.classes, run / "classes.safetensors")
    clip_args = ["--student-model", str(clips / "tiny-oa.json"), "--student-weights", str(clips / "tiny-oa.pt")]
    return SimpleNamespace(run=run, clips=clips, student=run / "student.safetensors", classes=run / "classes.safetensors",
                           clip_args=clip_args, names=tiny_kd.names, tmp=tmp_path)


def _export(rf, out, *extra):
    return main(["export", "--format", "safetensors", "--student", str(rf.student), "--class-vectors", str(rf.classes),
                 *rf.clip_args, "--out", str(out), *extra])


def _alone(path: Path, tmp: Path) -> Path:
    """The file copied into an empty folder; the CLIP weights and config moved out of reach."""
    lone = tmp / "lone"
    lone.mkdir()
    shutil.copy(path, lone / path.name)
    return lone / path.name


def test_one_file_student_predicts_what_the_run_folder_predicts(run_folder, image_folder, capsys):
    rf = run_folder
    reference = StudentClassifier.load(rf.student, rf.classes,
                                       clip=load_clip(str(rf.clips / "tiny-oa.json"), str(rf.clips / "tiny-oa.pt")))
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
    assert main(["predict", str(image_folder), "--student", str(rf.student), "--class-vectors", str(rf.classes),
                 *rf.clip_args, "--json", "--topk", "4"]) == 1  # one broken image in the folder
    from_run = json.loads(capsys.readouterr().out)

    assert _export(rf, rf.tmp / "model.safetensors") == 0
    assert capsys.readouterr().out.strip() == str(rf.tmp / "model.safetensors")
    lone = _alone(rf.tmp / "model.safetensors", rf.tmp)
    shutil.rmtree(rf.clips)  # no CLIP weights, no model config
    clf = StudentClassifier.load(lone)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), expected, rtol=0, atol=1e-5)
    assert clf.classnames == rf.names and clf.transform.size == 32 and clf.transform.mean == reference.transform.mean

    assert main(["predict", str(image_folder), "--model", str(lone), "--json", "--topk", "4"]) == 1
    assert json.loads(capsys.readouterr().out) == from_run


def test_one_file_student_runs_in_a_fresh_process_with_no_other_file(run_folder, image_folder, capsys):
    """A new Python process (no open_clip config registered, no CLIP file anywhere) in an empty folder."""
    rf = run_folder
    assert main(["predict", str(image_folder / "red.png"), "--student", str(rf.student), "--class-vectors",
                 str(rf.classes), *rf.clip_args, "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert _export(rf, rf.tmp / "model.safetensors") == 0
    lone = _alone(rf.tmp / "model.safetensors", rf.tmp)
    shutil.rmtree(rf.clips)
    image = lone.parent / "red.png"
    shutil.copy(image_folder / "red.png", image)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "promptkd.cli", "predict", "red.png", "--model", lone.name, "--json"],
                          cwd=lone.parent, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert [t["class"] for t in got["predictions"][0]["top"]] == [t["class"] for t in from_run["predictions"][0]["top"]]
    assert [t["prob"] for t in got["predictions"][0]["top"]] == pytest.approx(
        [t["prob"] for t in from_run["predictions"][0]["top"]], abs=1e-5)


def test_one_file_student_holds_the_image_tower_only_and_says_what_it_is(run_folder, tiny_kd):
    rf = run_folder
    assert _export(rf, rf.tmp / "model.safetensors") == 0
    tensors, meta = load_artifact(rf.tmp / "model.safetensors", kind="student_classifier")
    clip_sd = load_clip(str(rf.clips / "tiny-oa.json"), str(rf.clips / "tiny-oa.pt")).model.state_dict()
    assert {k for k in tensors if k.startswith("visual.")} == {k for k in clip_sd if k.startswith("visual.")}
    assert not any(k.startswith(("token_embedding", "transformer.", "ln_final", "text_projection")) for k in tensors)
    student = load_artifact(rf.student)[0]
    assert {k for k in tensors if not k.startswith("visual.")} == {*student, "class_vectors", "logit_scale"}
    assert all(torch.equal(tensors[k], v) for k, v in student.items())
    assert meta["format"] == "promptkd-student/1" and meta["precision"] == "fp32"
    assert meta["classnames"] == rf.names and meta["image_size"] == 32 and meta["interpolation"] == "bicubic"
    assert meta["teacher"] == json.loads(json.dumps(tiny_kd.teacher.identity()))
    assert meta["class_vectors_teacher"]["prompts_hash"] == tiny_kd.teacher.identity()["prompts_hash"]
    weights = rf.clips / "tiny-oa.pt"  # the CLIP by content: its weights file's sha256, not where it lies
    assert meta["student"]["clip"] == {"model": "tiny-oa", "pretrained": "tiny-oa.pt",
                                       "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    tower = meta["student"]["tower"]
    assert tower["quick_gelu"] is True and tower["vision_cfg"]["head_width"] == 64  # 128 wide, OpenAI's 2 heads
    assert b"pickle" not in (rf.tmp / "model.safetensors").read_bytes()[:8]  # safetensors: 8-byte length, JSON


def test_fp16_one_file_student_is_half_the_size_and_predicts_alike(run_folder):
    rf = run_folder
    assert _export(rf, rf.tmp / "m32.safetensors") == 0
    assert _export(rf, rf.tmp / "m16.safetensors", "--fp16") == 0
    size32, size16 = (rf.tmp / "m32.safetensors").stat().st_size, (rf.tmp / "m16.safetensors").stat().st_size
    assert 0.45 < size16 / size32 < 0.56
    assert read_artifact_meta(rf.tmp / "m16.safetensors")["precision"] == "fp16"
    assert load_file(str(rf.tmp / "m16.safetensors"))["visual.conv1.weight"].dtype == torch.float16
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    c32, c16 = StudentClassifier.load(rf.tmp / "m32.safetensors"), StudentClassifier.load(rf.tmp / "m16.safetensors")
    with torch.no_grad():
        p32, p16 = c32(x).softmax(-1), c16(x).softmax(-1)
    assert c16.class_vectors.dtype == torch.float32  # runs in fp32
    assert torch.equal(p32.argmax(-1), p16.argmax(-1)) and (p32 - p16).abs().max() < 2e-2


def test_student_file_alone_is_not_a_model(run_folder, image_folder, capsys):
    code = main(["predict", str(image_folder / "red.png"), "--model", str(run_folder.student)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "holds only prompts and projector" in err


def _damage(src: Path, dst: Path, tensors=lambda t: t, meta=lambda m: m) -> Path:
    t, m = load_artifact(src)
    return save_artifact(dst, tensors(dict(t)), meta(dict(m)))  # writes whatever it is given


def _tower(m, **changes):
    tower = json.loads(json.dumps(m["student"]["tower"]))
    tower["vision_cfg"].update(changes)
    return {**m, "student": {**m["student"], "tower": tower}}


DAMAGES = [
    ("NaN in the image tower", lambda t: {**t, "visual.ln_post.bias": t["visual.ln_post.bias"] * float("nan")}, None,
     "tensor 'visual.ln_post.bias' holds"),
    ("a tower tensor of another shape", lambda t: {**t, "visual.proj": torch.zeros(128, 7)}, None,
     "embed dim 24 in the description, 7 in the tensors"),
    ("a tower tensor missing", lambda t: {k: v for k, v in t.items() if k != "visual.ln_pre.weight"}, None,
     "missing keys"),
    ("a stray tensor", lambda t: {**t, "token_embedding.weight": torch.zeros(3, 3)}, None,
     "unexpected \\['token_embedding.weight'\\]"),
    ("class vectors of another width", lambda t: {**t, "class_vectors": torch.zeros(4, 5)}, None,
     "class vectors have dim 5"),
    ("a tower asking for a huge model", None, lambda m: _tower(m, width=100_000), "vision width 100000 in the"),
    ("a timm tower", None, lambda m: _tower(m, timm_model_name="vit_huge"), "only open_clip ViT"),
    ("a plain student's kind", None, lambda m: {**m, "kind": "class_vectors"}, "expected a student_classifier"),
    ("another format", None, lambda m: {**m, "format": "promptkd-student/9"}, "unknown one-file student format"),
    ("class names not strings", None, lambda m: {**m, "classnames": [1, 2, 3, 4]}, "'classnames' is malformed"),
    ("one class name too many", None, lambda m: {**m, "classnames": [*m["classnames"], "x"]},
     "vectors for 5 class names"),
]


@pytest.mark.parametrize("what,tensors,meta,message", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_damaged_one_file_student_is_refused_in_one_line(run_folder, image_folder, capsys, what, tensors, meta,
                                                         message):
    rf = run_folder
    assert _export(rf, rf.tmp / "model.safetensors") == 0
    bad = _damage(rf.tmp / "model.safetensors", rf.tmp / "bad.safetensors", tensors or (lambda t: t),
                  meta or (lambda m: m))
    capsys.readouterr()
    with pytest.raises(PromptKDError, match=message):
        StudentClassifier.load(bad)
    assert main(["predict", str(image_folder / "red.png"), "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.safetensors" in err


def test_fp16_export_of_weights_beyond_fp16_is_refused(run_folder, capsys):
    rf = run_folder
    t, m = load_artifact(rf.student)
    t["projector.fc2.weight"] = t["projector.fc2.weight"] * 1e6
    save_artifact(rf.run / "big.safetensors", t, m)
    rf.student = rf.run / "big.safetensors"
    assert _export(rf, rf.tmp / "m16.safetensors", "--fp16") == 2
    assert "'projector.fc2.weight' exceeds the fp16 range" in capsys.readouterr().err
    assert not (rf.tmp / "m16.safetensors").exists() and not list(rf.tmp.glob(".m16*"))
