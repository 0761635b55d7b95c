"""Deployable classifiers: the distilled student plus class vectors, usable in three lines.

    from promptkd.deploy import StudentClassifier
    clf = StudentClassifier.load("student.safetensors", "classes.safetensors")
    clf.predict([img1, img2], topk=5)   # [[(classname, prob), ...], ...]

The student's test transform, feature normalisation and logit scale are part of the object, so a
caller cannot get them wrong. `StudentClassifier.load("model.safetensors")` reads the one-file
student of `promptkd export --format safetensors` (image tower, prompts, projector, class vectors,
class names, preprocessing; no CLIP file needed). `OnnxClassifier` offers the same `predict` over an
exported ONNX file (see `promptkd.stages.export`), reading everything it needs from the file's
metadata; `load_model` opens either kind of file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from promptkd.data.dataset import load_rgb, to_rgb
from promptkd.data.transforms import TestTransform, transforms_for
from promptkd.errors import PromptKDError
from promptkd.models.wrappers import ClassVectors, Student, Teacher

log = logging.getLogger(__name__)

ONNX_FORMAT = "promptkd-onnx/1"
FEATURES_FORMAT = "promptkd-onnx-features/1"  # image -> normalised feature; class vectors in a file beside it
FEATURES_OUTPUT = "features"
STANDALONE_KIND, STANDALONE_FORMAT = "student_classifier", "promptkd-student/1"
# The tensors of a one-file student (each other name is refused).
_STANDALONE_PREFIXES = ("visual.", "vision.", "projector.")
_STANDALONE_NAMES = ("class_vectors", "logit_scale")
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"

ImageLike = Image.Image | torch.Tensor | str | os.PathLike
Prediction = list[tuple[str, float]]


class _Predictor:
    """`predict` shared by the PyTorch and ONNX classifiers: they only differ in `logits`."""

    classnames: list[str]
    transform: TestTransform
    source: str = "model"  # how error messages name it (its file, when loaded from one)

    @property
    def image_size(self) -> int:
        return self.transform.size

    @property
    def classes(self) -> list[str]:
        """The class names, in logit order."""
        return list(self.classnames)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_features(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """(B, D) L2-normalised image features in the teacher's class-vector space."""
        raise PromptKDError(f"{self.source}: an ONNX logits graph gives no image features; use the one-file student "
                            "or model folder, or `promptkd export --format image-features`")

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """A normalised (B, 3, S, S) batch: PIL images and paths get the test transform, tensors are
        taken as already normalised."""
        if isinstance(images, torch.Tensor):
            batch = images if images.ndim == 4 else images.unsqueeze(0)
        else:
            if isinstance(images, (Image.Image, str, os.PathLike)):
                images = [images]
            batch = torch.stack([self._one(x) for x in images]) if len(images) else torch.empty(0, 3, 0, 0)
        s = self.image_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, s, s):
            raise PromptKDError(f"images must be normalised 3x{s}x{s} tensors (or PIL images / paths); "
                                f"got shape {tuple(batch.shape)}")
        return batch.float()

    def _one(self, x: ImageLike) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, Image.Image):
            return self.transform(to_rgb(x))
        return self.transform(load_rgb(os.fspath(x)))

    @torch.no_grad()
    def predict(self, images: ImageLike | Sequence[ImageLike], topk: int = 5,
                batch_size: int = 32) -> list[Prediction]:
        """Top-k (classname, probability) per image, most probable first."""
        single = isinstance(images, (Image.Image, str, os.PathLike)) or (
            isinstance(images, torch.Tensor) and images.ndim == 3)
        items = [images] if single else images
        k = max(1, min(int(topk), len(self.classnames)))
        out: list[Prediction] = []
        for i in range(0, len(items), batch_size):
            logits = self.logits(self.preprocess(items[i : i + batch_size])).float()
            check_scores(logits, self.source)
            probs = logits.softmax(dim=-1)
            p, idx = probs.topk(k, dim=-1)
            out += [[(self.classnames[j], float(v)) for v, j in zip(pr.tolist(), ix.tolist())]
                    for pr, ix in zip(p, idx)]
        return out


