"""Import checkpoints trained by the official PromptSRC / PromptKD code (Dassl `model-best.pth.tar`,
`model.pth.tar-20`) as our teacher or student artifacts.

Key names (official-promptkd.md sections 1.1 and 2.1):
- teacher: `prompt_learner.ctx` (text input context), `text_encoder.transformer.resblocks.{i}.VPT_shallow`,
  `image_encoder.VPT`, `image_encoder.transformer.resblocks.{i}.VPT_shallow`;
- student: `image_encoder.VPT`, `image_encoder.transformer.resblocks.{i}.VPT_shallow` and the projector
  `VPT_image_trans.conv1.{0,1,3}.*` (1x1 conv, BatchNorm2d, 1x1 conv).
Every prompt tensor must be accounted for: a missing or extra one is an error that names it.

Frozen weights: PromptSRC's GPA re-sums the whole state dict in fp16, so a teacher checkpoint's
copies of the frozen CLIP tensors (`image_encoder.*`, `text_encoder.*`, `logit_scale`) differ
from the OpenAI archive by fp16 rounding (section 1.2), and the official PromptKD teacher loads them
(`strict=False`, section 2.2): the paper's students learned from *those* weights. By default a
teacher import therefore runs on the checkpoint's tensors wherever it has them, and stores the ones
that differ from the archive in the teacher file; `frozen_weights="archive"` keeps the archive's.
The token embedding always comes from the archive, as in the official teacher (its prompt
prefix/suffix buffers are rebuilt from the archive).
"""

from __future__ import annotations

import collections
import logging
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

from promptkd.artifacts import check_finite
from promptkd.errors import PromptKDError

if TYPE_CHECKING:  # torch and the models are imported where they run (fast `--help`)
    import torch

    from promptkd.models.loading import ClipBundle

log = logging.getLogger(__name__)

FROZEN_SOURCES = ("checkpoint", "archive")

# Dassl checkpoints pickle the LR scheduler, whose state holds scheduler and optimiser *objects*.
# Those (and only those) module prefixes are replaced by inert placeholders; anything else
# (os.system, builtins.eval, ...) makes the load fail as with plain weights_only=True.
_PLACEHOLDER_MODULES = ("torch.optim.", "dassl.")
# Plain containers the pickled optimiser objects use; building them runs no foreign code.
_SAFE_CONTAINERS = [dict, collections.defaultdict]
# torch names the offending global as "GLOBAL a.b was not an allowed global" or, for blocked
# modules (os, posix, builtins.eval ...), "unsupported GLOBAL a.b whose module a is blocked".
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)")


def _placeholder(name: str) -> type:
    """A class that accepts any construction and state and runs no code of the checkpoint's."""

    def init(self, *args, **kwargs):
        pass

    def setstate(self, state):
        self.__dict__["_state"] = state

    module, _, qual = name.rpartition(".")
    # A dict subclass, so that pickled item-setting (optimiser state dicts) also lands harmlessly.
    return type(qual, (dict,), {"__init__": init, "__setstate__": setstate, "__module__": module})


