"""The song token format, once: streams, frame rate, code range, EOS and pad, silent codes, output modes.

A song is a LongTensor ``[3, T]``: one row per stream (:data:`STREAMS`: mixed, vocal, bgm), one
column per frame at :data:`FRAME_RATE` (25 Hz). Codes of a stream are ``0 .. code_size - 1``
(:data:`CODE_SIZE` = 16384 for the released models); :func:`eos_id` (``code_size``) ends a stream
and :func:`pad_id` (``code_size + 1``, the special id) fills what is not a frame. Neither is stored
in a song's tokens: a stored song is its frames before the earliest EOS.

Output modes (:data:`MODES`, ``levo-infer --mode``): ``mixed`` keeps every stream; ``vocal`` and
``bgm`` replace the other stream by its silent code (:data:`SILENT_CODES`, the released decoder's
substitution: bgm 9670, vocal 3142); ``separate`` writes all three token sets (the song, and its
vocal and bgm versions under :data:`SEPARATE_SUFFIXES`). :func:`mode_tokens` applies a mode;
:data:`SUBSTITUTED` names the stream a single-stream mode replaces.
"""

from __future__ import annotations

import torch

__all__ = ["CODE_SIZE", "DECODE_MODES", "FRAME_RATE", "MODES", "SEPARATE_SUFFIXES", "SILENT_BGM_CODE", "SILENT_CODES",
           "SILENT_VOCAL_CODE", "STREAMS", "SUBSTITUTED", "append_eos", "eos_id", "mode_tokens", "pad_id"]

#: the streams of a song, in row order
STREAMS: tuple[str, ...] = ("mixed", "vocal", "bgm")
#: frames per second of every stream
FRAME_RATE = 25
#: codes per stream of the released models (a model's own: ``cfg.lm.code_size``)
CODE_SIZE = 16384

#: silent codes the released decoder substitutes for the other stream in the vocal / bgm modes
SILENT_BGM_CODE = 9670
SILENT_VOCAL_CODE = 3142
#: stream -> its silent code
SILENT_CODES: dict[str, int] = {"vocal": SILENT_VOCAL_CODE, "bgm": SILENT_BGM_CODE}
#: output modes of levo-infer (which token sets the codec decodes, see :func:`mode_tokens`)
MODES: tuple[str, ...] = ("mixed", "vocal", "bgm", "separate")
#: the modes one decode renders (``separate`` is three decodes)
DECODE_MODES: tuple[str, ...] = MODES[:3]
#: single-stream mode -> the stream it replaces by that stream's silent code
SUBSTITUTED: dict[str, str] = {"vocal": "bgm", "bgm": "vocal"}
#: file-name suffixes of the vocal and bgm versions ``--mode separate`` writes beside the song
SEPARATE_SUFFIXES: tuple[str, ...] = ("_vocal", "_bgm")


def eos_id(code_size: int = CODE_SIZE) -> int:
    """The end-of-song id of a stream (the last class of the LM heads)."""
    return code_size


def pad_id(code_size: int = CODE_SIZE) -> int:
    """The special / pad id: what is not a frame (never predicted, never stored)."""
    return code_size + 1


def mode_tokens(codes: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """Token sets the codec decodes for an output mode, keyed by file-name suffix (``""``, ``"_vocal"``,
    ``"_bgm"``). ``codes`` [K, T] or [B, K, T] (mixed, vocal, bgm). vocal: bgm replaced by the silent
    code 9670; bgm: vocal replaced by 3142; separate: all three files. The mixed stream is kept."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

    def single(m: str) -> torch.Tensor:
        stream = SUBSTITUTED[m]
        out = codes.clone()
        out[..., STREAMS.index(stream), :] = SILENT_CODES[stream]
        return out

    if mode == "mixed":
        return {"": codes}
    if mode != "separate":
        return {"": single(mode)}
    return {"": codes, **{sfx: single(sfx[1:]) for sfx in SEPARATE_SUFFIXES}}


def append_eos(codes: torch.Tensor, lengths: torch.Tensor, eos: int, pad: int,
               ended: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K, T] padded frames -> [B, K, T+1] with EOS at each song's length and pad after it.

    ``ended`` [B] bool: songs that ended with EOS (None: all). A song cut at its frame limit
    without EOS gets none (pad at its length: the model is never taught to stop there), and
    when no song needs the extra position it is dropped ([B, K, T]): a song of the model's
    longest length then still fits its positions."""
    B, K, T = codes.shape
    out = torch.cat([codes, codes.new_full((B, K, 1), pad)], dim=2)
    t = torch.arange(T + 1, device=codes.device)[None, None, :]
    ln = lengths.to(codes.device)[:, None, None]
    out = torch.where(t < ln, out, torch.full_like(out, pad))
    if ended is None:
        return torch.where(t == ln, torch.full_like(out, eos), out)
    ended = ended.to(device=codes.device, dtype=torch.bool)
    out = torch.where((t == ln) & ended[:, None, None], torch.full_like(out, eos), out)
    width = int((lengths.to(codes.device) + ended.long()).max()) if B else 0
    return out if width > T else out[:, :, :T]
