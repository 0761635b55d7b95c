"""Helpers for the reliability tests: a tiny on-disk world (CLIP configs and weights, a teacher
artifact, a labelled image folder) and a way to SIGKILL a CLI run at a chosen point (killable.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tinyclip import write_images as shared_write_images
from tinyclip import write_tiny_configs

HERE = Path(__file__).resolve().parent
KILLABLE = HERE / "killable.py"
# One kill point per stage comes from this seed; set RELIABILITY_SEED to try others.
KILL_SEED = int(os.environ.get("RELIABILITY_SEED", "20240601"))


@dataclass
class World:
    root: Path
    teacher_cfg: Path
    student_cfg: Path
    teacher_weights: Path
    student_weights: Path
    teacher: Path  # teacher artifact (prompts), its CLIP is teacher_cfg + teacher_weights
    data: Path  # labelled folder with train/ val/ test/

    def teacher_args(self) -> list[str]:
        return ["--teacher", str(self.teacher), "--teacher-model", str(self.teacher_cfg),
                "--teacher-weights", str(self.teacher_weights)]

    def distill_args(self, out: Path, *extra: str) -> list[str]:
        return ["distill", "--dataset", f"folder:{self.data}", "--protocol", "cross", *self.teacher_args(),
                "--student-model", str(self.student_cfg), "--student-weights", str(self.student_weights),
                "--vision-depth", "2", "--n-ctx-vision", "2", "--epochs", "3", "--batch-size", "4", "--lr", "0.05",
                "--kd-weight", "100", "--device", "cpu", "--no-progress", "--out", str(out), *extra]

    def teacher_train_args(self, out: Path, *extra: str) -> list[str]:
        return ["teacher", "--dataset", f"folder:{self.data}", "--teacher-model", str(self.teacher_cfg),
                "--teacher-weights", str(self.teacher_weights), "--vision-depth", "2", "--text-depth", "2",
                "--n-ctx-vision", "2", "--n-ctx-text", "2", "--epochs", "3", "--batch-size", "2", "--lr", "0.01",
                "--gpa-mean", "2", "--device", "cpu", "--set", "train.progress=false", "--set",
                "train.warmup_epochs=0", "--out", str(out), *extra]


def write_images(folder: Path, per_class: int, seed: int, size: int = 32) -> None:
    shared_write_images(folder, per_class, seed, size, noise=25.0)


def clip_weights(config: Path, out: Path, seed: int) -> Path:
    from promptkd.models import load_clip

    model = load_clip(str(config), init_seed=seed).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return out


def make_world(root: Path) -> World:
    from promptkd.models import load_clip
    from promptkd.models.wrappers import Teacher

    t_cfg, s_cfg = write_tiny_configs(root)
    t_w = clip_weights(t_cfg, root / "teacher-clip.safetensors", 11)
    s_w = clip_weights(s_cfg, root / "student-clip.safetensors", 12)
    torch.manual_seed(13)
    teacher = Teacher(load_clip(str(t_cfg), str(t_w)), 2, 2, 2, 2)
    teacher.save(root / "teacher.safetensors")
    for split, n in (("train", 4), ("val", 1), ("test", 1)):
        write_images(root / "data" / split, n, seed=len(split))
    return World(root, t_cfg, s_cfg, t_w, s_w, root / "teacher.safetensors", root / "data")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb), (a, b)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"


def start_killable(args: list[str], stop: str, ready: Path, env: dict | None = None, **popen) -> subprocess.Popen:
    """Run `killable.py ARGS` (the promptkd CLI) so that it blocks at kill point `stop` (EVENT:N, see
    killable.py) after creating the file `ready`. `popen`: other subprocess.Popen arguments (stderr
    apart from stdout, preexec_fn)."""
    env = {**os.environ, "RELIABILITY_STOP": stop, "RELIABILITY_READY": str(ready), "OMP_NUM_THREADS": "1",
           **(env or {})}
    return subprocess.Popen([sys.executable, str(KILLABLE), *args], env=env, cwd=HERE,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen})


def kill_when_ready(proc: subprocess.Popen, ready: Path, timeout: float = 180) -> None:
    """SIGKILL `proc` once it has reached its kill point (created `ready`; it is blocked there)."""
    wait_until_ready(proc, ready, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def wait_until_ready(proc: subprocess.Popen, ready: Path, timeout: float = 180) -> None:
    """Return once `proc` has reached its kill point (created `ready`); an earlier end or a timeout fails."""
    t0 = time.monotonic()
    while not ready.exists():
        if proc.poll() is not None:
            out = proc.stdout.read()
            raise AssertionError(f"run ended (code {proc.returncode}) before its kill point:\n{out[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"the kill point was not reached within {timeout}s")
        time.sleep(0.01)


def child_ctrl_c() -> None:
    """preexec_fn of a child that Ctrl-C must reach, even where the tests run with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the child's Python then turns it into KeyboardInterrupt


def seeded_point(name: str, low: int, high: int) -> int:
    """A kill point in [low, high] drawn from RELIABILITY_SEED for `name` (set the seed to try others)."""
    return random.Random(f"{KILL_SEED}:{name}").randint(low, high)
