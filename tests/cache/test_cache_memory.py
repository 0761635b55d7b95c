"""A teacher cache is read on demand: iterating one far larger than a memory bound keeps the process's
peak resident memory under that bound, and a NaN/inf feature anywhere is refused at open, naming
its shard, without loading the cache whole."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptkd.artifacts import save_artifact, write_json
from promptkd.data.dataset import Item, augmentation_seed
from promptkd.data.transforms import Uint8TrainTransform
from promptkd.errors import PromptKDError
from promptkd.stages.cache import CACHE_VERSION, TeacherCache, items_digest, transform_spec


def write_cache(d: Path, items, views: int, dim: int, shard_size: int, nan_at: int | None = None):
    """A cache written directly with the shard writer (no teacher): returns its features, (N, K, D) fp16."""
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.standard_normal((len(items), views, dim), dtype=np.float32)).half()
    if nan_at is not None:
        feats[nan_at, views - 1, dim - 1] = float("nan")
    boxes = torch.tensor([0, 0, 16, 16, 0], dtype=torch.int32).repeat(len(items), views, 1)
    boxes[..., 4] = torch.arange(len(items) * views, dtype=torch.int32).view(len(items), views) % 2
    shards = []
    for s, start in enumerate(range(0, len(items), shard_size)):
        end = min(start + shard_size, len(items))
        save_artifact(d / f"shard-{s:05d}.safetensors", {"features": feats[start:end], "views": boxes[start:end]},
                      {"kind": "teacher_cache_shard", "start": start, "end": end})
        shards.append({"file": f"shard-{s:05d}.safetensors", "start": start, "end": end})
    write_json(d / "manifest.json", {
        "kind": "teacher_cache", "version": CACHE_VERSION, "teacher": {}, "views": views, "seed": 0,
        "n_images": len(items), "items_digest": items_digest(items), "dim": dim, "dtype": "float16",
        "shard_size": shard_size, "precision": "fp32", "transform": transform_spec(Uint8TrainTransform(16)),
        "shards": shards})
    return feats


def _items(tmp_path, n):
    png = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(png)
    return [Item(str(png), -1)] * n  # one small image: the features are what is measured


def test_nonfinite_feature_is_refused_naming_its_shard(tmp_path, monkeypatch):
    items = _items(tmp_path, 40)
    feats = write_cache(tmp_path, items, views=3, dim=8, shard_size=16, nan_at=37)
    monkeypatch.setattr(TeacherCache, "CHECK_CHUNK_BYTES", 100)  # the NaN sits in a later chunk of its shard
    with pytest.raises(PromptKDError, match=r"shard-00002\.safetensors.*'features' holds 1 non-finite"):
        TeacherCache(tmp_path)
    feats = write_cache(tmp_path, items, views=3, dim=8, shard_size=16)  # the same cache, finite
    cache = TeacherCache(tmp_path)
    assert torch.equal(cache.feature(37, 2), feats[37, 2]) and torch.equal(cache.feature(5, 1), feats[5, 1])
    assert cache.view(17, 1) == (0, 0, 16, 16, bool((17 * 3 + 1) % 2))
    assert torch.equal(cache.read_all()[0], feats)


PROBE = textwrap.dedent("""
    import json, sys, torch
    from torch.utils.data import DataLoader
    from promptkd.data.dataset import ImageSource, Item
    from promptkd.data.transforms import Uint8TrainTransform, View
    from promptkd.stages.cache import CachedViewDataset, TeacherCache

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    d, png, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    items = [Item(png, -1)] * n
    tf = Uint8TrainTransform(16)
    # warm up what the loop uses (lazy imports, first kernel calls) before the baseline
    for _ in DataLoader([(tf.render(ImageSource(png), View(0, 0, 16, 16, True)), torch.zeros(8))] * 128, batch_size=64):
        pass
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    cache = TeacherCache(d)
    ds = CachedViewDataset(items, tf, cache, seed=3)
    total, seen = 0.0, 0
    for x, feat, index in DataLoader(ds, batch_size=64):
        total += feat.double().sum().item()
        seen += len(index)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "sum": total, "seen": seen, "end": status("VmRSS")}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS")
def test_iterating_a_cache_larger_than_the_bound_keeps_rss_bounded(tmp_path):
    n, views, dim = 1536, 8, 4096
    items = _items(tmp_path, n)
    feats = write_cache(tmp_path / "cache", items, views, dim, shard_size=512)
    size = sum(f.stat().st_size for f in (tmp_path / "cache").glob("shard-*"))
    bound = 24 * 2**20
    assert size > 4 * bound  # 100 MB of features; the process holds a few MB of them at most
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "cache"), items[0].path, str(n)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # the features of the view each image replays in epoch 0, summed here from what was written
    want = sum(feats[i, augmentation_seed(3, -1, i) % views].double().sum().item() for i in range(n))
    assert r["seen"] == n and r["sum"] == pytest.approx(want, rel=1e-9)
    assert r["peak"] - r["base"] < bound, f"peak RSS rose by {(r['peak'] - r['base']) / 2**20:.1f} MiB"
