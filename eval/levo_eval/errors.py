"""The one error type of levo_eval.

:class:`UsageError` (a ``ValueError``) is every problem with a command's inputs or settings as a
whole: a missing folder, no audio files, a bad ``--requested`` or ``--lyrics`` file, a scorer or
reward model that does not load, an unknown tier. A ``levo-eval`` command turns it into one
``error:`` line and exit status 2 (``levo-eval per`` raises it as :class:`~levo_eval.per.PerError`).
A lyric the G2P cannot read is one too (:class:`~levo_eval.phonemes.UnsupportedScriptError`), which
``levo-eval per`` reports for that song alone. Library code never raises ``SystemExit``.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A problem with the command's inputs as a whole (exit status 2); the message names it."""
