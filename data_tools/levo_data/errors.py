"""The one error type of levo_data, and how a ``levo-data`` command reports errors.

:class:`UsageError` (a ``ValueError``) is every problem with a command's arguments or folders as a
whole: settings that cannot be used, an output folder of another kind
(:class:`~levo_data.outputs.OutputFolderError`), a codec folder without its files. A command turns it
into one ``error:`` line and exit status 2. Data that cannot be read (a bad shard, a checkpoint that
does not load) is exit status 1 (:func:`guarded`), and a catalogue line that cannot become a record is
rejected and counted, not raised.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from levo_train.locking import FolderLockedError

__all__ = ["UsageError", "guarded"]


class UsageError(ValueError):
    """Arguments or an output folder that cannot be used (exit status 2); the message names them."""


def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; a :class:`UsageError` becomes one ``error:`` line and exit status 2, data and model
    errors (a bad shard, a checkpoint or config that does not load, a missing file, a busy folder:
    ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / a locked folder) exit status 1."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except UsageError as e:
            print(f"levo-data {args.command}: error: {e}", file=sys.stderr)
            return 2
        except (FileNotFoundError, FileExistsError, ValueError, FolderLockedError) as e:
            print(f"levo-data {args.command}: error: {e}", file=sys.stderr)
            return 1

    return run
