"""Loading CLIP weights from every supported format, and refusing bad or unsafe files."""

import json
import os

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from tinyclip import tiny_config

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
    with pytest.raises(PromptKDError, match=r"teacher.pt: checkpoint does not fit this architecture: .*shape mismatch"):
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
