"""`promptkd demo --quick`: every stage runs on the shipped toy CLIPs and writes the report files."""

import json

from promptkd.cli import main


def test_quick_demo_writes_report_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("student_zeroshot", "teacher_zeroshot", "teacher", "student"):
        assert set(metrics[key]) == {"base", "novel", "hm"}
        assert all(0.0 <= v <= 100.0 for v in metrics[key].values())
    assert metrics["teacher_images_per_s"] > 0 and metrics["student_images_per_s"] > 0 and metrics["seconds"] > 0
    assert (out / "report.md").read_text().count("|") > 20
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    for artifact in ("teacher", "class_vectors", "student"):
        assert (out / "x").parent.joinpath(metrics["artifacts"][artifact]).exists()
    assert "student, distilled (PromptKD)" in capsys.readouterr().out
