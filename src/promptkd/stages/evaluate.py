"""Evaluation: top-1 accuracy against class vectors, and base/novel/HM as the paper computes it.

Only the model being evaluated runs: a student is evaluated from its image tower, projector and
the stored class vectors (the official code also ran the teacher on every test batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from promptkd.data.dataset import ImageDataset, Item
from promptkd.errors import PromptKDError

# Plain zero-shot template (what the official IVLP/PromptSRC prompt reads at initialisation).
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def harmonic_mean(base: float, novel: float) -> float:
    """HM of base and novel accuracy; the paper applies it to seed means (and dataset means)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@torch.no_grad()
def encode_items(
    encode: Callable[[torch.Tensor], torch.Tensor],
    items: Sequence[Item],
    transform,
    *,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    desc: str = "eval",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels for every item, in order (test transform, no augmentation)."""
    from tqdm.auto import tqdm

    ds = ImageDataset(list(items), transform, train=False)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for images, y, _ in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        feats.append(F.normalize(encode(images.to(device)).float(), dim=-1).cpu())
        labels.append(y)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def accuracy(features: torch.Tensor, labels: torch.Tensor, class_vectors: torch.Tensor) -> float:
    """Top-1 accuracy in percent (micro, as Dassl's evaluator)."""
    if len(labels) == 0:
        return float("nan")
    pred = (features @ class_vectors.to(features).T).argmax(dim=-1)
    return 100.0 * (pred == labels).float().mean().item()


@torch.no_grad()
def zero_shot_class_vectors(clip, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                            device: str | torch.device = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Plain-CLIP classifier: normalised text features averaged over templates, renormalised.

    Averaging unnormalised features then normalising is what PromptSRC's frozen reference does.
    """
    model, tokenizer = clip.model, clip.tokenizer
    names = [c.replace("_", " ") for c in classnames]
    per_template = []
    for t in templates:
        texts = [t.format(n) for n in names]
        feats = [model.encode_text(tokenizer(texts[i : i + batch_size]).to(device))
                 for i in range(0, len(texts), batch_size)]
        per_template.append(torch.cat(feats).float())
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


# ----------------------------------------------------------------------------------------------
# Protocols: which images train, which select, which test, and which class vectors score them.

PROTOCOLS = ("base2novel", "cross", "dg")


@dataclass
class EvalSplit:
    """Labelled images scored against rows `classes` of the protocol's classifier (None: all)."""

    items: list[Item]
    classes: slice | None = None


@dataclass
class Protocol:
    """A dataset under one of the paper's protocols, as item lists and class names.

    `classnames` are the classes the classifier must list, in order. `class_indices` (DG only)
    picks those classes' rows out of class vectors made for the full ImageNet class list.
    """

    name: str
    dataset: str
    classnames: list[str]
    train: list[Item]
    val: dict[str, EvalSplit] = field(default_factory=dict)
    test: dict[str, EvalSplit] = field(default_factory=dict)
    class_indices: list[int] | None = None


def build_protocol(name: str, dataset: str, root=None, *, num_shots: int = 0, seed: int = 1,
                   reference_classnames: Sequence[str] | None = None) -> Protocol:
    """Build `dataset` under protocol `name`.

    - base2novel: train on all train images (all classes, unlabelled); select on the split's val
      of the base classes; test base (m-way over W[:m]) and novel ((n-m)-way over W[m:]) apart.
    - cross: train on the target's train images (unlabelled), select on its val, test on all classes.
    - dg: the official DG runs are transductive: train (unlabelled) and test on the variant's
      images; no val. With `reference_classnames` (ImageNet's), classes are mapped into that list.
    `reference_classnames` also names the classes of an unlabelled `images:` dataset.
    """
    from promptkd.data.protocols import base2novel, cross_dataset, domain_generalisation
    from promptkd.data.registry import build_dataset

    if name not in PROTOCOLS:
        raise PromptKDError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    ds = build_dataset(dataset, root)
    if name == "base2novel":
        if not ds.classnames:
            raise PromptKDError(f"{dataset}: base2novel needs a labelled dataset (class names)")
        b = base2novel(ds, num_shots=num_shots, seed=seed)
        m = slice(0, b.n_base)
        return Protocol(name, ds.name, b.classnames, b.train, {"val": EvalSplit(b.val_base, m)},
                        {"base": EvalSplit(b.test_base, m), "novel": EvalSplit(b.test_novel, slice(b.n_base, None))})
    classnames = list(ds.classnames) or list(reference_classnames or [])
    if name == "cross":
        c = cross_dataset(ds)
        val = {"val": EvalSplit(c.val)} if c.val else {}
        return Protocol(name, ds.name, classnames, c.train, val, {"accuracy": EvalSplit(c.test)})
    indices = None
    if reference_classnames is not None and ds.classnames and list(reference_classnames) != list(ds.classnames):
        indices = domain_generalisation(ds, list(reference_classnames)).class_indices
    test = list(ds.test) or list(ds.train)
    return Protocol(name, ds.name, classnames, test, {}, {"accuracy": EvalSplit(test)}, indices)


def align_class_vectors(cv, protocol: Protocol, source: str = "class vectors") -> torch.Tensor:
    """The rows of `cv` (a ClassVectors) for the protocol's classes, in order; a mismatch says what differs."""
    if protocol.class_indices is not None:
        return cv.vectors[protocol.class_indices]
    cv.check_classnames(protocol.classnames, source)
    return cv.vectors


def evaluate_splits(encode: Callable[[torch.Tensor], torch.Tensor], classifier: torch.Tensor,
                    splits: dict[str, EvalSplit], transform, *, batch_size: int = 100,
                    device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True) -> dict:
    """Accuracy per split (unlabelled items skipped), plus HM when there are base and novel splits."""
    out: dict[str, float] = {}
    for name, split in splits.items():
        items = [it for it in split.items if it.label >= 0]
        if not items:
            continue
        feats, labels = encode_items(encode, items, transform, batch_size=batch_size, device=device,
                                     num_workers=num_workers, desc=f"eval {name}", progress=progress)
        w = classifier if split.classes is None else classifier[split.classes]
        out[name] = accuracy(feats, labels, w.float().cpu())
    if "base" in out and "novel" in out:
        out["hm"] = harmonic_mean(out["base"], out["novel"])
    return out


# ----------------------------------------------------------------------------------------------
# Loading what is evaluated (also used by distillation).


def artifact_clip(path, kind: str, clip_model: str | None, clip_weights: str | None, device):
    """The artifact's CLIP, rebuilt from explicit model/weights when given; a missing file is one line."""
    from promptkd.artifacts import load_artifact
    from promptkd.models import load_clip

    if not Path(path).is_file():
        raise PromptKDError(f"{kind} artifact not found: {path}")
    if clip_model is None and clip_weights is None:
        return None
    _, meta = load_artifact(path, kind=kind)
    ident = meta.get("clip") or {}
    return load_clip(clip_model or ident.get("model", "?"),
                     clip_weights if clip_weights is not None else ident.get("pretrained"), device=device)


def add_clip_args(p, role: str, model_flag: str | None = None) -> None:
    """The two options that name an artifact's CLIP when its file cannot (local weights), as
    `load_teacher` / `load_student` take them."""
    p.add_argument(model_flag or f"--{role}-clip-model", metavar="MODEL",
                   help=f"the {role}'s CLIP model name or config JSON (default: from the file)")
    p.add_argument(f"--{role}-clip", metavar="TAG|PATH", help=f"the {role}'s CLIP weights, if a local file")


def load_teacher(path, clip_model: str | None = None, clip_weights: str | None = None, device="cpu"):
    """A teacher artifact; `clip_model`/`clip_weights` supply its CLIP when the name alone cannot."""
    from promptkd.models.wrappers import Teacher

    return Teacher.load(path, clip=artifact_clip(path, "teacher", clip_model, clip_weights, device), device=device)


def load_student(path, clip_model: str | None = None, clip_weights: str | None = None, device="cpu"):
    from promptkd.models.wrappers import Student

    return Student.load(path, clip=artifact_clip(path, "student", clip_model, clip_weights, device), device=device)


# ----------------------------------------------------------------------------------------------
# `promptkd eval`


def _format_table(title: str, results: dict[str, float], counts: dict[str, int]) -> str:
    lines = [title, f"{'split':<10} {'images':>8} {'accuracy':>9}"]
    for k, v in results.items():
        n = counts.get(k)
        lines.append(f"{('HM' if k == 'hm' else k):<10} {'' if n is None else n:>8} {v:>9.2f}")
    return "\n".join(lines)


def run_eval(args) -> dict:
    """Evaluate a zero-shot CLIP, a teacher or a student on a dataset under a protocol."""
    from promptkd.artifacts import write_json
    from promptkd.data.transforms import transforms_for
    from promptkd.engine.loop import autocast, resolve_device
    from promptkd.models import load_clip
    from promptkd.models.wrappers import ClassVectors

    chosen = [x for x in (args.clip, args.teacher, args.student) if x]
    if len(chosen) != 1:
        raise PromptKDError("give exactly one of --clip, --teacher, --student")
    if args.student and not args.class_vectors:
        raise PromptKDError("--student needs --class-vectors (the teacher's stored class vectors)")
    device = resolve_device(args.device)
    cv = ClassVectors.load(args.class_vectors) if args.student else None
    protocol = build_protocol(args.protocol, args.dataset, args.root, num_shots=args.num_shots, seed=args.seed,
                              reference_classnames=cv.classnames if cv is not None else None)
    with torch.no_grad():
        if args.clip:
            clip = load_clip(args.clip, args.pretrained, device=device)
            encode, preprocess = clip.model.encode_image, clip.preprocess_cfg
            classifier = zero_shot_class_vectors(clip, protocol.classnames, args.template or DEFAULT_TEMPLATES, device)
            what = {"clip": clip.identity(), "templates": list(args.template or DEFAULT_TEMPLATES)}
        elif args.teacher:
            teacher = load_teacher(args.teacher, args.teacher_clip_model, args.teacher_clip, device)
            encode, preprocess = teacher.encode_images, teacher.clip.preprocess_cfg
            classifier = teacher.encode_classnames(protocol.classnames, chunk_size=256)
            what = {"teacher": str(args.teacher), **teacher.identity()}
        else:
            student = load_student(args.student, args.student_clip_model, args.student_clip, device)
            if cv.dim != student.projector.out_dim:
                raise PromptKDError(f"{args.class_vectors}: class vectors have dim {cv.dim}, the student "
                                    f"projects to {student.projector.out_dim}")
            made_by = (getattr(student, "meta", {}) or {}).get("teacher") or {}
            if made_by.get("prompts_hash") and cv.teacher.get("prompts_hash") not in (None, made_by["prompts_hash"]):
                raise PromptKDError(f"{args.class_vectors}: class vectors come from another teacher than the one "
                                    f"{args.student} was distilled from (prompts hash {cv.teacher.get('prompts_hash')}"
                                    f" vs {made_by['prompts_hash']})")
            classifier = align_class_vectors(cv, protocol, str(args.class_vectors))
            encode, preprocess = student, student.clip.preprocess_cfg
            what = {"student": str(args.student), "class_vectors": str(args.class_vectors)}
    splits = protocol.val if args.split == "val" else protocol.test
    if not splits:
        raise PromptKDError(f"{protocol.dataset}: the {args.protocol} protocol has no {args.split} split")

    def encode_amp(x):
        with autocast(device, args.precision):
            return encode(x)

    results = evaluate_splits(encode_amp, classifier, splits, transforms_for(preprocess)[1],
                              batch_size=args.batch_size, device=device, num_workers=args.num_workers,
                              progress=not args.no_progress)
    counts = {k: sum(1 for it in s.items if it.label >= 0) for k, s in splits.items()}
    out = {"kind": "eval_metrics", "dataset": protocol.dataset, "protocol": args.protocol, "split": args.split,
           "model": what, "results": results, "images": counts}
    print(_format_table(f"{protocol.dataset} ({args.protocol}, {args.split})", results, counts))
    if args.out:
        write_json(args.out, out)
    return out


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a zero-shot CLIP, a teacher or a student on a dataset",
                       description="Student evaluation runs only the student (image tower + projector) against "
                                   "the stored class vectors.")
    p.add_argument("--dataset", required=True, help="benchmark name (OxfordPets, ...) or folder:/split:/images:PATH")
    p.add_argument("--root", help="data root holding the CoOp dataset folders")
    p.add_argument("--protocol", choices=PROTOCOLS, default="base2novel")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--num-shots", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    g = p.add_argument_group("what to evaluate (one of)")
    g.add_argument("--clip", metavar="MODEL", help="zero-shot open_clip model name or config JSON")
    g.add_argument("--pretrained", metavar="TAG|PATH", help="weights for --clip (none: random)")
    g.add_argument("--template", action="append", help="zero-shot template(s), default 'a photo of a {}.'")
    g.add_argument("--teacher", metavar="PATH", help="teacher artifact")
    add_clip_args(g, "teacher")
    g.add_argument("--student", metavar="PATH", help="student artifact (needs --class-vectors)")
    g.add_argument("--class-vectors", metavar="PATH", help="the teacher's class vectors for --student")
    add_clip_args(g, "student")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--out", metavar="JSON", help="write the results here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda a: (run_eval(a), 0)[1])
