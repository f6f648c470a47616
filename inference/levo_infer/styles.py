"""The v2 style tags and the style texts built from them (standard library only).

v2 models know six style tags (the style tokenizer's added tokens, in this order): five musicality
tiers, best first, and ``[Pure-Music]``. The released front end builds the style text a model sees
from a request's ``descriptions`` (:func:`released_style`), and classifier-free guidance runs the
unconditional half with a negative style (:func:`null_styles`).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MUSICALITY_TAGS", "NEGATIVE_STYLE_V2", "PURE_MUSIC", "STYLE_TAGS_V2", "VERY_HIGH", "null_styles",
           "released_style"]

STYLE_TAGS_V2: tuple[str, ...] = (
    "[Musicality-very-high]", "[Musicality-high]", "[Musicality-medium]", "[Musicality-low]",
    "[Musicality-very-low]", "[Pure-Music]",
)
#: the five musicality tier tags of v2 styles, best first (the rest of :data:`STYLE_TAGS_V2` is ``[Pure-Music]``)
MUSICALITY_TAGS: tuple[str, ...] = STYLE_TAGS_V2[:5]
VERY_HIGH = MUSICALITY_TAGS[0]
PURE_MUSIC = STYLE_TAGS_V2[-1]
#: the unconditional style of CFG when the style asks for the top tier
NEGATIVE_STYLE_V2 = f"{MUSICALITY_TAGS[-1]}, ."


def null_styles(styles: Sequence[str | None], version: str) -> list[str | None]:
    """The unconditional style for CFG: v2 uses the negative prompt when the style asks for the
    top musicality tier, otherwise no style at all."""
    if version != "v2":
        return [None] * len(styles)
    return [NEGATIVE_STYLE_V2 if (s is not None and VERY_HIGH in s) else None for s in styles]


def _lower_keep_tags(text: str) -> str:
    """Lower-case ``text`` except the v2 style tags (matched case-insensitively, kept canonical)."""
    out = text.lower()
    for tag in STYLE_TAGS_V2:
        out = out.replace(tag.lower(), tag)
    return out


def released_style(description: str | None, version: str, mode: str = "mixed") -> str | None:
    """The style text the released front end hands to the model for a JSONL ``descriptions``.

    v2: lower-cased, prefixed with ``[Musicality-very-high], `` (``.`` alone when there is no
    description); mode ``bgm`` adds ``[Pure-Music], `` after the tier tag. v1: lower-cased, ``None``
    when absent. Extension: style tags the user wrote are kept in their canonical spelling, and a
    description that already names a musicality tier is not given a second one.
    """
    desc = description.strip() if isinstance(description, str) else None
    if version != "v2":
        return desc.lower() if desc else None
    body = _lower_keep_tags(desc) if desc else "."
    tags: list[str] = []
    if "[Musicality-" not in body:
        tags.append(VERY_HIGH)
    if mode == "bgm" and PURE_MUSIC not in body:
        tags.append(PURE_MUSIC)
    return ", ".join([*tags, body])