def load_dassl_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a Dassl checkpoint, loaded with weights_only=True plus placeholders."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise PromptKDError(f"{path}: checkpoint not found")
    extra: list = list(_SAFE_CONTAINERS)
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(extra):
                ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as e:
            m = _UNSUPPORTED.search(str(e))
            if not m or not m.group(1).startswith(_PLACEHOLDER_MODULES):
                first = (m.group(1) if m else str(e).strip().splitlines()[0])[:200]
                raise PromptKDError(f"{path}: refusing to load: the file holds pickled objects other than tensors ({first})") from None
            extra.append((_placeholder(m.group(1)), m.group(1)))
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PromptKDError(f"{path}: not a readable checkpoint ({msg[:200]})") from None
    else:
        raise PromptKDError(f"{path}: too many unknown objects in the checkpoint")
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PromptKDError(f"{path}: expected a Dassl checkpoint with a 'state_dict' of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _deep_prompts(sd: dict[str, torch.Tensor], tower: str, source: str) -> dict[int, torch.Tensor]:
    pat = re.compile(rf"^{tower}\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
    found = {int(m.group(1)): v for k, v in sd.items() if (m := pat.match(k))}
    if found:
        expected = set(range(1, max(found) + 1))
        if 0 in found:
            raise PromptKDError(f"{source}: unexpected prompt tensor {tower}.transformer.resblocks.0.VPT_shallow "
                                "(block 0 takes the input-level prompts)")
        missing = sorted(expected - set(found))
        if missing:
            raise PromptKDError(f"{source}: missing prompt tensor {tower}.transformer.resblocks.{missing[0]}.VPT_shallow "
                                f"(deep prompts must cover blocks 1..{max(found)})")
    return found


def _check_unknown_prompts(sd: dict[str, torch.Tensor], used: set[str], source: str) -> None:
    stray = sorted(k for k in sd if k not in used and ("VPT" in k or k.endswith(".ctx")) and "ZS_image_encoder" not in k)
    if stray:
        raise PromptKDError(f"{source}: unexpected prompt tensor {stray[0]}" + (f" (+{len(stray) - 1} more)" if len(stray) > 1 else ""))


def _check_arch(sd: dict[str, torch.Tensor], clip: ClipBundle, prefix: str, source: str) -> None:
    """The checkpoint's frozen copy of the tower must have the given CLIP's shapes."""
    key = f"{prefix}.conv1.weight"
    if key in sd and tuple(sd[key].shape) != tuple(clip.model.visual.conv1.weight.shape):
        raise PromptKDError(f"{source}: checkpoint is for another architecture ({key} {tuple(sd[key].shape)}, "
                            f"{clip.name} has {tuple(clip.model.visual.conv1.weight.shape)})")


def _official_frozen_key(key: str) -> str | None:
    """Where a PromptSRC checkpoint keeps its copy of an open_clip CLIP tensor (None: nowhere)."""
    if key.startswith("visual."):
        return "image_encoder." + key.removeprefix("visual.")
    if key == "logit_scale":
        return key
    if key == "token_embedding.weight":
        return None  # the prompt learner keeps only prefix/suffix embeddings, rebuilt from the archive
    return "text_encoder." + key


def checkpoint_frozen_weights(sd: dict[str, torch.Tensor], clip: ClipBundle,
                              source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's frozen CLIP tensors that differ from `clip`'s (open_clip names, their own
    dtype), and a report: how many were compared, how many differ, the largest |difference|."""
    import torch

    own = clip.model.state_dict()
    theirs = {k: sd[o] for k in own if (o := _official_frozen_key(k)) is not None and o in sd}
    check_finite({_official_frozen_key(k): v for k, v in theirs.items()}, source)
    differ: dict[str, torch.Tensor] = {}
    worst, worst_name = 0.0, None
    for k, v in theirs.items():
        mine = own[k]
        if tuple(v.shape) != tuple(mine.shape):
            raise PromptKDError(f"{source}: frozen tensor {_official_frozen_key(k)} has shape {tuple(v.shape)}, "
                                f"{clip.name} has {tuple(mine.shape)} (a checkpoint of another architecture?)")
        v_here = v.to(mine.device, mine.dtype)
        if not torch.equal(v_here, mine):
            differ[k] = v
            dev = float((v_here - mine).abs().max())
            if dev > worst:
                worst, worst_name = dev, k
    return differ, {"compared": len(theirs), "differ": len(differ), "max_abs_deviation": worst,
                    "max_deviation_tensor": worst_name}


def _report_frozen(report: dict) -> None:
    n, d = report["compared"], report["differ"]
    worst = f"largest deviation {report['max_abs_deviation']:.2e} in {report['max_deviation_tensor']}"
    if not n:
        log.info("frozen CLIP weights: the archive's (the checkpoint holds no copies of them)")
    elif not d:
        log.info("frozen CLIP weights: the checkpoint's %d tensors equal the archive's", n)
    elif report["used"] == "checkpoint":
        log.info("frozen CLIP weights: the checkpoint's (%d of %d tensors differ from the archive and are "
                 "stored in the teacher file; %s)", d, n, worst)
    else:
        log.info("frozen CLIP weights: the archive's (the checkpoint's differ in %d of %d tensors; %s)", d, n, worst)


def import_teacher(checkpoint: str | Path, clip: ClipBundle, out: str | Path,
                   frozen_weights: str = "checkpoint") -> Path:
    """Official PromptSRC/IVLP teacher checkpoint + matching CLIP -> our teacher artifact.

    frozen_weights="checkpoint" (default): the teacher runs on the checkpoint's own copies of the
    frozen CLIP tensors, as the official PromptKD teacher does; those that differ from `clip`'s are
    written into `clip`'s model and stored in the artifact. "archive": `clip`'s weights as they are.
    The artifact's `frozen_weights` metadata reports the largest deviation either way.
    """
    from promptkd.models.wrappers import Teacher

    if frozen_weights not in FROZEN_SOURCES:
        raise PromptKDError(f"frozen_weights must be one of {', '.join(FROZEN_SOURCES)}, got {frozen_weights!r}")
    src = str(checkpoint)
    sd = load_dassl_checkpoint(checkpoint)
    _check_arch(sd, clip, "image_encoder", src)
    if "prompt_learner.ctx" not in sd:
        raise PromptKDError(f"{src}: missing prompt tensor prompt_learner.ctx (not a PromptSRC/IVLP teacher checkpoint?)")
    if sd["prompt_learner.ctx"].ndim != 2:
        raise PromptKDError(f"{src}: prompt_learner.ctx has shape {tuple(sd['prompt_learner.ctx'].shape)}; "
                            "class-specific contexts are not supported")
    vdeep = _deep_prompts(sd, "image_encoder", src)
    tdeep = _deep_prompts(sd, "text_encoder", src)
    if vdeep and "image_encoder.VPT" not in sd:
        raise PromptKDError(f"{src}: missing prompt tensor image_encoder.VPT (deep vision prompts without input prompts)")
    n_ctx_text = sd["prompt_learner.ctx"].shape[0]
    n_ctx_vision = sd["image_encoder.VPT"].shape[0] if "image_encoder.VPT" in sd else 4
    vision_depth = (1 + len(vdeep)) if "image_encoder.VPT" in sd else 0
    text_depth = 1 + len(tdeep)
    teacher = Teacher(clip, vision_depth, text_depth, n_ctx_vision, n_ctx_text, "a photo of a")
    tensors = {"text.input": sd["prompt_learner.ctx"].float(), **{f"text.deep.{i}": v.float() for i, v in tdeep.items()}}
    used = {"prompt_learner.ctx"} | {f"text_encoder.transformer.resblocks.{i}.VPT_shallow" for i in tdeep}
    if vision_depth:
        tensors["vision.input"] = sd["image_encoder.VPT"].float()
        tensors.update({f"vision.deep.{i}": v.float() for i, v in vdeep.items()})
        used |= {"image_encoder.VPT"} | {f"image_encoder.transformer.resblocks.{i}.VPT_shallow" for i in vdeep}
    _check_unknown_prompts(sd, used, src)
    teacher.load_prompt_tensors(tensors, src)
    differ, report = checkpoint_frozen_weights(sd, clip, src)
    report = {"used": frozen_weights if differ else "archive", "checkpoint": Path(checkpoint).name, **report}
    _report_frozen(report)
    if report["used"] == "checkpoint":
        teacher.use_frozen_weights(differ, src, info=report)
        return teacher.save(out, imported_from=Path(checkpoint).name)
    return teacher.save(out, imported_from=Path(checkpoint).name, frozen_weights=report)


def import_student(checkpoint: str | Path, clip: ClipBundle, out: str | Path) -> Path:
    """Official PromptKD student checkpoint + matching CLIP -> our student artifact."""
    from promptkd.models.wrappers import Student

    src = str(checkpoint)
    sd = load_dassl_checkpoint(checkpoint)
    _check_arch(sd, clip, "image_encoder", src)
    proj_keys = {
        "fc1.weight": "VPT_image_trans.conv1.0.weight", "fc1.bias": "VPT_image_trans.conv1.0.bias",
        "bn.weight": "VPT_image_trans.conv1.1.weight", "bn.bias": "VPT_image_trans.conv1.1.bias",
        "bn.running_mean": "VPT_image_trans.conv1.1.running_mean", "bn.running_var": "VPT_image_trans.conv1.1.running_var",
        "bn.num_batches_tracked": "VPT_image_trans.conv1.1.num_batches_tracked",
        "fc2.weight": "VPT_image_trans.conv1.3.weight", "fc2.bias": "VPT_image_trans.conv1.3.bias",
    }
    for theirs in proj_keys.values():
        if theirs not in sd:
            raise PromptKDError(f"{src}: missing projector tensor {theirs} (not a PromptKD student checkpoint?)")
    vdeep = _deep_prompts(sd, "image_encoder", src)
    if "image_encoder.VPT" not in sd:
        raise PromptKDError(f"{src}: missing prompt tensor image_encoder.VPT")
    used = set(proj_keys.values()) | {"image_encoder.VPT"} | {f"image_encoder.transformer.resblocks.{i}.VPT_shallow" for i in vdeep}
    stray = sorted(k for k in sd if k.startswith("VPT_image_trans.") and k not in used)
    if stray:
        raise PromptKDError(f"{src}: unexpected projector tensor {stray[0]}")
    _check_unknown_prompts(sd, used, src)
    fc1 = sd["VPT_image_trans.conv1.0.weight"]
    if fc1.ndim != 4 or fc1.shape[1] != clip.model.visual.output_dim:
        raise PromptKDError(f"{src}: projector input dim {fc1.shape[1]} does not match {clip.name}'s "
                            f"embedding dim {clip.model.visual.output_dim}")
    student = Student(clip, int(fc1.shape[0]), 1 + len(vdeep), sd["image_encoder.VPT"].shape[0])
    student.image.prompts.load_tensors(
        {"vision.input": sd["image_encoder.VPT"].float(), **{f"vision.deep.{i}": v.float() for i, v in vdeep.items()}},
        "vision", src)
    proj = {ours: sd[theirs].float() if sd[theirs].is_floating_point() else sd[theirs] for ours, theirs in proj_keys.items()}
    proj["fc1.weight"] = proj["fc1.weight"].flatten(1)
    proj["fc2.weight"] = proj["fc2.weight"].flatten(1)
    own = student.projector.state_dict()
    for k, v in proj.items():
        if v.shape != own[k].shape:
            raise PromptKDError(f"{src}: projector tensor {proj_keys[k]} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    student.projector.load_state_dict(proj)
    return student.save(out, imported_from=Path(checkpoint).name)


def register(sub) -> None:
    from promptkd.options import add_model_options, add_old_spellings, add_output_options

    p = sub.add_parser("import-official", help="convert an official PromptSRC/PromptKD checkpoint into our artifact",
                       description="Convert an official Dassl checkpoint (model-best.pth.tar / model.pth.tar-20) "
                                   "of a PromptSRC/IVLP teacher or a PromptKD student into a promptkd artifact. "
                                   "Name its CLIP with --teacher-model/--teacher-weights (a teacher) or "
                                   "--student-model/--student-weights (a student).")
    p.add_argument("kind", choices=["teacher", "student"])
    p.add_argument("checkpoint", help="the official checkpoint file")
    add_model_options(p, "teacher", default_note="required for a teacher")
    add_model_options(p, "student", default_note="required for a student")
    add_output_options(p, "path", what="imported artifact",
                       help="a run folder (gets KIND.safetensors and run.json) or a .safetensors file")
    add_old_spellings(p, "import-official")
    p.add_argument("--frozen-weights", choices=FROZEN_SOURCES, default="checkpoint",
                   help="teacher only: run on the checkpoint's own frozen CLIP tensors where it has them, as the "
                        "official PromptKD teacher does (default; those differing from the archive are stored in "
                        "the teacher file), or on the archive's")
    p.set_defaults(func=_run)


def _run(args) -> None:
    from promptkd.inputs import ARTIFACT_FILES, check_clip_files, clip_inputs
    from promptkd.models.loading import load_clip
    from promptkd.runs import (
        check_apart,
        claim_file,
        claim_folder,
        file_record,
        finish_run_record,
        write_run_record,
    )

    role, other = args.kind, "student" if args.kind == "teacher" else "teacher"
    if getattr(args, f"{other}_model") or getattr(args, f"{other}_weights"):
        raise PromptKDError(f"a {role} checkpoint's CLIP is given with --{role}-model / --{role}-weights, "
                            f"not --{other}-*")
    model = getattr(args, f"{role}_model") or getattr(args, "old_model", None)
    weights = getattr(args, f"{role}_weights") or getattr(args, "old_weights", None)
    if not model or not weights:
        raise PromptKDError(f"name the checkpoint's CLIP: --{role}-model MODEL and --{role}-weights TAG|PATH "
                            "(the official code reads clip/ViT-L-14.pt for a teacher, clip/ViT-B-16.pt for a student)")
    if not Path(args.checkpoint).is_file():
        raise PromptKDError(f"{args.checkpoint}: checkpoint not found")
    check_clip_files(model, weights, role)
    check_apart(args.out, {"checkpoint": args.checkpoint, **clip_inputs(model, weights, role)})
    folder = Path(args.out).suffix != ".safetensors"
    if folder:
        claim = claim_folder(args.out, (ARTIFACT_FILES[role], "run.json"), overwrite=args.overwrite,
                             what=f"imported {role}", finished=ARTIFACT_FILES[role], command="import-official")
        out = claim.path / ARTIFACT_FILES[role]
    else:
        out = claim_file(args.out, overwrite=args.overwrite, what=f"{role} artifact")
    clip = load_clip(model, weights)
    if folder:
        claim.prepare()
        write_run_record(claim.path, "import-official", {"checkpoint": file_record(args.checkpoint),
                                                          f"{role}_clip": clip.source})
    if role == "teacher":
        path = import_teacher(args.checkpoint, clip, out, frozen_weights=args.frozen_weights)
    else:
        path = import_student(args.checkpoint, clip, out)
    if folder:
        finish_run_record(claim.path, [ARTIFACT_FILES[role], "run.json"])
    print(f"wrote {path}")
