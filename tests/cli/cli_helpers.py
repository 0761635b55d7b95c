"""Helpers of the CLI tests: tiny CLIPs named by files (config JSONs and OpenAI-format weights, as a
user with clip/ViT-L-14.pt has them) and the teacher and distill command lines of a tiny run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tinyclip import openai_buffers, write_tiny_configs


def openai_checkpoint(config: Path, out: Path, seed: int) -> Path:
    """A state dict in the layout of OpenAI's CLIP files (with their three extra buffers)."""
    from promptkd.models import load_clip

    cfg = json.loads(config.read_text())
    sd = {k: v.contiguous() for k, v in load_clip(str(config), init_seed=seed).model.state_dict().items()}
    sd.update(openai_buffers(cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]))
    torch.save(sd, out)
    return out


@dataclass
class Clips:
    root: Path
    teacher_cfg: Path
    student_cfg: Path
    teacher_weights: Path
    student_weights: Path


def make_clips(root: Path) -> Clips:
    t_cfg, s_cfg = write_tiny_configs(root)
    return Clips(root, t_cfg, s_cfg, openai_checkpoint(t_cfg, root / "teacher-clip.pt", 11),
                 openai_checkpoint(s_cfg, root / "student-clip.pt", 12))


def teacher_command(clips: Clips, data: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "teacher", "--teacher-model", str(clips.teacher_cfg), "--teacher-weights", str(clips.teacher_weights),
            "--dataset", f"folder:{data}", "--vision-depth", "2", "--text-depth", "2", "--n-ctx-vision", "2",
            "--n-ctx-text", "2", "--epochs", "1", "--batch-size", "4", "--shots", "2", "--device", "cpu",
            "--no-progress", "--out", str(out), *extra]


def distill_command(clips: Clips, data: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "distill", "--teacher", str(teacher), "--dataset", f"folder:{data}", "--protocol", "cross",
            "--student-model", str(clips.student_cfg), "--student-weights", str(clips.student_weights),
            "--vision-depth", "2", "--n-ctx-vision", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
            "--no-progress", "--out", str(out), *extra]


@dataclass
class Runs:
    teacher: Path  # a teacher run folder
    student: Path  # a student run folder distilled from it


def dassl_teacher_checkpoint(clip_cfg: Path, out: Path, depth: int = 2, n_ctx: int = 2) -> Path:
    """An official PromptSRC teacher checkpoint (Dassl's `model-best.pth.tar` key names) for a CLIP."""
    cfg = json.loads(clip_cfg.read_text())
    g = torch.Generator().manual_seed(5)
    tw, vw = cfg["text_cfg"]["width"], cfg["vision_cfg"]["width"]
    sd = {"prompt_learner.ctx": torch.randn(n_ctx, tw, generator=g), "image_encoder.VPT": torch.randn(n_ctx, vw, generator=g)}
    for i in range(1, depth):
        sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx, tw, generator=g)
        sd[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx, vw, generator=g)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "epoch": 20}, out)
    return out
