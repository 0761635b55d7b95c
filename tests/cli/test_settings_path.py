"""One settings path: the options of `distill` and `teacher` are derived from their config fields, so
an option and its YAML key set the same field to the same value, its help is the field's, a bad value
is one line naming the setting either way, and one table of old spellings serves options and keys.
The fields are walked generically: a new setting is covered without a new test."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields

import pytest
import yaml
from tinyclip import one_line

from promptkd.cli import build_parser, main
from promptkd.options import OLD_SPELLINGS, deprecated_spellings
from promptkd.settings import option_fields
from promptkd.stages import distill, teacher

STAGES = {"distill": distill, "teacher": teacher}
CONFIGS = {"distill": distill.DistillConfig, "teacher": teacher.TeacherConfig}

# What `--help` showed before the options were derived (option strings and metavars as printed).
# docs/cli.md pins the shared ones; this pins the ones of one command too, so no spelling changed.
EXPECTED_OPTIONS = {
    "teacher": [
        "--config YAML", "--set KEY=VALUE", "--out DIR", "--overwrite", "--resume", "--dataset NAME", "--root ROOT",
        "--teacher-model MODEL", "--teacher-weights TAG|PATH|none", "--shots K", "--seed SEED",
        "--mode {promptsrc,ce}", "--text-chunk N", "--vision-depth VISION_DEPTH", "--text-depth TEXT_DEPTH",
        "--n-ctx-vision N_CTX_VISION", "--n-ctx-text N_CTX_TEXT", "--gpa-mean GPA_MEAN", "--gpa-std GPA_STD",
        "--no-gpa", "--val-every N", "--epochs EPOCHS", "--batch-size BATCH_SIZE", "--lr LR",
        "--precision {auto,fp32,bf16,fp16}", "--num-workers NUM_WORKERS", "--max-steps-per-epoch N",
        "--checkpoint-every STEPS", "--on-nonfinite {stop,skip}", "--on-bad-image {substitute,error}",
        "-q --quiet", "--debug", "--no-progress", "--device DEVICE"],
    "distill": [
        "--config YAML", "--set KEY=VALUE", "--out DIR", "--overwrite", "--resume", "--dataset NAME", "--root ROOT",
        "--protocol {base2novel,cross,dg}", "--shots K", "--teacher PATH|DIR", "--teacher-model MODEL",
        "--teacher-weights TAG|PATH|none", "--class-vectors FILE", "--teacher-cache DIR",
        "--templates NAME|TEMPLATE|FILE", "--classes-file FILE", "--add-teacher KEY=VALUE,...",
        "--ensemble {mean,confidence}", "--ensemble-weights W1,W2,...", "--projector-init {random,text}",
        "--student-model MODEL", "--student-weights TAG|PATH|none", "--vision-depth VISION_DEPTH",
        "--n-ctx-vision N_CTX_VISION", "--temperature TEMPERATURE", "--kd-weight KD_WEIGHT",
        "--kd-reduction {official,batchmean}", "--kd-loss {kl,sym-kl}", "--precision {auto,fp32,bf16,fp16}",
        "--epochs EPOCHS", "--batch-size BATCH_SIZE", "--lr LR", "--seed SEED", "--num-workers NUM_WORKERS",
        "--max-steps-per-epoch N", "--checkpoint-every STEPS", "--on-nonfinite {stop,skip}",
        "--on-bad-image {substitute,error}", "--compile {auto,on,off}", "--eval-batch-size EVAL_BATCH_SIZE",
        "--no-val", "--official-best-on-test", "--no-baseline", "-q --quiet", "--debug", "--no-progress",
        "--device DEVICE"],
}


def _parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _shown(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or not a.option_strings or a.option_strings[0] == "-h":
            continue
        metavar = "" if a.nargs == 0 else parser._get_formatter()._metavar_formatter(a, a.dest.upper())(1)[0]
        out.append(" ".join(a.option_strings) + (f" {metavar}" if metavar else ""))
    return out


def _cases():
    """(command, section, field, flag) of every option derived from a settings field."""
    for command, cls in CONFIGS.items():
        for section, f, flag in option_fields(cls):
            yield pytest.param(command, section, f, flag, id=f"{command}-{flag}")


def _sample(f, flag: str):
    """A valid value other than the default: (the command-line words after the flag, the setting's value)."""
    kinds = [n.strip() for n in f.type.split("|") if n.strip() != "None"]
    meta = f.metadata
    if kinds == ["bool"]:
        return [], not flag.startswith("--no-")
    if meta["choices"]:
        value = next(c for c in reversed(meta["choices"]) if c != f.default)
        return [value], value
    if flag == "--device":
        return ["cpu"], "cpu"
    if kinds == ["int"]:
        return ["3"], 3
    if kinds == ["float"]:
        return ["0.25"], 0.25
    if kinds == ["list"]:  # ensemble weights: one per teacher
        return ["2"], [2.0]
    return ["some-value"], "some-value"


def _config(command: str, argv: list[str]):
    args = build_parser().parse_args([command, "--out", "o", *argv])
    return STAGES[command].config_from_args(args)


def _get(cfg, section, name):
    return getattr(getattr(cfg, section) if section else cfg, name)


@pytest.mark.parametrize("command,section,f,flag", list(_cases()))
def test_an_option_and_its_yaml_key_set_the_same_field_to_the_same_value(command, section, f, flag, tmp_path):
    words, value = _sample(f, flag)
    default = _get(CONFIGS[command](), section, f.name)
    assert value != default  # so that the comparisons below can fail
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({section: {f.name: value}} if section else {f.name: value}))
    from_option = _get(_config(command, [flag, *words]), section, f.name)
    from_yaml = _get(_config(command, ["--config", str(preset)]), section, f.name)
    key = f"{section}.{f.name}" if section else f.name
    from_set = _get(_config(command, ["--set", f"{key}={json.dumps(value)}"]), section, f.name)  # JSON is YAML
    assert from_option == from_yaml == from_set == value


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_the_options_are_those_of_before_and_their_help_is_the_fields(command):
    parser = _parser(command)
    assert sorted(_shown(parser)) == sorted(EXPECTED_OPTIONS[command])  # (the order in --help may change)
    actions = {s: a for a in parser._actions for s in a.option_strings}
    derived = [(f, flag) for section, f, flag in option_fields(CONFIGS[command]) if not f.metadata["global"]]
    assert len(derived) > 20
    for f, flag in derived:
        assert actions[flag].help == f.metadata["help"], flag