def check_scores(logits: torch.Tensor, source: str) -> None:
    """Refuse NaN/inf logits: a probability printed as `nan` (or an argmax over NaN) is never an answer."""
    bad = (~torch.isfinite(logits)).any(dim=-1)
    if bad.any():
        raise PromptKDError(f"{source}: non-finite scores (NaN or inf) for {int(bad.sum())} of {len(logits)} "
                            "image(s); the model's weights are damaged or overflow at this precision")


OTHER_TEACHER_HINT = "pass --allow-other-teacher (Python: allow_other_teacher=True) to use them anyway"


def other_teacher(student: Student | dict, made_by: dict) -> str:
    """How the teacher that made some class vectors (`made_by`) differs from the one `student` (a
    Student, or the `teacher` identity it recorded) was distilled from; '' when it is the same or
    either side does not say."""
    from promptkd.models.loading import same_clip

    made_for = student if isinstance(student, dict) else (getattr(student, "meta", None) or {}).get("teacher") or {}
    if not isinstance(made_for, dict) or not isinstance(made_by, dict):
        return ""
    if made_for.get("clip") and made_by.get("clip") and not same_clip(made_for["clip"], made_by["clip"]):
        return f"teacher CLIP {made_by['clip']} vs {made_for['clip']}"
    if made_for.get("prompts_hash") and made_by.get("prompts_hash") != made_for["prompts_hash"]:
        return f"prompts hash {made_by.get('prompts_hash')} vs {made_for['prompts_hash']}"
    if "templates" in made_for and "templates" in made_by and made_by["templates"] != made_for["templates"]:
        # a plain CLIP teacher's classifier is its class names in its templates (distill refuses these too)
        return f"templates ({len(made_by['templates'])} vs {len(made_for['templates'])}: " \
               f"{made_by['templates'][:1]} vs {made_for['templates'][:1]})"
    return ""


