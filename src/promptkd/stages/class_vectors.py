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
from typing import TYPE_CHECKING

from promptkd.errors import PromptKDError
from promptkd.models.classnames import _check_names, warn_cut_names  # noqa: F401  (warn_cut_names: re-exported)

if TYPE_CHECKING:  # imported where they run, so that the CLI's parser does not import torch
    from promptkd.models.wrappers import ClassVectors, Teacher

log = logging.getLogger(__name__)


def compute_class_vectors(teacher: Teacher, classnames: list[str], chunk_size: int | None = 256) -> ClassVectors:
    """Normalised teacher text features, one row per class name, in order; under torchrun the ranks
    share the text passes."""
    from promptkd.models.classnames import class_vectors_of

    return class_vectors_of(teacher, classnames, chunk_size, encode=_encode_sharded)


def _encode_sharded(teacher: Teacher, names: list[str], chunk_size: int | None):
    """Under torchrun each rank encodes its chunks of `chunk_size` classes (round-robin) and the rows
    are summed over ranks (the others hold zeros there): the one-process result on every rank."""
    import torch

    from promptkd.engine import distributed
    from promptkd.models.classnames import encode_here

    if not distributed.current().enabled:
        return encode_here(teacher, names, chunk_size)
    chunk = chunk_size or len(names)
    starts = range(0, len(names), chunk)
    vectors = torch.zeros(len(names), teacher.dim)
    for c in distributed.my_units(len(starts)):
        vectors[starts[c]:starts[c] + chunk] = teacher.encode_classnames(names[starts[c]:starts[c] + chunk]).float().cpu()
    return distributed.sum_over_ranks(vectors)


def append_class_vectors(existing: ClassVectors, teacher: Teacher, new_names: list[str],
                         chunk_size: int | None = 256) -> ClassVectors:
    """`existing` plus vectors for `new_names` (computed now; the old rows are kept as they are)."""
    import torch

    from promptkd.models.wrappers import ClassVectors, check_same_teacher

    check_same_teacher(existing.teacher, teacher.identity(), "class vectors come from another teacher", "file")
    names = _check_names(list(new_names), "new class names", existing.classnames)
    new = compute_class_vectors(teacher, names, chunk_size)
    return ClassVectors(torch.cat([existing.vectors, new.vectors]), existing.classnames + names, existing.teacher)


def write_class_vectors(teacher: Teacher, classnames: list[str], out: str | Path, *,
                        append_to: str | Path | None = None, chunk_size: int | None = 256,
                        save: bool = True) -> Path:
    """Compute (or append) class vectors and save them to `out` (`save` False: a torchrun rank
    other than 0 computes its share only)."""
    from promptkd.models.wrappers import ClassVectors

    if append_to is not None:
        existing = ClassVectors.load(append_to, teacher=teacher, dim=teacher.dim)
        cv = append_class_vectors(existing, teacher, classnames, chunk_size)
    else:
        cv = compute_class_vectors(teacher, classnames, chunk_size)
    if not save:
        return Path(out)
    path = cv.save(out)
    log.info("%d class vectors (dim %d) written to %s", len(cv.classnames), cv.dim, path)
    return path


