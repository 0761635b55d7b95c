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

import torch
from torch import nn

from promptkd.artifacts import atomic_open
from promptkd.deploy import ONNX_INPUT, ONNX_OUTPUT, StudentClassifier, onnx_metadata_props
from promptkd.errors import PromptKDError

DEFAULT_OPSET = 17


class _Fp16(nn.Module):
    """fp16 weights and compute inside, fp32 image in and logits out, so callers feed the same inputs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).half()  # a copy: fp32 -> fp16 -> fp32 would lose bits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.half()).float()


def onnx_bytes(module: nn.Module, image_size: int, *, fp16: bool = False, opset: int = DEFAULT_OPSET) -> bytes:
    """Trace `module` (normalised (B, 3, S, S) images -> logits) into an ONNX model, dynamic batch.

    Uses the TorchScript exporter (dynamo=False): it needs no onnxscript and handles open_clip's
    blocks on CPU. MultiheadAttention's inference fast path (a fused op ONNX lacks) is switched off
    while tracing.
    """
    module = (_Fp16(module) if fp16 else module).eval()
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
    try:
        import onnx
    except ImportError:
        raise PromptKDError("exporting needs the onnx package (pip install 'promptkd[onnx]')") from None
    if opset < 17:
        raise PromptKDError(f"opset {opset} is too old; use 17 or newer")
    classifier = classifier.cpu().eval()
    model = onnx.load_from_string(onnx_bytes(classifier, classifier.image_size, fp16=fp16, opset=opset))
    meta = {**classifier.metadata(), "precision": "fp16" if fp16 else "fp32", "opset": opset}
    for key, value in onnx_metadata_props(meta).items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "promptkd"
    with atomic_open(out, "wb") as f:
        f.write(model.SerializeToString())
    return Path(out)


@torch.no_grad()
def parity(classifier: StudentClassifier, onnx_path: str | Path, batch: int = 3, seed: int = 0) -> float:
    """Max |logit difference| between PyTorch and onnxruntime on a random normalised batch."""
    from promptkd.deploy import OnnxClassifier

    s = classifier.image_size
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))
    return float((classifier.logits(x).cpu() - OnnxClassifier(onnx_path).logits(x)).abs().max())


def load_classifier(student: str, class_vectors: str, *, student_model: str | None = None,
                    student_clip: str | None = None, device="cpu") -> StudentClassifier:
    """Student + class-vector files -> classifier, with the CLI's CLIP options for the student."""
    from promptkd.inputs import artifact_clip

    clip = artifact_clip(student, "student", student_model, student_clip, device)
    return StudentClassifier.load(student, class_vectors, device=device, clip=clip)


def register(subparsers) -> None:
    from promptkd.inputs import add_clip_args

    p = subparsers.add_parser(
        "export", help="export a student classifier (student + class vectors) to ONNX",
        description="Write one ONNX graph from normalised images (fixed size, dynamic batch) to logits, "
                    "with class names, image size, mean/std and model identities in its metadata.")
    p.add_argument("--student", required=True, help="student file (student.safetensors)")
    p.add_argument("--class-vectors", required=True, help="class-vector file")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="output format (default onnx)")
    p.add_argument("--out", help="output file (default: the student file with .onnx)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and compute (inputs/outputs stay fp32)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check after export")
    add_clip_args(p, "student", "--student-model")
    p.set_defaults(func=_run)


def _run(args) -> int:
    clf = load_classifier(args.student, args.class_vectors, student_model=args.student_model,
                          student_clip=args.student_clip)
    out = export_onnx(clf, args.out or Path(args.student).with_suffix(".onnx"), fp16=args.fp16, opset=args.opset)
    if not args.no_check:
        try:
            msg = f"max |logit diff| onnxruntime vs PyTorch fp32: {parity(clf, out):.2e}"
        except PromptKDError as e:
            msg = f"parity check skipped: {e}"
        if not getattr(args, "quiet", False):
            print(msg, file=sys.stderr)
    print(out)
    return 0
