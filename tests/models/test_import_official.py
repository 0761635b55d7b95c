"""Official Dassl checkpoints (PromptSRC teacher, PromptKD student) import to the features the official rule gives."""

import json
import logging
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tinyclip import (
    OPENAI_BUFFERS,
    openai_config,
    openai_state_dict,
    reference_image_features,
    reference_text_features,
)

from promptkd.artifacts import load_artifact, read_artifact_meta, save_artifact
from promptkd.cli import main
from promptkd.errors import PromptKDError
from promptkd.models import load_clip
from promptkd.models.wrappers import ClassVectors, Student, Teacher, check_same_teacher
from promptkd.stages.import_official import import_student, import_teacher


def _dassl_save(path, state_dict, params):
    """Save like Dassl: model, optimiser and a warm-up scheduler whose state holds a scheduler object."""
    opt = torch.optim.SGD(params, lr=0.1)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    sched = {"successor": successor, "warmup_epoch": 1, "last_epoch": 20, "base_lrs": [0.005]}
    torch.save({"state_dict": state_dict, "epoch": 20, "optimizer": opt.state_dict(), "scheduler": sched,
                "val_result": 81.5}, path)


def _teacher_state(clip, n_ctx_t=4, n_ctx_v=2, depth=3):
    g = torch.Generator().manual_seed(1)
    tw = clip.model.token_embedding.embedding_dim
    vw = clip.model.visual.conv1.out_channels
    sd = {"prompt_learner.ctx": torch.randn(n_ctx_t, tw, generator=g).half(),
          "image_encoder.VPT": torch.randn(n_ctx_v, vw, generator=g),
          "prompt_learner.token_prefix": torch.zeros(3, 1, tw), "logit_scale": torch.tensor(4.6)}
    for i in range(1, depth):
        sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx_t, tw, generator=g)
        sd[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx_v, vw, generator=g)
    for k, v in clip.model.visual.state_dict().items():  # the frozen copies Dassl stores beside the prompts
        sd[f"image_encoder.{k}"] = v.half()
        sd[f"prompt_learner.ZS_image_encoder.{k}"] = v.half()
    return sd


def _official_text(clip, sd, names, depth):
    m = clip.model
    tok = clip.tokenizer([f"a photo of a {n}." for n in names])
    x = m.token_embedding(tok)
    ctx = sd["prompt_learner.ctx"].float()
    x = torch.cat([x[:, :1], ctx.expand(len(names), -1, -1), x[:, 5:]], 1) + m.positional_embedding
    for i, blk in enumerate(m.transformer.resblocks):
        if 1 <= i < depth:
            deep = sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"]
            x = torch.cat([x[:, :1], deep.expand(len(names), -1, -1), x[:, 5:]], 1)
        x = blk(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)[torch.arange(len(names)), tok.argmax(-1)] @ m.text_projection
    return F.normalize(x, dim=-1)


