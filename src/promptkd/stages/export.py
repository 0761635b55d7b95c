"""`promptkd export`: the student classifier as one file, ONNX or safetensors.

ONNX: one graph, normalised image -> logits, with a fixed image size and a dynamic batch axis; the
class vectors and logit scale are constants inside it. Everything a runtime needs besides the graph
(class names, image size, mean/std, which student and which teacher made it) goes into the model's
`metadata_props`, so `promptkd predict --model` and `promptkd.deploy.OnnxClassifier` need no other
file.

safetensors: the one-file student for PyTorch: the student CLIP's image tower, prompts, projector,
class vectors and logit scale as tensors, and the same fields plus how to rebuild the tower as JSON
metadata (no pickle); `StudentClassifier.load(file)` needs no CLIP file.

Before anything is written the PyTorch logits of a probe batch must be finite; after writing, the
file is run (onnxruntime, or reloaded) on that batch and must give finite logits within
`parity_limit` of PyTorch's, else the new file is removed and the export fails. The check runs on a
temporary file, so a failed export leaves an older file at `--out` untouched.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from promptkd.artifacts import METRICS_FILE, about_file, atomic_open, save_artifact
from promptkd.errors import PromptKDError, optional_import

if TYPE_CHECKING:  # torch and the models are imported where they run: `promptkd export --help` stays fast
    import torch
    from torch import nn

    from promptkd.deploy import StudentClassifier

DEFAULT_OPSET = 17
MAX_OPSET = 20  # the newest opset torch.onnx's TorchScript exporter writes (older torch: fewer, see _max_opset)
FORMATS = ("onnx", "safetensors", "folder", "image-features")


def _max_opset() -> int:
    from torch.onnx import _constants

    return min(MAX_OPSET, getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))


def _fp16(module: nn.Module) -> nn.Module:
    """fp16 weights and compute inside, fp32 image in and logits out, so callers feed the same inputs."""
    from torch import nn

    class Fp16(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = copy.deepcopy(module).half()  # a copy: fp32 -> fp16 -> fp32 would lose bits

        def forward(self, images):
            return self.module(images.half()).float()

    return Fp16()


def onnx_bytes(module: nn.Module, image_size: int, *, fp16: bool = False, opset: int = DEFAULT_OPSET,
               output: str | None = None) -> bytes:
    """Trace `module` (normalised (B, 3, S, S) images -> logits) into an ONNX model, dynamic batch.

    Uses the TorchScript exporter (dynamo=False): it needs no onnxscript and handles open_clip's
    blocks on CPU. MultiheadAttention's inference fast path (a fused op ONNX lacks) is switched off
    while tracing.
    """
    import torch

    from promptkd.deploy import ONNX_INPUT, ONNX_OUTPUT

    output = output or ONNX_OUTPUT
    module = (_fp16(module) if fp16 else module).eval()
    dummy = torch.zeros(2, 3, image_size, image_size)
    buf = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not actionable by users
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(module, (dummy,), buf, input_names=[ONNX_INPUT], output_names=[output],
                              dynamic_axes={ONNX_INPUT: {0: "batch"}, output: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    return buf.getvalue()


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise PromptKDError("exporting needs the onnx package (pip install 'promptkd[onnx]')") from None
    return onnx


def export_onnx(classifier: StudentClassifier, out: str | Path, *, fp16: bool = False,
                opset: int = DEFAULT_OPSET) -> Path:
    """Write the classifier as ONNX with promptkd metadata, atomically."""
    return _write_onnx(classifier, classifier, out, {}, fp16=fp16, opset=opset)


def export_image_features(classifier: StudentClassifier, out: str | Path, *, class_vectors_file: str,
                          fp16: bool = False, opset: int = DEFAULT_OPSET) -> Path:
    """Write the image side alone as ONNX: normalised image -> L2-normalised feature in the teacher's
    class-vector space (output `features`), recording the class-vector file that pairs with it."""
    from promptkd.deploy import FEATURES_FORMAT, FEATURES_OUTPUT

    meta = {"format": FEATURES_FORMAT, "feature_dim": classifier.student.projector.out_dim,
            "class_vectors_file": class_vectors_file}
    return _write_onnx(classifier, classifier.student, out, meta, fp16=fp16, opset=opset, output=FEATURES_OUTPUT)


def _write_onnx(classifier: StudentClassifier, module: nn.Module, out: str | Path, extra: dict, *, fp16: bool,
                opset: int, output: str | None = None) -> Path:
    """Trace `module` (the classifier or its image side) to ONNX with the classifier's metadata."""
    from promptkd.deploy import onnx_metadata_props

    onnx = _require_onnx()
    if not DEFAULT_OPSET <= opset <= _max_opset():
        raise PromptKDError(f"opset {opset} is not supported here; use {DEFAULT_OPSET} to {_max_opset()}")
    classifier = classifier.cpu().eval()
    model = onnx.load_from_string(onnx_bytes(module, classifier.image_size, fp16=fp16, opset=opset, output=output))
    meta = {**classifier.metadata(), "precision": "fp16" if fp16 else "fp32", "opset": opset, **extra}
    for key, value in onnx_metadata_props(meta).items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "promptkd"
    with atomic_open(out, "wb") as f:
        f.write(model.SerializeToString())
    return Path(out)


