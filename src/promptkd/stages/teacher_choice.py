"""Which teacher a command uses: a PromptSRC teacher artifact (`--teacher FILE|DIR`), or a plain CLIP
(`--teacher-model M --teacher-weights W`, class vectors from `--templates`), or what a teacher cache
folder recorded (`distill --teacher-cache DIR` alone replays the cache's teacher).

Checks run before torch is imported; `load_teacher_choice` builds the model. A plain CLIP teacher's
identity is its CLIP (model, weights sha256 or tag, seed of random weights) plus its templates, so its
class vectors, caches and students are matched to it as a PromptSRC teacher's are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from promptkd.artifacts import read_artifact_meta
from promptkd.errors import PromptKDError

# Keys of one teacher in `distill --add-teacher KEY=VALUE,...` and in a config's `teachers:` list.
TEACHER_KEYS = ("teacher", "teacher_model", "teacher_weights", "class_vectors", "teacher_cache", "templates")


@dataclass
class TeacherChoice:
    teacher: str | None = None  # a teacher artifact or its run folder
    teacher_model: str | None = None  # its CLIP (override), or a plain CLIP teacher's
    teacher_weights: str | None = None
    class_vectors: str | None = None
    teacher_cache: str | None = None
    templates: str | list | None = None  # a plain CLIP teacher's templates (promptkd.templates)
    checked: bool = field(default=False, repr=False)  # by check_teacher_choice: `teacher` is the artifact file

    @classmethod
    def from_dict(cls, d: dict, where: str) -> TeacherChoice:
        if not isinstance(d, dict):
            raise PromptKDError(f"{where}: a teacher is a mapping of {', '.join(TEACHER_KEYS)}")
        unknown = sorted(set(d) - set(TEACHER_KEYS))
        if unknown:
            raise PromptKDError(f"{where}: unknown teacher key(s) {unknown}; known: {', '.join(TEACHER_KEYS)}")
        return cls(**d)

    @property
    def plain(self) -> bool:
        return not self.teacher and bool(self.teacher_model)


def parse_teacher_spec(text: str) -> dict:
    """`teacher_model=toy-teacher,teacher_weights=toy,class_vectors=cv.safetensors` as a dict (the
    value of templates may itself hold commas only inside a file name it does not)."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value.strip():
            raise PromptKDError(f"--add-teacher {text}: expected KEY=VALUE pairs separated by commas "
                                f"(keys: {', '.join(TEACHER_KEYS)})")
        out[key] = value.strip()
    return out


def cache_teacher_record(cache_dir: str | Path) -> dict:
    """What a cache folder's run.json recorded about its teacher ({} when nothing)."""
    from promptkd.runs import read_run_record

    return (read_run_record(cache_dir) or {}).get("inputs") or {}


def check_teacher_choice(choice: TeacherChoice, where: str = "distill") -> TeacherChoice:
    """Everything about a teacher choice that needs no torch: which kind, files present, templates
    (its cache folder is the caller's to check: promptkd.stages.cache.require_cache_folder). Returns
    the choice checked, its teacher and class vectors resolved to their files (a run folder names the
    file in it): later steps trust it."""
    from promptkd.inputs import artifact_path, check_clip_files, class_vectors_path
    from promptkd.templates import resolve_templates

    if not choice.teacher and not choice.teacher_model:
        if not (choice.teacher_cache and cache_teacher_record(choice.teacher_cache).get("teacher_clip")):
            raise PromptKDError(f"{where}: no teacher (--teacher FILE|DIR, or a plain CLIP with --teacher-model M "
                                "--teacher-weights W, or a --teacher-cache DIR that recorded its teacher)")
    path = None
    if choice.teacher:
        path = artifact_path(choice.teacher, "teacher")
        if choice.templates:
            raise PromptKDError("--templates is for a plain CLIP teacher (--teacher-model without --teacher); a "
                                "PromptSRC teacher's class prompts are its own")
    if choice.templates and choice.templates != "dataset":  # the dataset's template: once the dataset is known
        resolve_templates(choice.templates)
    vectors = str(class_vectors_path(choice.class_vectors)) if choice.class_vectors else None
    check_clip_files(choice.teacher_model, choice.teacher_weights, "teacher")
    return replace(choice, teacher=str(path) if path else choice.teacher, class_vectors=vectors, checked=True)


