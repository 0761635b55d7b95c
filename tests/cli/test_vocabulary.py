"""Every command's parser agrees with the vocabulary tables of docs/cli.md: each documented option is
in exactly the commands the table names, with the documented metavar; an option shared by several
commands is documented; no old spelling is shown in --help; and every old spelling still works,
with one warning line."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from promptkd.cli import build_parser, main
from promptkd.options import deprecated_spellings

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _table(heading: str) -> list[list[str]]:
    """The rows (cells, unescaped) of the first table after `heading` in docs/cli.md."""
    text = DOC.read_text()
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append(cells)
    return rows[1:]  # without the header


def _commands() -> dict[str, argparse.ArgumentParser]:
    """{command: its parser}; the toy group's one command is `toy pretrain`."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = dict(sub.choices)
    toy = out.pop("toy")
    out["toy pretrain"] = next(a for a in toy._actions if isinstance(a, argparse._SubParsersAction)).choices["pretrain"]
    return out


COMMANDS = _commands()


def _visible(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings
            if s not in ("-h", "--help")}


def _shown_metavar(parser, action) -> str:
    """The metavar as --help prints it (explicit, DEST, or {choices})."""
    if action.nargs == 0:
        return ""
    formatter = parser._get_formatter()
    return formatter._metavar_formatter(action, action.dest.upper())(1)[0]


def _vocabulary() -> list[tuple[list[str], str, list[str]]]:
    """(option strings, metavar, commands) per row of the vocabulary table."""
    rows = []
    for cells in _table("## Vocabulary"):
        spec = cells[0].strip("`")
        names, _, metavar = spec.partition(" ")
        options = [o.strip() for o in spec.split(",")] if spec.startswith("-q") else [names]
        if spec.startswith("-q"):
            metavar = ""
        commands = list(COMMANDS) if cells[2] == "all" else [c.strip() for c in cells[2].split(",")]
        rows.append((options, metavar, commands))
    return rows


VOCABULARY = _vocabulary()


def test_the_tables_name_only_real_commands():
    assert VOCABULARY and all(set(cmds) <= set(COMMANDS) for _, _, cmds in VOCABULARY)
    assert all(set(c.strip() for c in row[2].split(",")) <= set(COMMANDS) for row in _table("### Old spellings"))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_agrees_with_the_vocabulary_table(command):
    parser = COMMANDS[command]
    shown = _visible(parser)
    for options, metavar, commands in VOCABULARY:
        present = [o for o in options if o in shown]
        if command in commands:
            assert present == options, f"{command} lacks {options[0]} (docs/cli.md lists it)"
            got = _shown_metavar(parser, shown[options[0]])
            allowed = set(metavar.split("|")) | {metavar} if options[0] == "--out" else {metavar}
            assert got in allowed, f"{command} {options[0]}: --help shows {got!r}, docs/cli.md says {metavar!r}"
        else:
            assert not present, f"{command} has {options[0]}, which docs/cli.md does not list for it"


def test_every_shared_option_is_in_the_vocabulary():
    """The same name in two commands is one concept: it must be a row of the table."""
    documented = {o for options, _, _ in VOCABULARY for o in options}
    seen: dict[str, list[str]] = {}
    for command, parser in COMMANDS.items():
        for option in _visible(parser):
            seen.setdefault(option, []).append(command)
    shared = {o: cmds for o, cmds in seen.items() if len(cmds) > 1 and o not in documented}
    assert shared == {}


def test_no_old_spelling_is_shown():
    old = {row[0].strip("`") for row in _table("### Old spellings")}
    for command, parser in COMMANDS.items():
        assert not old & (set(_visible(parser)) - {o for opts, _, cmds in VOCABULARY if command in cmds
                                                    for o in opts}), command


def test_old_spellings_table_matches_the_parsers():
    documented = {(row[0].strip("`"), row[1].strip("`"), c.strip()) for row in _table("### Old spellings")
                  for c in row[2].split(",")}
    actual = {(old, new, command) for command, parser in COMMANDS.items()
              for old, new in deprecated_spellings(parser).items()}
    assert actual == documented


@pytest.mark.parametrize("command,old,new", sorted(
    (command, old, new) for command, parser in COMMANDS.items() for old, new in deprecated_spellings(parser).items()))
def test_old_spelling_sets_the_new_option_with_one_warning(command, old, new, capsys):
    parser = build_parser()
    argv = command.split() + {"teacher": [], "class-vectors": [], "cache": ["--teacher", "t", "--dataset", "d"],
                              "distill": [], "eval": [], "export": [], "predict": ["x.png"],
                              "import-official": ["teacher", "ckpt"], "toy pretrain": ["teacher", "--steps", "1"]}[command]
    if command in ("teacher", "distill", "cache", "import-official"):
        argv += ["--out", "o"]
    value = "7"
    args = parser.parse_args([*argv, old, value])
    err = capsys.readouterr().err.strip()
    assert err == f"promptkd: warning: {old} is deprecated and goes away in 0.3; use {new}"
    sub = COMMANDS[command]
    dest = next(a.dest for a in sub._actions if old in a.option_strings)
    assert str(getattr(args, dest)).rstrip(".0") == value
    if " or " not in new:  # the new spelling fills the same setting
        assert dest == next(a.dest for a in sub._actions if new in a.option_strings)


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_before_or_after_the_command(where, tmp_path):
    globals_ = ["-q", "--no-progress", "--device", "cpu", "--debug"]
    argv = ["report", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    argv = [*globals_, *argv] if where == "before" else [*argv, *globals_]
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.no_progress, args.device, args.debug) == (True, True, "cpu", True)
    with pytest.raises(Exception, match="no such run folder"):  # --debug: the error propagates
        main(argv)


def test_set_is_accepted_wherever_a_preset_is():
    for command, parser in COMMANDS.items():
        shown = _visible(parser)
        assert ("--config" in shown) == ("--set" in shown), command


def test_old_setting_names_in_presets_still_read_with_a_warning(caplog):
    import logging

    from promptkd.stages.distill import DistillConfig
    from promptkd.stages.teacher import TeacherConfig

    with caplog.at_level(logging.WARNING, logger="promptkd"):
        teacher = TeacherConfig.from_dict({"pretrained": "clip/ViT-L-14.pt"}, "old.yaml")
        distill = DistillConfig.from_dict({"num_shots": 4, "student_pretrained": "none", "teacher_clip": "t.pt",
                                           "teacher_clip_model": "t.json"})
    assert teacher.weights == "clip/ViT-L-14.pt"
    assert (distill.shots, distill.student_weights, distill.teacher_weights, distill.teacher_model) == (4, None, "t.pt",
                                                                                                       "t.json")
    assert "setting 'pretrained' is deprecated; use 'weights'" in caplog.text
    assert "setting 'num_shots' is deprecated; use 'shots'" in caplog.text


def test_set_overrides_the_preset_and_options_override_set(tmp_path):
    from promptkd.stages.distill import config_from_args

    (tmp_path / "p.yaml").write_text("kd_weight: 7\ntemperature: 2.0\ntrain:\n  lr: 0.5\n  epochs: 3\n")
    parser = build_parser()
    args = parser.parse_args(["distill", "--config", str(tmp_path / "p.yaml"), "--set", "kd_weight=9", "--set",
                              "train.lr=0.25", "--set", "train.epochs=4", "--epochs", "5", "--out", "o"])
    cfg = config_from_args(args)
    assert (cfg.kd_weight, cfg.temperature, cfg.train.lr, cfg.train.epochs) == (9.0, 2.0, 0.25, 5)
