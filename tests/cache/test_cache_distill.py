"""Distillation from a teacher cache: same result as online on the same views, teacher image tower
never called, exact resume, one cache for any class list, mismatches refused, CLI end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from distill.distill_helpers import text_class_vectors, tiny_student, tiny_teacher, write_images
from tinyclip import killed_at_call

import promptkd.stages.distill as distill_mod
from promptkd.cli import main
from promptkd.data.dataset import ImageDataset, load_rgb
from promptkd.data.transforms import TrainTransform
from promptkd.engine import TrainConfig
from promptkd.engine.loop import EpochBatchSampler
from promptkd.errors import PromptKDError
from promptkd.stages.cache import (
    CachedViewDataset,
    CacheSpec,
    TeacherCache,
    build_teacher_cache,
    teacher_train_transform,
    view_generator,
)
from promptkd.stages.distill import class_logits, distill_models

CFG = dict(batch_size=8, lr=0.05, warmup_epochs=0, progress=False)


@pytest.fixture
def world(tmp_path, tiny_configs):
    items, names = write_images(tmp_path / "images", per_class=4)
    teacher = tiny_teacher(tiny_configs[0])
    return teacher, items, names, text_class_vectors(teacher, names)


def _no_image_tower(teacher, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the teacher's image tower ran")

    monkeypatch.setattr(teacher.image, "forward", boom)


@pytest.mark.parametrize("student_size", [32, 48])  # 48: other input size, the crop is rendered twice
def test_cached_k1_equals_online_on_the_same_views(world, tiny_configs, tmp_path, monkeypatch, student_size):
    teacher, items, names, cv = world
    s_cfg = tiny_configs[1]
    if student_size != 32:
        cfg = json.loads(s_cfg.read_text())
        cfg["vision_cfg"]["image_size"] = student_size
        s_cfg = tmp_path / "student48.json"
        s_cfg.write_text(json.dumps(cfg))
    cache = TeacherCache(build_teacher_cache(teacher, items, None, tmp_path / "cache", CacheSpec(views=1, seed=3),
                                             progress=False))
    cfg = TrainConfig(epochs=2, **CFG)
    # The online run draws every epoch's view exactly as the cache's only view, and rounds the
    # teacher's features through fp16 as the cache stores them.
    encode = teacher.encode_images
    with monkeypatch.context() as m:
        m.setattr(ImageDataset, "generator_for", lambda self, i: view_generator(3, 0, i))
        m.setattr(teacher, "encode_images", lambda x: F.normalize(encode(x).half().float(), dim=-1))
        online = tiny_student(s_cfg, teacher.dim)
        distill_models(teacher, online, cv, items, tmp_path / "online", train=cfg)
    _no_image_tower(teacher, monkeypatch)
    cached = tiny_student(s_cfg, teacher.dim)
    res = distill_models(teacher, cached, cv, items, tmp_path / "cached", train=cfg, teacher_cache=cache)
    a, b = online.trainable_tensors(), cached.trainable_tensors()
    assert any(not torch.equal(a[k], tiny_student(s_cfg, teacher.dim).trainable_tensors()[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    assert res.metrics["teacher_cache"]["views"] == 1


def test_cached_run_resumes_exactly_and_refuses_another_cache(world, tiny_configs, tmp_path, monkeypatch):
    teacher, items, names, cv = world
    d = build_teacher_cache(teacher, items, None, tmp_path / "cache", CacheSpec(views=3), progress=False)
    _no_image_tower(teacher, monkeypatch)
    cfg = TrainConfig(epochs=2, checkpoint_every=1, **CFG)
    ref = tiny_student(tiny_configs[1], teacher.dim)
    distill_models(teacher, ref, cv, items, tmp_path / "ref", train=cfg, teacher_cache=d)

    with killed_at_call(distill_mod, "kd_loss", 3):  # epoch 2, step 1 (2 steps per epoch)
        distill_models(teacher, tiny_student(tiny_configs[1], teacher.dim), cv, items, tmp_path / "run", train=cfg,
                       teacher_cache=d)
    resumed = tiny_student(tiny_configs[1], teacher.dim)
    with torch.no_grad():  # the trained state must come from the checkpoint
        for p in resumed.parameters():
            if p.requires_grad:
                p.add_(1.0)
    distill_models(teacher, resumed, cv, items, tmp_path / "run", train=cfg, teacher_cache=d, resume=True)
    a, b = ref.trainable_tensors(), resumed.trainable_tensors()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(PromptKDError, match="teacher_cache"):  # resuming online is another run
        distill_models(teacher, resumed, cv, items, tmp_path / "run", train=cfg, resume=True)


def test_one_cache_gives_the_teacher_logits_for_any_class_list(world, tiny_configs, tmp_path, monkeypatch):
    teacher, items, names, _ = world
    d = build_teacher_cache(teacher, items, None, tmp_path / "cache", CacheSpec(views=2), progress=False)
    cache, tf = TeacherCache(d), teacher_train_transform(teacher)
    seen = []
    monkeypatch.setattr(distill_mod, "kd_loss", lambda s, t, *a, **k: seen.append(t) or (s - s.detach()).sum())
    for subset in (names[:2], names[1:]):
        cv = text_class_vectors(teacher, subset)
        seen.clear()
        cfg = TrainConfig(epochs=1, max_steps_per_epoch=1, **CFG)
        distill_models(teacher, tiny_student(tiny_configs[1], teacher.dim), cv, items,
                       tmp_path / f"run{len(subset)}", train=cfg, teacher_cache=cache)
        sampler = EpochBatchSampler(len(items), 8, cfg.seed)
        first = next(iter(sampler))
        ds = CachedViewDataset(items, tf, cache, cfg.seed)
        views = tf.normalize(torch.stack([tf.apply_view(load_rgb(items[i].path), cache.view(i, ds.view_index(i)))
                                          for i in first]))  # uint8 renderer: normalised on the device
        with torch.no_grad():
            want = class_logits(teacher.encode_images(views), cv.vectors, teacher.logit_scale)
        assert seen[0].shape == (8, len(subset))
        torch.testing.assert_close(seen[0], want, atol=0.05, rtol=1e-3)  # logit scale 100, fp16 features


def test_views_cycle_through_all_k(world, tmp_path):
    teacher, items, *_ = world
    cache = TeacherCache(build_teacher_cache(teacher, items, None, tmp_path / "c", CacheSpec(views=3), progress=False))
    ds = CachedViewDataset(items, teacher_train_transform(teacher), cache, seed=5)
    seen = {i: set() for i in range(len(items))}
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in seen:
            seen[i].add(ds.view_index(i))
    assert all(s == {0, 1, 2} for s in seen.values())


def test_mismatched_cache_is_refused(world, tiny_configs, tmp_path):
    teacher, items, names, cv = world
    cfg = TrainConfig(epochs=1, **CFG)
    other_tf = build_teacher_cache(teacher, items, TrainTransform(size=32, scale=(0.5, 1.0)), tmp_path / "tf",
                                   CacheSpec(views=1), progress=False)
    with pytest.raises(PromptKDError, match="another transform.*scale"):
        distill_models(teacher, tiny_student(tiny_configs[1], teacher.dim), cv, items, tmp_path / "a", train=cfg,
                       teacher_cache=other_tf)
    from promptkd.data.transforms import transforms_for

    pil = build_teacher_cache(teacher, items, transforms_for(teacher.clip.preprocess_cfg)[0], tmp_path / "pil",
                              CacheSpec(views=1), progress=False)  # the same views, rendered by PIL
    with pytest.raises(PromptKDError, match=r"another transform \(renderer differ"):
        distill_models(teacher, tiny_student(tiny_configs[1], teacher.dim), cv, items, tmp_path / "p", train=cfg,
                       teacher_cache=pil)
    fewer = build_teacher_cache(teacher, items[:8], None, tmp_path / "few", CacheSpec(views=1), progress=False)
    with pytest.raises(PromptKDError, match="another image list"):
        distill_models(teacher, tiny_student(tiny_configs[1], teacher.dim), cv, items, tmp_path / "b", train=cfg,
                       teacher_cache=fewer)
    with pytest.raises(PromptKDError, match="manifest.json missing"):
        distill_models(teacher, tiny_student(tiny_configs[1], teacher.dim), cv, items, tmp_path / "c", train=cfg,
                       teacher_cache=tmp_path / "nothing")


def test_cli_cache_then_distill(tiny_configs, tmp_path, capsys):
    from safetensors.torch import save_file

    from promptkd.models import load_clip
    from promptkd.models.wrappers import Teacher

    t_cfg, s_cfg = tiny_configs
    for split in ("train", "val", "test"):
        write_images(tmp_path / "data" / split, per_class=2 if split != "train" else 4, seed=len(split))
    clip = load_clip(str(t_cfg))
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    Teacher(load_clip(str(t_cfg), str(tmp_path / "t.safetensors")), 2, 2, 2, 2).save(tmp_path / "teacher.safetensors")
    teacher_args = ["--teacher", str(tmp_path / "teacher.safetensors"), "--teacher-model", str(t_cfg),
                    "--teacher-weights", str(tmp_path / "t.safetensors")]
    data = ["--dataset", f"folder:{tmp_path / 'data'}", "--protocol", "cross"]
    cache_cmd = ["cache", *teacher_args, *data, "--views", "2", "--shard-size", "5", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "cache")]
    assert main(cache_cmd) == 0
    assert "16 images x 2 views" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4 and manifest["views"] == 2
    assert main(cache_cmd) == 2  # a finished cache is not rebuilt or touched without being asked
    assert "already holds a finished teacher cache" in capsys.readouterr().err
    assert main([*cache_cmd, "--resume"]) == 0  # --resume on a finished cache: nothing left to do
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text()) == manifest
    code = main(["distill", *teacher_args, *data, "--teacher-cache", str(tmp_path / "cache"), "--student-model",
                 str(s_cfg), "--student-weights", "none", "--vision-depth", "2", "--n-ctx-vision", "2",
                 "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["teacher_cache"]["views"] == 2 and metrics["config"]["teacher_cache"] == str(tmp_path / "cache")


def test_bf16_build_and_cached_distillation(world, tiny_configs, tmp_path):
    """The GPU precision path (bf16 autocast), run on CPU: build a cache and distil from it."""
    teacher, items, names, cv = world
    ref = TeacherCache(build_teacher_cache(teacher, items, None, tmp_path / "r", CacheSpec(views=2), progress=False))
    cache = TeacherCache(build_teacher_cache(teacher, items, None, tmp_path / "c", CacheSpec(views=2),
                                             precision="bf16", progress=False))
    (feats, boxes), (ref_feats, ref_boxes) = cache.read_all(), ref.read_all()
    assert torch.equal(boxes, ref_boxes) and cache.manifest["precision"] == "bf16"
    torch.testing.assert_close(feats.float(), ref_feats.float(), atol=0.05, rtol=0)
    cfg = TrainConfig(epochs=1, precision="bf16", **CFG)
    res = distill_models(teacher, tiny_student(tiny_configs[1], teacher.dim), cv, items, tmp_path / "run", train=cfg,
                         teacher_cache=cache)
    assert res.train.steps == 2 and res.train.skipped_steps == 0