def _official_vision(visual, sd, images, depth, prefix="image_encoder"):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(images), 1, -1), x], 1) + visual.positional_embedding
    vpt = sd[f"{prefix}.VPT"].float()
    n = vpt.shape[0]
    x = visual.ln_pre(torch.cat([x, vpt.expand(len(images), -1, -1)], 1))
    for i, blk in enumerate(visual.transformer.resblocks):
        if 1 <= i < depth:
            x = torch.cat([x[:, :-n], sd[f"{prefix}.transformer.resblocks.{i}.VPT_shallow"].float().expand(len(images), -1, -1)], 1)
        x = blk(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def test_teacher_import_matches_official_rule(tiny_configs, tmp_path):
    clip = load_clip(str(tiny_configs[0]))
    sd = _teacher_state(clip)
    _dassl_save(tmp_path / "model-best.pth.tar", sd, [torch.nn.Parameter(torch.zeros(2))])
    out = import_teacher(tmp_path / "model-best.pth.tar", clip, tmp_path / "teacher.safetensors")
    teacher = Teacher.load(out, clip=clip)
    assert teacher.prompt_config["vision_depth"] == 3 and teacher.prompt_config["n_ctx_vision"] == 2
    names = ["red circle", "blue square", "green_star"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.encode_classnames(names), _official_text(clip, sd, [n.replace("_", " ") for n in names], 3))
        torch.testing.assert_close(teacher.encode_images(images), F.normalize(_official_vision(clip.model.visual, sd, images, 3), dim=-1))


def test_student_import_matches_official_rule(tiny_configs, tmp_path):
    clip = load_clip(str(tiny_configs[1]))
    vis = clip.model.visual
    g = torch.Generator().manual_seed(2)
    d_in, d_out, w = vis.output_dim, 32, vis.conv1.out_channels
    sd = {"image_encoder.VPT": torch.randn(4, w, generator=g),
          "image_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, w, generator=g),
          "VPT_image_trans.conv1.0.weight": torch.randn(d_out, d_in, 1, 1, generator=g).half(),
          "VPT_image_trans.conv1.0.bias": torch.randn(d_out, generator=g).half(),
          "VPT_image_trans.conv1.1.weight": torch.rand(d_out, generator=g) + 0.5,
          "VPT_image_trans.conv1.1.bias": torch.randn(d_out, generator=g),
          "VPT_image_trans.conv1.1.running_mean": torch.randn(d_out, generator=g),
          "VPT_image_trans.conv1.1.running_var": torch.rand(d_out, generator=g) + 0.5,
          "VPT_image_trans.conv1.1.num_batches_tracked": torch.tensor(100),
          "VPT_image_trans.conv1.3.weight": torch.randn(d_out, d_out, 1, 1, generator=g).half(),
          "VPT_image_trans.conv1.3.bias": torch.randn(d_out, generator=g).half(),
          "logit_scale": torch.tensor(4.6)}
    _dassl_save(tmp_path / "model.pth.tar-20", sd, [torch.nn.Parameter(torch.zeros(2))])
    out = import_student(tmp_path / "model.pth.tar-20", clip, tmp_path / "student.safetensors")
    student = Student.load(out, clip=clip)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = _official_vision(vis, sd, images, 2)[:, :, None, None]
        f = F.conv2d(f, sd["VPT_image_trans.conv1.0.weight"].float(), sd["VPT_image_trans.conv1.0.bias"].float())
        f = F.batch_norm(f, sd["VPT_image_trans.conv1.1.running_mean"], sd["VPT_image_trans.conv1.1.running_var"],
                         sd["VPT_image_trans.conv1.1.weight"], sd["VPT_image_trans.conv1.1.bias"], training=False)
        f = F.conv2d(F.relu(f), sd["VPT_image_trans.conv1.3.weight"].float(), sd["VPT_image_trans.conv1.3.bias"].float())
        torch.testing.assert_close(student(images), F.normalize(f.flatten(1), dim=-1))


def test_missing_or_extra_prompt_tensor_is_named(tiny_configs, tmp_path):
    clip = load_clip(str(tiny_configs[0]))
    sd = _teacher_state(clip, depth=3)
    del sd["image_encoder.transformer.resblocks.1.VPT_shallow"]
    torch.save({"state_dict": sd}, tmp_path / "gap.pth.tar")
    with pytest.raises(PromptKDError, match=r"missing prompt tensor image_encoder\.transformer\.resblocks\.1\.VPT_shallow"):
        import_teacher(tmp_path / "gap.pth.tar", clip, tmp_path / "t.safetensors")
    sd = _teacher_state(clip, depth=3)
    sd["prompt_learner.VPT_extra"] = torch.zeros(2, 2)
    torch.save({"state_dict": sd}, tmp_path / "extra.pth.tar")
    with pytest.raises(PromptKDError, match=r"unexpected prompt tensor prompt_learner\.VPT_extra"):
        import_teacher(tmp_path / "extra.pth.tar", clip, tmp_path / "t.safetensors")
    sd = _teacher_state(clip)
    del sd["prompt_learner.ctx"]
    torch.save({"state_dict": sd}, tmp_path / "noctx.pth.tar")
    with pytest.raises(PromptKDError, match="missing prompt tensor prompt_learner.ctx"):
        import_teacher(tmp_path / "noctx.pth.tar", clip, tmp_path / "t.safetensors")


def test_checkpoint_for_other_architecture_or_unsafe_is_refused(tiny_configs, tmp_path):
    teacher_clip, student_clip = load_clip(str(tiny_configs[0])), load_clip(str(tiny_configs[1]))
    torch.save({"state_dict": _teacher_state(teacher_clip)}, tmp_path / "t.pth.tar")
    with pytest.raises(PromptKDError, match="another architecture"):
        import_teacher(tmp_path / "t.pth.tar", student_clip, tmp_path / "x.safetensors")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "scheduler": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(PromptKDError, match="refusing to load"):
        import_teacher(tmp_path / "evil.pth.tar", teacher_clip, tmp_path / "x.safetensors")
    assert not marker.exists()


# ------------------------------------------------- frozen weights of a GPA checkpoint (official §1.2, §2.2)

_GEOMETRY = {"width": 128, "layers": 3, "text_width": 128, "text_layers": 3, "embed": 64}  # 2 heads per tower


def _fp16_in_official_model(key):
    """Tensors OpenAI's convert_weights keeps in fp16 (convs, linears, attention, projections);
    LayerNorms and embeddings stay fp32, so GPA re-sums them in fp32."""
    return key.endswith(("conv1.weight", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias",
                         "c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")) or key in ("visual.proj",
                                                                                                "text_projection")


def _gpa_resum(w, fp16, epochs=20, mean=15.0, std=1.0):
    """PromptSRC's GPA applied to a frozen tensor: sum over epochs of g_e * w, in the tensor's dtype,
    with Gaussian weights g_e normalised to sum 1."""
    g = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
    w = w.half() if fp16 else w.float()
    total = None
    for ge in g:
        term = w * (ge / sum(g))
        total = term if total is None else total + term
    return total


def _official_key(key):
    return "image_encoder." + key.removeprefix("visual.") if key.startswith("visual.") else \
        key if key == "logit_scale" else "text_encoder." + key


@pytest.fixture
def official(tmp_path):
    """An OpenAI-format fp16 archive, and a PromptSRC GPA checkpoint whose frozen copies of it were
    re-summed as the official GPA does, with depth-3 prompts on both towers."""
    cfg = tmp_path / "tiny-l.json"
    cfg.write_text(json.dumps(openai_config(**_GEOMETRY)))
    archive = openai_state_dict(**_GEOMETRY, seed=5, dtype=torch.float16)  # OpenAI ships fp16 archives
    torch.save(archive, tmp_path / "tiny-L.pt")
    frozen = {k: _gpa_resum(v, _fp16_in_official_model(k)) for k, v in archive.items()
              if k not in OPENAI_BUFFERS and k != "token_embedding.weight"}
    g = torch.Generator().manual_seed(7)
    text_prompts = {i: torch.randn(4, 128, generator=g).half() for i in range(3)}
    vision_prompts = {i: torch.randn(2, 128, generator=g).half() for i in range(3)}
    sd = {_official_key(k): v for k, v in frozen.items()}
    sd.update({"prompt_learner.ctx": text_prompts[0], "image_encoder.VPT": vision_prompts[0],
               "prompt_learner.token_prefix": torch.zeros(3, 1, 128).half(),
               "prompt_learner.ZS_image_encoder.conv1.weight": archive["visual.conv1.weight"]})
    for i in (1, 2):
        sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = text_prompts[i]
        sd[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = vision_prompts[i]
    _dassl_save(tmp_path / "model-best.pth.tar", sd, [torch.nn.Parameter(torch.zeros(2))])
    plain = {k: v.float() for k, v in archive.items() if k not in OPENAI_BUFFERS}
    tokens = load_clip(str(cfg), str(tmp_path / "tiny-L.pt")).tokenizer([f"a photo of a {n}." for n in _NAMES])
    return SimpleNamespace(cfg=str(cfg), archive=str(tmp_path / "tiny-L.pt"), ckpt=tmp_path / "model-best.pth.tar",
                           plain=plain, official={**plain, **{k: v.float() for k, v in frozen.items()}},
                           frozen=frozen, text_prompts=text_prompts, vision_prompts=vision_prompts, tokens=tokens,
                           tmp=tmp_path)


_NAMES = ["red circle", "blue square", "green star"]


def _official_logits(o, weights, images):
    """What the official CustomCLIP_teacher computes, written out by hand from `weights`."""
    text = F.normalize(reference_text_features(weights, o.tokens, heads=2, prompts=o.text_prompts), dim=-1)
    image = F.normalize(reference_image_features(weights, images, heads=2, prompts=o.vision_prompts), dim=-1)
    return weights["logit_scale"].exp() * image @ text.T


def _logits(teacher, images):
    with torch.no_grad():
        return teacher.logit_scale * teacher.encode_images(images) @ teacher.encode_classnames(_NAMES).T


def test_teacher_import_runs_on_the_checkpoints_frozen_weights(official, caplog):
    o, images = official, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO, logger="promptkd"):
        out = import_teacher(o.ckpt, load_clip(o.cfg, o.archive), o.tmp / "teacher.safetensors")
    # The file alone, on a freshly loaded archive, is the official teacher of this checkpoint.
    teacher = Teacher.load(out, clip=load_clip(o.cfg, o.archive))
    expected = _official_logits(o, o.official, images)
    torch.testing.assert_close(_logits(teacher, images), expected, rtol=1e-5, atol=1e-4)
    assert (_official_logits(o, o.plain, images) - expected).abs().max() > 1e-3  # the archive's would differ

    differ = {k for k, v in o.frozen.items() if not torch.equal(v.float(), o.plain[k])}
    worst = max(float((o.frozen[k].float() - o.plain[k]).abs().max()) for k in differ)
    report = read_artifact_meta(out, "teacher")["frozen_weights"]
    assert report["used"] == "checkpoint" and report["compared"] == len(o.frozen) and report["differ"] == len(differ)
    assert report["max_abs_deviation"] == pytest.approx(worst) and worst > 0
    stored = {k for k in load_artifact(out)[0] if k.startswith("frozen.")}
    assert stored == {f"frozen.{k}" for k in differ}  # only the tensors that differ, in their own dtype
    assert load_artifact(out)[0]["frozen.visual.conv1.weight"].dtype == torch.float16
    assert f"largest deviation {worst:.2e}" in caplog.text


def test_teacher_import_can_keep_the_archives_weights(official):
    o, images = official, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = o.tmp / "archive-teacher.safetensors"
    assert main(["import-official", "teacher", str(o.ckpt), "--teacher-model", o.cfg, "--teacher-weights", o.archive,
                 "--out", str(out), "--frozen-weights", "archive"]) == 0
    teacher = Teacher.load(out, clip=load_clip(o.cfg, o.archive))
    torch.testing.assert_close(_logits(teacher, images), _official_logits(o, o.plain, images), rtol=1e-5, atol=1e-4)
    assert not any(k.startswith("frozen.") for k in load_artifact(out)[0])
    assert read_artifact_meta(out)["frozen_weights"]["used"] == "archive"
    assert read_artifact_meta(out)["frozen_weights"]["max_abs_deviation"] > 0


def test_frozen_weights_apply_only_to_the_archive_they_were_taken_against(official):
    o = official
    ckpt_teacher = import_teacher(o.ckpt, load_clip(o.cfg, o.archive), o.tmp / "t.safetensors")
    other = openai_state_dict(**_GEOMETRY, seed=6, dtype=torch.float16)
    (o.tmp / "other").mkdir()
    torch.save(other, o.tmp / "other" / "tiny-L.pt")  # same name, other weights: only the hash tells
    # the CLIP identity holds the weights' sha256, so it is refused before the frozen tensors' base hash
    with pytest.raises(PromptKDError, match=r"made for CLIP tiny-l / tiny-L.pt, sha256 \w+\.\.\., but the given "
                                            r"CLIP is tiny-l / tiny-L.pt, sha256"):
        Teacher.load(ckpt_teacher, clip=load_clip(o.cfg, str(o.tmp / "other" / "tiny-L.pt")))

    # An altered frozen tensor is caught before anything is written into the CLIP.
    t, m = load_artifact(ckpt_teacher)
    t["frozen.visual.proj"] = t["frozen.visual.proj"] * 1.01
    save_artifact(o.tmp / "altered.safetensors", t, m)
    clean = load_clip(o.cfg, o.archive)
    with pytest.raises(PromptKDError, match="altered.safetensors: its frozen tensors do not match the recorded"):
        Teacher.load(o.tmp / "altered.safetensors", clip=clean)
    Teacher.load(ckpt_teacher, clip=clean)  # the refused file left the CLIP untouched

    # A CLIP that carries one teacher's frozen weights is not silently reused for another teacher.
    archive_teacher = import_teacher(o.ckpt, load_clip(o.cfg, o.archive), o.tmp / "a.safetensors", "archive")
    carrying = load_clip(o.cfg, o.archive)
    t = Teacher.load(ckpt_teacher, clip=carrying)
    assert Teacher.load(ckpt_teacher, clip=carrying).identity() == t.identity()  # the same file again is fine
    with pytest.raises(PromptKDError, match="already carries the frozen weights"):
        Teacher.load(archive_teacher, clip=carrying)

    # Class vectors of the archive-weights teacher are not those of the checkpoint-weights teacher.
    a = Teacher.load(archive_teacher, clip=load_clip(o.cfg, o.archive))
    with torch.no_grad():
        cv = ClassVectors(a.encode_classnames(_NAMES), _NAMES, a.identity())
    with pytest.raises(PromptKDError, match="frozen_hash"):
        check_same_teacher(cv.teacher, t.identity(), "class vectors come from another teacher", "file")
