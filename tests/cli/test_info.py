"""`promptkd info`: every kind of file and folder promptkd writes says what it is, without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from promptkd.cli import main

PROBE = """
import json, sys
from promptkd.cli import main
code = main(["info", "--json", *sys.argv[1:]])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def artifacts(runs, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("info")
    assert main(["-q", "cache", "--teacher", str(runs.teacher), "--dataset", f"folder:{data}", "--protocol", "cross",
                 "--views", "1", "--out", str(out / "cache")]) == 0
    for fmt, name in (("folder", "model"), ("safetensors", "one.safetensors"), ("onnx", "model.onnx"),
                      ("image-features", "features.onnx")):
        assert main(["-q", "export", str(runs.student), "--format", fmt, "--out", str(out / name)]) == 0
    return {
        "teacher run folder": runs.teacher, "teacher (PromptSRC prompts)": runs.teacher / "teacher.safetensors",
        "distill run folder": runs.student, "student (prompts and projector)": runs.student / "student.safetensors",
        "class vectors": runs.student / "class_vectors.safetensors",
        "training checkpoint": runs.student / "checkpoint.safetensors",
        "teacher cache (teacher image features of augmented views)": out / "cache",
        "model folder (promptkd export --format folder)": out / "model",
        "one-file student (deployable)": out / "one.safetensors",
        "ONNX classifier (image -> logits)": out / "model.onnx",
        "ONNX image side (image -> features)": out / "features.onnx",
        "distill metrics": runs.student / "metrics.json",
    }


def test_info_names_every_kind_without_importing_torch(artifacts, runs):
    paths = [str(p) for p in artifacts.values()]
    done = subprocess.run([sys.executable, "-c", PROBE, *paths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *described, status = done.stdout.strip().splitlines()
    assert json.loads(status) == {"code": 0, "torch": False}
    described = [json.loads(line) for line in described]
    assert [d["kind"] for d in described] == list(artifacts)
    by_kind = {d["kind"]: d for d in described}
    metrics = json.loads((runs.student / "metrics.json").read_text())
    teacher_hash = metrics["teacher"]["prompts_hash"]
    for kind in ("teacher (PromptSRC prompts)", "distill run folder", "model folder (promptkd export --format folder)",
                 "one-file student (deployable)", "ONNX classifier (image -> logits)",
                 "teacher cache (teacher image features of augmented views)"):
        assert teacher_hash in json.dumps(by_kind[kind]), kind  # which teacher, for every kind that has one
    last = f"accuracy {metrics['results']['last']['accuracy']:.2f}"
    assert by_kind["distill run folder"]["metrics: distilled (last epoch)"].startswith(last)
    zero_shot = f"accuracy {metrics['baseline']['student_zero_shot']['accuracy']:.2f}"
    assert by_kind["model folder (promptkd export --format folder)"]["metrics: student CLIP, zero-shot"] == zero_shot
    assert by_kind["class vectors"]["classes"] == "4 (blue, green, red, yellow)"
    assert by_kind["one-file student (deployable)"]["precision"] == "fp32"
    assert by_kind["ONNX image side (image -> features)"]["pairs with"].startswith("features.class_vectors.safetensors")
    assert by_kind["distill run folder"]["command"].startswith("promptkd -q distill")


def test_info_text_and_errors(artifacts, capsys, tmp_path):
    assert main(["info", str(artifacts["class vectors"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split(None, 1) == ["kind:", "class vectors"]
    (tmp_path / "plain").mkdir()
    assert main(["info", str(tmp_path / "plain")]) == 2
    assert "not a promptkd folder" in capsys.readouterr().err
