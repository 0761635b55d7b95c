"""Untrusted files: nothing a user is handed can run code when promptkd reads it, and a file with
wrong metadata (types, dims, classes) or a split file pointing outside the dataset is refused with
an error that says what is wrong."""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from promptkd.artifacts import load_artifact
from promptkd.cli import main
from promptkd.errors import PromptKDError
from promptkd.models import load_clip
from promptkd.models.wrappers import ClassVectors, Student, Teacher
from promptkd.stages.import_official import load_dassl_checkpoint


class Touch:
    """Unpickling this runs `touch MARKER` (the classic pickle attack)."""

    def __init__(self, marker, via: str = "system"):
        self.marker, self.via = str(marker), via

    def __reduce__(self):
        if self.via == "system":
            return (os.system, (f"touch {self.marker}",))
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class EvilModule(torch.nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) writes a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.path = marker

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]):
        self.w = state[0]
        self.path = state[1]
        self.training = state[2]
        torch.save(self.w, self.path)


def evil_torchscript(path: Path, marker: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(EvilModule(str(marker))), str(path))
    return path


def fake_torchscript(path: Path, marker: Path) -> Path:
    """A zip laid out like a TorchScript archive whose data.pkl is a plain pickle attack."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Touch(marker), protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/version", "3\n")
    return path


def malicious_files(tmp: Path, marker: Path) -> dict[str, Path]:
    out = {}
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Touch(marker)}, tmp / "zip.pt")
    out["torch.save zip"] = tmp / "zip.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Touch(marker, "exec")}, tmp / "legacy.pt",
               _use_new_zipfile_serialization=False)
    out["torch.save legacy"] = tmp / "legacy.pt"
    (tmp / "raw.bin").write_bytes(pickle.dumps({"w": Touch(marker)}))
    out["raw pickle"] = tmp / "raw.bin"
    out["torchscript __setstate__"] = evil_torchscript(tmp / "ts.pt", marker)
    out["fake torchscript"] = fake_torchscript(tmp / "fake.pt", marker)
    (tmp / "pickle.safetensors").write_bytes(pickle.dumps(Touch(marker)))
    out["pickle named .safetensors"] = tmp / "pickle.safetensors"
    return out


def test_the_torchscript_attack_is_real(tmp_path):
    """torch.jit.load runs the archive's __setstate__: the reason load_clip never calls it."""
    import warnings

    marker = tmp_path / "ran"
    evil_torchscript(tmp_path / "ts.pt", marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(tmp_path / "ts.pt"))
    assert marker.exists()


def test_load_clip_refuses_code_in_every_checkpoint_format(world, tmp_path):
    marker = tmp_path / "pwned"
    for name, path in malicious_files(tmp_path, marker).items():
        with pytest.raises(PromptKDError, match=r"refusing to load|not a readable checkpoint") as e:
            load_clip(str(world.student_cfg), str(path))
        assert str(path) in str(e.value), name
        assert not marker.exists(), f"{name}: code ran"


def test_torchscript_weights_are_read_without_running_the_archive(tmp_path):
    """A genuine TorchScript CLIP archive (OpenAI's format) still loads, to the same weights."""
    import warnings

    from tinyclip import tiny_config

    c = tiny_config()
    c["quick_gelu"] = True
    cfg = tmp_path / "tiny-openai.json"
    cfg.write_text(json.dumps(c))
    original = load_clip(str(cfg)).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(original), str(tmp_path / "tiny.pt"))
        reference = torch.jit.load(str(tmp_path / "tiny.pt")).state_dict()
    from promptkd.models.torchscript import read_torchscript_state_dict

    ours = read_torchscript_state_dict(tmp_path / "tiny.pt")
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) and ours[k].dtype == reference[k].dtype for k in ours)


