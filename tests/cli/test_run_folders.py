"""Run folders remember what they were built from: later commands take the folder alone, an explicit
option overrides the record, a moved or changed CLIP file is one line naming its path and sha256,
and random weights are rebuilt identically from the recorded seed."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
from cli_helpers import distill_command, teacher_command
from safetensors.torch import load_file

from promptkd.artifacts import read_artifact_meta
from promptkd.cli import main


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(folder) -> dict:
    return json.loads((folder / "run.json").read_text())


def test_run_json_records_every_input_by_absolute_path_and_sha256(runs, clips, data):
    teacher = record(runs.teacher)
    assert teacher["command"] == "teacher" and teacher["status"] == "finished"
    assert "teacher.safetensors" in teacher["outputs"] and "checkpoint.safetensors" in teacher["outputs"]
    clip = teacher["inputs"]["teacher_clip"]
    assert clip["model"] == {"path": str(clips.teacher_cfg.resolve()), "size": clips.teacher_cfg.stat().st_size,
                             "sha256": sha256(clips.teacher_cfg)}
    assert clip["weights"]["path"] == str(clips.teacher_weights.resolve())
    assert clip["weights"]["sha256"] == sha256(clips.teacher_weights)
    assert teacher["inputs"]["dataset"]["name"] == f"folder:{data.resolve()}"
    assert teacher["inputs"]["dataset"]["train_images"] == 2 * 2  # 2 shots of the 2 base classes (of 4)
    student = record(runs.student)
    assert student["command"] == "distill" and student["status"] == "finished"
    assert student["inputs"]["teacher"]["sha256"] == sha256(runs.teacher / "teacher.safetensors")
    assert student["inputs"]["teacher_clip"] == clip
    assert student["inputs"]["student_clip"]["weights"]["sha256"] == sha256(clips.student_weights)
    assert student["inputs"]["dataset"]["protocol"] == "cross"
    # the artifacts carry the same record of their CLIP, so a lone file works too
    assert read_artifact_meta(runs.teacher / "teacher.safetensors")["clip_source"] == clip


def test_run_json_lists_exactly_the_files_each_run_wrote(runs):
    """The outputs in run.json are what the folder holds (the run's lock aside), derived from what the
    engine, the run and the stage write: no file is left out, none is listed that is not there."""
    for folder, artifacts in ((runs.teacher, {"teacher.safetensors"}),
                              (runs.student, {"student.safetensors", "class_vectors.safetensors"})):
        listed = record(folder)["outputs"]
        held = {p.name for p in folder.iterdir() if p.name != ".promptkd.lock"}
        assert sorted(listed) == sorted(held), folder
        assert artifacts | {"run.json", "metrics.json", "metrics.jsonl", "checkpoint.safetensors"} <= held


def test_later_commands_take_the_run_folder_alone(runs, clips, data, tmp_path, capsys):
    # class vectors from the teacher's run folder = from its file with the CLIP named explicitly
    assert main(["-q", "class-vectors", str(runs.teacher), "--classes", "red,green", "--out",
                 str(tmp_path / "a.safetensors")]) == 0
    assert main(["-q", "class-vectors", "--teacher", str(runs.teacher / "teacher.safetensors"), "--teacher-model",
                 str(clips.teacher_cfg), "--teacher-weights", str(clips.teacher_weights), "--classes", "red,green",
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    assert torch.equal(load_file(tmp_path / "a.safetensors")["vectors"], load_file(tmp_path / "b.safetensors")["vectors"])
    # eval of a student run: dataset, root, protocol and class vectors are the run's
    capsys.readouterr()
    assert main(["-q", "eval", str(runs.student), "--no-progress"]) == 0
    alone = capsys.readouterr().out
    assert main(["-q", "eval", "--student", str(runs.student / "student.safetensors"), "--class-vectors",
                 str(runs.student / "class_vectors.safetensors"), "--student-model", str(clips.student_cfg),
                 "--student-weights", str(clips.student_weights), "--dataset", f"folder:{data}", "--protocol",
                 "cross", "--no-progress"]) == 0
    assert alone == capsys.readouterr().out and "accuracy" in alone and "(cross, test)" in alone
    # export and predict take it too
    assert main(["-q", "export", str(runs.student), "--out", str(tmp_path / "m.onnx"), "--no-check"]) == 0
    assert main(["-q", "predict", str(data / "test" / "red"), "--student", str(runs.student), "--json"]) == 0
    assert (tmp_path / "m.onnx").is_file() and '"predictions"' in capsys.readouterr().out


def test_a_moved_weights_file_is_one_line_naming_path_and_hash(own_runs, data, tmp_path, capsys):
    clips, runs = own_runs
    assert main(["-q", "class-vectors", str(runs.teacher), "--dataset", f"folder:{data}", "--out",
                 str(tmp_path / "before.safetensors")]) == 0
    digest, where = sha256(clips.teacher_weights), clips.teacher_weights.resolve()
    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    clips.teacher_weights.rename(moved)
    cv = ["-q", "class-vectors", str(runs.teacher), "--classes", "red,green"]
    assert main([*cv, "--out", str(tmp_path / "cv.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(where) in err and digest in err and "--teacher-weights" in err, err
    # the explicit option overrides the record; the teacher is the same teacher (its identity does not
    # depend on where the file lies), so class vectors made before the move are still its own
    assert main([*cv, "--teacher-weights", str(moved), "--out", str(tmp_path / "cv.safetensors")]) == 0
    assert main([*distill_command(clips, data, runs.teacher, tmp_path / "s"), "--teacher-weights", str(moved),
                 "--class-vectors", str(tmp_path / "before.safetensors")]) == 0
    # a file of the same name with other bytes is another CLIP
    other = tmp_path / "other" / "renamed.pt"
    other.parent.mkdir()
    other.write_bytes(clips.student_weights.read_bytes())
    assert main([*cv, "--teacher-weights", str(other), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not the teacher CLIP weights" in err and digest in err


def test_a_changed_weights_file_is_refused_with_both_hashes(own_runs, capsys):
    clips, runs = own_runs
    before = sha256(clips.student_weights)
    sd = torch.load(clips.student_weights, weights_only=True)
    sd["logit_scale"] = sd["logit_scale"] + 1
    torch.save(sd, clips.student_weights)
    assert main(["-q", "eval", str(runs.student)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has changed" in err and before in err and sha256(clips.student_weights) in err


def test_random_weights_are_seeded_recorded_and_rebuilt(clips, data, tmp_path, caplog):
    """--teacher-weights none: the tower comes from --seed, the seed is recorded, and every later
    command rebuilds exactly it (the class vectors of two runs of class-vectors are identical)."""
    with caplog.at_level(logging.WARNING, logger="promptkd"):
        assert main(teacher_command(clips, data, tmp_path / "t", "--teacher-weights", "none", "--seed", "3")) == 0
    assert "random weights (seed 3)" in caplog.text
    meta = read_artifact_meta(tmp_path / "t" / "teacher.safetensors")
    assert meta["clip_source"]["weights"] == "none" and meta["clip_source"]["init_seed"] == 3
    assert meta["clip"]["init_seed"] == 3
    for name in ("a", "b"):
        assert main(["-q", "class-vectors", str(tmp_path / "t"), "--classes", "red,green,blue", "--out",
                     str(tmp_path / f"{name}.safetensors")]) == 0
    a, b = (load_file(tmp_path / f"{n}.safetensors")["vectors"] for n in "ab")
    assert torch.equal(a, b)


def test_random_weights_for_open_clip_names_json_configs_and_toy_models(clips, caplog):
    from promptkd.models import load_clip

    def state(bundle):
        return {k: v.clone() for k, v in bundle.model.state_dict().items()}

    for model in ("RN50", str(clips.teacher_cfg), "toy-student"):
        with caplog.at_level(logging.WARNING, logger="promptkd"):
            one = load_clip(model, "none", init_seed=7)
        assert "random weights (seed 7)" in caplog.text
        caplog.clear()
        same = state(load_clip(model, "none", init_seed=7))
        assert all(torch.equal(v, same[k]) for k, v in state(one).items()), model
        assert one.identity()["init_seed"] == 7 and one.source["init_seed"] == 7
        if model != "RN50":  # another seed, another tower
            other = state(load_clip(model, "none", init_seed=8))
            assert not all(torch.equal(v, other[k]) for k, v in state(one).items())


@pytest.mark.parametrize("weights", ["/nonexistent/toy.safetensors", "openai", "laion2b_s34b_b88k"])
def test_toy_models_refuse_weights_they_cannot_use(weights):
    from promptkd.errors import PromptKDError
    from promptkd.models import load_clip

    with pytest.raises(PromptKDError, match="toy"):
        load_clip("toy-teacher", weights)


def test_toy_models_take_their_shipped_weights_or_a_toy_weights_file(tmp_path):
    from promptkd.models import load_clip
    from promptkd.toy.models import save_toy_weights

    shipped = load_clip("toy-student", "toy")
    assert shipped.identity() == {"model": "toy-student", "pretrained": "toy"}
    own = tmp_path / "mine.safetensors"
    save_toy_weights(load_clip("toy-student", "none", init_seed=2).model, own, "toy-student")
    mine = load_clip("toy-student", str(own))
    assert mine.identity()["sha256"] == sha256(own)
    assert torch.equal(mine.model.visual.conv1.weight, load_clip("toy-student", "none", init_seed=2).model.visual.conv1.weight)


def test_big_files_are_hashed_once_per_path_size_and_mtime(tmp_path, monkeypatch):
    import os

    import promptkd.files as files

    monkeypatch.setenv("PROMPTKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "_HASH_CACHE_MIN_BYTES", 10)
    big = tmp_path / "weights.pt"
    big.write_bytes(b"x" * 100)
    assert files.file_digest(big) == sha256(big)
    cache = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    cache[str(big)][2] = "from-the-cache"
    (tmp_path / "cache" / "sha256.json").write_text(json.dumps(cache))
    assert files.file_digest(big) == "from-the-cache"  # same path, size and mtime: not read again
    os.utime(big, ns=(big.stat().st_atime_ns, big.stat().st_mtime_ns + 10**9))
    assert files.file_digest(big) == sha256(big)  # touched: hashed again
    small = tmp_path / "config.json"
    small.write_text("{}")
    assert files.file_digest(small) == sha256(small) and str(small) not in json.loads(
        (tmp_path / "cache" / "sha256.json").read_text())