class StudentClassifier(nn.Module, _Predictor):
    """Student image tower + deep prompts + projector + class vectors -> logits.

    `forward(images)` takes normalised (B, 3, S, S) images and returns
    `logit_scale * normalise(student(images)) @ class_vectors.T`, exactly what training and
    evaluation compute, so it is also the module exported to ONNX. The student is put in eval mode
    (its projector has BatchNorm).
    """

    def __init__(self, student: Student, class_vectors: ClassVectors, *, allow_other_teacher: bool = False):
        super().__init__()
        want = student.projector.out_dim
        if class_vectors.dim != want:
            raise PromptKDError(f"class vectors have dim {class_vectors.dim}, but the student projects to "
                                f"dim {want} (they come from a different teacher than the student's)")
        other = other_teacher(student, class_vectors.teacher)
        if other and not allow_other_teacher:
            raise PromptKDError(f"class vectors come from another teacher than the one the student was distilled "
                                f"from ({other}); {OTHER_TEACHER_HINT}")
        if other:
            log.warning("class vectors come from another teacher than the student's (%s); used as asked "
                        "(--allow-other-teacher): accuracy may differ", other)
        self.other_teacher = other  # recorded in exported files, which then load without the option
        self.student = student.eval()
        device = student.logit_scale.device
        self.register_buffer("class_vectors", class_vectors.vectors.to(device), persistent=False)
        self.classnames = list(class_vectors.classnames)
        self.teacher_identity = dict(class_vectors.teacher)
        self.transform = transforms_for(student.clip.preprocess_cfg)[1]

    @classmethod
    def load(cls, student: str | Path, class_vectors: str | Path | None = None, *,
             device: str | torch.device = "cpu", clip=None, allow_other_teacher: bool = False) -> StudentClassifier:
        """From a one-file student (`promptkd export --format safetensors`) alone, or from a student
        file (or its run folder) and a class-vector file (default: those beside it in a run folder);
        `clip` overrides the student's CLIP (local weights). `promptkd.load` takes every kind."""
        if Path(student).is_dir():  # a run folder, as every command takes it
            from promptkd.artifacts import artifact_path, student_class_vectors

            student = artifact_path(student, "student", "student")
            class_vectors = student_class_vectors(student, class_vectors)
        if class_vectors is None:
            return _load_standalone(Path(student), device)
        s = Student.load(student, clip=clip, device=device)
        cv = ClassVectors.load(class_vectors)
        try:
            clf = cls(s, cv, allow_other_teacher=allow_other_teacher)
        except PromptKDError as e:  # say which files do not belong together
            raise PromptKDError(f"{class_vectors} vs {student}: {e}") from None
        clf.source = str(student)
        return clf

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.student.logit_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.student(images)  # already L2-normalised, in the teacher's space
        return self.logit_scale.to(features.dtype) * features @ self.class_vectors.to(features.dtype).T

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images.to(self.class_vectors.device))

    @torch.no_grad()
    def with_classes(self, classnames: Sequence[str], teacher: Teacher, *,
                     allow_other_teacher: bool = False) -> StudentClassifier:
        """A classifier for other classes: their vectors from the teacher's text tower (shares the student)."""
        from promptkd.models.classnames import class_vectors_of

        return StudentClassifier(self.student, class_vectors_of(teacher, list(classnames)),
                                 allow_other_teacher=allow_other_teacher)

    def with_class_vectors(self, class_vectors: ClassVectors | str | Path, *,
                           allow_other_teacher: bool = False) -> StudentClassifier:
        """A classifier for the classes of a class-vector file made elsewhere (`promptkd class-vectors`
        with the student's teacher): open vocabulary without re-exporting. Shares the student."""
        cv = class_vectors if isinstance(class_vectors, ClassVectors) else ClassVectors.load(class_vectors)
        clf = StudentClassifier(self.student, cv, allow_other_teacher=allow_other_teacher)
        clf.source = self.source
        return clf

    @torch.no_grad()
    def image_features(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """(B, D) L2-normalised image features in the teacher's class-vector space: logits are
        `logit_scale * features @ class_vectors.T` for any class vectors of the student's teacher."""
        return self.student(self.preprocess(images).to(self.class_vectors.device)).float()

    def metadata(self) -> dict:
        """What a deployed file must say about this classifier (stored in ONNX metadata_props)."""
        from promptkd import __version__

        t = self.transform
        meta = {"format": ONNX_FORMAT, "promptkd_version": __version__, "classnames": self.classnames,
                "student": {"clip": self.student.clip.identity(), "prompts": self.student.prompt_config,
                            "teacher_dim": self.student.projector.out_dim},
                "teacher": (getattr(self.student, "meta", None) or {}).get("teacher"),
                "class_vectors_teacher": self.teacher_identity, "image_size": t.size, "mean": t.mean,
                "std": t.std, "interpolation": t.interpolation.value, "resize_mode": t.resize_mode,
                "logit_scale": float(self.logit_scale)}
        if self.other_teacher:  # exported with --allow-other-teacher: the file says so, and loads as made
            meta["class_vectors_other_teacher"] = self.other_teacher
        return meta

    def standalone_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the classifier runs on: the student CLIP's image tower (`visual.*`; not its
        text tower), prompts (`vision.*`), projector, class vectors and the CLIP's logit scale."""
        from promptkd.models.loading import freeze

        s = self.student
        out = {f"visual.{k}": v for k, v in freeze(s.clip.model.visual).state_dict().items()}
        out.update({k: v.detach() for k, v in s.trainable_tensors().items()})
        out["class_vectors"] = self.class_vectors
        out["logit_scale"] = s.clip.model.logit_scale.detach()
        return out

    def standalone_metadata(self, precision: str = "fp32") -> dict:
        """metadata() plus how to rebuild the image tower: the one-file student's JSON."""
        from promptkd.models.loading import vision_tower_config

        meta = {**self.metadata(), "kind": STANDALONE_KIND, "format": STANDALONE_FORMAT, "precision": precision}
        meta["student"] = {**meta["student"], "tower": vision_tower_config(self.student.clip)}
        return meta