def test_import_official_refuses_code(world, tmp_path, capsys):
    marker = tmp_path / "pwned"
    sd = {"prompt_learner.ctx": torch.zeros(2, 32)}
    torch.save({"state_dict": sd, "epoch": 20, "scheduler": Touch(marker)}, tmp_path / "model.pth.tar-20")
    with pytest.raises(PromptKDError, match="refusing to load.*system"):
        load_dassl_checkpoint(tmp_path / "model.pth.tar-20")
    for name, path in malicious_files(tmp_path, marker).items():
        with pytest.raises(PromptKDError, match=r"refusing to load|not a readable checkpoint"):
            load_dassl_checkpoint(path)
        assert not marker.exists(), f"{name}: code ran"
    code = main(["import-official", "teacher", str(tmp_path / "model.pth.tar-20"), "--teacher-model", str(world.teacher_cfg),
                 "--teacher-weights", str(world.teacher_weights), "--out", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "refusing to load" in err
    assert not marker.exists() and not (tmp_path / "t.safetensors").exists()


def test_import_official_placeholders_never_call_dassl_code(tmp_path, monkeypatch):
    """Dassl's scheduler objects are replaced by inert placeholders, even when dassl is importable."""
    marker = tmp_path / "pwned"
    pkg = tmp_path / "pkgs" / "dassl"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "evil.py").write_text("def run(path):\n    open(path, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    import dassl.evil

    class Scheduler:
        def __reduce__(self):
            return (dassl.evil.run, (str(marker),))

    torch.save({"state_dict": {"w": torch.ones(2)}, "scheduler": Scheduler()}, tmp_path / "model-best.pth.tar")
    assert load_dassl_checkpoint(tmp_path / "model-best.pth.tar")["w"].tolist() == [1.0, 1.0]
    assert not marker.exists()
    for name in [m for m in sys.modules if m == "dassl" or m.startswith("dassl.")]:
        monkeypatch.delitem(sys.modules, name)


def test_yaml_config_cannot_construct_objects(world, tmp_path, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f'epochs: !!python/object/apply:os.system ["touch {marker}"]\n')
    for command in (["distill", "--teacher", str(world.teacher)], ["teacher"]):
        code = main([*command, "--config", str(tmp_path / "evil.yaml"), "--dataset", f"folder:{world.data}",
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and "not valid YAML" in err, err
    assert not marker.exists()


def test_onnx_file_that_is_a_pickle_is_refused(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    marker = tmp_path / "pwned"
    (tmp_path / "model.onnx").write_bytes(pickle.dumps(Touch(marker)))
    (tmp_path / "x.png").write_bytes(b"")
    code = main(["predict", str(tmp_path / "x.png"), "--model", str(tmp_path / "model.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "model.onnx" in err, err
    assert not marker.exists()


def _onnx_with_metadata(path: Path, props: dict) -> Path:
    """A valid ONNX graph (logits = image summed to 4 numbers) carrying the given metadata."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[2, 3], keepdims=0),
         helper.make_node("Concat", ["pooled", "pooled"], ["cat"], axis=1),
         helper.make_node("Slice", ["cat", "starts", "ends", "axes"], ["logits"])],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor("starts", TensorProto.INT64, [1], [0]), helper.make_tensor("ends", TensorProto.INT64, [1], [4]),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def test_onnx_with_malformed_promptkd_metadata_is_refused(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from promptkd.deploy import ONNX_FORMAT, OnnxClassifier

    good = {"promptkd.format": ONNX_FORMAT, "promptkd.classnames": '["a", "b", "c", "d"]',
            "promptkd.image_size": "8", "promptkd.mean": "[0.5, 0.5, 0.5]", "promptkd.std": "[0.5, 0.5, 0.5]"}
    assert OnnxClassifier(_onnx_with_metadata(tmp_path / "good.onnx", good)).classnames == ["a", "b", "c", "d"]
    for key, value in (("classnames", '"abcd"'), ("image_size", '"8"'), ("std", "[0, 1, 1]"), ("mean", "[1]")):
        path = _onnx_with_metadata(tmp_path / f"bad-{key}.onnx", {**good, f"promptkd.{key}": value})
        with pytest.raises(PromptKDError, match=f"'{key}' is malformed"):
            OnnxClassifier(path)
    (tmp_path / "x.png").write_bytes(b"")
    assert main(["predict", str(tmp_path / "x.png"), "--model", str(tmp_path / "bad-classnames.onnx")]) == 2
    assert "'classnames' is malformed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ metadata


def _craft(path: Path, tensor_dict: dict, meta) -> Path:
    raw = meta if isinstance(meta, str) or meta is None else json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensor_dict.items()}, str(path),
              metadata=None if raw is None else {"promptkd": raw})
    return path


@pytest.fixture(scope="module")
def artifacts_of(world):
    """(tensors, meta) of a real teacher, a real student and real class vectors."""
    from promptkd.models.wrappers import Teacher

    clip_t = load_clip(str(world.teacher_cfg), str(world.teacher_weights))
    clip_s = load_clip(str(world.student_cfg), str(world.student_weights))
    teacher = Teacher.load(world.teacher, clip=clip_t)
    torch.manual_seed(0)
    student = Student(clip_s, teacher.dim, 2, 2)
    with torch.no_grad():
        cv = ClassVectors(teacher.encode_classnames(["blue", "green", "red", "yellow"]), ["blue", "green", "red", "yellow"],
                          teacher.identity())
    return {"teacher": load_artifact(world.teacher), "clip_t": clip_t, "clip_s": clip_s, "teacher_obj": teacher,
            "student": (student.trainable_tensors(), {"kind": "student", "clip": clip_s.identity(),
                                                      "prompts": student.prompt_config, "teacher_dim": teacher.dim}),
            "cv": ({"vectors": cv.vectors}, {"kind": "class_vectors", "classnames": cv.classnames,
                                             "teacher": cv.teacher, "dim": cv.dim})}


BAD_ARTIFACTS = [
    # (what, which artifact, how to damage (tensors, meta) -> (tensors, meta or raw string), expected message)
    ("metadata is a JSON list", "cv", lambda t, m: (t, "[1, 2]"), "must be a JSON object"),
    ("metadata is not JSON", "cv", lambda t, m: (t, "{kind: cv"), "corrupt promptkd metadata"),
    ("no promptkd metadata", "cv", lambda t, m: (t, None), "not a promptkd artifact"),
    ("wrong kind", "cv", lambda t, m: (t, {**m, "kind": "student"}), "expected a class_vectors artifact"),
    ("kind missing", "teacher", lambda t, m: (t, {k: v for k, v in m.items() if k != "kind"}), "expected a teacher"),
    ("dim as a string", "cv", lambda t, m: (t, {**m, "dim": "32"}), "'dim' must be a non-negative integer"),
    ("dim disagrees with the vectors", "cv", lambda t, m: (t, {**m, "dim": 24}), "metadata says dim 24"),
    ("class names not strings", "cv", lambda t, m: (t, {**m, "classnames": [1, 2, 3, 4]}), "list of strings"),
    ("one class name too many", "cv", lambda t, m: (t, {**m, "classnames": [*m["classnames"], "x"]}),
     "vectors for 5 class names"),
    ("duplicate class names", "cv", lambda t, m: (t, {**m, "classnames": ["a", "a", "b", "c"]}), "duplicate class"),
    ("NaN class vectors", "cv", lambda t, m: ({"vectors": t["vectors"] * float("nan")}, m), "finite"),
    ("teacher identity a string", "cv", lambda t, m: (t, {**m, "teacher": "mine"}), "'teacher' must be a JSON object"),
    ("teacher_dim as a string", "student", lambda t, m: (t, {**m, "teacher_dim": "32"}),
     "'teacher_dim' must be a non-negative integer"),
    ("prompt depth as a string", "teacher", lambda t, m: (t, {**m, "prompts": {**m["prompts"], "vision_depth": "2"}}),
     "'vision_depth' must be a non-negative integer"),
    ("prompt config a list", "teacher", lambda t, m: (t, {**m, "prompts": [2, 2]}), "'prompts' must be a JSON object"),
    ("clip identity a string", "student", lambda t, m: (t, {**m, "clip": "ViT-B-16"}), "'clip' must be a JSON object"),
    ("prompt tensor of the wrong shape", "teacher",
     lambda t, m: ({**t, "vision.input": torch.zeros(3, 7)}, m), "vision.input has shape"),
    ("prompt tensor missing", "teacher",
     lambda t, m: ({k: v for k, v in t.items() if k != "text.deep.1"}, m), "missing"),
    ("non-finite prompts", "student", lambda t, m: ({**t, "vision.input": t["vision.input"] * float("inf")}, m),
     "finite"),
    ("projector of another width", "student",
     lambda t, m: ({**t, "projector.fc1.weight": torch.zeros(5, 5)}, m), "projector"),
]


@pytest.mark.parametrize("what,which,damage,message", BAD_ARTIFACTS, ids=[b[0] for b in BAD_ARTIFACTS])
def test_artifact_with_bad_metadata_is_a_clear_error(artifacts_of, tmp_path, what, which, damage, message):
    t, m = artifacts_of[which]
    t2, m2 = damage(dict(t), dict(m))
    path = _craft(tmp_path / f"{which}.safetensors", t2, m2)
    with pytest.raises(PromptKDError, match=message) as e:
        if which == "cv":
            ClassVectors.load(path, dim=32)
        elif which == "teacher":
            Teacher.load(path, clip=artifacts_of["clip_t"])
        else:
            Student.load(path, clip=artifacts_of["clip_s"])
    assert str(path) in str(e.value) or which == "teacher" and "shape" in str(e.value)


def test_bad_artifacts_through_the_cli_are_one_line(world, artifacts_of, tmp_path, capsys):
    t, m = artifacts_of["cv"]
    other = _craft(tmp_path / "other-classes.safetensors", t, {**m, "classnames": ["cat", "dog", "red", "yellow"]})
    stringy = _craft(tmp_path / "stringy.safetensors", t, {**m, "dim": "32"})
    student = _craft(tmp_path / "student.safetensors", *artifacts_of["student"])
    small = _craft(tmp_path / "small.safetensors", {"vectors": torch.nn.functional.normalize(torch.randn(4, 24), dim=-1)},
                   {**m, "dim": 24})
    common = ["eval", "--dataset", f"folder:{world.data}", "--protocol", "cross", "--student", str(student),
              "--student-model", str(world.student_cfg), "--student-weights", str(world.student_weights),
              "--no-progress", "--device", "cpu"]
    cases = [
        ([*common, "--class-vectors", str(other)], "2 missing"),  # classes of another dataset
        ([*common, "--class-vectors", str(stringy)], "'dim' must be a non-negative integer"),
        ([*common, "--class-vectors", str(small)], "dim 24"),  # vectors of another teacher width
        (["class-vectors", "--teacher", str(student), "--classes", "a,b", "--out", str(tmp_path / "cv")],
         "expected a teacher artifact, found kind='student'"),
        (world.distill_args(tmp_path / "run", "--class-vectors", str(small)), "dim 24"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and message in err, (argv[0], err)


def test_checkpoint_with_damaged_metadata_refuses_to_resume(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(world.distill_args(run, "--epochs", "1", "--no-val")) == 0
    t, m = load_artifact(run / "checkpoint.safetensors")
    for damage, message in ((lambda m: {**m, "epoch": "1"}, "'epoch' must be a non-negative integer"),
                            (lambda m: {**m, "history": "none"}, "'history' must be a JSON list"),
                            (lambda m: {**m, "rng": {"numpy": [1, 2], "numpy_pos": 0}}, "corrupt RNG state")):
        _craft(run / "checkpoint.safetensors", t, damage(dict(m)))
        code = main(world.distill_args(run, "--epochs", "1", "--no-val", "--resume"))
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and message in err, err
    bad = {**t, next(k for k in t if k.startswith("model.")): torch.zeros(1, 2, 3)}
    _craft(run / "checkpoint.safetensors", bad, m)
    assert main(world.distill_args(run, "--epochs", "1", "--no-val", "--resume")) == 2
    assert "has shape (1, 2, 3)" in capsys.readouterr().err


def test_cache_manifest_pointing_outside_its_folder_is_refused(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["cache", *world.teacher_args(), "--dataset", f"folder:{world.data}", "--protocol", "cross",
                 "--views", "1", "--device", "cpu", "--no-progress", "--out", str(cache)]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../../../etc/passwd"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    code = main([*world.distill_args(tmp_path / "run"), "--teacher-cache", str(cache)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "malformed shard" in err, err


def test_report_of_a_hand_edited_metrics_file_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"kind": "distill_metrics", "protocol": "cross", "dataset": "X",
                                                  "seed": "1", "results": {"last": {"accuracy": 50.0}}}))
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--no-plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'seed' must be a int" in err, err
    (run / "metrics.json").write_text("[]")
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--no-plot"]) == 2
    assert "not a distillation metrics file" in capsys.readouterr().err


# ------------------------------------------------------------------------------- split files


@pytest.mark.parametrize("escape", ["../../etc/passwd", "/etc/passwd", "red/../../../etc/passwd", ".."])
def test_split_file_path_outside_the_dataset_root_is_refused(world, tmp_path, capsys, escape):
    from promptkd.data.registry import build_dataset

    image = next((world.data / "train" / "red").iterdir()).name
    split = {"train": [[f"red/{image}", 0, "red"], [escape, 0, "red"]], "val": [], "test": [[f"red/{image}", 0, "red"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(PromptKDError, match="points outside the image folder"):
        build_dataset(f"split:{tmp_path / 'split.json'}", str(world.data / "train"))
    code = main(["eval", "--dataset", f"split:{tmp_path / 'split.json'}", "--root", str(world.data / "train"),
                 "--protocol", "cross", "--clip-model", str(world.student_cfg), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "points outside the image folder" in err, err
