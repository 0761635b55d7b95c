"""Class vectors: the teacher's text tower run once over the class names.

The normalised text features are the classifier of both teacher and student from then on (the
official code recomputed them at every step, §6.1). A file records the teacher's identity (its CLIP
and a hash of its prompts), so vectors from another teacher are refused, and new classes can be
appended later with one more text pass over the new names only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from promptkd.errors import PromptKDError
from promptkd.models.wrappers import ClassVectors, Teacher, check_same_teacher

log = logging.getLogger(__name__)


def _check_names(names: list[str], source: str) -> list[str]:
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise PromptKDError(f"{source}: class names must be non-empty")
    seen, dupes = set(), []
    for n in names:
        if n in seen:
            dupes.append(n)
        seen.add(n)
    if dupes:
        raise PromptKDError(f"{source}: duplicate class names {sorted(set(dupes))[:5]}")
    return names


@torch.no_grad()
def compute_class_vectors(teacher: Teacher, classnames: list[str], chunk_size: int | None = 256) -> ClassVectors:
    """Normalised teacher text features, one row per class name, in order."""
    names = _check_names(list(classnames), "class vectors")
    was_training = teacher.training
    teacher.eval()
    vectors = teacher.encode_classnames(names, chunk_size).float().cpu()
    teacher.train(was_training)
    return ClassVectors(vectors, names, teacher.identity())


def append_class_vectors(existing: ClassVectors, teacher: Teacher, new_names: list[str],
                         chunk_size: int | None = 256) -> ClassVectors:
    """`existing` plus vectors for `new_names` (computed now; the old rows are kept as they are)."""
    check_same_teacher(existing.teacher, teacher.identity(), "class vectors come from another teacher", "file")
    names = _check_names(list(new_names), "new class names")
    have = set(existing.classnames)
    dupes = [n for n in names if n in have]
    if dupes:
        raise PromptKDError(f"{len(dupes)} class name(s) are already in the file (first: {dupes[:3]})")
    new = compute_class_vectors(teacher, names, chunk_size)
    return ClassVectors(torch.cat([existing.vectors, new.vectors]), existing.classnames + names, existing.teacher)


def write_class_vectors(teacher: Teacher, classnames: list[str], out: str | Path, *,
                        append_to: str | Path | None = None, chunk_size: int | None = 256) -> Path:
    """Compute (or append) class vectors and save them to `out`."""
    if append_to is not None:
        existing = ClassVectors.load(append_to, teacher=teacher, dim=teacher.dim)
        cv = append_class_vectors(existing, teacher, classnames, chunk_size)
    else:
        cv = compute_class_vectors(teacher, classnames, chunk_size)
    path = cv.save(out)
    log.info("%d class vectors (dim %d) written to %s", len(cv.classnames), cv.dim, path)
    return path


def classnames_from_args(args) -> list[str]:
    """Class names from exactly one of --dataset, --classnames-file or --classes."""
    given = [x for x in (args.dataset, args.classnames_file, args.classes) if x]
    if len(given) != 1:
        raise PromptKDError("give exactly one of --dataset NAME, --classnames-file FILE or --classes 'a,b,c'")
    if args.classes:
        return [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.classnames_file:
        from promptkd.data.folders import read_classnames

        return read_classnames(args.classnames_file)
    from promptkd.data.registry import build_dataset

    names = list(build_dataset(args.dataset, args.root).classnames)
    n_base = math.ceil(len(names) / 2)  # official base/novel rule
    return {"all": names, "base": names[:n_base], "novel": names[n_base:]}[args.subset]


def register(subparsers) -> None:
    from promptkd.inputs import add_clip_args

    p = subparsers.add_parser(
        "class-vectors", help="run the teacher's text tower over class names and store the vectors",
        description="Write a class-vector file (normalised teacher text features + class names + teacher "
                    "identity). With --append-to, only the new names are computed and added.")
    p.add_argument("--teacher", required=True, help="teacher file (teacher.safetensors)")
    add_clip_args(p, "teacher", "--teacher-model")
    p.add_argument("--dataset", help="take the class names of this dataset (benchmark name or folder:PATH)")
    p.add_argument("--root", help="data root for --dataset")
    p.add_argument("--subset", choices=("all", "base", "novel"), default="all", help="with --dataset (default all)")
    p.add_argument("--classnames-file", help="one class name per line")
    p.add_argument("--classes", help="comma-separated class names, e.g. 'cat,dog,red fox'")
    p.add_argument("--out", help="output file (default: the --append-to file, updated in place)")
    p.add_argument("--append-to", help="existing class-vector file of the same teacher to extend")
    p.add_argument("--chunk", type=int, default=256, help="classes per text forward (memory only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from promptkd.engine.loop import resolve_device
    from promptkd.inputs import load_teacher

    out = args.out or args.append_to
    if not out:
        raise PromptKDError("--out is required (unless --append-to updates a file in place)")
    names = classnames_from_args(args)
    teacher = load_teacher(args.teacher, args.teacher_model, args.teacher_clip, device=resolve_device(args.device))
    print(write_class_vectors(teacher, names, out, append_to=args.append_to, chunk_size=args.chunk))
    return 0
