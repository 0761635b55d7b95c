"""Official Dassl checkpoints (PromptSRC teacher, PromptKD student) import to the features the official rule gives."""

import os

import pytest
import torch
import torch.nn.functional as F

from promptkd.errors import PromptKDError
from promptkd.models import load_clip
from promptkd.models.wrappers import Student, Teacher
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
