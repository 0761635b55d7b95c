"""The command-line vocabulary: one option name per concept in every command (docs/cli.md holds the
table, and a test holds every parser to it), the global options, value checks that run while the
command line is parsed, and the old spellings that keep working for one release with a warning.

argparse only: building a parser imports no torch, so `promptkd --help` answers at once.
"""

from __future__ import annotations

import argparse
import re
import sys

ROLES = ("teacher", "student", "clip")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE_HELP = "auto (default: CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
REMOVED_IN = "0.3"  # the release that drops the deprecated spellings


# ---------------------------------------------------------------------------------------------
# Value checks (argparse `type=`): a bad value is argparse's one-line usage error, exit code 2.


def _number(kind, test, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what}")
        return value

    return parse


def ranged(kind: type, op: str, bound: float):
    """An int or (finite) float `op` bound, op '>' or '>=': the check of a setting's range as a flag."""
    above = (lambda v: v > bound) if op == ">" else (lambda v: v >= bound)
    if kind is int:
        return _number(int, above, f"an integer {op} {bound:g}")
    return _number(float, lambda v: above(v) and v < float("inf"), f"a number {op} {bound:g}")


positive_int = ranged(int, ">=", 1)
non_negative_int = ranged(int, ">=", 0)
positive_float = ranged(float, ">", 0)
non_negative_float = ranged(float, ">=", 0)


def int_range(low: int, high: int):
    return _number(int, lambda v: low <= v <= high, f"an integer from {low} to {high}")


def device_name(text: str) -> str:
    """auto, cpu, mps, cuda or cuda:N (whether it exists is checked before any work starts)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: use {DEVICE_HELP}")
    return text


# ---------------------------------------------------------------------------------------------
# Option groups used by several commands.


def add_global_options(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """-q, --debug, --no-progress and --device, accepted before or after the sub-command.

    The sub-command's copies default to SUPPRESS, so a value given before the sub-command is kept.
    """
    def default(value):
        return value if top else argparse.SUPPRESS

    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("-q", "--quiet", action="store_true", default=default(False),
                   help="only warnings and errors on stderr")
    g.add_argument("--debug", action="store_true", default=default(False),
                   help="show the traceback of an error")
    g.add_argument("--no-progress", action="store_true", default=default(False),
                   help="no progress bars (they are off anyway when stderr is not a terminal)")
    g.add_argument("--device", type=device_name, default=default(None), metavar="DEVICE", help=DEVICE_HELP)


MODEL_METAVAR, WEIGHTS_METAVAR = "MODEL", "TAG|PATH|none"


def model_option_help(role: str, *, what: str | None = None, default_note: str = "from the artifact") -> tuple[str, str]:
    """The help of --ROLE-model and --ROLE-weights (also of the settings fields they fill)."""
    assert role in ROLES, role
    what = what or f"the {role}'s CLIP"
    return (f"{what}: open_clip name, model-config JSON or toy-teacher/toy-student ({default_note})",
            f"{what}'s weights: open_clip tag, local checkpoint, or none for a seeded random "
            f"initialisation ({default_note})")


def add_model_options(p, role: str, *, what: str | None = None, default_note: str = "from the artifact") -> None:
    """--ROLE-model MODEL and --ROLE-weights TAG|PATH|none for role in teacher, student, clip."""
    model_help, weights_help = model_option_help(role, what=what, default_note=default_note)
    p.add_argument(f"--{role}-model", metavar=MODEL_METAVAR, help=model_help)
    p.add_argument(f"--{role}-weights", metavar=WEIGHTS_METAVAR, help=weights_help)


TEMPLATES_METAVAR = "NAME|TEMPLATE|FILE"
TEMPLATES_HELP = ("a plain CLIP's zero-shot templates: imagenet80 (CLIP's 80, averaged as CLIP does), dataset (the "
                  "benchmark's CoOp template), one template with {} or a file of templates (default 'a photo of a {}.')")


def add_output_options(p, kind: str, *, required: bool = True, resume: bool = False, what: str = "result",
                       help: str | None = None) -> None:
    """--out, --overwrite and (for resumable commands) --resume."""
    metavar = {"dir": "DIR", "file": "FILE", "path": "FILE|DIR"}[kind]
    p.add_argument("--out", metavar=metavar, required=required, help=help or f"where to write the {what}")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace a {what} already in --out (its promptkd files are removed first)")
    if resume:
        p.add_argument("--resume", action="store_true", help=f"continue the unfinished {what} in --out")


def add_config_options(p, *, several: bool = False, example: str = "configs/...yaml") -> None:
    """--config YAML (a preset; several merge left to right where `several`) and --set KEY=VALUE."""
    p.add_argument("--config", metavar="YAML", action="append" if several else "store",
                   default=[] if several else None,
                   help=f"YAML preset{'(s), merged in order' if several else ''}, e.g. {example}; "
                        "--set and the options override it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any setting of the preset, e.g. --set train.lr=0.01 (repeatable; YAML values)")


def yaml_value(text: str):
    """YAML as safe_load reads it (no Python objects), except that `1e-3` is a number: YAML 1.1 wants
    a dot (`1.0e-3`), which nobody writing a learning rate expects."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)


