"""Every option of every command says what it does in --help (the vocabulary's meaning at least)."""

from __future__ import annotations

import argparse

from promptkd.cli import build_parser


def _options(parser, command=""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{command} {name}".strip())
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield command, action


def test_every_option_of_every_command_has_help():
    seen = list(_options(build_parser()))
    assert {c.split()[0] for c, _ in seen if c} >= {"teacher", "distill", "eval", "export", "predict", "info", "toy"}
    missing = [f"{c} {'/'.join(a.option_strings) or a.dest}" for c, a in seen if not a.help]
    assert missing == []


def test_distill_dataset_help_lists_every_custom_prefix():
    from promptkd.data.registry import CUSTOM_PREFIXES

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dataset = next(a for a in sub.choices["distill"]._actions if "--dataset" in a.option_strings)
    assert all(prefix in dataset.help for prefix in CUSTOM_PREFIXES)
