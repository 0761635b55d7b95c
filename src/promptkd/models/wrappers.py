"""Teacher and student models, their artifacts, and the class-vector file.

Artifact kinds (safetensors + JSON metadata, see promptkd.artifacts):
- "teacher": the teacher's prompt tensors (`vision.*`, `text.*`) plus which CLIP they belong to
  (`clip`: its identity; `clip_source`: the files it was built from, by absolute path and sha256,
  or the seed of random weights) and the prompt shapes. The CLIP weights themselves are not copied,
  except frozen tensors that differ from that CLIP's (`frozen.<open_clip name>`, e.g. the
  fp16-resummed weights of an official PromptSRC checkpoint): they replace the CLIP's on load, after
  a hash check that the CLIP is the one they were taken against (`frozen_weights.base_hash`).
- "student": the student's vision prompts (`vision.*`) and projector (`projector.*`).
- "class_vectors": `vectors` (n_classes x teacher dim, L2-normalised) plus the class names, the
  teacher identity and a hash of its prompts, so a file from another teacher is refused.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from promptkd.artifacts import load_artifact, save_artifact, tensor_digest
from promptkd.errors import PromptKDError
from promptkd.models.encoders import PromptedImageEncoder, PromptedTextEncoder
from promptkd.models.loading import ClipBundle, clip_from_source, freeze, load_clip, same_clip
from promptkd.models.projector import Projector


def _describe(ident: dict) -> str:
    extra = (f", sha256 {ident['sha256'][:16]}..." if ident.get("sha256") else
             f", random seed {ident['init_seed']}" if ident.get("init_seed") is not None else "")
    return f"{ident.get('model')} / {ident.get('pretrained')}{extra}"


def _check_identity(expected: dict, bundle: ClipBundle, source: str) -> None:
    got = bundle.identity()
    if not same_clip(expected, got):
        raise PromptKDError(f"{source}: made for CLIP {_describe(expected)}, but the given CLIP is {_describe(got)}")


def _meta_dict(meta: dict, key: str, source: str) -> dict:
    """meta[key] as a dict of JSON scalars; anything else is a PromptKDError naming the file."""
    value = meta.get(key) or {}
    if not isinstance(value, dict):
        raise PromptKDError(f"{source}: metadata '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _meta_int(d: dict, key: str, source: str, default: int | None = None) -> int:
    value = d.get(key)
    if value is None:
        value = default
    if type(value) is not int or value < 0:
        raise PromptKDError(f"{source}: metadata '{key}' must be a non-negative integer, got {value!r}")
    return value


FROZEN_PREFIX = "frozen."
_FROZEN_MARK = "_promptkd_frozen_hash"  # set on a CLIP model whose frozen tensors a teacher replaced


def _bundle_for(meta: dict, clip: ClipBundle | None, device, source: str, frozen_hash: str | None = None) -> ClipBundle:
    """The artifact's CLIP: `clip` when given, else rebuilt from what the artifact recorded."""
    ident = _meta_dict(meta, "clip", source)
    role = meta.get("kind") if meta.get("kind") in ("teacher", "student") else "teacher"
    for key in ("model", "pretrained"):
        if ident.get(key) is not None and not isinstance(ident[key], str):
            raise PromptKDError(f"{source}: metadata clip.{key} must be a string, got {ident[key]!r}")
    if clip is None and meta.get("clip_source"):
        clip = clip_from_source(_meta_dict(meta, "clip_source", source), where=source, role=role, device=device)
    elif clip is None:  # written before artifacts recorded their CLIP's files
        pre = ident.get("pretrained")
        if pre and pre.endswith((".pt", ".pth", ".bin", ".safetensors", ".tar")):
            raise PromptKDError(
                f"{source}: its CLIP weights were a local file ({pre}); pass that file with --{role}-weights PATH"
            )
        clip = load_clip(ident.get("model", "?"), pre, device=device)
    _check_identity(ident, clip, source)
    carried = getattr(clip.model, _FROZEN_MARK, None)
    if carried is not None and carried != frozen_hash:
        raise PromptKDError(f"{source}: the given CLIP already carries the frozen weights of an imported teacher "
                            f"(hash {carried}); load the CLIP afresh for this file")
    return clip