def export_safetensors(classifier: StudentClassifier, out: str | Path, *, fp16: bool = False) -> Path:
    """Write the one-file student (see the module docstring), fp32 or fp16 tensors, atomically."""
    import torch

    tensors = classifier.standalone_tensors()
    if fp16:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        overflow = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if overflow:
            raise PromptKDError(f"--fp16: tensor {overflow[0]!r} exceeds the fp16 range (|x| > 65504); export in fp32")
    return save_artifact(out, tensors, classifier.standalone_metadata("fp16" if fp16 else "fp32"))


def parity_limit(classifier: StudentClassifier, fp16: bool) -> float:
    """Largest |logit difference| an export may show: 1e-4 (fp32) or 1e-2 (fp16) times the logit
    scale, 10x to 100x what exports of a ViT-B/16 student measure (1e-5 and 8e-3 at scale 100)."""
    return (1e-2 if fp16 else 1e-4) * max(1.0, float(classifier.logit_scale))


def _probe(classifier: StudentClassifier, batch: int = 3, seed: int = 0) -> torch.Tensor:
    import torch

    s = classifier.image_size
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))


def reference_logits(classifier: StudentClassifier, batch: int = 3, seed: int = 0,
                     source: str = "PyTorch") -> torch.Tensor:
    """The PyTorch logits of the probe batch (finite, else an error naming `source`): what an export
    must reproduce."""
    import torch

    from promptkd.deploy import check_scores

    with torch.no_grad():
        ref = classifier.logits(_probe(classifier, batch, seed)).cpu().float()
    check_scores(ref, source)
    return ref


def parity(classifier: StudentClassifier, exported, batch: int = 3, seed: int = 0,
           reference: torch.Tensor | None = None) -> float:
    """Max |logit difference| between PyTorch and an exported file (a path: ONNX on onnxruntime, or any
    loaded predictor) on a random normalised batch (`reference`: its PyTorch logits, when already
    computed). Non-finite logits on either side are an error."""
    import torch

    from promptkd.deploy import OnnxClassifier, check_scores

    if isinstance(exported, (str, os.PathLike)):
        exported = OnnxClassifier(exported)
    x = _probe(classifier, batch, seed)
    ref = reference if reference is not None else reference_logits(classifier, batch, seed)
    with torch.no_grad():
        got = exported.logits(x).cpu().float()
    check_scores(got, "the exported model")
    return float((ref - got).abs().max())


def load_classifier(student: str, class_vectors: str, *, student_model: str | None = None,
                    student_weights: str | None = None, device="cpu",
                    allow_other_teacher: bool = False) -> StudentClassifier:
    """Student + class-vector files -> classifier, with the CLI's CLIP options for the student."""
    from promptkd.deploy import StudentClassifier
    from promptkd.inputs import artifact_clip

    clip = artifact_clip(student, "student", student_model, student_weights, device)
    return StudentClassifier.load(student, class_vectors, device=device, clip=clip,
                                  allow_other_teacher=allow_other_teacher)


