"""Class vectors from class names: the teacher's text tower run once over checked names.

Below deploy and the stages (it imports only models and leaves), so that a deployed classifier can
make vectors for new classes without importing a stage; `promptkd.stages.class_vectors` builds the
command, the files and the torchrun sharing on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from promptkd.errors import PromptKDError

if TYPE_CHECKING:
    from promptkd.models.wrappers import ClassVectors, Teacher

log = logging.getLogger("promptkd.stages.class_vectors")  # the logger name the warning always had


def _check_names(names: list[str], source: str, existing: list[str] = ()) -> list[str]:
    """Non-empty names, none repeated, also not up to case ('Cat' and 'cat' would get one text feature
    from a lower-casing tokenizer, and two rows for one class)."""
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise PromptKDError(f"{source}: class names must be non-empty")
    seen = {n.casefold(): n for n in existing}
    for n in names:
        if n.casefold() in seen:
            where = "already in the file" if seen[n.casefold()] in existing else "given twice"
            same = "" if seen[n.casefold()] == n else f" as {seen[n.casefold()]!r}: names differing only in case clash"
            raise PromptKDError(f"{source}: duplicate class name {n!r} ({where}{same})")
        seen[n.casefold()] = n
    return names


def _shown(name: str) -> str:
    return repr(name if len(name) <= 60 else f"{name[:36]}...{name[-20:]}")


def warn_cut_names(tokens, names: list[str]) -> list[str]:
    """One warning naming the class names whose prompt fills the text tower's context (CLIP: 77
    tokens), where the tokenizer cuts it, and the names that thereby become one text (one vector).
    Returns the cut names."""
    cut = [n for n, row in zip(names, tokens) if int(row[-1]) != 0]  # no padding left: the text was cut
    if cut:
        texts: dict[tuple, list[str]] = {}
        for n, row in zip(names, tokens):
            texts.setdefault(tuple(row.tolist()), []).append(n)
        same = "; ".join(" = ".join(_shown(n) for n in group) for group in texts.values() if len(group) > 1)
        log.warning("%d class name(s) cut at the text tower's %d-token limit: %s%s", len(cut), tokens.shape[1],
                    ", ".join(_shown(n) for n in cut[:5]) + (", ..." if len(cut) > 5 else ""),
                    f"; these become identical (one vector for several classes): {same}" if same else "")
    return cut


def class_vectors_of(teacher: Teacher, classnames: list[str], chunk_size: int | None = 256, *,
                     encode: Callable | None = None) -> ClassVectors:
    """Normalised teacher text features, one row per class name, in order. `encode(teacher, names,
    chunk_size)` runs the text passes (default: all of them here, in this process; the class-vectors
    stage passes one that shares them out under torchrun)."""
    import torch

    from promptkd.models.wrappers import ClassVectors

    names = _check_names(list(classnames), "class vectors")
    warn_cut_names(teacher.text.tokenize_classnames(names), names)
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        vectors = (encode or encode_here)(teacher, names, chunk_size)
    teacher.train(was_training)
    return ClassVectors(vectors, names, teacher.identity())


def encode_here(teacher: Teacher, names: list[str], chunk_size: int | None):
    """Every text pass in this process, `chunk_size` classes at a time."""
    return teacher.encode_classnames(names, chunk_size).float().cpu()
