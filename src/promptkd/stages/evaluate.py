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


def default_clip_weights(model: str, weights: str | None) -> str | None:
    """--clip-weights when not given: `openai` for an open_clip name, as distill's --student-weights and
    teacher's --teacher-weights; a toy model's shipped weights; random for a config JSON (no tag fits it)."""
    if weights is not None or model.endswith(".json") or model.startswith("toy-"):
        return weights
    return "openai"


def _subject(args):
    """(clip model | None, teacher file | None, student file | None) of the command line; a run
    folder or artifact given as the first argument is a teacher or a student by its kind."""
    from promptkd.inputs import artifact_kind, artifact_path, one_of

    teacher, student = args.teacher, args.student
    if args.run:
        kind, path = artifact_kind(args.run, "eval")
        one_of(args.run, teacher if kind == "teacher" else student, f"--{kind}")
        teacher, student = (path, student) if kind == "teacher" else (teacher, path)
    chosen = [x for x in (args.clip_model, teacher, student) if x]
    if not chosen and args.teacher_model:  # a plain CLIP teacher
        return None, None, None
    if len(chosen) != 1:
        raise PromptKDError("give exactly one model: a teacher or student (file or run folder), --clip-model, or "
                            "a plain CLIP teacher (--teacher-model M --teacher-weights W)")
    if args.templates and not (args.clip_model or (args.teacher_model and not teacher and not student)):
        raise PromptKDError("--templates is for a plain CLIP (--clip-model, or --teacher-model without --teacher)")
    return (args.clip_model, teacher and artifact_path(teacher, "teacher"), student and artifact_path(student, "student"))


def run_eval(args) -> dict:
    """Evaluate a zero-shot CLIP, a teacher or a student on a dataset under a protocol."""
    from promptkd.artifacts import write_json
    from promptkd.data.protocols import build_protocol
    from promptkd.engine import distributed
    from promptkd.engine.loop import resolve_device, resolve_precision
    from promptkd.models.wrappers import ClassVectors

    subject, choice, cv_path = _checked_subject(args)
    clip_model, teacher_path, student_path = subject
    dataset, root, protocol_name = _data_of(args, teacher_path or student_path)
    if args.out:  # the metrics file never replaces an input
        _check_out_apart(args.out, dataset, root, {"teacher": teacher_path, "student": student_path,
                                                   "class vectors": cv_path})
    device, info = distributed.join_ranks(resolve_device(args.device))  # torchrun: each rank takes test batches
    precision = resolve_precision(args.precision, device)
    cv = ClassVectors.load(cv_path) if cv_path else None
    protocol = build_protocol(protocol_name, dataset, root, num_shots=args.shots, seed=args.seed,
                              reference_classnames=cv.classnames if cv is not None else None)
    splits = protocol.val if args.split == "val" else protocol.test
    if not any(it.label >= 0 for sp in splits.values() for it in sp.items):
        raise PromptKDError(f"{protocol.dataset}: no labelled {args.split} images under the {protocol_name} protocol"
                            + (" (a folder without a val/ sub-folder has none; use --split test)"
                               if args.split == "val" else ""))
    encode, preprocess, classifier, what = _load_model(args, subject, choice, cv, cv_path, protocol, dataset, device)
    results = _score(args, encode, preprocess, classifier, splits, device, precision, info.is_main)
    counts = {k: sum(1 for it in s.items if it.label >= 0) for k, s in splits.items()}
    out = {"kind": "eval_metrics", "dataset": protocol.dataset, "protocol": protocol_name, "split": args.split,
           "model": what, "results": results, "images": counts}
    if not info.is_main:
        return out
    print(_format_table(f"{protocol.dataset} ({protocol_name}, {args.split})", results, counts))
    if args.out:
        write_json(args.out, out)
    return out