def register(subparsers) -> None:
    from promptkd.inputs import add_clip_args
    from promptkd.options import add_old_spellings, add_other_teacher_option, add_output_options, int_range

    p = subparsers.add_parser(
        "export", help="export a student classifier (student + class vectors): ONNX, one safetensors file, "
                       "or a Hub-style model folder",
        description="Write one ONNX graph from normalised images (fixed size, dynamic batch) to logits, "
                    "with class names, image size, mean/std and model identities in its metadata; or, with "
                    "--format safetensors, one file holding the student's image tower, prompts, projector and "
                    "class vectors (PyTorch, no CLIP file needed); or, with --format folder, a model folder to "
                    "share (config.json, model.safetensors, classes.txt, class_vectors.safetensors and a README.md "
                    "model card with the run's metrics); or, with --format image-features, the image side alone "
                    "as ONNX (image -> normalised feature) with its class vectors beside it. Given a student run "
                    "folder, the class vectors default to the ones distillation wrote there.")
    p.add_argument("student_run", nargs="?", metavar="STUDENT", help="student file or run folder (or --student)")
    p.add_argument("--student", metavar="PATH|DIR", help="student file or run folder")
    p.add_argument("--class-vectors", metavar="FILE", help="class-vector file (default: the one in the run folder)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="output format (default onnx)")
    add_output_options(p, "path", required=False, what="exported model",
                       help="output file, or folder for --format folder (default: beside the student file, "
                            "student.onnx, student-model.safetensors, model/ or student-features.onnx)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights (ONNX: and compute; inputs/outputs stay fp32)")
    p.add_argument("--opset", type=int_range(DEFAULT_OPSET, MAX_OPSET), default=DEFAULT_OPSET,
                   help=f"ONNX opset, {DEFAULT_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--no-check", action="store_true", help="skip the parity check of the written file")
    add_other_teacher_option(p)
    add_clip_args(p, "student")
    add_old_spellings(p, "export")
    p.set_defaults(func=_run)


def default_out(student: str | Path, fmt: str) -> Path:
    student = Path(student)
    return {"onnx": student.with_suffix(".onnx"), "folder": student.with_name("model"),
            "image-features": student.with_name(f"{student.stem}-features.onnx")}.get(
        fmt, student.with_name(f"{student.stem}-model.safetensors"))


def paired_class_vectors(features_file: Path) -> Path:
    """The class-vector file written beside an image-features export."""
    return features_file.with_name(f"{features_file.stem}.class_vectors.safetensors")


def _copy(src: Path, dst: Path) -> None:
    """A class-vector file copied atomically (a few MB at most: 1,000 classes x 768 x 4 bytes)."""
    with atomic_open(dst, "wb") as f:
        f.write(Path(src).read_bytes())


def _run_metrics(student: Path, cv: Path) -> tuple[dict | None, str | None]:
    """The distillation's metrics.json and command line, when the student is a run's own and the
    class vectors are those it was distilled with (else the metrics would describe another model)."""
    from promptkd.artifacts import read_json
    from promptkd.inputs import CLASS_VECTORS_FILE, run_record_of

    metrics_file = student.parent / METRICS_FILE
    if not metrics_file.is_file() or cv.resolve() != (student.parent / CLASS_VECTORS_FILE).resolve():
        return None, None
    metrics = read_json(metrics_file)
    if not isinstance(metrics, dict) or metrics.get("kind") != "distill_metrics":
        return None, None
    return metrics, run_record_of(student).get("command_line")


def _run(args) -> int:
    from promptkd.inputs import check_clip_files

    fmt = getattr(args, "format", "onnx")
    student, cv, out, out_file, folder, beside = _claim_outputs(args, fmt)
    check_clip_files(args.student_model, args.student_weights, "student")
    onnx_format = fmt in ("onnx", "image-features")
    if onnx_format:
        _require_onnx()
        if args.opset > _max_opset():
            raise PromptKDError(f"--opset {args.opset}: this torch exports opsets {DEFAULT_OPSET} to {_max_opset()}")
    clf = load_classifier(str(student), str(cv), student_model=args.student_model, student_weights=args.student_weights,
                          allow_other_teacher=args.allow_other_teacher)
    ref = reference_logits(clf, source=str(student))  # nothing is written for a broken model
    check = not args.no_check
    if check and onnx_format and optional_import("onnxruntime") is None:  # a Ctrl-C here is one, not "missing"
        check = False
        print("parity check skipped: onnxruntime is not installed (pip install 'promptkd[onnx]')", file=sys.stderr)
    if folder is not None:
        folder.prepare()
    target = out_file.with_name(f".{out_file.name}.unchecked") if check else out_file
    try:
        _write(args, fmt, clf, target, beside)
        if check:
            checked = _check_parity(args, fmt, clf, ref, target, cv, out)
            os.replace(target, out_file)
            if not getattr(args, "quiet", False):
                print(checked, file=sys.stderr)
        if beside is not None:
            _copy(cv, beside)
        if folder is not None:
            _write_folder_files(args, clf, student, cv, out)
    except OSError as e:  # name the file asked for, not the temporary one checked first
        raise about_file(e, out) from None
    finally:
        if target != out_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
    print(out)
    return 0


def _claim_outputs(args, fmt: str):
    """(student file, class-vector file, --out, the file written, the claimed model folder | None, the
    class-vector file written beside an image-features model | None): inputs found, outputs checked
    apart from them and claimed (--overwrite), before anything is loaded."""
    from promptkd import sharing
    from promptkd.inputs import artifact_path, clip_inputs, one_of, student_class_vectors
    from promptkd.runs import check_apart, claim_file, claim_folder

    given = one_of(args.student_run, args.student, "--student")
    if not given:
        raise PromptKDError("no student: give its file or run folder (promptkd export runs/NAME/student ...)")
    student = artifact_path(given, "student")
    cv = student_class_vectors(student, args.class_vectors)
    out = Path(args.out or default_out(student, fmt))
    inputs = {"student": student, "class vectors": cv, **clip_inputs(args.student_model, args.student_weights, "student")}
    check_apart(out, inputs)  # a file, or a model folder that may not hold them either
    folder = None
    if fmt == "folder":
        folder = claim_folder(out, sharing.FOLDER_FILES, overwrite=args.overwrite, what="model folder",
                              finished=sharing.CONFIG_FILE, lock=False)  # for upload: no lock file in it
        out_file = out / sharing.WEIGHTS_FILE
    else:
        out_file = claim_file(out, overwrite=args.overwrite, what="exported model")
    beside = paired_class_vectors(out) if fmt == "image-features" else None
    if beside is not None:
        check_apart(beside, inputs)
        claim_file(beside, overwrite=args.overwrite, what="class-vector file")
    return student, cv, out, out_file, folder, beside


def _write(args, fmt: str, clf: StudentClassifier, target: Path, beside: Path | None) -> None:
    if fmt == "onnx":
        export_onnx(clf, target, fp16=args.fp16, opset=args.opset)
    elif fmt == "image-features":
        export_image_features(clf, target, class_vectors_file=beside.name, fp16=args.fp16, opset=args.opset)
    else:
        export_safetensors(clf, target, fp16=args.fp16)


def _check_parity(args, fmt: str, clf: StudentClassifier, ref: torch.Tensor, target: Path, cv: Path, out: Path) -> str:
    """The written file, run on the probe batch, must match PyTorch's logits within parity_limit;
    returns the line that says by how much it does."""
    from promptkd.deploy import OnnxClassifier, StudentClassifier

    runtime = "onnxruntime" if fmt in ("onnx", "image-features") else "the reloaded file"
    try:
        exported = OnnxClassifier(target, class_vectors=cv, allow_other_teacher=args.allow_other_teacher) \
            if fmt == "image-features" else OnnxClassifier(target) if fmt == "onnx" else \
            StudentClassifier.load(target)
        diff = parity(clf, exported, reference=ref)
    except PromptKDError as e:
        raise PromptKDError(f"{out}: parity check failed: {e}; nothing written") from None
    limit = parity_limit(clf, args.fp16)
    if not diff <= limit:
        raise PromptKDError(f"{out}: parity check failed: max |logit diff| {runtime} vs PyTorch fp32 is "
                            f"{diff:.2e}, above the limit {limit:.1e}; nothing written")
    return f"max |logit diff| {runtime} vs PyTorch fp32: {diff:.2e} (limit {limit:.1e})"


def _write_folder_files(args, clf: StudentClassifier, student: Path, cv: Path, out: Path) -> None:
    """The model folder's class vectors, config, metrics and card (sharing.write_folder_files)."""
    from promptkd import runs, sharing

    _copy(cv, out / sharing.CLASS_VECTORS_FILE)
    metrics, trained_by = _run_metrics(student, cv)
    sharing.write_folder_files(out, clf.standalone_metadata("fp16" if args.fp16 else "fp32"), metrics=metrics,
                               made_by=sharing.command_line(runs.COMMAND_LINE), trained_by=trained_by,
                               selected_on=(getattr(clf.student, "meta", None) or {}).get("selected_on"))
