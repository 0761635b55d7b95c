"""Prompted encoders: exact equality with open_clip at depth 0, prompts matter, gradients reach only prompts."""

import torch
import torch.nn.functional as F

from promptkd.models import Projector, PromptedImageEncoder, PromptedTextEncoder, load_clip


def test_depth0_image_encoder_equals_open_clip(tiny_configs):
    bundle = load_clip(str(tiny_configs[0]))
    images = torch.randn(3, 3, 32, 32)
    enc = PromptedImageEncoder(bundle.model.visual, depth=0)
    with torch.no_grad():
        assert torch.equal(enc(images), bundle.model.encode_image(images))


def test_depth0_text_encoder_equals_open_clip(tiny_configs):
    bundle = load_clip(str(tiny_configs[0]))
    enc = PromptedTextEncoder(bundle.model, bundle.tokenizer, depth=0)
    names = ["red circle", "blue_square"]
    tokens = enc.tokenize_classnames(names)
    expected_tokens = bundle.tokenizer(["a photo of a red circle.", "a photo of a blue square."])
    assert torch.equal(tokens, expected_tokens)
    with torch.no_grad():
        assert torch.equal(enc(tokens), bundle.model.encode_text(expected_tokens))


def test_text_context_initialised_from_ctx_init_keeps_features_at_input(tiny_configs):
    """Depth 1 with ctx from 'a photo of a' is CoOp at init: same features as plain CLIP."""
    bundle = load_clip(str(tiny_configs[0]))
    enc = PromptedTextEncoder(bundle.model, bundle.tokenizer, depth=1, n_ctx=4)
    tokens = enc.tokenize_classnames(["red circle"])
    with torch.no_grad():
        torch.testing.assert_close(enc(tokens), bundle.model.encode_text(tokens), rtol=1e-5, atol=1e-6)


def test_prompts_change_features(tiny_configs):
    bundle = load_clip(str(tiny_configs[0]))
    images = torch.randn(2, 3, 32, 32)
    plain = PromptedImageEncoder(bundle.model.visual, depth=0)
    deep = PromptedImageEncoder(bundle.model.visual, depth=3, n_ctx=2)
    with torch.no_grad():
        a, b = plain(images), deep(images)
        deep.prompts.deep[0].add_(torch.randn_like(deep.prompts.deep[0]))
        c = deep(images)
    assert not torch.allclose(a, b)
    assert not torch.allclose(b, c)  # a deep (block-1) prompt matters too
    text = PromptedTextEncoder(bundle.model, bundle.tokenizer, depth=3, n_ctx=4)
    tok = text.tokenize_classnames(["red circle", "blue square"])
    with torch.no_grad():
        t0 = text(tok)
        text.prompts.deep[1].add_(torch.randn_like(text.prompts.deep[1]))
        t1 = text(tok)
    assert not torch.allclose(t0, t1)


def test_vision_sequence_rule_matches_hand_computation(tiny_configs):
    """Prompts are appended without positional embedding before ln_pre, and replaced at block i."""
    bundle = load_clip(str(tiny_configs[0]))
    v = bundle.model.visual
    enc = PromptedImageEncoder(v, depth=2, n_ctx=3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(2, 1, -1), x], 1) + v.positional_embedding
        x = torch.cat([x, enc.prompts.input.expand(2, -1, -1)], 1)
        x = v.ln_pre(x)
        x = v.transformer.resblocks[0](x)
        x = torch.cat([x[:, :-3], enc.prompts.deep[0].expand(2, -1, -1)], 1)
        for blk in v.transformer.resblocks[1:]:
            x = blk(x)
        expected = v.ln_post(x[:, 0]) @ v.proj
        torch.testing.assert_close(enc(images), expected)


def test_only_prompts_and_projector_get_gradients(tiny_configs):
    teacher, student = load_clip(str(tiny_configs[0])), load_clip(str(tiny_configs[1]))
    for p in student.model.parameters():
        p.requires_grad_(False)
    enc = PromptedImageEncoder(student.model.visual, depth=2, n_ctx=2)
    proj = Projector(student.embed_dim, teacher.embed_dim)
    assert (proj.in_dim, proj.out_dim) == (24, 32)
    feats = F.normalize(proj(enc(torch.randn(4, 3, 32, 32))), dim=-1)
    feats.sum().backward()
    with_grad = {n for n, p in list(enc.named_parameters()) + [("proj." + n, p) for n, p in proj.named_parameters()] if p.grad is not None}
    assert with_grad == {"prompts.input", "prompts.deep.0"} | {"proj." + n for n, _ in proj.named_parameters()}


def test_chunked_checkpointed_text_forward_equals_full(tiny_configs):
    bundle = load_clip(str(tiny_configs[0]))
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    enc = PromptedTextEncoder(bundle.model, bundle.tokenizer, depth=2, n_ctx=4, grad_checkpointing=True)
    tok = enc.tokenize_classnames([f"class {i}" for i in range(7)])
    full = enc(tok)
    full.square().sum().backward()
    g_full = enc.prompts.input.grad.clone()
    enc.zero_grad()
    chunked = enc.encode(tok, chunk_size=3)
    chunked.square().sum().backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(enc.prompts.input.grad, g_full, rtol=1e-3, atol=1e-3)


def test_training_attention_path_equals_open_clip(tiny_configs):
    """With gradients the blocks take our batch-first attention; it must be the same function."""
    bundle = load_clip(str(tiny_configs[0]))
    images = torch.randn(3, 3, 32, 32)
    image_enc = PromptedImageEncoder(bundle.model.visual, depth=2, n_ctx=2)
    text_enc = PromptedTextEncoder(bundle.model, bundle.tokenizer, depth=2, n_ctx=4)
    tokens = text_enc.tokenize_classnames(["red circle", "blue square"])
    with torch.no_grad():
        image_ref, text_ref = image_enc(images), text_enc(tokens)
    torch.testing.assert_close(image_enc(images), image_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_enc(tokens), text_ref, rtol=1e-5, atol=1e-5)  # causal mask path


def test_a_sequence_first_transformer_is_refused_in_one_line(tiny_configs):
    import pytest

    from promptkd.errors import PromptKDError

    bundle = load_clip(str(tiny_configs[0]))
    bundle.model.visual.transformer.batch_first = False
    with pytest.raises(PromptKDError, match="image tower.*batch_first=False"):
        PromptedImageEncoder(bundle.model.visual, depth=2)
    bundle.model.transformer.batch_first = False
    with pytest.raises(PromptKDError, match="text tower.*batch_first=False"):
        PromptedTextEncoder(bundle.model, bundle.tokenizer, depth=1)