def add_other_teacher_option(p) -> None:
    """--allow-other-teacher: the one override of the refusal of class vectors made by another teacher."""
    p.add_argument("--allow-other-teacher", action="store_true",
                   help="use class vectors made by another teacher than the student's (refused without it: "
                        "the student was trained to match its own teacher's vectors)")


# Help of options whose command did not give one: the vocabulary's meaning (docs/cli.md), once.
# Keys: "--option" for every command, "COMMAND --option" for one. tests/cli/test_help.py requires
# every option of every command to have help, so a new option needs it here or where it is added.
# (The options derived from settings fields take their help from the field: settings.setting.)
PRESET_DEFAULT = "(default: the preset's)"
OPTION_HELP = {
    "cache --view-seed": "seed of the recorded augmentations (default 0)",
    "cache --shard-size": "images per shard file (default 1024)",
    "cache --num-workers": "data-loader processes (default 0)",
    "cache --precision": "teacher forward dtype: auto (default: bf16 on CUDA), fp32, bf16, fp16",
    "cache --protocol": "base2novel (default), cross or dg: which images distill will train on",
    "predict inputs": "image files, folders (searched recursively) or quoted glob patterns",
    "report run_dirs": "folders searched for distillation runs (their metrics.json)",
    "report --out": "folder for report.md, report.json and a CSV and PNG per protocol",
    "report --no-plot": "skip the PNG plots",
    "import-official kind": "what the checkpoint holds: a PromptSRC teacher or a PromptKD student",
    "pretrain which": "which toy CLIP to pretrain",
    "pretrain --seed": "the run's seed (default 0)",
    "pretrain --batch-size": "image-caption pairs per step (default 128)",
    "pretrain --lr": "peak learning rate (default 1e-3)",
    "pretrain --weight-decay": "AdamW weight decay (default 0.05)",
    "pretrain --warmup-steps": "linear warm-up steps (default 200)",
}


