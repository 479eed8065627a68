"""The dispatch table and the parser name the same commands."""

from __future__ import annotations

import argparse

from local_agent.cli import COMMANDS, build_parser


def test_every_subcommand_has_a_handler_and_every_handler_a_subcommand() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subcommands.choices) == set(COMMANDS)
