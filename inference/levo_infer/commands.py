"""The one CLI idiom of the levo tools: a table of subcommands (standard library only).

A subcommand is a :class:`Command`: its help line, a function that adds its arguments to a parser,
and a function that runs it and returns the exit status. A tool keeps its subcommands in a dict
(name -> Command; each module that owns commands exports its part of the table), builds its parser
with :func:`add_commands` and dispatches with :func:`run_command`. To add a subcommand, write the
two functions and add an entry. ``levo-data`` and ``levo-eval`` are such tables; ``levo-infer`` keeps
its plain form ``levo-infer CKPT_DIR INPUT.jsonl OUT_DIR`` and takes its subcommands (``decode``)
from a table through :func:`parse_command`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Command", "add_commands", "command_parser", "parse_command", "run_command"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, argument setup and runner (returns the exit code), the
    description its own ``--help`` shows (None: none), and ``check``: argument rules argparse cannot
    express (a returned message exits with the command's usage and status 2, as argparse's own
    errors do; applied by :func:`parse_command`)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    check: Callable[[argparse.Namespace], str | None] | None = None


def add_commands(subparsers: argparse._SubParsersAction, commands: Mapping[str, Command], *,
                 help_as_description: bool = False) -> dict[str, argparse.ArgumentParser]:
    """Add one parser per command to ``subparsers`` (from ``add_subparsers(dest="command")``), in table
    order; a command without a description shows its help line instead when ``help_as_description``.
    Returns the parsers by name."""
    parsers = {}
    for name, cmd in commands.items():
        if cmd.check is not None:
            raise ValueError(f"command {name!r}: a check runs only on a stand-alone parser (parse_command)")
        description = cmd.description if cmd.description is not None or not help_as_description else cmd.help
        parsers[name] = p = subparsers.add_parser(name, help=cmd.help, description=description)
        cmd.add_arguments(p)
    return parsers


def run_command(commands: Mapping[str, Command], args: argparse.Namespace) -> int:
    """Run the command ``args.command`` names; its exit status."""
    return int(commands[args.command].run(args))


def command_parser(prog: str, cmd: Command) -> argparse.ArgumentParser:
    """A stand-alone parser for one command (``prog``: e.g. ``levo-infer decode``)."""
    p = argparse.ArgumentParser(prog=prog, description=cmd.description)
    cmd.add_arguments(p)
    return p


def parse_command(prog: str, cmd: Command, argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed by :func:`command_parser` and ``cmd.check``-ed; a bad argument exits as argparse
    does (usage, status 2)."""
    parser = command_parser(prog, cmd)
    args = parser.parse_args(list(argv))
    problem = cmd.check(args) if cmd.check is not None else None
    if problem:
        parser.error(problem)
    return args
