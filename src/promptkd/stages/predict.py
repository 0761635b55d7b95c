"""`promptkd predict`: classify images, folders or globs with a student (PyTorch) or an exported file
(`--model`: ONNX on onnxruntime, or the one-file safetensors student on PyTorch).

Unreadable files are reported one by one (stderr, or "errors" in --json) and the rest are still
classified; the exit code is 1 when any file failed. With --classes/--classes-file the class
vectors are computed now by the teacher's text tower (open vocabulary), so the teacher is needed.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from promptkd.errors import PromptKDError


def expand_inputs(inputs: list[str]) -> list[str]:
    """Image files named by paths, folders (recursive) or glob patterns, in order, without repeats."""
    from promptkd.data.dataset import is_image_file, list_images

    out: list[str] = []
    for given in inputs:
        if os.path.isdir(given):
            found = list_images(given)
        elif os.path.isfile(given):
            found = [given]
        elif glob.has_magic(given):
            found = sorted(p for p in glob.glob(given, recursive=True) if os.path.isfile(p) and is_image_file(
                os.path.basename(p)))
        else:
            raise PromptKDError(f"{given}: no such file or folder")
        if not found:
            raise PromptKDError(f"{given}: no images found")
        out += found
    return list(dict.fromkeys(out))


def predict_files(clf, paths: list[str], *, topk: int = 5, batch_size: int = 32, progress: bool = True):
    """-> (predictions [{path, top: [{class, prob}]}], errors [{path, error}]), reading files lazily."""
    from promptkd.data.dataset import load_rgb
    from promptkd.logs import progress_bar

    preds, errors = [], []
    bar = progress_bar(total=len(paths), desc="predict", unit="img", enabled=progress and len(paths) > batch_size)
    for i in range(0, len(paths), batch_size):
        batch, ok = [], []
        for p in paths[i : i + batch_size]:
            try:
                batch.append(clf.transform(load_rgb(p)))
                ok.append(p)
            except PromptKDError as e:
                errors.append({"path": p, "error": str(e).removeprefix(f"{p}: ")})
        if batch:
            for p, top in zip(ok, clf.predict(batch, topk=topk, batch_size=batch_size)):
                preds.append({"path": p, "top": [{"class": c, "prob": round(v, 6)} for c, v in top]})
        bar.update(len(paths[i : i + batch_size]))
    bar.close()
    return preds, errors


def build_classifier(args):
    """The classifier the options describe: a --model file, a student + class vectors (those in its
    run folder by default), or a student + teacher + class names (open vocabulary)."""
    from promptkd.inputs import artifact_path, check_clip_files, student_class_vectors
    from promptkd.stages.export import load_classifier

    names = _classnames(args)
    if args.model:
        if args.student or args.class_vectors or names:
            raise PromptKDError("--model has its class vectors built in: do not combine it with --student, "
                                "--class-vectors or --classes (export another model for other classes)")
        from promptkd.deploy import load_model
        from promptkd.sharing import HUB_PREFIX, load

        if args.model.startswith(HUB_PREFIX) or os.path.isdir(args.model):  # a model folder
            return load(args.model, device=args.device or "cpu")
        return load_model(args.model, device=args.device or "cpu")
    if not args.student:
        raise PromptKDError("give --model FILE, or --student with --class-vectors (or --classes and --teacher)")
    student = artifact_path(args.student, "student")
    check_clip_files(args.student_model, args.student_weights, "student")
    check_clip_files(args.teacher_model, args.teacher_weights, "teacher")
    device = args.device or "cpu"
    if names is None:
        if args.teacher:
            raise PromptKDError("--teacher is only used with --classes/--classes-file")
        cv = student_class_vectors(student, args.class_vectors, "--student needs --class-vectors (none beside "
                                   "it), or --classes/--classes-file with --teacher")
        return load_classifier(str(student), str(cv), student_model=args.student_model,
                               student_weights=args.student_weights, device=device,
                               allow_other_teacher=args.allow_other_teacher)
    if not args.teacher:
        raise PromptKDError("--classes/--classes-file need --teacher: new class vectors come from its text tower")
    if args.class_vectors:
        raise PromptKDError("give either --class-vectors or --classes/--classes-file, not both")
    from promptkd.deploy import StudentClassifier
    from promptkd.inputs import load_student, load_teacher
    from promptkd.stages.class_vectors import compute_class_vectors

    teacher_path = artifact_path(args.teacher, "teacher")
    student = load_student(student, args.student_model, args.student_weights, device=device)
    teacher = load_teacher(teacher_path, args.teacher_model, args.teacher_weights, device=device)
    return StudentClassifier(student, compute_class_vectors(teacher, names, args.text_chunk),
                             allow_other_teacher=args.allow_other_teacher)


def _classnames(args) -> list[str] | None:
    if args.classes and args.classes_file:
        raise PromptKDError("give --classes or --classes-file, not both")
    if args.classes:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not names:
            raise PromptKDError("--classes: no class names given")
        return names
    if args.classes_file:
        from promptkd.data.folders import read_classnames

        return read_classnames(args.classes_file)
    return None


def register(subparsers) -> None:
    from promptkd.inputs import add_clip_args
    from promptkd.options import add_old_spellings, add_other_teacher_option, positive_int

    p = subparsers.add_parser(
        "predict", help="classify images with an exported model or a student",
        description="Print the top-k classes and probabilities of each image. Inputs are image files, "
                    "folders (searched recursively) or glob patterns (quote them).")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER|GLOB")
    p.add_argument("--model", metavar="FILE",
                   help="a model from `promptkd export`: ONNX (onnxruntime), the one-file .safetensors (PyTorch), "
                        "a model folder or hf-hub:ORG/NAME")
    p.add_argument("--student", metavar="PATH|DIR", help="student file or run folder (runs on PyTorch)")
    p.add_argument("--class-vectors", metavar="FILE",
                   help="class-vector file for --student (default: the one in its run folder)")
    p.add_argument("--classes", metavar="A,B,C", help="open vocabulary: comma-separated class names (needs --teacher)")
    p.add_argument("--classes-file", metavar="FILE", help="open vocabulary: one class name per line (needs --teacher)")
    p.add_argument("--teacher", metavar="PATH|DIR", help="teacher whose text tower computes vectors for --classes")
    add_clip_args(p, "teacher")
    add_clip_args(p, "student")
    p.add_argument("--text-chunk", type=positive_int, default=256, metavar="N",
                   help="classes per teacher text forward with --classes (memory only; default 256)")
    p.add_argument("--topk", type=positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward (default 32)")
    add_other_teacher_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (predictions and errors)")
    add_old_spellings(p, "predict")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.device:  # an ONNX --model runs on onnxruntime (CPU); a student or one-file model on this device
        from promptkd.engine.loop import resolve_device

        resolve_device(args.device)
    paths = expand_inputs(args.inputs)
    clf = build_classifier(args)
    preds, errors = predict_files(clf, paths, topk=args.topk, batch_size=args.batch_size,
                                  progress=not args.no_progress)
    if args.json:
        json.dump({"predictions": preds, "errors": errors}, sys.stdout, indent=2)
        print()
    else:
        for r in preds:
            print(f"{r['path']}\t" + "  ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
    for e in errors:
        print(f"promptkd: {e['path']}: {e['error']}", file=sys.stderr)
    return 1 if errors else 0
