"""`promptkd export` and `promptkd predict` through promptkd.cli.main."""

import json

from promptkd.cli import main


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_predict_folder_reports_corrupt_file_and_classifies_the_rest(tiny_kd, image_folder, capsys):
    p = tiny_kd.paths
    code = main(["predict", str(image_folder), "--student", str(p.student), "--class-vectors", str(p.classes),
                 "--topk", "2", "--json"])
    out = _json(capsys)
    assert code == 1  # something failed, but the rest was classified
    assert [e["path"].endswith("broken.jpg") for e in out["errors"]] == [True]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in out["predictions"]) == ["blue.png", "gray.jpg", "red.png"]
    for r in out["predictions"]:
        assert len(r["top"]) == 2 and all(t["class"] in tiny_kd.names for t in r["top"])


def test_predict_text_output_and_glob(tiny_kd, image_folder, capsys):
    p = tiny_kd.paths
    code = main(["predict", str(image_folder / "*.png"), "--student", str(p.student), "--class-vectors",
                 str(p.classes), "--topk", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith(str(image_folder / "red.png"))


def test_open_vocabulary_classes(tiny_kd, image_folder, capsys):
    p = tiny_kd.paths
    code = main(["predict", str(image_folder / "red.png"), "--student", str(p.student), "--teacher", str(p.teacher),
                 "--classes", "zebra, horse,pony", "--topk", "5", "--json"])
    out = _json(capsys)
    assert code == 0 and not out["errors"]
    assert sorted(t["class"] for t in out["predictions"][0]["top"]) == ["horse", "pony", "zebra"]

    names = tiny_kd.tmp / "names.txt"
    names.write_text("zebra\n# comment\nhorse\n")
    assert main(["predict", str(image_folder / "red.png"), "--student", str(p.student), "--teacher",
                 str(p.teacher), "--classes-file", str(names), "--json"]) == 0
    assert len(_json(capsys)["predictions"][0]["top"]) == 2


def test_classes_without_teacher_is_an_error(tiny_kd, image_folder, capsys):
    code = main(["predict", str(image_folder), "--student", str(tiny_kd.paths.student), "--classes", "a,b"])
    assert code == 2 and "--teacher" in capsys.readouterr().err


def test_export_then_predict_onnx(tiny_kd, image_folder, capsys):
    p, out = tiny_kd.paths, tiny_kd.tmp / "model.onnx"
    assert main(["export", "--format", "onnx", "--student", str(p.student), "--class-vectors", str(p.classes),
                 "--out", str(out), "--fp16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    code = main(["predict", str(image_folder), "--model", str(out), "--json"])
    res = _json(capsys)
    assert code == 1 and len(res["predictions"]) == 3 and len(res["errors"]) == 1
    assert len(res["predictions"][0]["top"]) == len(tiny_kd.names)


def test_export_dim_mismatch_names_both_files(tiny_kd, capsys):
    import torch

    from promptkd.models.wrappers import ClassVectors

    bad = tiny_kd.tmp / "bad.safetensors"
    ClassVectors(torch.eye(4, 8), tiny_kd.names, {}).save(bad)
    code = main(["export", "--student", str(tiny_kd.paths.student), "--class-vectors", str(bad),
                 "--out", str(tiny_kd.tmp / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.safetensors" in err and "dim 8" in err and "dim 32" in err