def onnx_metadata_props(meta: dict) -> dict[str, str]:
    """Flat string key/values for ONNX `metadata_props` (one `promptkd.*` key per field)."""
    return {f"promptkd.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def parse_onnx_metadata(props: dict[str, str], source: str) -> dict:
    if props.get("promptkd.format") not in (ONNX_FORMAT, FEATURES_FORMAT):
        raise PromptKDError(f"{source}: ONNX file without promptkd metadata (export it with `promptkd export`)")
    meta = {}
    for key, raw in props.items():
        if key.startswith("promptkd."):
            try:
                meta[key.removeprefix("promptkd.")] = json.loads(raw)
            except json.JSONDecodeError:
                meta[key.removeprefix("promptkd.")] = raw
    return check_runtime_metadata(meta, source, "promptkd ONNX metadata")


def check_runtime_metadata(meta: dict, source: str, what: str) -> dict:
    """The fields a runtime reads from a deployed file (class names, input size and normalisation),
    each type-checked, so a hand-edited or crafted file says which field is wrong."""
    missing = [k for k in ("classnames", "image_size", "mean", "std") if k not in meta]
    if missing:
        raise PromptKDError(f"{source}: {what} lacks {missing}")

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    checks = {  # a hand-edited or crafted file says which field is wrong
        "classnames": lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v),
        "image_size": lambda v: type(v) is int and v > 0,
        "mean": lambda v: isinstance(v, list) and len(v) == 3 and all(number(x) for x in v),
        "std": lambda v: isinstance(v, list) and len(v) == 3 and all(number(x) and x > 0 for x in v),
        "interpolation": lambda v: isinstance(v, str),
        "resize_mode": lambda v: isinstance(v, str),
    }
    for key, ok in checks.items():
        if key in meta and not ok(meta[key]):
            raise PromptKDError(f"{source}: {what} '{key}' is malformed ({str(meta[key])[:80]!r})")
    return meta


