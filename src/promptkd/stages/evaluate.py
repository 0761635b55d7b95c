"""`promptkd eval`: score a zero-shot CLIP, a teacher or a student on a dataset under a protocol.

Only the model being evaluated runs: a student is evaluated from its image tower, projector and
the stored class vectors (the official code also ran the teacher on every test batch).
"""

from __future__ import annotations

from promptkd.errors import PromptKDError


def _format_table(title: str, results: dict[str, float], counts: dict[str, int]) -> str:
    lines = [title, f"{'split':<10} {'images':>8} {'accuracy':>9}"]
    for k, v in results.items():
        n = counts.get(k)
        lines.append(f"{('HM' if k == 'hm' else k):<10} {'' if n is None else n:>8} {v:>9.2f}")
    return "\n".join(lines)


def run_eval(args) -> dict:
    """Evaluate a zero-shot CLIP, a teacher or a student on a dataset under a protocol."""
    import torch

    from promptkd.artifacts import write_json
    from promptkd.data.protocols import align_class_vectors, build_protocol
    from promptkd.data.transforms import transforms_for
    from promptkd.engine.loop import autocast, resolve_device
    from promptkd.inputs import load_student, load_teacher
    from promptkd.metrics import DEFAULT_TEMPLATES, evaluate_splits, zero_shot_class_vectors
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
    from promptkd.data.protocols import PROTOCOLS
    from promptkd.inputs import add_clip_args

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