class Teacher(nn.Module):
    """A frozen CLIP with IVLP deep prompts on both towers (PromptSRC's architecture)."""

    def __init__(self, clip: ClipBundle, vision_depth: int = 9, text_depth: int = 9, n_ctx_vision: int = 4,
                 n_ctx_text: int = 4, ctx_init: str | None = "a photo of a", grad_checkpointing: bool = False):
        super().__init__()
        freeze(clip.model)
        self.clip = clip
        self.image = PromptedImageEncoder(clip.model.visual, vision_depth, n_ctx_vision, grad_checkpointing)
        self.text = PromptedTextEncoder(clip.model, clip.tokenizer, text_depth, n_ctx_text, ctx_init, grad_checkpointing)
        self.register_buffer("logit_scale", clip.model.logit_scale.detach().exp().clone(), persistent=False)
        self.prompt_config = {
            "vision_depth": vision_depth, "text_depth": text_depth,
            "n_ctx_vision": n_ctx_vision if vision_depth else 0, "n_ctx_text": n_ctx_text if text_depth else 0,
            "ctx_init": ctx_init,
        }
        self.frozen: dict | None = None  # frozen CLIP tensors replaced from the CLIP's (use_frozen_weights)
        self._frozen_dtypes: dict[str, torch.dtype] = {}

    @property
    def dim(self) -> int:
        return int(self.clip.model.visual.output_dim)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_classnames(self, classnames: list[str], chunk_size: int | None = None) -> torch.Tensor:
        tokens = self.text.tokenize_classnames(classnames)
        return F.normalize(self.text.encode(tokens, chunk_size), dim=-1)

    def prompt_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.image.prompts.tensors("vision"), **self.text.prompts.tensors("text")}

    def load_prompt_tensors(self, tensors: dict[str, torch.Tensor], source: str = "teacher") -> None:
        self.image.prompts.load_tensors(tensors, "vision", source)
        self.text.prompts.load_tensors(tensors, "text", source)

    def identity(self) -> dict:
        """Which teacher this is: the CLIP, the prompt shapes and a hash of the prompt values (and of
        its own frozen weights, when it has some)."""
        ident = {"clip": self.clip.identity(), "prompts": self.prompt_config,
                 "prompts_hash": tensor_digest(self.prompt_tensors())}
        if self.frozen:
            ident["frozen_hash"] = self.frozen["hash"]
        return ident

    @torch.no_grad()
    def use_frozen_weights(self, tensors: dict[str, torch.Tensor], source: str, base_hash: str | None = None,
                           info: dict | None = None, expected_hash: str | None = None) -> None:
        """Run on these values of some frozen CLIP tensors (open_clip names) instead of the CLIP's.

        They are written into the CLIP model (so the given ClipBundle changes, and is marked: another
        teacher refuses it) and saved with the teacher in their own dtype. `base_hash`, when given,
        must be the hash of the CLIP's tensors they replace: a delta only applies to the weights it
        was taken against. `expected_hash` (a file's record of the tensors' own hash) catches an
        altered file before anything is written into the CLIP. `info` is kept in the metadata.
        """
        model = self.clip.model
        own = model.state_dict()
        for k, v in tensors.items():
            if k not in own:
                raise PromptKDError(f"{source}: frozen tensor {k} is not a tensor of CLIP {self.clip.name}")
            if tuple(v.shape) != tuple(own[k].shape):
                raise PromptKDError(f"{source}: frozen tensor {k} has shape {tuple(v.shape)}, {self.clip.name} "
                                    f"has {tuple(own[k].shape)}")
        digest = tensor_digest(tensors)
        if expected_hash is not None and digest != expected_hash:
            raise PromptKDError(f"{source}: its frozen tensors do not match the recorded frozen_hash (the file was altered)")
        carried = getattr(model, _FROZEN_MARK, None)
        if carried is None:
            base = tensor_digest({k: own[k] for k in tensors})
            if base_hash is not None and base != base_hash:
                raise PromptKDError(f"{source}: its frozen weights replace tensors of other CLIP weights than the "
                                    f"given {self.clip.name} / {self.clip.pretrained} (hash {base}, the file "
                                    f"expects {base_hash})")
            for k, v in tensors.items():
                own[k].copy_(v.to(own[k].dtype))
            setattr(model, _FROZEN_MARK, digest)
        elif carried != digest:
            raise PromptKDError(f"{source}: the given CLIP already carries other frozen weights (hash {carried}); "
                                "load the CLIP afresh")
        else:
            base = base_hash  # already applied to this very model (the same file loaded twice)
        self.logit_scale.copy_(model.logit_scale.detach().exp())
        self.frozen = {**(info or {}), "tensors": len(tensors), "hash": digest, "base_hash": base}
        self._frozen_dtypes = {k: v.dtype for k, v in tensors.items()}

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        """The replaced frozen tensors, in the dtype they came in (exact: they were upcast from it)."""
        own = self.clip.model.state_dict()
        return {k: own[k].to(dtype) for k, dtype in self._frozen_dtypes.items()}

    def save(self, path: str | Path, **meta) -> Path:
        tensors = self.prompt_tensors()
        if self.frozen:
            tensors.update({FROZEN_PREFIX + k: v for k, v in self.frozen_tensors().items()})
            meta = {"frozen_weights": self.frozen, **meta}
        return save_artifact(path, tensors, {"kind": "teacher", **self.identity(), "clip_source": self.clip.source,
                                             **meta})

    @classmethod
    def load(cls, path: str | Path, clip: ClipBundle | None = None, device="cpu") -> Teacher:
        tensors, meta = load_artifact(path, kind="teacher")
        frozen = {k.removeprefix(FROZEN_PREFIX): v for k, v in tensors.items() if k.startswith(FROZEN_PREFIX)}
        frozen_meta = _meta_dict(meta, "frozen_weights", str(path))
        want_hash = meta.get("frozen_hash")
        if frozen and (not isinstance(want_hash, str) or not isinstance(frozen_meta.get("base_hash"), str)):
            raise PromptKDError(f"{path}: frozen tensors without a recorded frozen_hash and base_hash (the file "
                                "was altered)")
        if want_hash is not None and not frozen:
            raise PromptKDError(f"{path}: metadata records frozen weights (frozen_hash) but the file holds none")
        bundle = _bundle_for(meta, clip, device, str(path), want_hash if frozen else None)
        pc = _meta_dict(meta, "prompts", str(path))
        depths = [_meta_int(pc, k, str(path)) for k in ("vision_depth", "text_depth")]
        n_ctx = [_meta_int(pc, k, str(path), default=4) or 4 for k in ("n_ctx_vision", "n_ctx_text")]
        if pc.get("ctx_init") is not None and not isinstance(pc["ctx_init"], str):
            raise PromptKDError(f"{path}: metadata prompts.ctx_init must be a string or null, got {pc['ctx_init']!r}")
        try:
            teacher = cls(bundle, depths[0], depths[1], n_ctx[0], n_ctx[1], pc.get("ctx_init"))
        except (KeyError, TypeError, ValueError) as e:
            raise PromptKDError(f"{path}: teacher metadata has a missing or malformed prompt config ({e})") from None
        teacher.load_prompt_tensors(tensors, str(path))
        if frozen:
            info = {k: v for k, v in frozen_meta.items() if k not in ("tensors", "hash", "base_hash")}
            teacher.use_frozen_weights(frozen, str(path), frozen_meta["base_hash"], info, expected_hash=want_hash)
        teacher.meta = meta
        return teacher.to(device).eval()