def _teacher_file(choice: TeacherChoice) -> Path | None:
    """The teacher artifact a choice names: resolved once (by check_teacher_choice), or here."""
    from promptkd.inputs import artifact_path

    if not choice.teacher:
        return None
    return Path(choice.teacher) if choice.checked else artifact_path(choice.teacher, "teacher")


def teacher_inputs(choice: TeacherChoice, suffix: str = "") -> dict:
    """The files a teacher choice reads (artifact, class vectors, cache, CLIP files), as inputs for
    runs.check_apart."""
    from promptkd.inputs import clip_inputs

    return {f"teacher{suffix}": _teacher_file(choice),
            f"class vectors{suffix}": choice.class_vectors, f"teacher cache{suffix}": choice.teacher_cache,
            **{f"{k}{suffix}": v for k, v in clip_inputs(choice.teacher_model, choice.teacher_weights, "teacher").items()}}


def _recorded_templates(class_vectors: str | None) -> list | None:
    if not class_vectors:
        return None
    from promptkd.inputs import class_vectors_path

    made_by = read_artifact_meta(class_vectors_path(class_vectors), "class_vectors").get("teacher")
    templates = made_by.get("templates") if isinstance(made_by, dict) else None
    return list(templates) if isinstance(templates, list) else None


def load_teacher_choice(choice: TeacherChoice, *, device, seed: int = 0, dataset: str | None = None):
    """(teacher model, its run.json record). A plain CLIP takes --templates, else the templates its
    class vectors recorded, else the default template."""
    from promptkd.inputs import load_teacher
    from promptkd.models.loading import clip_from_source, load_clip
    from promptkd.models.teachers import ZeroShotTeacher
    from promptkd.runs import check_file_record, file_record, is_file_record
    from promptkd.templates import resolve_templates

    if choice.teacher:
        path = _teacher_file(choice)
        teacher = load_teacher(path, choice.teacher_model, choice.teacher_weights, device)
        return teacher, {"teacher": file_record(path), "teacher_clip": teacher.clip.source}
    if choice.teacher_model:
        clip = load_clip(choice.teacher_model, choice.teacher_weights, device=device, init_seed=seed)
        templates = choice.templates or _recorded_templates(choice.class_vectors)
    else:  # what the cache recorded: its teacher artifact, or its plain CLIP and templates
        recorded = cache_teacher_record(choice.teacher_cache)
        where = f"--teacher-cache {choice.teacher_cache}"
        if is_file_record(recorded.get("teacher")):
            path = check_file_record(recorded["teacher"], f"{where}: its teacher", "pass it with --teacher PATH")
            return load_teacher_choice(TeacherChoice(teacher=str(path), class_vectors=choice.class_vectors),
                                       device=device, seed=seed, dataset=dataset)
        clip = clip_from_source(recorded["teacher_clip"], where=where, role="teacher", device=device)
        templates = choice.templates or _recorded_templates(choice.class_vectors) or recorded.get("teacher_templates")
    templates = resolve_templates(templates, dataset)
    teacher = ZeroShotTeacher(clip, templates).to(device).eval()
    return teacher, {"teacher": None, "teacher_clip": clip.source, "teacher_templates": templates}


def add_template_option(p) -> None:
    """--templates: a plain CLIP's zero-shot templates (the same choice in every command)."""
    from promptkd.options import TEMPLATES_HELP, TEMPLATES_METAVAR

    p.add_argument("--templates", metavar=TEMPLATES_METAVAR, help=TEMPLATES_HELP)


def weight_list(text: str) -> list[float]:
    """'1,2' -> [1.0, 2.0] (argparse type: a malformed list is a usage error)."""
    import argparse

    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"weights must be >= 0 with a positive sum, got {text!r}")
    return values
