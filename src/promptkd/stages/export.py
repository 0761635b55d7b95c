"""`promptkd export`: the student classifier as one ONNX graph, normalised image -> logits.

The graph has a fixed image size and a dynamic batch axis; the class vectors and logit scale are
constants inside it. Everything a runtime needs besides the graph (class names, image size,
mean/std, which student and which teacher made it) goes into the model's `metadata_props`, so
`promptkd predict --onnx` and `promptkd.deploy.OnnxClassifier` need no other file.
"""

from __future__ import annotations

import copy
import io
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from promptkd.artifacts import atomic_open
from promptkd.errors import PromptKDError

if TYPE_CHECKING:  # torch and the models are imported where they run: `promptkd export --help` stays fast
    from torch import nn

    from promptkd.deploy import StudentClassifier

DEFAULT_OPSET = 17
MAX_OPSET = 20  # the newest opset torch.onnx's TorchScript exporter writes (older torch: fewer, see _max_opset)


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


def onnx_bytes(module: nn.Module, image_size: int, *, fp16: bool = False, opset: int = DEFAULT_OPSET) -> bytes:
    """Trace `module` (normalised (B, 3, S, S) images -> logits) into an ONNX model, dynamic batch.

    Uses the TorchScript exporter (dynamo=False): it needs no onnxscript and handles open_clip's
    blocks on CPU. MultiheadAttention's inference fast path (a fused op ONNX lacks) is switched off
    while tracing.
    """
    import torch

    from promptkd.deploy import ONNX_INPUT, ONNX_OUTPUT

    module = (_fp16(module) if fp16 else module).eval()
    dummy = torch.zeros(2, 3, image_size, image_size)
    buf = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not actionable by users
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(module, (dummy,), buf, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                              dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    return buf.getvalue()


def export_onnx(classifier: StudentClassifier, out: str | Path, *, fp16: bool = False,
                opset: int = DEFAULT_OPSET) -> Path:
    """Write the classifier as ONNX with promptkd metadata, atomically."""
    from promptkd.deploy import onnx_metadata_props

    try:
        import onnx
    except ImportError:
        raise PromptKDError("exporting needs the onnx package (pip install 'promptkd[onnx]')") from None
    if not DEFAULT_OPSET <= opset <= _max_opset():
        raise PromptKDError(f"opset {opset} is not supported here; use {DEFAULT_OPSET} to {_max_opset()}")
    classifier = classifier.cpu().eval()
    model = onnx.load_from_string(onnx_bytes(classifier, classifier.image_size, fp16=fp16, opset=opset))
    meta = {**classifier.metadata(), "precision": "fp16" if fp16 else "fp32", "opset": opset}
    for key, value in onnx_metadata_props(meta).items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "promptkd"
    with atomic_open(out, "wb") as f:
        f.write(model.SerializeToString())
    return Path(out)


def parity(classifier: StudentClassifier, onnx_path: str | Path, batch: int = 3, seed: int = 0) -> float:
    """Max |logit difference| between PyTorch and onnxruntime on a random normalised batch."""
    import torch

    from promptkd.deploy import OnnxClassifier

    s = classifier.image_size
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((classifier.logits(x).cpu() - OnnxClassifier(onnx_path).logits(x)).abs().max())


def load_classifier(student: str, class_vectors: str, *, student_model: str | None = None,
                    student_weights: str | None = None, device="cpu") -> StudentClassifier:
    """Student + class-vector files -> classifier, with the CLI's CLIP options for the student."""
    from promptkd.deploy import StudentClassifier
    from promptkd.inputs import artifact_clip

    clip = artifact_clip(student, "student", student_model, student_weights, device)
    return StudentClassifier.load(student, class_vectors, device=device, clip=clip)


def register(subparsers) -> None:
    from promptkd.inputs import add_clip_args
    from promptkd.options import add_output_options, deprecated, int_range

    p = subparsers.add_parser(
        "export", help="export a student classifier (student + class vectors) to ONNX",
        description="Write one ONNX graph from normalised images (fixed size, dynamic batch) to logits, "
                    "with class names, image size, mean/std and model identities in its metadata. Given a "
                    "student run folder, the class vectors default to the ones distillation wrote there.")
    p.add_argument("student_run", nargs="?", metavar="STUDENT", help="student file or run folder (or --student)")
    p.add_argument("--student", metavar="PATH|DIR", help="student file or run folder")
    p.add_argument("--class-vectors", metavar="FILE", help="class-vector file (default: the one in the run folder)")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="output format (default onnx)")
    add_output_options(p, "file", required=False, what="exported model",
                       help="output file (default: student.onnx beside the student file)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and compute (inputs/outputs stay fp32)")
    p.add_argument("--opset", type=int_range(DEFAULT_OPSET, MAX_OPSET), default=DEFAULT_OPSET,
                   help=f"ONNX opset, {DEFAULT_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check after export")
    add_clip_args(p, "student")
    deprecated(p, "--student-clip", "--student-weights")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from promptkd.inputs import (
        artifact_path,
        check_clip_files,
        class_vectors_beside,
        class_vectors_path,
        one_of,
    )
    from promptkd.runs import claim_file

    given = one_of(args.student_run, args.student, "--student")
    if not given:
        raise PromptKDError("no student: give its file or run folder (promptkd export runs/NAME/student ...)")
    student = artifact_path(given, "student")
    cv = class_vectors_path(args.class_vectors) if args.class_vectors else class_vectors_beside(student)
    if cv is None:
        raise PromptKDError(f"{student}: no class vectors beside it; give --class-vectors FILE")
    out = claim_file(args.out or student.with_suffix(".onnx"), overwrite=args.overwrite, what="exported model")
    check_clip_files(args.student_model, args.student_weights, "student")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise PromptKDError("exporting needs the onnx package (pip install 'promptkd[onnx]')") from None
    if args.opset > _max_opset():
        raise PromptKDError(f"--opset {args.opset}: this torch exports opsets {DEFAULT_OPSET} to {_max_opset()}")
    clf = load_classifier(str(student), str(cv), student_model=args.student_model, student_weights=args.student_weights)
    out = export_onnx(clf, out, fp16=args.fp16, opset=args.opset)
    if not args.no_check:
        try:
            msg = f"max |logit diff| onnxruntime vs PyTorch fp32: {parity(clf, out):.2e}"
        except PromptKDError as e:
            msg = f"parity check skipped: {e}"
        if not getattr(args, "quiet", False):
            print(msg, file=sys.stderr)
    print(out)
    return 0
