"""The README's quick start runs as written.

The `bash` block under "Quick start with real CLIP weights" is read from README.md and each of its
`promptkd` commands runs in order, in a fresh folder, with only these stand-ins substituted
(documented in docs/cli.md, "The README quick start is a test"):

| in README.md | replaced by |
|---|---|
| `pip install ...` | skipped (it must install the onnx extra the export and predict steps use) |
| `$DATA` | a generated CoOp tree: oxford_pets/images/ and split_zhou_OxfordPets.json, 4 classes |
| `clip/ViT-L-14.pt`, `clip/ViT-B-16.pt` | tiny generated OpenAI-format checkpoints |
| `ViT-L-14`, `ViT-B-16` | the tiny model-config JSONs of those checkpoints |
| `configs/teacher/vit_l14.yaml`, `configs/distill/vit_b16_c2_ep20_batch8_4ctx.yaml` | those presets, read from the repository, with tiny sizes |
| `teacher_model/OxfordPets/VLPromptLearner/model-best.pth.tar` | a generated official (Dassl) teacher checkpoint |
| `photos/` | a folder of generated images |
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import dassl_teacher_checkpoint
from tinyclip import write_images

from promptkd.cli import main

REPO = Path(__file__).resolve().parents[2]


def quickstart_lines(heading: str = "## Quick start with real CLIP weights") -> list[str]:
    """The commands of the quick-start block: continuation lines joined, comments and blanks dropped."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(shlex.join(words))
    return lines


def coop_pets(root: Path) -> Path:
    """$DATA holding OxfordPets in the CoOp layout: 4 classes, 4 train / 2 val / 2 test images each."""
    items, names = write_images(root / "oxford_pets" / "images", per_class=8)
    split = {"train": [], "val": [], "test": []}
    for i, (path, label) in enumerate(items):
        part = "train" if i % 8 < 4 else "val" if i % 8 < 6 else "test"
        split[part].append([str(Path(path).relative_to(root / "oxford_pets" / "images")), label, names[label]])
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


def tiny_preset(source: str, out: Path, **changes) -> Path:
    """The repository's preset with tiny sizes (so a renamed or broken key still fails here)."""
    data = yaml.safe_load((REPO / source).read_text())
    train = {**data.get("train", {}), **changes.pop("train", {})}
    out.write_text(yaml.safe_dump({**data, **changes, "train": train}))
    return out


@pytest.fixture
def stand_ins(tmp_path, clips) -> dict[str, str]:
    tiny = {"vision_depth": 2, "n_ctx_vision": 2}
    quick = {"epochs": 1, "batch_size": 4, "num_workers": 0, "device": "cpu", "progress": False}
    photos = tmp_path / "photos"
    write_images(photos, per_class=1)
    return {
        "$DATA": str(coop_pets(tmp_path / "data")),
        "clip/ViT-L-14.pt": str(clips.teacher_weights),
        "clip/ViT-B-16.pt": str(clips.student_weights),
        "ViT-L-14": str(clips.teacher_cfg),
        "ViT-B-16": str(clips.student_cfg),
        "configs/teacher/vit_l14.yaml": str(tiny_preset(
            "configs/teacher/vit_l14.yaml", tmp_path / "teacher.yaml", model=str(clips.teacher_cfg), shots=2,
            text_depth=2, n_ctx_text=2, **tiny, train=quick)),
        "configs/distill/vit_b16_c2_ep20_batch8_4ctx.yaml": str(tiny_preset(
            "configs/distill/vit_b16_c2_ep20_batch8_4ctx.yaml", tmp_path / "distill.yaml",
            student_model=str(clips.student_cfg), eval_batch_size=8, **tiny, train=quick)),
        "teacher_model/OxfordPets/VLPromptLearner/model-best.pth.tar": str(dassl_teacher_checkpoint(
            clips.teacher_cfg, tmp_path / "official" / "model-best.pth.tar")),
        "photos/": str(photos),
    }


def _run_as_written(commands, stand_ins, work, monkeypatch, capsys) -> set:
    """Each command with the stand-ins substituted word by word; returns the stand-ins used."""
    work.mkdir()
    monkeypatch.chdir(work)
    torch.set_num_threads(1)
    used = set()
    for words in commands:
        argv = []
        for w in words[1:]:
            if w in stand_ins:
                used.add(w)
            argv.append(stand_ins.get(w, w))
        assert main(["-q", *argv]) == 0, f"{shlex.join(words)}: {capsys.readouterr().err}"
    return used


def test_the_no_labels_quick_start_runs_as_written(clips, tmp_path, monkeypatch, capsys):
    """The README's three commands without labels: class names, unlabelled photos, a plain CLIP."""
    photos, names = tmp_path / "photos", tmp_path / "names.txt"
    _, classes = write_images(photos, per_class=2)
    names.write_text("\n".join(classes) + "\n")
    preset = "configs/distill/vit_b16_c2_ep20_batch8_4ctx_cross_datasets.yaml"
    stand_ins = {
        "ViT-L-14": str(clips.teacher_cfg), "clip/ViT-L-14.pt": str(clips.teacher_weights),
        "clip/ViT-B-16.pt": str(clips.student_weights), "names.txt": str(names), "images:photos/": f"images:{photos}",
        preset: str(tiny_preset(preset, tmp_path / "distill.yaml", student_model=str(clips.student_cfg),
                                vision_depth=2, n_ctx_vision=2, train={"epochs": 1, "batch_size": 4,
                                                                       "num_workers": 0, "device": "cpu",
                                                                       "progress": False})),
    }
    commands = [shlex.split(line) for line in quickstart_lines("### No labels at all") if line.startswith("promptkd ")]
    assert [c[1] for c in commands] == ["class-vectors", "cache", "distill"]
    used = _run_as_written(commands, stand_ins, tmp_path / "work", monkeypatch, capsys)
    assert used == set(stand_ins)
    run = json.loads((tmp_path / "work/runs/mine/student/run.json").read_text())
    assert run["status"] == "finished" and run["inputs"]["teacher"] is None and run["inputs"]["teacher_templates"]


def test_the_readme_quick_start_runs_as_written(stand_ins, tmp_path, monkeypatch, capsys):
    lines = quickstart_lines()
    pip = [line for line in lines if line.startswith("pip install")]
    assert pip and all(".[onnx]" in line for line in pip)  # the set-up installs what export/predict need
    commands = [shlex.split(line) for line in lines if line.startswith("promptkd ")]
    assert [c[1] for c in commands] == ["teacher", "import-official", "class-vectors", "distill", "eval", "export",
                                        "predict"]
    work = tmp_path / "work"
    used = _run_as_written(commands, stand_ins, work, monkeypatch, capsys)
    assert used == set(stand_ins)  # every stand-in is needed (none is stale)
    # step 1's two alternatives wrote two run folders, not one file twice
    assert (work / "runs/pets/teacher/teacher.safetensors").is_file()
    assert (work / "runs/pets/teacher-official/teacher.safetensors").is_file()
    out = capsys.readouterr().out
    assert "OxfordPets (base2novel, test)" in out  # eval took the dataset from the run folder
    assert (work / "pets.onnx").is_file() and out.count(str(Path(stand_ins["photos/"]))) == 4  # 4 photos predicted
