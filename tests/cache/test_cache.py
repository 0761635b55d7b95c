"""Teacher-output cache: replayed views give the teacher's features; builds resume; misuse is refused."""

import pytest
import torch
from PIL import Image

from promptkd.data.dataset import Item, load_rgb
from promptkd.data.transforms import TrainTransform
from promptkd.errors import PromptKDError
from promptkd.models import load_clip
from promptkd.models.wrappers import Teacher
from promptkd.stages import cache as cache_mod
from promptkd.stages.cache import CachedViewDataset, CacheSpec, TeacherCache, build_teacher_cache


@pytest.fixture
def setup(tiny_configs, tmp_path):
    items = []
    for i in range(5):
        img = Image.new("RGB", (40 + 4 * i, 36), color=(40 * i, 255 - 40 * i, 90))
        img.putpixel((3, 3), (255, 255, 255))
        p = tmp_path / f"img{i}.png"
        img.save(p)
        items.append(Item(str(p), -1))
    teacher = Teacher(load_clip(str(tiny_configs[0])), 2, 1, 2, 4)
    return teacher, items, TrainTransform(size=32)


def test_replayed_view_features_equal_teacher_forward(setup, tmp_path):
    teacher, items, tf = setup
    d = build_teacher_cache(teacher, items, tf, tmp_path / "c", CacheSpec(views=3, shard_size=2), progress=False)
    cache = TeacherCache(d, teacher.identity(), items)
    ds = CachedViewDataset(items, tf, cache, seed=4)
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(items)):
            x, feat, idx = ds[i]
            with torch.no_grad():
                direct = teacher.encode_images(x[None])[0]
            torch.testing.assert_close(feat, direct, atol=2e-3, rtol=1e-2)  # stored in fp16
    ks = {ds.view_index(i) for i in range(len(items))}
    assert ks <= {0, 1, 2}


def test_interrupted_build_resumes_to_the_same_cache(setup, tmp_path, monkeypatch):
    teacher, items, tf = setup
    spec = CacheSpec(views=2, shard_size=2)
    ref = TeacherCache(build_teacher_cache(teacher, items, tf, tmp_path / "ref", spec, progress=False))
    real_save = cache_mod.save_artifact
    calls = {"n": 0}

    def failing_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while writing the second shard
        return real_save(*a, **k)

    monkeypatch.setattr(cache_mod, "save_artifact", failing_save)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, items, tf, tmp_path / "run", spec, progress=False)
    with pytest.raises(PromptKDError, match="incomplete"):
        TeacherCache(tmp_path / "run")
    monkeypatch.setattr(cache_mod, "save_artifact", real_save)
    resumed = TeacherCache(build_teacher_cache(teacher, items, tf, tmp_path / "run", spec, progress=False))
    assert all(torch.equal(a, b) for a, b in zip(resumed.read_all(), ref.read_all()))


def test_cache_from_other_teacher_or_images_is_refused(setup, tiny_configs, tmp_path):
    teacher, items, tf = setup
    d = build_teacher_cache(teacher, items, tf, tmp_path / "c", CacheSpec(views=1), progress=False)
    other = Teacher(load_clip(str(tiny_configs[0])), 2, 1, 2, 4)  # same CLIP, other prompts
    with pytest.raises(PromptKDError, match="another teacher"):
        TeacherCache(d, other.identity())
    with pytest.raises(PromptKDError, match="another image list"):
        TeacherCache(d, teacher.identity(), items[:3])
    with pytest.raises(PromptKDError, match="another teacher, image list or settings"):
        build_teacher_cache(teacher, items, tf, d, CacheSpec(views=2), progress=False)


def test_views_replay_the_recorded_crop(setup, tmp_path):
    teacher, items, tf = setup
    cache = TeacherCache(build_teacher_cache(teacher, items, tf, tmp_path / "c", CacheSpec(views=2), progress=False))
    v = cache.view(3, 1)
    img = load_rgb(items[3][0])
    assert 0 <= v.top and v.top + v.h <= img.height and 0 <= v.left and v.left + v.w <= img.width
