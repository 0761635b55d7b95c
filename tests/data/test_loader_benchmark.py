"""benchmarks/loader.py at tiny size: every pipeline runs, the uint8 renderer stays within the pixel
difference the docs state, and the region probe (where it can be built) decodes exactly a full
decode's pixels, so its rows measure the same work."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
from tinyclip import load_benchmark


@pytest.fixture(scope="module")
def loader():
    return load_benchmark("loader")  # it sets one torch thread; conftest resets threads for every test


def _run(loader, tmp_path, *extra) -> dict:
    out = tmp_path / "loader.json"
    assert loader.main(["--images", "4", "--reps", "1", "--diff-images", "2", "--dir", str(tmp_path / "jpegs"),
                        "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_every_pipeline_runs_and_uint8_pixels_stay_close(loader, tmp_path, capsys):
    r = _run(loader, tmp_path)
    assert set(r["images_per_s"]) == {"official", "project-pil", "project", "decode-pil", "decode-tvio"}
    assert all(v > 0 for v in r["images_per_s"].values())
    assert r["ratio_vs_official"]["official"] == 1.0
    px = r["pixels"]
    assert px["views"] == 8 and px["share_within_1"] > 0.999 and px["max_levels"] <= 8
    assert "| project |" in capsys.readouterr().out


def _can_build() -> bool:
    include = Path("/usr/include/jpeglib.h").exists() or Path("/usr/local/include/jpeglib.h").exists()
    return include and shutil.which("cc") is not None and Path(sysconfig.get_paths()["include"], "Python.h").exists()


@pytest.mark.skipif(not _can_build(), reason="no C compiler, Python headers or libjpeg headers to build the probe")
def test_region_probe_decodes_exactly_the_full_decodes_pixels(loader, tmp_path):
    r = _run(loader, tmp_path, "--region-probe")
    assert {"probe-region", "probe-entropy", "project-region"} <= set(r["images_per_s"])
    assert r["region_exact"] == {"views": 16, "equal": 16}


def test_region_probe_without_a_compiler_is_one_line(loader, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(SystemExit) as e:
        _run(loader, tmp_path, "--region-probe")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a C compiler" in err