def classnames_from_args(args) -> list[str]:
    """Class names from exactly one of --dataset, --classes-file or --classes (a --dataset beside a
    names option only names the domain: an unlabelled images: folder, or the benchmark of --templates dataset)."""
    given = [x for x in (args.classes_file, args.classes) if x] or [x for x in (args.dataset,) if x]
    if len(given) != 1:
        raise PromptKDError("give exactly one of --dataset NAME, --classes-file FILE or --classes 'a,b,c'")
    if args.classes:
        return [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.classes_file:
        from promptkd.data.folders import read_classnames

        return read_classnames(args.classes_file)
    from promptkd.data.registry import build_dataset

    names = list(build_dataset(args.dataset, args.root).classnames)
    if not names:
        raise PromptKDError(f"--dataset {args.dataset}: unlabelled images have no class names; give them with "
                            "--classes-file FILE")
    n_base = math.ceil(len(names) / 2)  # official base/novel rule
    return {"all": names, "base": names[:n_base], "novel": names[n_base:]}[args.subset]


def register(subparsers) -> None:
    from promptkd.inputs import add_clip_args
    from promptkd.options import add_old_spellings, add_output_options, positive_int
    from promptkd.stages.teacher_choice import add_template_option

    p = subparsers.add_parser(
        "class-vectors", help="run the teacher's text tower over class names and store the vectors",
        description="Write a class-vector file (normalised teacher text features + class names + teacher "
                    "identity). With --append-to, only the new names are computed and added.")
    p.add_argument("teacher_run", nargs="?", metavar="TEACHER", help="teacher file or run folder (or --teacher)")
    p.add_argument("--teacher", metavar="PATH|DIR", help="teacher file or run folder")
    add_clip_args(p, "teacher")
    add_template_option(p)
    p.add_argument("--seed", type=int, default=1, help="the seed of --teacher-weights none (a plain CLIP teacher)")
    p.add_argument("--dataset", metavar="NAME", help="take the class names of this dataset (benchmark name or folder:PATH)")
    p.add_argument("--root", help="data root for --dataset")
    p.add_argument("--subset", choices=("all", "base", "novel"), default="all", help="with --dataset (default all)")
    p.add_argument("--classes-file", metavar="FILE", help="one class name per line")
    p.add_argument("--classes", metavar="A,B,C", help="comma-separated class names, e.g. 'cat,dog,red fox'")
    add_output_options(p, "file", required=False, what="class-vector file",
                       help="output file (default: the --append-to file, updated in place)")
    p.add_argument("--append-to", metavar="FILE", help="existing class-vector file of the same teacher to extend")
    p.add_argument("--text-chunk", type=positive_int, default=256, metavar="N",
                   help="classes per text forward (memory only; default 256)")
    add_old_spellings(p, "class-vectors")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from promptkd.engine import distributed
    from promptkd.engine.loop import resolve_device
    from promptkd.inputs import class_vectors_path, dataset_inputs, one_of
    from promptkd.runs import check_apart, claim_file
    from promptkd.stages.teacher_choice import (
        TeacherChoice,
        check_teacher_choice,
        load_teacher_choice,
        teacher_inputs,
    )

    given = one_of(args.teacher_run, args.teacher, "--teacher")
    if not given and not args.teacher_model:
        raise PromptKDError("no teacher: give its file or run folder (promptkd class-vectors runs/NAME/teacher ...), "
                            "or a plain CLIP with --teacher-model M --teacher-weights W")
    choice = TeacherChoice(given, args.teacher_model, args.teacher_weights, class_vectors=args.append_to,
                           templates=args.templates)  # appended rows: the file's templates unless given
    choice = check_teacher_choice(choice, "class-vectors")  # its teacher file resolved once
    out = args.out or args.append_to
    if not out:
        raise PromptKDError("--out is required (unless --append-to updates a file in place)")
    if args.append_to:
        class_vectors_path(args.append_to, "--append-to")
    in_place = bool(args.append_to) and Path(out).resolve() == Path(args.append_to).resolve()
    data, roots = dataset_inputs(args.dataset, args.root)
    check_apart(out, {**teacher_inputs(choice), "class-name file": args.classes_file, **data,
                      "class vectors": None if in_place else args.append_to}, roots=roots)
    claim_file(out, overwrite=args.overwrite, what="class-vector file", in_place=in_place)
    device, info = distributed.join_ranks(resolve_device(args.device))  # torchrun: each rank takes class chunks
    names = classnames_from_args(args)
    teacher, _ = load_teacher_choice(choice, device=device, seed=args.seed, dataset=args.dataset)
    path = write_class_vectors(teacher, names, out, append_to=args.append_to, chunk_size=args.text_chunk,
                               save=info.is_main)
    if info.is_main:
        print(path)
    return 0
