"""What a user sees while and after commands run: one line per epoch in logs, a weights tag that
cannot be downloaded fails at once, a closed pipe ends quietly, one default for the same option."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

from cli_helpers import distill_command
from tinyclip import write_images


def test_distill_logs_one_line_per_epoch_when_not_on_a_terminal(clips, data, runs, tmp_path):
    argv = distill_command(clips, data, runs.teacher, tmp_path / "s", "--epochs", "2")[1:]  # without -q
    done = subprocess.run([sys.executable, "-m", "promptkd.cli", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    epochs = [line for line in done.stderr.splitlines() if line.startswith("distill epoch ")]
    line = r"distill epoch {}/2  loss [0-9.e+-]+  lr [0-9.e+-]+  val [0-9.]+  [0-9.]+ s \([0-9]+ img/s\)"
    assert re.fullmatch(line.format(1) + r"  ETA \d+:\d\d:\d\d", epochs[0]), epochs
    assert re.fullmatch(line.format(2), epochs[1]) and len(epochs) == 2  # the last epoch has no ETA
    assert re.search(r"^baseline, student zero-shot: accuracy [0-9.]+% of \d+ images", done.stderr, re.M)
    assert re.search(r"^baseline, teacher: accuracy [0-9.]+% of \d+ images", done.stderr, re.M)
    assert "\r" not in done.stderr  # no progress bars in a log


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def _offline_eval(tmp_path, data, extra_env: dict) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("NO_PROXY", "HF_HUB_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "xdg"), **extra_env)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "promptkd.cli", "eval", "--clip-model", "ViT-B-32",
                           "--dataset", f"folder:{data}", "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    return done, time.perf_counter() - start


def test_a_weights_tag_without_network_fails_at_once_in_one_line(tmp_path, data):
    """The default `openai` weights of eval --clip-model, not in an empty cache, with every connection
    sent to a proxy that refuses it (the network unreachable) or with HF_HUB_OFFLINE."""
    port = _closed_port()
    proxy = {"HTTPS_PROXY": f"http://127.0.0.1:{port}", "HTTP_PROXY": f"http://127.0.0.1:{port}",
             "https_proxy": f"http://127.0.0.1:{port}", "http_proxy": f"http://127.0.0.1:{port}"}
    for env in (proxy, {"HF_HUB_OFFLINE": "1"}):
        done, seconds = _offline_eval(tmp_path, data, env)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "weights tag 'openai' of ViT-B-32" in done.stderr and "local weights file" in done.stderr
        # huggingface_hub's retries took about 50 s; what is left is Python's imports (slow on a busy CPU)
        assert seconds < 45, seconds


def test_probe_of_a_refused_connection_is_quick(monkeypatch):
    from promptkd.models.downloads import PROBE_SECONDS, reachable

    for key in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)
    start = time.perf_counter()
    assert not reachable(f"https://127.0.0.1:{_closed_port()}")
    assert time.perf_counter() - start < PROBE_SECONDS + 1


def test_predict_into_a_closed_pipe_ends_quietly(runs, tmp_path):
    """`promptkd predict DIR | head -3` where head has already gone: no error line, SIGPIPE's status."""
    write_images(tmp_path / "photos", 3)
    proc = subprocess.Popen([sys.executable, "-m", "promptkd.cli", "predict", str(tmp_path / "photos"), "--student",
                             str(runs.student)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader leaves before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert err == ""


def test_the_same_weights_option_has_the_same_default_everywhere():
    from promptkd.stages.distill import DistillConfig
    from promptkd.stages.evaluate import default_clip_weights
    from promptkd.stages.teacher import TeacherConfig

    assert default_clip_weights("ViT-B-16", None) == DistillConfig().student_weights == TeacherConfig().weights
    assert default_clip_weights("ViT-B-16", "none") == "none"