def _checked_subject(args):
    """(the _subject triple, the plain CLIP teacher's choice | None, the class-vector file of the
    student or the plain teacher | None), with every option and CLIP file checked before anything
    heavy runs."""
    from promptkd.inputs import check_clip_files, student_class_vectors
    from promptkd.stages.teacher_choice import TeacherChoice, check_teacher_choice

    clip_model, teacher_path, student_path = subject = _subject(args)
    plain = not (clip_model or teacher_path or student_path)
    if args.template and args.templates:
        raise PromptKDError("give the zero-shot templates once: --template or --templates")
    choice = None
    if plain:
        choice = TeacherChoice(None, args.teacher_model, args.teacher_weights, args.class_vectors,
                               templates=args.template or args.templates)
        choice = check_teacher_choice(choice, "eval")  # its class vectors resolved (a run folder: the file in it)
    cv_path = student_class_vectors(student_path, args.class_vectors) if student_path else None
    if choice is not None and choice.class_vectors:  # an input of --out's check
        cv_path = choice.class_vectors
    for role, model, weights in (("clip", args.clip_model, args.clip_weights), ("teacher", args.teacher_model,
                                 args.teacher_weights), ("student", args.student_model, args.student_weights)):
        check_clip_files(model, weights, role)
    return subject, choice, cv_path


def _data_of(args, run_file) -> tuple[str, str | None, str]:
    """(dataset, root, protocol): a run folder remembers its data, so --dataset, --root and --protocol
    default to the run's."""
    from promptkd.inputs import run_record_of

    recorded = (run_record_of(run_file).get("inputs") or {}).get("dataset") or {} if run_file else {}
    dataset = args.dataset or recorded.get("name")
    if not dataset:
        raise PromptKDError("no dataset: pass --dataset NAME (or folder:PATH)")
    root = args.root if args.dataset else args.root or recorded.get("root")
    protocol_name = args.protocol or (recorded.get("protocol") if not args.dataset else None) or "base2novel"
    return dataset, root, protocol_name


def _check_out_apart(out, dataset: str, root, inputs: dict) -> None:
    from promptkd.inputs import dataset_inputs
    from promptkd.runs import check_apart

    data, roots = dataset_inputs(dataset, root)
    check_apart(out, {**inputs, **data}, roots=roots)


def _load_model(args, subject, choice, cv, cv_path, protocol, dataset, device):
    """(image encoder, preprocessing config, class-vector classifier, what the metrics name) of the
    model evaluated."""
    import torch

    clip_model, teacher_path, student_path = subject
    with torch.no_grad():
        if clip_model:
            return _zero_shot_clip(args, clip_model, protocol, dataset, device)
        if choice is not None:
            return _plain_teacher(args, choice, cv, cv_path, protocol, dataset, device)
        if teacher_path:
            from promptkd.inputs import load_teacher

            teacher = load_teacher(teacher_path, args.teacher_model, args.teacher_weights, device)
            classifier = teacher.encode_classnames(protocol.classnames, chunk_size=args.text_chunk)
            return (teacher.encode_images, teacher.clip.preprocess_cfg, classifier,
                    {"teacher": str(teacher_path), **teacher.identity()})
        return _student(args, student_path, cv, cv_path, protocol, device)


def _zero_shot_clip(args, clip_model, protocol, dataset, device):
    from promptkd.models import load_clip
    from promptkd.models.teachers import template_class_vectors
    from promptkd.templates import resolve_templates

    clip = load_clip(clip_model, default_clip_weights(clip_model, args.clip_weights), device=device,
                     init_seed=args.seed)
    templates = resolve_templates(args.template or args.templates, dataset)
    classifier = template_class_vectors(lambda tokens: clip.model.encode_text(tokens.to(device)),
                                        clip.tokenizer, protocol.classnames, templates)
    return clip.model.encode_image, clip.preprocess_cfg, classifier, {"clip": clip.identity(), "templates": templates}


def _plain_teacher(args, choice, cv, cv_path, protocol, dataset, device):
    from promptkd.data.protocols import align_class_vectors
    from promptkd.models.wrappers import ClassVectors
    from promptkd.stages.teacher_choice import load_teacher_choice

    teacher, _ = load_teacher_choice(choice, device=device, seed=args.seed, dataset=dataset)
    if cv is not None:  # its own class vectors: made by this CLIP with these templates, or refused
        ClassVectors.load(cv_path, teacher=teacher, dim=teacher.dim)
        classifier = align_class_vectors(cv, protocol, str(args.class_vectors))
    else:
        classifier = teacher.encode_classnames(protocol.classnames, chunk_size=args.text_chunk)
    return teacher.encode_images, teacher.clip.preprocess_cfg, classifier, {"plain_clip_teacher": teacher.identity()}