def check_same_teacher(made_by: dict, teacher: dict, refusal: str, holder: str) -> None:
    """Refuse outputs of another teacher (another CLIP or other prompts): `refusal (key: holder has
    X, this teacher has Y)`. Shared by class vectors, their append, distillation and the cache."""
    if not same_clip(made_by.get("clip"), teacher.get("clip")):
        raise PromptKDError(f"{refusal} (clip: {holder} has {made_by.get('clip')}, this teacher has {teacher.get('clip')})")
    for key in ("prompts_hash", "frozen_hash"):
        if made_by.get(key) != teacher.get(key):
            raise PromptKDError(f"{refusal} ({key}: {holder} has {made_by.get(key)}, this teacher has {teacher.get(key)})")
    if "templates" in made_by and "templates" in teacher and made_by["templates"] != teacher["templates"]:
        # a plain CLIP teacher: its class vectors depend on its templates (a cache's features do not)
        raise PromptKDError(f"{refusal} (templates: {holder} has {_few(made_by['templates'])}, this teacher has "
                            f"{_few(teacher['templates'])})")


def _few(templates) -> str:
    templates = list(templates) if isinstance(templates, list) else [templates]
    return f"{len(templates)} template(s) {templates[:2]}"


class Student(nn.Module):
    """A frozen small CLIP image tower with deep vision prompts and a projector to the teacher's dim.

    Its output is L2-normalised and lives in the teacher's embedding space, so logits are
    `logit_scale * features @ class_vectors.T`.
    """

    def __init__(self, clip: ClipBundle, teacher_dim: int, vision_depth: int = 9, n_ctx_vision: int = 4):
        super().__init__()
        freeze(clip.model)
        self.clip = clip
        self.image = PromptedImageEncoder(clip.model.visual, vision_depth, n_ctx_vision)
        self.projector = Projector(int(clip.model.visual.output_dim), int(teacher_dim))
        self.register_buffer("logit_scale", clip.model.logit_scale.detach().exp().clone(), persistent=False)
        self.prompt_config = {"vision_depth": vision_depth, "n_ctx_vision": n_ctx_vision if vision_depth else 0}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.image(images)), dim=-1)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.image.prompts.tensors("vision"))
        out.update({f"projector.{k}": v for k, v in self.projector.state_dict().items()})
        return out

    def save(self, path: str | Path, **meta) -> Path:
        return save_artifact(path, self.trainable_tensors(), {
            "kind": "student", "clip": self.clip.identity(), "clip_source": self.clip.source,
            "prompts": self.prompt_config, "teacher_dim": self.projector.out_dim, **meta})

    @classmethod
    def load(cls, path: str | Path, clip: ClipBundle | None = None, device="cpu") -> Student:
        tensors, meta = load_artifact(path, kind="student")
        bundle = _bundle_for(meta, clip, device, str(path))
        return cls.from_tensors(bundle, tensors, meta, str(path)).to(device).eval()

    @classmethod
    def from_tensors(cls, bundle: ClipBundle, tensors: dict[str, torch.Tensor], meta: dict, source: str) -> Student:
        """A student on `bundle` from its prompt and projector tensors and its metadata (prompts,
        teacher_dim), each checked: shared by the student file and the one-file deployable student."""
        pc = _meta_dict(meta, "prompts", source)
        teacher_dim = _meta_int(meta, "teacher_dim", source)
        depth, n_ctx = _meta_int(pc, "vision_depth", source), _meta_int(pc, "n_ctx_vision", source, default=4) or 4
        try:
            student = cls(bundle, teacher_dim, depth, n_ctx)
        except (KeyError, TypeError, ValueError) as e:
            raise PromptKDError(f"{source}: student metadata is missing or malformed ({e})") from None
        student.image.prompts.load_tensors(tensors, "vision", source)
        proj = {k.removeprefix("projector."): v for k, v in tensors.items() if k.startswith("projector.")}
        own = student.projector.state_dict()
        if set(proj) != set(own) or any(proj[k].shape != own[k].shape for k in own):
            raise PromptKDError(f"{source}: projector tensors do not match a {student.projector.in_dim}->"
                                f"{student.projector.out_dim} projector")
        student.projector.load_state_dict(proj)
        student.meta = meta
        return student.eval()


