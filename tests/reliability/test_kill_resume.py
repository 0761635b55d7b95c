"""kill -9 at chosen points, then --resume (or a rerun): the result is bit-identical to a run that
was never interrupted, and the logs read as one clean run.

Each test runs the real CLI in a subprocess (tests/reliability/killable.py) that stops at a named
point (after a mid-epoch checkpoint, after an epoch's record but before its checkpoint, just after
an end-of-epoch checkpoint, in the middle of a metrics.jsonl append, ...), says so through a file
and blocks, so the SIGKILL lands there on any machine. One point per stage is drawn from a seeded
RNG (RELIABILITY_SEED). CPU, one thread, so runs are deterministic.

Both training runs here have 3 epochs of 4 steps and --checkpoint-every 2: checkpoints are written
after global steps 2, 4 (end of epoch 1), 6, 8 (end of epoch 2), 10 and 12.
"""

from __future__ import annotations

import json

import pytest
import torch
from reliability_helpers import (
    assert_same_tensors,
    kill_when_ready,
    seeded_point,
    start_killable,
    tensors,
)

from promptkd.artifacts import load_artifact
from promptkd.cli import main

EXTRA = ("--checkpoint-every", "2")
STEPS, PER_EPOCH = 12, 4


def _without_seconds(obj):
    """Everything but wall-clock timings (seconds, and the epoch records' images/s)."""
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k not in ("seconds", "images_per_s")}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def _last_checkpoint_before(global_step: int) -> int:
    """Global step of the checkpoint on disk when a run stops just before checkpointing `global_step`."""
    return 2 * ((global_step - 1) // 2)


def _log(run_dir) -> list:
    return [_without_seconds(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# kill point -> global step of the checkpoint left on disk
def _points(stage: str, low: int) -> list:
    k = seeded_point(stage, low, STEPS - 1)
    points = [
        pytest.param("checkpoint:3", 6, id="after-mid-epoch-checkpoint"),
        pytest.param("epoch:2" if stage == "teacher" else "epoch:1", 6 if stage == "teacher" else 2,
                     id="epoch-ended-checkpoint-not-written"),
    ]
    if stage == "teacher":  # a resume at an epoch's start (distill's is the same loop code)
        points.append(pytest.param("checkpoint:4", 8, id="just-after-epoch-2-checkpoint"))
    kind = "torn" if stage == "distill" else "step"
    return [*points, pytest.param(f"{kind}:{k}", _last_checkpoint_before(k), id=f"{kind}-{k}-seeded")]


def _kill(args, run, stop, tmp_path) -> dict:
    """Run the CLI until kill point `stop`, SIGKILL it, and return the checkpoint (tensors, meta) left behind."""
    ready = tmp_path / "ready"
    kill_when_ready(start_killable(args, stop, ready), ready)
    return load_artifact(run / "checkpoint.safetensors", kind="checkpoint")


def _check_checkpoint(meta, at: int) -> None:
    assert meta["steps"] == at and meta["epoch"] * PER_EPOCH + meta["step"] == at


def _same_run(ref, run, files) -> None:
    for name in files:
        assert_same_tensors(ref / name, run / name)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert _without_seconds(a) == _without_seconds(b)
    # Steps logged after the last checkpoint were redone, a torn line dropped: each step once.
    assert _log(ref) == _log(run)


@pytest.fixture(scope="module")
def distill_ref(world, tmp_path_factory):
    torch.set_num_threads(1)  # as the killed runs (this runs before the function-scoped fixtures)
    ref = tmp_path_factory.mktemp("distill-ref")
    assert main(world.distill_args(ref, *EXTRA)) == 0  # 16 images, batch 4: 3 x 4 steps
    return ref


@pytest.mark.parametrize("stop, at", _points("distill", 3))
def test_distill_killed_mid_run_resumes_to_identical_student(world, distill_ref, tmp_path, stop, at):
    run = tmp_path / "run"
    _, meta = _kill(world.distill_args(run, *EXTRA), run, stop, tmp_path)
    _check_checkpoint(meta, at)
    assert not (run / "student.safetensors").exists()
    if stop.startswith("torn"):  # the kill did land in the middle of an append
        last = (run / "metrics.jsonl").read_text().splitlines()[-1]
        with pytest.raises(json.JSONDecodeError):
            json.loads(last)

    assert main(world.distill_args(run, *EXTRA, "--resume")) == 0
    _same_run(distill_ref, run, ("student.safetensors", "student-best-val.safetensors",
                                 "class_vectors.safetensors", "checkpoint.safetensors"))


@pytest.fixture(scope="module")
def teacher_ref(world, tmp_path_factory):
    torch.set_num_threads(1)
    ref = tmp_path_factory.mktemp("teacher-ref")
    assert main(["-q", *world.teacher_train_args(ref, *EXTRA)]) == 0  # 8 base images, batch 2: 3 x 4 steps
    return ref


@pytest.mark.parametrize("stop, at", _points("teacher", 5))
def test_teacher_killed_after_a_gpa_update_resumes_to_identical_prompts(world, teacher_ref, tmp_path, stop, at):
    run = tmp_path / "run"
    ckpt, meta = _kill(["-q", *world.teacher_train_args(run, *EXTRA)], run, stop, tmp_path)
    _check_checkpoint(meta, at)
    gpa_sum = [v for k, v in ckpt.items() if k.startswith("extra0.")]
    assert gpa_sum and all(v.abs().min() > 0 for v in gpa_sum)  # at least one epoch in the aggregate

    assert main(["-q", *world.teacher_train_args(run, *EXTRA, "--resume")]) == 0
    _same_run(teacher_ref, run, ("teacher.safetensors", "checkpoint.safetensors"))  # GPA sum included


def _cache_args(world, out):
    return ["cache", *world.teacher_args(), "--dataset", f"folder:{world.data}", "--protocol", "cross",
            "--views", "2", "--shard-size", "1", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--out", str(out)]


def _shards_listed(cache_dir) -> int:
    return len(json.loads((cache_dir / "manifest.json").read_text())["shards"])


def test_cache_build_killed_mid_run_resumes_to_identical_cache(world, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_cache_args(world, ref)) == 0  # 16 images, one per shard

    k = seeded_point("cache", 1, 15)
    ready = tmp_path / "ready"
    kill_when_ready(start_killable(_cache_args(world, run), f"shard:{k}", ready), ready)
    assert _shards_listed(run) == k

    assert main(_cache_args(world, run)) == 2  # an unfinished cache is not restarted silently
    assert main([*_cache_args(world, run), "--resume"]) == 0  # --resume continues at the first missing shard
    manifest_ref = json.loads((ref / "manifest.json").read_text())
    assert json.loads((run / "manifest.json").read_text()) == manifest_ref
    for shard in manifest_ref["shards"]:
        a, b = tensors(ref / shard["file"]), tensors(run / shard["file"])
        assert all(a[k].equal(b[k]) for k in a), shard["file"]
