"""The one error type of levo_infer (standard library only).

Every error levo_infer raises for input it cannot use (a model folder, a config, a checkpoint, a
song request, a lyric, a prompt file, codec files, a JSONL file, a setting) derives from
:class:`LevoInferError`, itself a ``ValueError``: one ``except LevoInferError`` catches them all,
and code that caught ``ValueError`` before still does. The domain errors stay where they are
raised (:class:`~levo_infer.checkpoint.CheckpointError`, :class:`~levo_infer.config.ConfigError`,
:class:`~levo_infer.lyrics.LyricError`, :class:`~levo_infer.request.RequestError`, ...), as
subclasses, so that a caller can still tell them apart. ``levo-infer`` turns them into exit
status 2 (a bad song request fails its line instead); library code never raises ``SystemExit``.
"""

from __future__ import annotations

__all__ = ["LevoInferError"]


class LevoInferError(ValueError):
    """Input levo_infer cannot use; the message names the file, record or setting and what was expected."""
