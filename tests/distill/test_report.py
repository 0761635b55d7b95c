"""`promptkd report` aggregates seeds as the paper does, and the reproduction script's dry run."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from promptkd.cli import main
from promptkd.errors import PromptKDError
from promptkd.metrics import harmonic_mean
from promptkd.stages.distill import official_kd_weight

REPO = Path(__file__).resolve().parents[2]


def write_run(root, protocol, dataset, seed, **last):
    d = root / protocol / dataset / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"kind": "distill_metrics", "protocol": protocol, "dataset": dataset,
                                                "seed": seed, "results": {"last": {"epoch": 20, **last}}}))


def test_report_aggregates_seeds_with_hm_of_means(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "base2novel", "OxfordPets", 1, base=90.0, novel=80.0, hm=84.7)
    write_run(runs, "base2novel", "OxfordPets", 2, base=94.0, novel=60.0, hm=73.2)
    write_run(runs, "base2novel", "ImageNet", 1, base=80.0, novel=70.0, hm=74.7)
    for seed, acc in ((1, 50.0), (2, 54.0)):
        write_run(runs, "cross", "EuroSAT", seed, accuracy=acc)
    write_run(runs, "cross", "DescribableTextures", 1, accuracy=40.0)
    write_run(runs, "cross", "ImageNet", 1, accuracy=99.0)  # source: listed, not averaged

    assert main(["report", str(runs), "--out", str(tmp_path / "out")]) == 0
    tables = json.loads((tmp_path / "out" / "report.json").read_text())["tables"]
    b2n = tables["base2novel"]
    assert [r["dataset"] for r in b2n["rows"]] == ["ImageNet", "OxfordPets"]  # paper order
    pets = b2n["rows"][1]
    assert pets["base"] == pytest.approx(92.0) and pets["novel"] == pytest.approx(70.0)
    assert pets["base_std"] == pytest.approx(2.0)  # population std over seeds, as Dassl
    assert pets["hm"] == pytest.approx(harmonic_mean(92.0, 70.0))  # HM of the means, not mean of HMs
    assert pets["hm"] != pytest.approx((84.7 + 73.2) / 2, abs=0.1)
    avg = b2n["average"]
    assert avg["base"] == pytest.approx(86.0) and avg["novel"] == pytest.approx(70.0)
    assert avg["hm"] == pytest.approx(harmonic_mean(86.0, 70.0))
    assert tables["cross"]["average"]["accuracy"] == pytest.approx((52.0 + 40.0) / 2)

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| OxfordPets | 2 | 92.00 ± 2.00 | 70.00 ± 10.00 |" in md and "ImageNet (source)" in md
    rows = list(csv.reader((tmp_path / "out" / "base2novel.csv").open()))
    assert rows[0][:3] == ["dataset", "seeds", "base"] and rows[-1][0] == "Average"
    assert (tmp_path / "out" / "base2novel.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_duplicate_seeds_and_missing_selection(tmp_path):
    write_run(tmp_path / "a", "cross", "EuroSAT", 1, accuracy=50.0)
    write_run(tmp_path / "b", "cross", "EuroSAT", 1, accuracy=51.0)
    with pytest.raises(PromptKDError, match="seed 1 of EuroSAT"):
        main(["--debug", "report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    with pytest.raises(PromptKDError, match="official_best_on_test"):
        main(["--debug", "report", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
              "--select", "official_best_on_test"])


def test_protocol_configs_match_the_official_kd_weights():
    for name, protocol in (("base2novel", "base2novel"), ("cross_dataset", "cross"),
                           ("domain_generalisation", "dg")):
        spec = yaml.safe_load((REPO / "configs" / "protocols" / f"{name}.yaml").read_text())
        assert spec["protocol"] == protocol and spec["seeds"] == [1, 2, 3]
        assert (REPO / spec["preset"]).is_file()
        for dataset, settings in spec["datasets"].items():
            assert settings["kd_weight"] == official_kd_weight(dataset, protocol), dataset


def test_sweep_dry_run_prints_the_whole_paper_plan(tmp_path):
    """teachers, class vectors, caches, 33 + 30 + 12 distillations and 3 reports, each after what it needs."""
    out = subprocess.run([sys.executable, "-m", "promptkd.cli", "sweep", "--root", "/data", "--teachers", "/teachers",
                          "--out", str(tmp_path / "runs"), "--dry-run", "--nproc", "2", "--cache-views", "8"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout.splitlines()
    names = [line.split(" (")[0] for line in out if not line.startswith(" ")][:-1]
    commands = dict(zip(names, [line.strip() for line in out if line.startswith(" ")]))
    assert out[-1] == f"{len(names)} jobs, {len(names)} to run"
    distill = [c for n, c in commands.items() if n.startswith("distill/")]
    assert len(distill) == 11 * 3 + 10 * 3 + 4 * 3
    assert sorted(n for n in names if n.startswith("report/")) == ["report/base2novel", "report/cross", "report/dg"]
    # 11 base-to-novel teachers and the one ImageNet-xd teacher of cross and DG, each trained once
    assert sorted(n for n in names if n.startswith("teacher/")) == sorted(
        [f"teacher/{d}" for d in yaml.safe_load((REPO / "configs/protocols/base2novel.yaml").read_text())["datasets"]]
        + ["teacher/ImageNet-xd"])
    assert sum(n.startswith("cache/") for n in names) == 11 + 10 + 4
    assert all("torch.distributed.run" in c and "--nproc-per-node=2" in c for c in distill)
    b2n = [c for c in distill if "--protocol base2novel" in c]
    weight_200 = {c.split("--dataset ")[1].split()[0] for c in b2n if "--kd-weight 200" in c}
    assert weight_200 == {"FGVCAircraft", "OxfordFlowers", "DescribableTextures"}
    assert all("--kd-weight 1000" in c for c in distill if "--protocol base2novel" not in c)
    cross = [c for c in distill if "--protocol cross" in c]
    assert all("/teachers/ImageNet-xd/teacher.safetensors" in c and "cross_datasets.yaml" in c for c in cross)
    assert {c.split("--seed ")[1].split()[0] for c in distill} == {"1", "2", "3"}
    # every job comes after the jobs it names
    seen: set[str] = set()
    for line in out[:-1]:
        if not line.startswith(" "):
            after = line.split("; after ")[1].rstrip(")").split(", ") if "; after " in line else []
            assert set(after) <= seen, line
            seen.add(line.split(" (")[0])
    pets = commands["distill/base2novel/OxfordPets/seed2"]
    assert "/teachers/OxfordPets/teacher.safetensors" in pets and "class_vectors/OxfordPets/OxfordPets" in pets
    assert "caches/OxfordPets/base2novel/OxfordPets" in pets


def test_old_reproduce_script_runs_the_sweep(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce_paper.py"), "--data", "/data",
                          "--teachers", "/teachers", "--out", str(tmp_path), "--protocols", "dg", "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    assert "--root /data" in out and out.splitlines()[-1] == "18 jobs, 18 to run"  # teacher, 4 cv, 12 runs, report


def test_report_takes_the_readme_layout_of_teacher_and_student_runs(tmp_path, capsys):
    """runs/pets/{teacher,student}: below a folder, a teacher run's metrics.json is passed over."""
    pets = tmp_path / "runs" / "pets"
    (pets / "teacher").mkdir(parents=True)
    (pets / "teacher" / "metrics.json").write_text(json.dumps({"val_acc": 91.0, "history": []}))
    d = pets / "student"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"kind": "distill_metrics", "protocol": "base2novel", "dataset":
                                                "OxfordPets", "seed": 1, "results": {"last": {"base": 90.0, "novel": 80.0}}}))
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-plot"]) == 0
    assert "| OxfordPets | 1 | 90.00 ± 0.00 | 80.00 ± 0.00 |" in capsys.readouterr().out
    assert main(["report", str(pets / "teacher"), "--out", str(tmp_path / "out2")]) == 2  # named directly: refused
    assert "not a distillation metrics file" in capsys.readouterr().err