def _load_standalone(path: Path, device) -> StudentClassifier:
    """The one-file student: every tensor and field checked (kind, format, names, shapes, finiteness)."""
    from promptkd.artifacts import load_artifact, read_artifact_meta
    from promptkd.models.loading import ClipBundle, ImageTowerCLIP, build_vision_tower

    source = str(path)
    kind = read_artifact_meta(path).get("kind")
    if kind == "student":
        raise PromptKDError(f"{source}: a student file holds only prompts and projector; give its class vectors "
                            "too, or make one file with `promptkd export --format safetensors`")
    tensors, meta = load_artifact(path, kind=STANDALONE_KIND)  # refuses NaN/inf, naming the tensor
    if meta.get("format") != STANDALONE_FORMAT:
        raise PromptKDError(f"{source}: unknown one-file student format {meta.get('format')!r} "
                            f"(this promptkd reads {STANDALONE_FORMAT})")
    check_runtime_metadata(meta, source, "one-file student metadata")
    stray = [k for k in tensors if not k.startswith(_STANDALONE_PREFIXES) and k not in _STANDALONE_NAMES]
    if stray or any(k not in tensors for k in _STANDALONE_NAMES):
        raise PromptKDError(f"{source}: one-file student tensors: "
                            + (f"unexpected {stray[:3]}" if stray else f"missing {[k for k in _STANDALONE_NAMES if k not in tensors]}"))
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}  # --fp16 files run in fp32
    student_meta = meta.get("student")
    if not isinstance(student_meta, dict) or not isinstance(student_meta.get("clip"), dict):
        raise PromptKDError(f"{source}: one-file student metadata 'student' must be a JSON object with 'clip'")
    if tensors["logit_scale"].ndim != 0:
        raise PromptKDError(f"{source}: logit_scale must be a scalar, got shape {tuple(tensors['logit_scale'].shape)}")
    visual = build_vision_tower(student_meta.get("tower"), {k.removeprefix("visual."): v for k, v in tensors.items()
                                                            if k.startswith("visual.")}, source)
    ident = student_meta["clip"]
    t = meta
    preprocess = {"size": t["image_size"], "mean": t["mean"], "std": t["std"],
                  "interpolation": t.get("interpolation", "bicubic"), "resize_mode": t.get("resize_mode", "shortest")}
    bundle = ClipBundle(ImageTowerCLIP(visual, tensors["logit_scale"]), str(ident.get("model")), ident.get("pretrained"),
                        None, preprocess)
    student = Student.from_tensors(bundle, tensors, {**student_meta, "teacher": meta.get("teacher")}, source)
    teacher = meta.get("class_vectors_teacher")
    try:
        cv = ClassVectors(tensors["class_vectors"], meta["classnames"], teacher if isinstance(teacher, dict) else {})
        clf = StudentClassifier(student, cv, allow_other_teacher=bool(meta.get("class_vectors_other_teacher")))
    except PromptKDError as e:
        raise PromptKDError(f"{source}: {e}") from None
    if len(set(cv.classnames)) != len(cv.classnames):
        raise PromptKDError(f"{source}: duplicate class names")
    clf.source = source
    return clf.to(device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> _Predictor:
    """A deployed model file: ONNX (onnxruntime) or the one-file safetensors student (PyTorch)."""
    path = Path(path)
    if not path.is_file():
        raise PromptKDError(f"{path}: model file not found")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix != ".onnx" and len(head) == 9 and head[8:9] == b"{":  # safetensors: header length, then JSON
        return StudentClassifier.load(path, device=device)
    return OnnxClassifier(path)


class OnnxClassifier(_Predictor):
    """An exported classifier on onnxruntime, with the same `predict` as StudentClassifier.

    An image-features export (`--format image-features`) runs the image side on onnxruntime and
    scores against class vectors: the file recorded beside it, or `class_vectors` (any file made by
    the student's teacher, so classes change without re-exporting)."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, *,
                 class_vectors: str | Path | None = None, allow_other_teacher: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise PromptKDError("onnxruntime is not installed (pip install 'promptkd[onnx]')") from None
        path = Path(path)
        if not path.is_file():
            raise PromptKDError(f"{path}: ONNX file not found")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:
            raise PromptKDError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        self.meta = parse_onnx_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        self.source = str(path)
        self.classnames = list(self.meta["classnames"])
        self.transform = TestTransform(self.meta["image_size"], self.meta["mean"], self.meta["std"],
                                       self.meta.get("interpolation", "bicubic"),
                                       self.meta.get("resize_mode", "shortest"))
        self.features_only = self.meta["format"] == FEATURES_FORMAT
        self.class_vectors = None
        if self.features_only:
            self.class_vectors = self._paired_class_vectors(path, class_vectors, allow_other_teacher)
            self.classnames = list(self.class_vectors.classnames)
        elif class_vectors is not None:
            raise PromptKDError(f"{path}: an ONNX logits graph has its class vectors built in; export "
                                "--format image-features to pair it with others")

    def _paired_class_vectors(self, path: Path, given, allow_other_teacher: bool) -> ClassVectors:
        beside = self.meta.get("class_vectors_file")
        cv_path = Path(given) if given is not None else path.parent / str(beside or "")
        if given is None and (not isinstance(beside, str) or not cv_path.is_file()):
            raise PromptKDError(f"{path}: an image-features export needs its class vectors ({beside or 'none recorded'} "
                                "beside it, or class_vectors=FILE)")
        cv = ClassVectors.load(cv_path)
        if cv.dim != self.meta.get("feature_dim"):
            raise PromptKDError(f"{cv_path}: class vectors have dim {cv.dim}, {path} gives features of dim "
                                f"{self.meta.get('feature_dim')}")
        other = other_teacher(self.meta.get("teacher") or {}, cv.teacher)
        if other and self.meta.get("class_vectors_other_teacher"):  # exported with --allow-other-teacher:
            exported_with = self.meta.get("class_vectors_teacher")  # vectors of that same teacher load as made
            allow_other_teacher = allow_other_teacher or (isinstance(exported_with, dict) and bool(exported_with)
                                                          and not other_teacher(exported_with, cv.teacher))
        if other and not allow_other_teacher:
            raise PromptKDError(f"{cv_path}: class vectors come from another teacher than the one {path} was distilled "
                                f"from ({other}); {OTHER_TEACHER_HINT}")
        return cv

    @classmethod
    def load(cls, path: str | Path, providers: Sequence[str] | None = None, **kwargs) -> OnnxClassifier:
        return cls(path, providers, **kwargs)

    def _run(self, images, output: str) -> torch.Tensor:
        out = self.session.run([output], {ONNX_INPUT: images.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).float()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.features_only:
            scale = float(self.meta.get("logit_scale", 100.0))
            return scale * self._run(images, FEATURES_OUTPUT) @ self.class_vectors.vectors.T
        return self._run(images, ONNX_OUTPUT)

    def image_features(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        if not self.features_only:
            return super().image_features(images)
        return self._run(self.preprocess(images), FEATURES_OUTPUT)

    __call__ = logits
