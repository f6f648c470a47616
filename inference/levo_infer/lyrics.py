"""The one lyric checker / normaliser shared by ``levo-infer`` and the data tools.

Released rules (SongGeneration): sections are separated by ``;``, sentences by ``.``; every section
starts with a structure tag; ``[intro-*]``, ``[inst-*]``, ``[outro-*]`` and ``[silence]`` carry no
lyrics; ``[verse]``, ``[chorus]`` and ``[bridge]`` must carry lyrics.

Canonical form (what :func:`normalize_lyrics` returns)::

    [intro-short] ; [verse] a b . c d ; [chorus] e f ; [outro-short]

* sections joined by ``" ; "``; each section is its lower-case tag, then (vocal sections only) its
  sentences joined by ``" . "``;
* whitespace inside a sentence collapsed to single spaces; no trailing ``.`` (empty sentences, e.g.
  from ``"a. b."`` or ``"a .. b"``, are dropped); a trailing ``;`` is tolerated and dropped;
* words are whitespace-separated and kept verbatim (case, commas and apostrophes untouched).

The released demo writes sentences as ``"a b.c d"``; ``format_sections(..., compact=True)``
produces that spelling from the same parse. :data:`STRUCTURE_TAGS` is the one list of the tags (the
lyric tokenizer and the model config take it from here). This module depends on the standard library only.
"""

from __future__ import annotations

import re

from .errors import LevoInferError

__all__ = [
    "STRUCTURE_TAGS",
    "VOCAL_TAGS",
    "INSTRUMENTAL_TAGS",
    "LyricError",
    "normalize_lyrics",
    "split_sections",
    "format_sections",
    "lyric_words",
]

#: The 13 structure tags in the released order (their tokenizer ids follow this order).
STRUCTURE_TAGS: tuple[str, ...] = (
    "[verse]",
    "[chorus]",
    "[bridge]",
    "[intro-short]",
    "[intro-medium]",
    "[intro-long]",
    "[outro-short]",
    "[outro-medium]",
    "[outro-long]",
    "[inst-short]",
    "[inst-medium]",
    "[inst-long]",
    "[silence]",
)
#: Tags whose section must carry lyrics.
VOCAL_TAGS: frozenset[str] = frozenset({"[verse]", "[chorus]", "[bridge]"})
#: Tags whose section must not carry lyrics.
INSTRUMENTAL_TAGS: frozenset[str] = frozenset(STRUCTURE_TAGS) - VOCAL_TAGS

_TAG_RE = re.compile(r"\[[^\[\]]*\]")
_ALIASES = {"[intro]": "[intro-short]", "[inst]": "[inst-short]", "[outro]": "[outro-short]"}

Sections = list[tuple[str, list[list[str]]]]


class LyricError(LevoInferError):
    """A lyric breaks a rule.

    Attributes:
        section: 0-based index of the offending section (``None`` for whole-text errors);
            the message counts sections from 1.
        rule: short rule name, one of ``empty``, ``empty_section``, ``missing_tag``,
            ``unknown_tag``, ``tag_inside_section``, ``stray_bracket``, ``missing_lyrics``,
            ``lyrics_in_instrumental``, ``no_vocal_section``.
        message: human-readable explanation of the rule.
        section_text: the offending section's text (``""`` for whole-text errors).
    """

    def __init__(self, section: int | None, rule: str, message: str, section_text: str = "") -> None:
        self.section = section
        self.rule = rule
        self.message = message
        self.section_text = section_text
        if section is None:
            text = f"lyric: rule '{rule}': {message}"
        else:
            text = f"lyric section {section + 1} {section_text!r}: rule '{rule}': {message}"
        super().__init__(text)


