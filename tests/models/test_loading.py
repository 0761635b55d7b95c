"""Loading CLIP weights from every supported format, and refusing bad or unsafe files."""

import json
import os

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from tinyclip import (
    OPENAI_BUFFERS,
    openai_config,
    openai_state_dict,
    reference_image_features,
    reference_text_features,
    tiny_config,
)

from promptkd.errors import PromptKDError
from promptkd.models import PromptedImageEncoder, load_clip


@pytest.fixture
def reference(tiny_configs):
    cfg = tiny_configs[1]
    bundle = load_clip(str(cfg))
    return cfg, bundle.model


def _same_features(a, b):
    x = torch.randn(2, 3, 32, 32)
    tok = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat."])[:, :16]
    with torch.no_grad():
        return torch.allclose(a.encode_image(x), b.encode_image(x)) and torch.allclose(a.encode_text(tok), b.encode_text(tok))


def test_plain_state_dict(reference, tmp_path):
    cfg, model = reference
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert _same_features(load_clip(str(cfg), str(tmp_path / "w.pt")).model, model)


def test_safetensors(reference, tmp_path):
    cfg, model = reference
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    assert _same_features(load_clip(str(cfg), str(tmp_path / "w.safetensors")).model, model)


def test_open_clip_training_checkpoint(reference, tmp_path):
    cfg, model = reference
    ckpt = {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    assert _same_features(load_clip(str(cfg), str(tmp_path / "epoch_3.pt")).model, model)


def test_openai_torchscript_archive(tmp_path):
    c = tiny_config()
    c["quick_gelu"] = True  # OpenAI models use QuickGELU; the loader must switch it on for archives
    cfg = tmp_path / "tiny-openai.json"
    cfg.write_text(json.dumps(c))
    original = load_clip(str(cfg)).model
    torch.jit.save(torch.jit.script(original), tmp_path / "tiny.pt")
    plain = tmp_path / "tiny-plain.json"
    plain.write_text(json.dumps(tiny_config()))  # same architecture, no quick_gelu flag
    loaded = load_clip(str(plain), str(tmp_path / "tiny.pt")).model
    assert _same_features(loaded, original)


def test_pickle_that_runs_code_is_refused(reference, tmp_path):
    cfg, _ = reference
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(PromptKDError, match="refusing to load"):
        load_clip(str(cfg), str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_truncated_file_names_file(reference, tmp_path):
    cfg, model = reference
    torch.save(model.state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(PromptKDError, match="cut.pt: not a readable checkpoint"):
        load_clip(str(cfg), str(tmp_path / "cut.pt"))


def test_other_architecture_is_a_clear_error(tiny_configs, tmp_path):
    teacher = load_clip(str(tiny_configs[0])).model
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(PromptKDError, match=r"teacher.pt: checkpoint does not fit tiny-student: vision width 48 in "
                                            r"the checkpoint, 32 in tiny-student; vision layers 3 in the checkpoint"):
        load_clip(str(tiny_configs[1]), str(tmp_path / "teacher.pt"))


def test_unknown_names_and_tags(tiny_configs):
    with pytest.raises(PromptKDError, match="unknown model 'ViT-Q-99'"):
        load_clip("ViT-Q-99")
    with pytest.raises(PromptKDError, match="unknown weights tag 'nope'"):
        load_clip("ViT-B-16", "nope")
    with pytest.raises(PromptKDError, match="checkpoint not found"):
        load_clip(str(tiny_configs[1]), "/no/such/ViT-B-16.pt")


def test_unsupported_tower_says_so(tmp_path):
    cfg = tmp_path / "tiny-rn.json"
    c = tiny_config()
    c["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}
    cfg.write_text(json.dumps(c))
    with pytest.raises(PromptKDError, match="ModifiedResNet is not supported yet"):
        PromptedImageEncoder(load_clip(str(cfg)).model.visual, depth=2)


# ---------------------------------------------------------------- OpenAI-format weights and configs


def _openai_files(tmp_path, cfg=None, **sd_kwargs):
    path = tmp_path / "tiny-oa.json"
    path.write_text(json.dumps(cfg or openai_config()))
    sd = openai_state_dict(**sd_kwargs)
    torch.save(sd, tmp_path / "tiny-oa.pt")
    return path, tmp_path / "tiny-oa.pt", sd


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_openai_weights_get_openai_head_counts(tmp_path):
    """A config without head counts + OpenAI-format weights: heads = width // 64 (2 here), as OpenAI's
    build_model sets them; open_clip's default of 8 text heads would give other features."""
    cfg, weights, sd = _openai_files(tmp_path)
    model = load_clip(str(cfg), str(weights)).model
    assert model.transformer.resblocks[0].attn.num_heads == 2
    assert model.visual.transformer.resblocks[0].attn.num_heads == 2
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat.", "a red fox", "zebra"])[:, :16]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), reference_text_features(sd, tokens, heads=2))
        torch.testing.assert_close(model.encode_image(images), reference_image_features(sd, images, heads=2))
        # The reference depends on the head count: 8 text heads (open_clip's default) is far off.
        assert _rel_err(reference_text_features(sd, tokens, heads=8), reference_text_features(sd, tokens, heads=2)) > 0.1


def test_torchscript_archive_without_head_counts_matches_openai_rule(tmp_path):
    """The same through a TorchScript archive (what OpenAI ships), built from a scripted open_clip
    model with the right heads, loaded under a config that sets none."""
    cfg = openai_config(width=64, text_width=128)
    cfg_path = tmp_path / "tiny-oa.json"
    cfg_path.write_text(json.dumps(cfg))
    sd = openai_state_dict(width=64, text_width=128, seed=3)
    right = json.loads(json.dumps(cfg))
    right["text_cfg"]["heads"], right["quick_gelu"] = 2, True
    (tmp_path / "tiny-right.json").write_text(json.dumps(right))
    original = load_clip(str(tmp_path / "tiny-right.json")).model
    original.load_state_dict({k: v for k, v in sd.items() if k not in OPENAI_BUFFERS})
    torch.jit.save(torch.jit.script(original), tmp_path / "tiny.pt")
    loaded = load_clip(str(cfg_path), str(tmp_path / "tiny.pt")).model
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat."])[:, :16]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), reference_text_features(sd, tokens, heads=2))
        torch.testing.assert_close(loaded.encode_image(torch.ones(1, 3, 32, 32)),
                                   reference_image_features(sd, torch.ones(1, 3, 32, 32), heads=1))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["text_cfg"].update(heads=8), r"text heads = width // 64 = 2, but tiny-oa sets 8"),
    (lambda c: c["vision_cfg"].update(head_width=16), r"vision heads = width // 64 = 2, but tiny-oa gives 8"),
    (lambda c: c["vision_cfg"].update(layers=3), r"vision layers 2 in the checkpoint, 3 in tiny-oa"),
    (lambda c: c["text_cfg"].update(layers=4, width=192),
     r"text layers 2 in the checkpoint, 4 in tiny-oa; text mlp width 512 in the checkpoint, 768 in tiny-oa; "
     r"text width 128 in the checkpoint, 192 in tiny-oa"),
    (lambda c: c["vision_cfg"].update(patch_size=16), r"patch size 8 in the checkpoint, 16 in tiny-oa"),
    (lambda c: c["text_cfg"].update(context_length=77), r"context length 16 in the checkpoint, 77 in tiny-oa"),
], ids=["text heads", "vision heads", "vision layers", "text layers and width", "patch", "context"])
def test_config_that_contradicts_the_weights_is_refused(tmp_path, edit, message):
    cfg = openai_config()
    edit(cfg)
    cfg_path, weights, _ = _openai_files(tmp_path, cfg)
    with pytest.raises(PromptKDError, match=message) as e:
        load_clip(str(cfg_path), str(weights))
    assert "\n" not in str(e.value) and "tiny-oa.pt" in str(e.value)


def test_openai_width_under_64_needs_explicit_heads(tmp_path):
    cfg_path, weights, _ = _openai_files(tmp_path, openai_config(text_width=32), text_width=32)
    with pytest.raises(PromptKDError, match="cannot infer the text heads of width 32.*set text_cfg.heads"):
        load_clip(str(cfg_path), str(weights))


def test_non_finite_clip_weights_are_refused_naming_the_tensor(reference, tmp_path):
    cfg, model = reference
    sd = dict(model.state_dict())
    sd["visual.ln_post.bias"] = sd["visual.ln_post.bias"].clone()
    sd["visual.ln_post.bias"][3] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(PromptKDError, match=r"nan.pt: tensor 'visual.ln_post.bias' holds 1 non-finite value"):
        load_clip(str(cfg), str(tmp_path / "nan.pt"))
