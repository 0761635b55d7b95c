"""cache, eval and class-vectors under torchrun (gloo, CPU): two ranks on one node and two nodes on
one machine each take their share and give exactly the one-process result; an interrupted cache
resumes under another world size."""

from __future__ import annotations

import json

import torch
from launch import cli, torchrun
from safetensors.torch import load_file

from promptkd.cli import main
from promptkd.stages.cache import TeacherCache


def cache_args(runs, data, out, *extra):
    # 16 train images of the 4 classes (cross: all classes), shards of 5: four, the last of one image
    return ["-q", "cache", "--teacher", str(runs.teacher), "--dataset", f"folder:{data}", "--protocol", "cross",
            "--views", "2", "--shard-size", "5", "--batch-size", "4", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def same_cache(a, b) -> bool:
    fa, va = TeacherCache(a).read_all()
    fb, vb = TeacherCache(b).read_all()
    return torch.equal(fa, fb) and torch.equal(va, vb)


def interrupt(folder, keep: list[int]) -> None:
    """What a build stopped mid-way leaves: the manifest lists the finished shards only (a shard
    written in the round it was stopped in stays on disk, unlisted); the others are missing."""
    m = json.loads((folder / "manifest.json").read_text())
    listed = [s for i, s in enumerate(m["shards"]) if i in keep]
    for i, s in enumerate(m["shards"]):
        if i not in keep and i != len(m["shards"]) - 1:
            (folder / s["file"]).unlink()
    (folder / "manifest.json").write_text(json.dumps({**m, "shards": listed}))


def test_cache_on_two_ranks_and_two_nodes_equals_one_process_and_resumes_across_world_sizes(runs, data, tmp_path):
    assert main(cache_args(runs, data, tmp_path / "one")) == 0
    torchrun(cli(*cache_args(runs, data, tmp_path / "ranks")), nproc=2)
    torchrun(cli(*cache_args(runs, data, tmp_path / "nodes")), nnodes=2)
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4 and manifest["n_images"] == 16
    for d in ("ranks", "nodes"):
        assert json.loads((tmp_path / d / "manifest.json").read_text()) == manifest
        assert same_cache(tmp_path / "one", tmp_path / d)
        assert json.loads((tmp_path / d / "run.json").read_text())["status"] == "finished"
    # stopped after one shard of two ranks, resumed by three; stopped in one process, resumed by two nodes
    interrupt(tmp_path / "ranks", keep=[0])
    torchrun(cli(*cache_args(runs, data, tmp_path / "ranks", "--resume")), nproc=3)
    interrupt(tmp_path / "one", keep=[1])
    torchrun(cli(*cache_args(runs, data, tmp_path / "one", "--resume")), nnodes=2)
    assert same_cache(tmp_path / "one", tmp_path / "nodes") and same_cache(tmp_path / "ranks", tmp_path / "nodes")
    assert json.loads((tmp_path / "one" / "manifest.json").read_text()) == manifest


def test_eval_and_class_vectors_on_two_ranks_equal_one_process(runs, data, tmp_path):
    # eval: base and novel test splits of 4 images each in batches of 3, one batch per rank; the same
    # accuracies and HM as one process
    ev = ["-q", "eval", str(runs.student), "--protocol", "base2novel", "--batch-size", "3", "--device", "cpu",
          "--no-progress"]
    assert main([*ev, "--out", str(tmp_path / "one.json")]) == 0
    torchrun(cli(*ev, "--out", str(tmp_path / "ranks.json")), nproc=2)
    one, ranks = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ranks"))
    assert ranks["results"] == one["results"] and ranks["images"] == one["images"] == {"base": 4, "novel": 4}
    assert set(one["results"]) == {"base", "novel", "hm"}
    # class vectors: 5 classes in chunks of 2 over two nodes (the last chunk has one class)
    cv = ["-q", "class-vectors", str(runs.teacher), "--classes", "red,green,blue,yellow,red fox",
          "--text-chunk", "2", "--device", "cpu"]
    assert main([*cv, "--out", str(tmp_path / "one.safetensors")]) == 0
    torchrun(cli(*cv, "--out", str(tmp_path / "nodes.safetensors")), nnodes=2)
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "nodes.safetensors")
    assert a["vectors"].shape[0] == 5 and torch.equal(a["vectors"], b["vectors"])
    assert a["vectors"].abs().sum(-1).min() > 0  # every row computed by some rank