def test_report_plot_has_short_labels_a_free_legend_and_whole_error_bars(tmp_path):
    from promptkd.stages.report import aggregate, figure

    metrics = []
    for seed, (base, novel) in enumerate([(100.0, 60.0), (100.0, 70.0), (85.0, 65.0)], start=1):  # 95 ± 7.1
        metrics.append(("x", {"kind": "distill_metrics", "protocol": "base2novel", "seed": seed,
                              "dataset": f"folder:{tmp_path}/some/very/long/path/to/my_pet_photos",
                              "results": {"last": {"base": base, "novel": novel}}}))
        metrics.append(("y", {"kind": "distill_metrics", "protocol": "base2novel", "seed": seed, "dataset": "EuroSAT",
                              "results": {"last": {"base": 90.0 + seed, "novel": 50.0}}}))
    table = aggregate(metrics)["base2novel"]
    fig = figure("base2novel", table)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["EuroSAT", "my_pet_photos", "Average"]
    top = max(r["base"] + r["base_std"] for r in table["rows"])
    assert top > 100 and ax.get_ylim()[1] >= top  # the error bar is not clipped at 100
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(legend.overlaps(p.get_window_extent(renderer)) for p in ax.patches)  # Average bars included
    assert not legend.overlaps(ax.title.get_window_extent(renderer))
    assert fig.get_window_extent(renderer).contains(legend.x0, legend.y1)