def fill_missing_help(parser: argparse.ArgumentParser, command: str = "") -> None:
    """Give each option of every sub-command without help its vocabulary meaning (OPTION_HELP)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                fill_missing_help(sub, name)
        elif action.help is None:
            for key in (action.option_strings or [action.dest]):
                action.help = OPTION_HELP.get(f"{command} {key}", OPTION_HELP.get(key))
                if action.help:
                    break


def parse_set(items: list[str] | None) -> list[tuple[str, object]]:
    """--set KEY=VALUE pairs, the value read as YAML (`--set train.lr=0.01` and `1e-3` are numbers)."""
    import yaml

    from promptkd.errors import PromptKDError

    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PromptKDError(f"--set {item!r}: expected KEY=VALUE (e.g. train.lr=0.01)")
        try:
            out.append((key.strip(), yaml_value(value)))
        except yaml.YAMLError:
            raise PromptKDError(f"--set {item!r}: the value is not valid YAML") from None
    return out


# ---------------------------------------------------------------------------------------------
# Old spellings: accepted for one release, with one warning line on stderr.

# The one table of old spellings, per command: {old: new}. An entry starting with "--" is an option
# (a hidden alias of the new option, with its type: add_old_spellings); any other is a key of the
# command's settings (YAML presets and --set; `section.key` inside a section: settings.rename_keys).
# An old option standing for either of two new ones sets `old_<what>` (import-official reads it).
# docs/cli.md lists them ("Old spellings"), and tests/cli/test_vocabulary.py holds it to them.
OLD_SPELLINGS: dict[str, dict[str, str]] = {
    "teacher": {"--model": "--teacher-model", "--pretrained": "--teacher-weights",
                "pretrained": "weights", "train.precision": "precision"},
    "distill": {"--teacher-clip-model": "--teacher-model", "--teacher-clip": "--teacher-weights",
                "--student-pretrained": "--student-weights", "--num-shots": "--shots",
                "num_shots": "shots", "teacher_clip_model": "teacher_model", "teacher_clip": "teacher_weights",
                "student_pretrained": "student_weights"},
    "eval": {"--clip": "--clip-model", "--pretrained": "--clip-weights", "--teacher-clip-model": "--teacher-model",
             "--teacher-clip": "--teacher-weights", "--student-clip-model": "--student-model",
             "--student-clip": "--student-weights", "--num-shots": "--shots"},
    "cache": {"--teacher-clip-model": "--teacher-model", "--teacher-clip": "--teacher-weights",
              "--num-shots": "--shots"},
    "class-vectors": {"--teacher-clip": "--teacher-weights", "--chunk": "--text-chunk",
                      "--classnames-file": "--classes-file"},
    "predict": {"--onnx": "--model", "--teacher-clip": "--teacher-weights", "--student-clip": "--student-weights"},
    "export": {"--student-clip": "--student-weights"},
    "import-official": {"--clip": "--teacher-model or --student-model",
                        "--pretrained": "--teacher-weights or --student-weights"},
    "toy pretrain": {"--eval-every": "--eval-seconds", "--checkpoint-every": "--checkpoint-seconds"},
}


def old_keys(command: str) -> dict[str, str]:
    """{old settings key: new} of one command (OLD_SPELLINGS' entries that are not options)."""
    return {old: new for old, new in OLD_SPELLINGS.get(command, {}).items() if not old.startswith("--")}


class _Deprecated(argparse.Action):
    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"promptkd: warning: {option_string} is deprecated and goes away in {REMOVED_IN}; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated(p, old: str, new: str, *, dest: str | None = None, type=None) -> None:
    """`old` still sets `new`'s value (or `dest`), hidden from --help, with a warning when used."""
    dest = dest or new.lstrip("-").replace("-", "_")
    p.add_argument(old, dest=dest, action=_Deprecated, new=new, type=type, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


def add_old_spellings(p: argparse.ArgumentParser, command: str) -> None:
    """The command's old options (OLD_SPELLINGS), each filling its new option's setting with its type;
    call it after the command's own options."""
    actions = {s: a for a in p._actions for s in a.option_strings}
    for old, new in OLD_SPELLINGS[command].items():
        if not old.startswith("--"):
            continue
        if " or " in new:
            deprecated(p, old, new, dest="old_" + new.rsplit("-", 1)[-1])
        else:
            deprecated(p, old, new, dest=actions[new].dest, type=actions[new].type)


def deprecated_spellings(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{old option: new option} of one command's parser (for docs and tests)."""
    return {s: a.new for a in parser._actions if isinstance(a, _Deprecated) for s in a.option_strings}
