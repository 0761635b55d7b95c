"""Class vectors: one text pass of the teacher, tied to that teacher, extendable with new classes."""

import pytest
import torch
import torch.nn.functional as F

from promptkd.cli import main
from promptkd.errors import PromptKDError
from promptkd.models.wrappers import ClassVectors, Teacher
from promptkd.stages.class_vectors import append_class_vectors, compute_class_vectors, write_class_vectors

NAMES = ["apple", "banana", "cherry", "green_grape", "kiwi"]


def test_vectors_are_reproducible_and_equal_the_teachers_text_forward(make_teacher):
    teacher = make_teacher()
    a = compute_class_vectors(teacher, NAMES)
    b = compute_class_vectors(teacher, NAMES, chunk_size=2)
    with torch.no_grad():
        direct = F.normalize(teacher.text(teacher.text.tokenize_classnames(NAMES)), dim=-1)
    assert torch.equal(a.vectors, compute_class_vectors(teacher, NAMES).vectors)
    assert torch.allclose(a.vectors, direct, atol=1e-6) and torch.allclose(b.vectors, direct, atol=1e-6)
    assert torch.allclose(a.vectors.norm(dim=-1), torch.ones(len(NAMES)))
    assert a.classnames == NAMES and a.teacher == teacher.identity()
    with pytest.raises(PromptKDError, match="duplicate"):
        compute_class_vectors(teacher, ["apple", "kiwi", "apple"])


def test_vectors_from_another_teacher_are_rejected(make_teacher, tmp_path):
    mine, other = make_teacher(seed=1), make_teacher(seed=2)  # same CLIP, other prompts
    path = write_class_vectors(mine, NAMES, tmp_path / "cv.safetensors")
    assert ClassVectors.load(path, teacher=mine, dim=mine.dim).classnames == NAMES
    with pytest.raises(PromptKDError, match="another teacher.*prompts_hash"):
        ClassVectors.load(path, teacher=other)
    with pytest.raises(PromptKDError, match="another teacher"):
        write_class_vectors(other, ["plum"], tmp_path / "more.safetensors", append_to=path)
    with pytest.raises(PromptKDError, match="dim"):
        ClassVectors.load(path, teacher=mine, dim=mine.dim + 1)


def test_append_computes_only_new_names_and_refuses_duplicates(make_teacher, tmp_path, monkeypatch):
    teacher = make_teacher()
    first = write_class_vectors(teacher, NAMES[:3], tmp_path / "cv.safetensors")
    seen = []
    encode = Teacher.encode_classnames
    monkeypatch.setattr(Teacher, "encode_classnames", lambda self, names, chunk=None: seen.append(list(names))
                        or encode(self, names, chunk))
    grown = write_class_vectors(teacher, NAMES[3:], tmp_path / "cv2.safetensors", append_to=first)
    assert seen == [NAMES[3:]]  # the old classes were not recomputed
    cv = ClassVectors.load(grown, teacher=teacher)
    assert cv.classnames == NAMES
    assert torch.allclose(cv.vectors, compute_class_vectors(teacher, NAMES).vectors, atol=1e-6)
    assert torch.equal(cv.vectors[:3], ClassVectors.load(first).vectors)
    with pytest.raises(PromptKDError, match="banana.*already in the file"):
        append_class_vectors(cv, teacher, ["plum", "banana"])


def test_cli_class_vectors_and_append(make_teacher, tiny_clip, tmp_path, capsys):
    teacher = make_teacher()
    tpath = teacher.save(tmp_path / "teacher.safetensors")
    out = tmp_path / "cv.safetensors"
    base = ["class-vectors", "--teacher", str(tpath), "--teacher-weights", tiny_clip[1], "--teacher-model",
            tiny_clip[0], "--device", "cpu"]
    assert main([*base, "--classes", "apple, banana", "--out", str(out)]) == 0
    names_file = tmp_path / "names.txt"
    names_file.write_text("cherry\n# a comment\nkiwi\n")
    assert main([*base, "--classes-file", str(names_file), "--append-to", str(out)]) == 0
    cv = ClassVectors.load(out, teacher=teacher)
    assert cv.classnames == ["apple", "banana", "cherry", "kiwi"]
    assert torch.allclose(cv.vectors, compute_class_vectors(teacher, cv.classnames).vectors, atol=1e-6)
    capsys.readouterr()
    assert main([*base, "--classes", "kiwi", "--append-to", str(out)]) == 2
    assert "already in the file" in capsys.readouterr().err
    assert main([*base, "--out", str(out)]) == 2  # no class names given


def test_class_names_differing_only_in_case_are_refused(make_teacher, tmp_path):
    """'Cat' and 'cat' tokenise alike (the CLIP tokenizer lower-cases): two rows for one class."""
    teacher = make_teacher()
    with pytest.raises(PromptKDError, match="duplicate class name 'cat'.*differing only in case"):
        compute_class_vectors(teacher, ["Cat", "dog", "cat"])
    first = write_class_vectors(teacher, ["Cat", "dog"], tmp_path / "cv.safetensors")
    with pytest.raises(PromptKDError, match="'CAT' .*already in the file as 'Cat'"):
        write_class_vectors(teacher, ["fox", "CAT"], tmp_path / "cv2.safetensors", append_to=first)
