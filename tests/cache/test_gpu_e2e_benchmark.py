"""benchmarks/gpu_e2e.py at tiny size on CPU: the whole pipeline (JPEG folder, `promptkd cache`,
`promptkd distill --teacher-cache`, step rates, the official step, two gloo ranks) runs and reports
every row."""

import argparse
import json

import pytest
from tinyclip import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("gpu_e2e")


FAKE_OFFICIAL = """
import argparse, json, os
ap = argparse.ArgumentParser()
for flag in ("--classes", "--batch", "--steps"):
    ap.add_argument(flag, type=int)
ap.add_argument("--json"); ap.add_argument("--tiny", action="store_true")
a = ap.parse_args()
assert os.path.isfile(os.path.join(os.environ["PKD_OFFICIAL_SRC"], "clip", "model.py"))
json.dump({"impl": "official-fp16", "batch": a.batch, "classes": a.classes, "s_per_step": 0.5,
           "images_per_s": a.batch / 0.5, "tiny": a.tiny}, open(a.json, "w"))
"""


@pytest.mark.slow
def test_tiny_run_reports_every_row(bench, tiny_configs, tmp_path, capsys):
    repo = tmp_path / "PromptKD"
    (repo / "clip").mkdir(parents=True)
    (repo / "clip" / "model.py").write_text("# stands in for the official code\n")
    fake = tmp_path / "official_step.py"
    fake.write_text(FAKE_OFFICIAL)
    t, s = tiny_configs
    out = tmp_path / "e2e"
    assert bench.main(["--out", str(out), "--images", "24", "--classes", "3", "--image-size", "64x48", "--views", "2",
                       "--batch", "4", "--cache-batch", "8", "--num-workers", "1", "--device", "cpu",
                       "--precision", "fp32", "--teacher-model", str(t), "--student-model", str(s), "--depth", "2",
                       "--step-modes", "cached,compiled,bound", "--paper-modes", "cached", "--step-steps", "2",
                       "--step-warmup", "1", "--threads", "1", "--official-repo", str(repo), "--official-step", str(fake),
                       "--ranks", "1,2", "--shard-size", "8"]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert len(list((out / "data" / "train").glob("*/*.jpg"))) == 24
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["n_images"] == 24 and manifest["views"] == 2 and manifest["transform"]["renderer"] == "uint8"
    metrics = json.loads((out / "distill" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 * (24 // 4) and len(metrics["history"]) == 2
    assert report["e2e"]["images_per_s"] == metrics["history"][-1]["images_per_s"] > 0
    assert {r["mode"] for r in report["step"]} == {"cached", "compiled", "bound"}
    assert report["official"]["batch"] == 4 and report["official"]["tiny"] and report["official_paper"]["batch"] == 8
    for row in ("| end to end: promptkd distill --teacher-cache (epoch 2) | 4 | 3 |", "| compute only: compiled step | 4 |",
                "| compute only: eager cached step | 4 |", "| FLOP bound of the student step | 4 |",
                "| official step (its clip/model.py, fp16) | 4 | 3 | 8.0 |", "| official step (its clip/model.py, fp16) | 8 | 100 |",
                "| eager cached step | 8 | 100 |", "end to end / compute only:"):
        assert row in text, row
    assert (out / "report.md").read_text().strip() == text.strip()
    # two gloo ranks: the same cache, each rank half the global batch of 8, a row per rank count
    assert manifest == json.loads((out / "cache-r2" / "manifest.json").read_text())
    r2 = json.loads((out / "distill-r2" / "metrics.json").read_text())
    assert r2["train"]["steps"] == 2 * (24 // 8) and r2["train"]["config"]["batch_size"] == 8
    one, two = report["ranks"]
    assert (one["ranks"], two["ranks"], two["global_batch"]) == (1, 2, 8)
    assert two["images_per_s_per_rank"] == pytest.approx(r2["history"][-1]["images_per_s"] / 2)
    assert f"| 2 | 8 | {two['images_per_s']:.1f} | {two['images_per_s_per_rank']:.1f} |" in text


def test_official_row_says_why_it_is_skipped(bench, tmp_path):
    args = argparse.Namespace(official_step=str(tmp_path / "x.py"), official_repo=None, device="cpu", step_steps=1)
    assert bench.official_row(args, 8, 100, tmp_path, "t").startswith("skipped: no official PromptKD checkout")
    args.official_repo = str(tmp_path)
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "model.py").write_text("")
    assert "x.py not found" in bench.official_row(args, 8, 100, tmp_path, "t")
