"""`promptkd sweep` end to end on toy data through submitit's local executor: teachers, class vectors,
caches, distillations and the report run in dependency order; a failed job is listed with its log
and its dependents wait; the rerun skips what finished and runs the rest."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from promptkd.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def toy_sweep(clips, data, tmp_path, monkeypatch):
    """A protocol file over two folder datasets (the second not there yet) with tiny presets."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))  # the jobs' promptkd
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    teacher = {"model": str(clips.teacher_cfg), "weights": str(clips.teacher_weights), "shots": 2, "vision_depth": 2,
               "text_depth": 2, "n_ctx_vision": 2, "n_ctx_text": 2, "train": {"epochs": 1, "batch_size": 4}}
    student = {"protocol": "cross", "student_model": str(clips.student_cfg), "student_weights": str(clips.student_weights),
               "vision_depth": 2, "n_ctx_vision": 2, "train": {"epochs": 1, "batch_size": 4}}
    late = tmp_path / "late"
    protocol = {"protocol": "cross", "preset": "distill.yaml", "teacher": "{teachers}/{dataset}/teacher.safetensors",
                "teacher_config": "teacher.yaml", "seeds": [1],
                "datasets": {f"folder:{data}": {"kd_weight": 4}, f"folder:{late}": {"kd_weight": 4}}}
    for name, spec in (("teacher.yaml", teacher), ("distill.yaml", student), ("toy.yaml", protocol)):
        (tmp_path / name).write_text(yaml.safe_dump(spec))
    args = ["-q", "sweep", "--protocol-file", str(tmp_path / "toy.yaml"), "--teachers", str(tmp_path / "teachers"),
            "--out", str(tmp_path / "out"), "--cache-views", "2", "--executor", "submitit-local", "--parallel", "2"]
    return args, data, late, tmp_path / "out"


def test_toy_sweep_through_submitit_reports_a_failed_job_then_resumes_it(toy_sweep, capsys):
    args, data, late, out = toy_sweep
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "9 jobs, 9 to run"  # 2 x (teacher, cv, cache, run) + report

    assert main(args) == 1  # the second dataset's folder is missing: its teacher fails
    printed = capsys.readouterr().out
    log = out / "logs" / "teacher__late.log"
    assert f"failed: teacher/late: log {log}" in printed
    assert f"{late}: folder not found" in log.read_text()
    for waiting in ("class-vectors/late/late", "cache/late/cross/late", "distill/cross/late/seed1", "report/cross"):
        assert f"not started: {waiting}" in printed
    first = out / "cross" / "colours" / "seed1"
    assert json.loads((first / "run.json").read_text())["status"] == "finished"
    student_mtime = (first / "student.safetensors").stat().st_mtime_ns
    run = json.loads((first / "run.json").read_text())
    assert run["inputs"]["teacher_cache"]["path"] == str((out / "caches" / "colours" / "cross" / "colours").resolve())

    shutil.copytree(data, late)  # the data arrives; the same command again
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "9 jobs, 5 to run"
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "sweep: 5 jobs finished now, 4 were finished already, 0 failed, 0 not started" in printed
    assert (first / "student.safetensors").stat().st_mtime_ns == student_mtime  # skipped, not redone
    rows = json.loads((out / "tables" / "cross" / "report.json").read_text())["tables"]["cross"]["rows"]
    assert [r["dataset"] for r in rows] == [f"folder:{data}", f"folder:{late}"]


def test_slurm_without_slurm_is_one_line(toy_sweep, capsys):
    import shutil as sh

    if sh.which("srun"):
        pytest.skip("this machine has Slurm")
    args, _, _, out = toy_sweep
    assert main([*args[:-4], "--executor", "slurm"]) == 2
    assert capsys.readouterr().err.strip() == ('promptkd: error: --executor slurm: Could not detect "srun", '
                                               'are you indeed on a slurm cluster?')
    assert not (out / "logs").exists()  # nothing ran


def test_interrupted_run_continues_with_resume(toy_sweep, capsys):
    args, _, _, out = toy_sweep
    run = out / "cross" / "colours" / "seed1"
    run.mkdir(parents=True)
    (run / "checkpoint.safetensors").write_bytes(b"")  # what a stopped run leaves (its checkpoint)
    assert main([*args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    command = lines[lines.index(next(x for x in lines if x.startswith("distill/cross/colours/seed1"))) + 1]
    assert command.endswith("--resume") and "--teacher-cache" in command
    (run / "checkpoint.safetensors").unlink()
    (run / "metrics.jsonl").write_text("")  # stopped before its first checkpoint: started again
    assert main([*args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    command = lines[lines.index(next(x for x in lines if x.startswith("distill/cross/colours/seed1"))) + 1]
    assert command.endswith("--overwrite")


class ShellJob:
    """A sweep job whose command records the GPUs it was given and when it ran (no promptkd needed)."""

    def __init__(self, name, folder, deps=(), fail=False):
        from promptkd.stages.sweep import Job

        self.job = Job(name, ["probe"], folder / name, list(deps))
        self.fail = fail

    def command(self):
        import sys

        code = ("import os, sys, time; time.sleep(0.3); os.makedirs(sys.argv[1], exist_ok=True); "
                "open(os.path.join(sys.argv[1], 'gpus'), 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '')); "
                f"open(os.path.join(sys.argv[1], 'run.json'), 'w').write('{{\"status\": \"finished\"}}'); "
                f"sys.exit({int(self.fail)})")
        return [sys.executable, "-c", code, str(self.job.out)]


def test_local_executor_gives_each_job_its_own_gpus_and_keeps_the_order(tmp_path, monkeypatch):
    from promptkd.stages import sweep

    probes = [ShellJob("a", tmp_path), ShellJob("b", tmp_path), ShellJob("c", tmp_path, ["a", "b"]),
              ShellJob("d", tmp_path, fail=True), ShellJob("e", tmp_path, ["d"])]
    for p in probes:
        monkeypatch.setattr(p.job, "command", p.command)
    jobs = [p.job for p in probes]
    ran, failed, blocked = sweep.execute(jobs, sweep._Local(gpus=4, nproc=2, parallel=1), tmp_path / "logs", 0.05)
    assert sorted(ran) == ["a", "b", "c"] and [j.name for j in failed] == ["d"] and [j.name for j in blocked] == ["e"]
    groups = {n: (tmp_path / n / "gpus").read_text() for n in "abc"}
    assert sorted([groups["a"], groups["b"]]) == ["0,1", "2,3"]  # two jobs at once, two GPUs each
    assert (tmp_path / "c" / "gpus").stat().st_mtime >= max((tmp_path / n / "run.json").stat().st_mtime for n in "ab")
    assert not (tmp_path / "e").exists() and (tmp_path / "logs" / "d.log").read_text().startswith("=== ")
