"""kill -9 at a random step, then --resume (or a rerun): the result is bit-identical to a run that
was never interrupted, and the logs read as one clean run.

Each test runs the real CLI in a subprocess (tests/reliability/killable.py, slowed down between
steps so the kill lands inside a chosen step) and sends SIGKILL; the kill point comes from a
seeded RNG (RELIABILITY_SEED). CPU, one thread, so runs are deterministic.
"""

from __future__ import annotations

import json

from reliability_helpers import (
    assert_same_tensors,
    kill_point,
    kill_when,
    start_killable,
    step_lines,
    tensors,
)

from promptkd.artifacts import load_artifact
from promptkd.cli import main

DELAY = 0.15  # seconds the killable run sleeps after each step


def _without_seconds(obj):
    """Everything but wall-clock timings (seconds, and the epoch records' images/s)."""
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k not in ("seconds", "images_per_s")}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def _log(run_dir) -> list:
    return [_without_seconds(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _killed_checkpoint(run_dir, total_steps: int) -> dict:
    """The run folder after the kill holds a loadable checkpoint from before the end."""
    _, meta = load_artifact(run_dir / "checkpoint.safetensors", kind="checkpoint")
    assert 0 < meta["steps"] < total_steps
    return meta


def test_distill_killed_mid_run_resumes_to_identical_student(world, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    extra = ("--checkpoint-every", "1")
    assert main(world.distill_args(ref, *extra)) == 0  # 3 epochs x 4 steps

    at, after = kill_point("distill", 2, 11, DELAY)
    proc = start_killable(world.distill_args(run, *extra), DELAY)
    kill_when(proc, lambda: step_lines(run / "metrics.jsonl"), at, after)
    _killed_checkpoint(run, 12)
    assert not (run / "student.safetensors").exists()

    assert main(world.distill_args(run, *extra, "--resume")) == 0
    for name in ("student.safetensors", "student-best-val.safetensors", "class_vectors.safetensors",
                 "checkpoint.safetensors"):
        assert_same_tensors(ref / name, run / name)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert _without_seconds(a) == _without_seconds(b)
    # Steps logged after the last checkpoint were redone: the log keeps each step once.
    assert _log(ref) == _log(run)


def test_teacher_killed_mid_run_resumes_to_identical_prompts(world, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    extra = ("--checkpoint-every", "1")
    assert main(["-q", *world.teacher_train_args(ref, *extra)]) == 0  # 8 base images, batch 2: 3 x 4 steps

    at, after = kill_point("teacher", 2, 11, DELAY)
    proc = start_killable(["-q", *world.teacher_train_args(run, *extra)], DELAY)
    kill_when(proc, lambda: step_lines(run / "metrics.jsonl"), at, after)
    _killed_checkpoint(run, 12)

    assert main(["-q", *world.teacher_train_args(run, *extra, "--resume")]) == 0
    assert_same_tensors(ref / "teacher.safetensors", run / "teacher.safetensors")
    assert_same_tensors(ref / "checkpoint.safetensors", run / "checkpoint.safetensors")  # GPA sum included
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert _without_seconds(a) == _without_seconds(b)
    assert _log(ref) == _log(run)


def _cache_args(world, out):
    return ["cache", *world.teacher_args(), "--dataset", f"folder:{world.data}", "--protocol", "cross",
            "--views", "2", "--shard-size", "1", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--out", str(out)]


def _shards_listed(cache_dir) -> int:
    try:
        return len(json.loads((cache_dir / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0  # the manifest is replaced atomically, so a half-written one is never seen


def test_cache_build_killed_mid_run_resumes_to_identical_cache(world, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_cache_args(world, ref)) == 0  # 16 images, one per shard

    at, after = kill_point("cache", 1, 15, DELAY)
    proc = start_killable(_cache_args(world, run), DELAY)
    kill_when(proc, lambda: _shards_listed(run), at, after)
    assert 0 < _shards_listed(run) < 16

    assert main(_cache_args(world, run)) == 0  # rerunning the build resumes it
    manifest_ref = json.loads((ref / "manifest.json").read_text())
    assert json.loads((run / "manifest.json").read_text()) == manifest_ref
    for shard in manifest_ref["shards"]:
        a, b = tensors(ref / shard["file"]), tensors(run / shard["file"])
        assert all(a[k].equal(b[k]) for k in a), shard["file"]