def _parse(text: str, *, require_vocal: bool) -> Sections:
    if not isinstance(text, str):
        raise LyricError(None, "empty", f"expected a str, got {type(text).__name__}")
    raw_sections = text.split(";")
    # Tolerate one trailing separator ("... ; [outro-short] ;").
    while len(raw_sections) > 1 and not raw_sections[-1].strip():
        raw_sections.pop()
    if not text.strip() or (len(raw_sections) == 1 and not raw_sections[0].strip()):
        raise LyricError(None, "empty", "lyric is empty; expected e.g. '[verse] a b . c d ; [chorus] e f'")
    out: Sections = []
    for i, raw in enumerate(raw_sections):
        sec = " ".join(raw.split())
        if not sec:
            raise LyricError(i, "empty_section", "empty section between ';' separators")
        m = _TAG_RE.match(sec)
        if m is None:
            raise LyricError(
                i,
                "missing_tag",
                "a section must start with a structure tag, one of " + " ".join(STRUCTURE_TAGS),
                sec,
            )
        tag = m.group(0).lower().replace(" ", "")
        if tag not in STRUCTURE_TAGS:
            hint = f" (did you mean {_ALIASES[tag]}?)" if tag in _ALIASES else ""
            raise LyricError(
                i,
                "unknown_tag",
                f"unknown structure tag {m.group(0)}{hint}; allowed: " + " ".join(STRUCTURE_TAGS),
                sec,
            )
        body = sec[m.end() :]
        extra = _TAG_RE.search(body)
        if extra is not None:
            raise LyricError(
                i,
                "tag_inside_section",
                f"second tag {extra.group(0)} inside a section; separate sections with ' ; '",
                sec,
            )
        if "[" in body or "]" in body:
            raise LyricError(i, "stray_bracket", "unmatched '[' or ']' in the lyric text", sec)
        sentences = [s.split() for s in body.split(".")]
        sentences = [s for s in sentences if s]
        if tag in VOCAL_TAGS and not sentences:
            raise LyricError(
                i, "missing_lyrics", f"{tag} must carry lyrics ([verse], [chorus], [bridge] do)", sec
            )
        if tag in INSTRUMENTAL_TAGS and sentences:
            raise LyricError(
                i,
                "lyrics_in_instrumental",
                f"{tag} must not carry lyrics ([intro-*], [inst-*], [outro-*], [silence] don't)",
                sec,
            )
        out.append((tag, sentences))
    if require_vocal and not any(tag in VOCAL_TAGS for tag, _ in out):
        raise LyricError(
            None, "no_vocal_section", "the lyric needs at least one [verse], [chorus] or [bridge]"
        )
    return out


def split_sections(text: str, *, require_vocal: bool = False) -> Sections:
    """Parse and check a lyric: ``[(tag, [[word, ...], ...]), ...]`` (instrumental: no sentences).

    Raises :class:`LyricError` naming the section, its text and the broken rule.
    """
    return _parse(text, require_vocal=require_vocal)


def format_sections(sections: Sections, *, compact: bool = False) -> str:
    """Format parsed sections; canonical spacing, or the released demo's ``"a b.c d"`` if ``compact``."""
    sep = "." if compact else " . "
    parts = []
    for tag, sentences in sections:
        if sentences:
            parts.append(tag + " " + sep.join(" ".join(words) for words in sentences))
        else:
            parts.append(tag)
    return " ; ".join(parts)


def normalize_lyrics(text: str, *, compact: bool = False, require_vocal: bool = False) -> str:
    """Check a lyric and return its canonical form (see the module docstring).

    ``normalize_lyrics(normalize_lyrics(x)) == normalize_lyrics(x)``. ``require_vocal`` additionally
    demands at least one vocal section (the released demo does; pure-music songs don't).
    """
    return format_sections(_parse(text, require_vocal=require_vocal), compact=compact)


def lyric_words(text: str) -> list[str]:
    """All sung words of a lyric, in order (what a PER is computed against)."""
    return [w for _, sentences in _parse(text, require_vocal=False) for s in sentences for w in s]
