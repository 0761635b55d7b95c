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


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number > 0")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")


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


def add_model_options(p, role: str, *, what: str | None = None, default_note: str = "from the artifact") -> None:
    """--ROLE-model MODEL and --ROLE-weights TAG|PATH|none for role in teacher, student, clip."""
    assert role in ROLES, role
    what = what or f"the {role}'s CLIP"
    p.add_argument(f"--{role}-model", metavar="MODEL",
                   help=f"{what}: open_clip name, model-config JSON or toy-teacher/toy-student ({default_note})")
    p.add_argument(f"--{role}-weights", metavar="TAG|PATH|none",
                   help=f"{what}'s weights: open_clip tag, local checkpoint, or none for a seeded random "
                        f"initialisation ({default_note})")


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
_PRESET = "(default: the preset's)"
OPTION_HELP = {
    "--vision-depth": f"prompted blocks of the trained image tower {_PRESET}",
    "--text-depth": f"prompted blocks of the teacher's text tower {_PRESET}",
    "--n-ctx-vision": f"vision prompt tokens per block {_PRESET}",
    "--n-ctx-text": f"text prompt tokens per block {_PRESET}",
    "--gpa-mean": f"Gaussian prompt aggregation: the epoch of largest weight {_PRESET}",
    "--gpa-std": f"Gaussian prompt aggregation: the spread in epochs {_PRESET}",
    "--epochs": f"training epochs {_PRESET}",
    "--batch-size": f"images per step, global across processes {_PRESET}",
    "--lr": f"learning rate, > 0 {_PRESET}",
    "--seed": f"the run's seed: few-shot draw, initialisation, batch order, weights of --*-weights none {_PRESET}",
    "--num-workers": f"data-loader processes {_PRESET}",
    "--precision": f"autocast dtype: auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16, fp16; weights stay fp32 {_PRESET}",
    "--protocol": "base2novel, cross or dg (docs/datasets.md) (default: the preset's, else base2novel)",
    "--temperature": f"KD softmax temperature, > 0 {_PRESET}",
    "--kd-reduction": f"how the KD loss is averaged: official (over batch x classes) or batchmean {_PRESET}",
    "--max-steps-per-epoch": "cap the steps of each epoch (quick runs)",
    "--checkpoint-every": "also checkpoint every N steps (for --resume)",
    "--eval-batch-size": f"images per forward in validation and test passes {_PRESET}",
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


def deprecated_spellings(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{old option: new option} of one command's parser (for docs and tests)."""
    return {s: a.new for a in parser._actions if isinstance(a, _Deprecated) for s in a.option_strings}
