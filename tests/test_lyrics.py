"""The shared lyric checker / normaliser (levo_infer.lyrics)."""

from __future__ import annotations

import sys

import pytest

from levo_infer.lyrics import (
    INSTRUMENTAL_TAGS,
    STRUCTURE_TAGS,
    VOCAL_TAGS,
    LyricError,
    format_sections,
    lyric_words,
    normalize_lyrics,
    split_sections,
)


def test_tags_match_released_order():
    assert STRUCTURE_TAGS[:3] == ("[verse]", "[chorus]", "[bridge]")
    assert len(STRUCTURE_TAGS) == 13 and STRUCTURE_TAGS[-1] == "[silence]"
    assert VOCAL_TAGS | INSTRUMENTAL_TAGS == set(STRUCTURE_TAGS)
    assert not VOCAL_TAGS & INSTRUMENTAL_TAGS


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("[verse] a b . c d ; [chorus] e f", "[verse] a b . c d ; [chorus] e f"),
        (
            "  [Verse]  a   b. c d ;[chorus]e f ; [outro-short] ;",
            "[verse] a b . c d ; [chorus] e f ; [outro-short]",
        ),
        ("[intro-short] ; [verse]\nHello there.\nGeneral Kenobi. ;\t[inst-long]", None),
        ("[verse] a b.. c d. ; [bridge] x", "[verse] a b . c d ; [bridge] x"),
        (
            "[verse] Oh-oh-oh, we're fading. Dancing ; [outro-long]",
            "[verse] Oh-oh-oh, we're fading . Dancing ; [outro-long]",
        ),
    ],
)
def test_normalize_canonical_and_idempotent(raw, canonical):
    out = normalize_lyrics(raw)
    if canonical is not None:
        assert out == canonical
    assert normalize_lyrics(out) == out
    assert "  " not in out


def test_released_sample_lyric_normalises():
    raw = (
        "[intro-short] ; [verse] These faded memories of us. I can't erase the tears you cried before. ; "
        "[chorus]Like a fool begs for supper. I find myself waiting for her ; [inst-short] ; [outro-short]"
    )
    out = normalize_lyrics(raw)
    assert out.startswith("[intro-short] ; [verse] These faded memories of us . I can't erase")
    assert "[chorus] Like a fool" in out
    compact = normalize_lyrics(raw, compact=True)
    assert "[verse] These faded memories of us.I can't erase the tears you cried before ; [chorus]" in compact
    # both spellings parse to the same sections
    assert split_sections(out) == split_sections(compact)


def test_split_sections_structure():
    secs = split_sections("[intro-medium] ; [verse] a b . c ; [chorus] d e f ; [silence]")
    assert secs == [
        ("[intro-medium]", []),
        ("[verse]", [["a", "b"], ["c"]]),
        ("[chorus]", [["d", "e", "f"]]),
        ("[silence]", []),
    ]
    assert format_sections(secs) == "[intro-medium] ; [verse] a b . c ; [chorus] d e f ; [silence]"
    assert lyric_words("[verse] a b . c ; [inst-short] ; [bridge] d") == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "text, section, rule, needle",
    [
        ("", None, "empty", "empty"),
        ("  ;  ", None, "empty", "empty"),
        ("[verse] a ; ; [chorus] b", 1, "empty_section", "empty section"),
        ("[verse] a ; hello world", 1, "missing_tag", "must start with a structure tag"),
        ("[verse] a ; [intro] ; [chorus] b", 1, "unknown_tag", "did you mean [intro-short]"),
        ("[verse] a ; [hook] b", 1, "unknown_tag", "[hook]"),
        ("[verse] a b [chorus] c", 0, "tag_inside_section", "' ; '"),
        ("[intro-short] la la ; [verse] a", 0, "lyrics_in_instrumental", "must not carry lyrics"),
        ("[verse] a ; [inst-medium] x", 1, "lyrics_in_instrumental", "[inst-medium]"),
        ("[verse] a ; [silence] hush", 1, "lyrics_in_instrumental", "[silence]"),
        ("[intro-short] ; [chorus] . ; [verse] a", 1, "missing_lyrics", "must carry lyrics"),
        ("[verse] a ; [bridge]", 1, "missing_lyrics", "[bridge]"),
        ("[verse] a ] b", 0, "stray_bracket", "unmatched"),
    ],
)
def test_errors_name_section_text_and_rule(text, section, rule, needle):
    with pytest.raises(LyricError) as ei:
        normalize_lyrics(text)
    e = ei.value
    assert isinstance(e, ValueError)
    assert e.rule == rule and e.section == section
    msg = str(e)
    assert needle in msg and rule in msg
    if section is not None:
        assert f"section {section + 1} " in msg
        assert e.section_text in msg
        assert e.section_text or rule == "empty_section"


def test_require_vocal():
    assert normalize_lyrics("[intro-short] ; [inst-long]") == "[intro-short] ; [inst-long]"
    with pytest.raises(LyricError) as ei:
        normalize_lyrics("[intro-short] ; [inst-long]", require_vocal=True)
    assert ei.value.rule == "no_vocal_section"


def test_module_imports_only_stdlib():
    """levo_infer must stay slim: the lyric module itself imports only the standard library."""
    import ast

    import levo_infer.lyrics as mod

    tree = ast.parse(open(mod.__file__, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)