def _student(args, student_path, cv, cv_path, protocol, device):
    from promptkd.data.protocols import align_class_vectors
    from promptkd.deploy import OTHER_TEACHER_HINT, other_teacher
    from promptkd.inputs import load_student

    student = load_student(student_path, args.student_model, args.student_weights, device)
    if cv.dim != student.projector.out_dim:
        raise PromptKDError(f"{cv_path}: class vectors have dim {cv.dim}, the student "
                            f"projects to {student.projector.out_dim}")
    other = other_teacher(student, cv.teacher)
    if other and not getattr(args, "allow_other_teacher", False):
        raise PromptKDError(f"{cv_path}: class vectors come from another teacher than the one "
                            f"{student_path} was distilled from ({other}); {OTHER_TEACHER_HINT}")
    classifier = align_class_vectors(cv, protocol, str(cv_path))
    return student, student.clip.preprocess_cfg, classifier, {"student": str(student_path), "class_vectors": str(cv_path)}


def _score(args, encode, preprocess, classifier, splits, device, precision, is_main: bool) -> dict:
    """Accuracy per split (and HM), the image encoder run under the chosen precision."""
    from promptkd.data.transforms import transforms_for
    from promptkd.engine.loop import autocast
    from promptkd.metrics import evaluate_splits

    def encode_amp(x):
        with autocast(device, precision):
            return encode(x)

    return evaluate_splits(encode_amp, classifier, splits, transforms_for(preprocess)[1],
                           batch_size=args.batch_size, device=device, num_workers=args.num_workers,
                           progress=not args.no_progress and is_main,
                           announce="eval" if is_main else None, shard=True)


def register(sub) -> None:
    from promptkd.data.protocols import PROTOCOLS
    from promptkd.inputs import add_clip_args
    from promptkd.options import (
        PRECISIONS,
        add_model_options,
        add_old_spellings,
        add_other_teacher_option,
        non_negative_int,
        positive_int,
    )
    from promptkd.stages.teacher_choice import add_template_option

    p = sub.add_parser("eval", help="evaluate a zero-shot CLIP, a teacher or a student on a dataset",
                       description="Student evaluation runs only the student (image tower + projector) against "
                                   "the stored class vectors. Given a run folder, the dataset, root, protocol and "
                                   "(for a student) the class vectors default to the run's.")
    p.add_argument("run", nargs="?", metavar="RUN", help="teacher or student: its file or run folder")
    p.add_argument("--dataset", metavar="NAME", help="benchmark name (OxfordPets, ...) or folder:/split:/images:PATH "
                                     "(default: the run's)")
    p.add_argument("--root", help="data root holding the CoOp dataset folders (default: the run's)")
    p.add_argument("--protocol", choices=PROTOCOLS, help="default: the run's, else base2novel")
    p.add_argument("--split", choices=("test", "val"), default="test", help="the split scored (default test)")
    p.add_argument("--shots", type=non_negative_int, default=0, metavar="K",
                   help="K images per class of train/val (0: all; the test split is never subsampled)")
    p.add_argument("--seed", type=int, default=1, help="few-shot draw; the seed of --clip-weights none")
    g = p.add_argument_group("what to evaluate (one of)")
    add_model_options(g, "clip", what="a plain zero-shot CLIP",
                      default_note="weights default: openai for an open_clip name, as --student-weights")
    g.add_argument("--template", action="append", help="zero-shot template(s), default 'a photo of a {}.'")
    add_template_option(g)
    add_other_teacher_option(g)
    g.add_argument("--teacher", metavar="PATH|DIR", help="teacher file or run folder")
    add_clip_args(g, "teacher")
    g.add_argument("--student", metavar="PATH|DIR", help="student file or run folder")
    g.add_argument("--class-vectors", metavar="FILE",
                   help="the teacher's class vectors for the student (default: those in its run folder)")
    add_clip_args(g, "student")
    p.add_argument("--text-chunk", type=positive_int, default=256, metavar="N",
                   help="classes per teacher text forward (memory only; default 256)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images per forward (default 100)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="compute precision: auto (bf16 on CUDA), fp32 (default), bf16 or fp16")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="data-loader processes (default 0)")
    p.add_argument("--out", metavar="FILE", help="write the results here (JSON)")
    add_old_spellings(p, "eval")
    p.set_defaults(func=lambda a: (run_eval(a), 0)[1])