class ClassVectors:
    """Normalised teacher text features for a list of class names: the shared classifier."""

    def __init__(self, vectors: torch.Tensor, classnames: list[str], teacher: dict):
        if vectors.ndim != 2 or vectors.shape[0] != len(classnames):
            raise PromptKDError(f"class vectors: {tuple(vectors.shape)} vectors for {len(classnames)} class names")
        self.vectors, self.classnames, self.teacher = vectors.float(), list(classnames), teacher

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def save(self, path: str | Path) -> Path:
        return save_artifact(path, {"vectors": self.vectors}, {
            "kind": "class_vectors", "classnames": self.classnames, "teacher": self.teacher, "dim": self.dim})

    @classmethod
    def load(cls, path: str | Path, teacher: Teacher | dict | None = None, dim: int | None = None) -> ClassVectors:
        """Load, and refuse a file made by another teacher or of another dimension."""
        tensors, meta = load_artifact(path, kind="class_vectors")
        names = meta.get("classnames")
        if "vectors" not in tensors or not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise PromptKDError(f"{path}: class-vector file needs a 'vectors' tensor and a 'classnames' list of strings")
        dupes = sorted(c for c, k in Counter(names).items() if k > 1)
        if dupes:
            raise PromptKDError(f"{path}: duplicate class names {dupes[:5]}")
        vectors = tensors["vectors"]
        if not vectors.is_floating_point() or not torch.isfinite(vectors).all():
            raise PromptKDError(f"{path}: class vectors must be finite floating-point numbers")
        made_by = _meta_dict(meta, "teacher", str(path))
        try:
            cv = cls(vectors, names, made_by)
        except PromptKDError as e:
            raise PromptKDError(f"{path}: {e}") from None
        if meta.get("dim") is not None and _meta_int(meta, "dim", str(path)) != cv.dim:
            raise PromptKDError(f"{path}: metadata says dim {meta.get('dim')}, vectors have dim {cv.dim}")
        if teacher is not None:
            want = teacher.identity() if isinstance(teacher, Teacher) else teacher
            check_same_teacher(cv.teacher, want, f"{path}: class vectors come from another teacher", "file")
        if dim is not None and cv.dim != dim:
            raise PromptKDError(f"{path}: class vectors have dim {cv.dim}, but the model needs {dim}")
        return cv

    def check_classnames(self, classnames: list[str], source: str) -> None:
        """The dataset's classes must be exactly these, in this order."""
        if list(classnames) == self.classnames:
            return
        missing = [c for c in classnames if c not in self.classnames]
        extra = [c for c in self.classnames if c not in classnames]
        if missing or extra:
            raise PromptKDError(
                f"{source}: class vectors do not match the dataset's classes: "
                f"{len(missing)} missing (first: {missing[:3]}), {len(extra)} not in the dataset (first: {extra[:3]})"
            )
        raise PromptKDError(f"{source}: class vectors list the dataset's classes in a different order")
