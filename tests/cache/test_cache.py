"""Teacher-output cache: replayed views give the teacher's features; builds resume; misuse is refused."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from promptkd.data.dataset import Item
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
    with pytest.raises(PromptKDError, match=r"another teacher, image list or settings \(views differ\)"):
        build_teacher_cache(teacher, items, tf, d, CacheSpec(views=2), progress=False)


def test_views_replay_the_recorded_crop(setup, tmp_path):
    """Each replayed view is the recorded box cut out of the image, resized and maybe mirrored
    (checked with PIL and numpy here), and it is the view whose features the teacher stored."""
    teacher, _, tf = setup
    rng = np.random.default_rng(0)
    items = []
    for i in range(5):  # noise: no crop of it looks the same mirrored, flipped upside down or shifted
        path = tmp_path / f"noise{i}.png"
        Image.fromarray(rng.integers(0, 256, (36, 40 + 4 * i, 3), dtype=np.uint8)).save(path)
        items.append(Item(str(path), -1))
    cache = TeacherCache(build_teacher_cache(teacher, items, tf, tmp_path / "c", CacheSpec(views=2), progress=False))
    ds = CachedViewDataset(items, tf, cache, seed=4)
    mean, std = torch.tensor(tf.mean)[:, None, None], torch.tensor(tf.std)[:, None, None]
    flips, boxes = set(), set()
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(items)):
            x, feature, _ = ds[i]
            top, left, h, w, flip = cache.view(i, ds.view_index(i))
            img = Image.open(items[i].path).convert("RGB")
            assert 0 <= top and top + h <= img.height and 0 <= left and left + w <= img.width
            a = np.asarray(img.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC), np.float32) / 255
            if flip:
                a = a[:, ::-1]
            want = (torch.from_numpy(a.copy()).permute(2, 0, 1) - mean) / std
            torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
            with torch.no_grad():
                direct = teacher.encode_images(want[None])[0]
            torch.testing.assert_close(feature, direct, atol=2e-3, rtol=1e-2)  # stored in fp16
            flips.add(bool(flip))
            boxes.add((i, top, left, h, w))
    assert flips == {True, False}  # both branches of the replay were checked
    assert len(boxes) > len(items)  # the two epochs replayed different crops


def test_a_mismatched_image_list_says_what_differs(setup, tmp_path):
    """Issue #23: 'built for another image list (60 images, this run has 60)' said nothing; now the
    message names the images only on one side, or the first position where the order differs."""
    teacher, items, tf = setup
    d = build_teacher_cache(teacher, items, tf, tmp_path / "c", CacheSpec(views=1), progress=False)
    other = tmp_path / "other.png"
    Image.new("RGB", (40, 36), (1, 2, 3)).save(other)
    swapped = [*items[:4], Item(str(other), -1)]  # same count, one image replaced
    with pytest.raises(PromptKDError) as e:
        TeacherCache(d, teacher.identity(), swapped)
    msg = str(e.value)
    assert "(5 images there, 5 in this run)" in msg and f"1 only in the cache (e.g. {items[4].path})" in msg
    assert f"1 only in this run (e.g. {other})" in msg
    with pytest.raises(PromptKDError, match=r"the same 5 images in another order \(position 0: "):
        TeacherCache(d, teacher.identity(), items[::-1])


def test_an_image_changed_after_caching_is_not_served_stale(setup, tmp_path):
    """An image rewritten in place after the build (same path) is found by its size and mtime."""
    teacher, items, tf = setup
    d = build_teacher_cache(teacher, items, tf, tmp_path / "c", CacheSpec(views=1), progress=False)
    TeacherCache(d, teacher.identity(), items)  # unchanged: accepted
    path = items[2].path
    before = os.stat(path)
    Image.new("RGB", (44, 36), (200, 10, 10)).save(path)  # another picture, same file name
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a second later, on any file system
    with pytest.raises(PromptKDError, match=rf"1 of its images changed since the cache was built .*e\.g\. {path}"):
        TeacherCache(d, teacher.identity(), items)