def _bad_values(f):
    """(word on the command line, value in YAML) that the field's type, choices or range refuse."""
    kinds = [n.strip() for n in f.type.split("|") if n.strip() != "None"]
    meta = f.metadata
    if meta["choices"]:
        yield "bogus", "bogus"
    if kinds in (["int"], ["float"]):
        yield "abc", "abc"
        if meta["range"]:
            op, bound = meta["range"]
            bad = bound if op == ">" else bound - 1
            yield str(bad), bad


@pytest.mark.parametrize("command,section,f,flag", [  # (an arg_type checks the option apart: gpa_std)
    p for p in _cases() if list(_bad_values(p.values[2])) and not p.values[2].metadata["arg_type"]])
def test_a_bad_value_is_one_line_naming_the_setting_as_option_and_in_yaml(command, section, f, flag, tmp_path, capsys):
    for word, value in _bad_values(f):
        try:
            code = main([command, "--out", str(tmp_path / "o"), flag, word])
        except SystemExit as e:
            code = e.code
        err = one_line(capsys.readouterr().err)
        assert code == 2 and f"argument {flag}" in err and repr(word) in err, err
        preset = tmp_path / "bad.yaml"
        preset.write_text(yaml.safe_dump({section: {f.name: value}} if section else {f.name: value}))
        code = main([command, "--out", str(tmp_path / "o"), "--config", str(preset)])
        err = one_line(capsys.readouterr().err)
        assert code == 2 and err.startswith("promptkd: error: ") and f"{f.name} must be" in err, err
    assert not (tmp_path / "o").exists()


def _spelling_value(cls, new: str):
    """A value for the setting an old spelling names, and where it lands: (words, value, section, name)."""
    if new.startswith("--"):
        section, f, _ = next(c for c in option_fields(cls) if c[2] == new)
    else:
        section, _, name = new.rpartition(".")
        f = next(g for g in fields(cls) if g.name == name)
    words, value = _sample(f, new if new.startswith("--") else "--" + f.name)
    return words, value, section or None, f.name


@pytest.mark.parametrize("command,old,new", [(c, o, n) for c in CONFIGS for o, n in OLD_SPELLINGS[c].items()])
def test_one_table_of_old_spellings_serves_options_and_keys(command, old, new, capsys, caplog):
    cls = CONFIGS[command]
    words, value, section, name = _spelling_value(cls, new)
    if old.startswith("--"):
        assert deprecated_spellings(_parser(command))[old] == new
        cfg = _config(command, [old, *words])
        assert capsys.readouterr().err.strip() == f"promptkd: warning: {old} is deprecated and goes away in 0.3; use {new}"
    else:
        old_section, _, old_name = old.rpartition(".")
        with caplog.at_level(logging.WARNING, logger="promptkd"):
            cfg = cls.from_dict({old_section: {old_name: value}} if old_section else {old: value})
        assert f"setting '{old}' is deprecated; use '{new}'" in caplog.text
    assert _get(cfg, section, name) == value


def test_docs_list_every_old_settings_key():
    """docs/cli.md's table of old settings keys is OLD_SPELLINGS' keys (the options: test_vocabulary)."""
    from test_vocabulary import _table

    documented = {(row[0].strip("`"), row[1].strip("`"), c.strip()) for row in _table("### Old settings keys")
                  for c in row[2].split(",")}
    table = {(old, new, command) for command, spellings in OLD_SPELLINGS.items() for old, new in spellings.items()
             if not old.startswith("--")}
    assert documented == table and table
