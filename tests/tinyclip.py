"""Tiny open_clip architectures as JSON configs, for tests (no downloads)."""


def tiny_config(width=32, layers=2, patch=8, image=32, embed=24, text_width=32, text_layers=2, ctx=16):
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": image, "layers": layers, "width": width, "patch_size": patch, "head_width": 16},
        "text_cfg": {"context_length": ctx, "vocab_size": 49408, "width": text_width, "heads": 2, "layers": text_layers},
    }
