"""Typed model configuration, read from and written to the released ``config.yaml`` layout.

A released SongGeneration ``config.yaml`` uses two OmegaConf resolvers (``eval`` for arithmetic
and ``load_yaml`` for the lyric tag list); both are registered here. The parsed file is kept
(unresolved) in :attr:`ModelConfig.raw` so that :func:`save_config` writes the same layout back,
with our own settings under a ``levo:`` section that the released code ignores.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import logging
import math
import operator
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.basecontainer import BaseContainer
from omegaconf.errors import GrammarParseError
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse as parse_interpolation

from .errors import LevoInferError
from .jsonio import write_text_atomic
from .lyrics import STRUCTURE_TAGS
from .styles import STYLE_TAGS_V2
from .tokenizer import CONTROL_TOKENS, QWEN2_BASE_VOCAB, TextTokenizer, build_text_tokenizer
from .tokens import CODE_SIZE, FRAME_RATE, STREAMS, eos_id, pad_id

log = logging.getLogger(__name__)

KNOWN_VERSIONS = ("v1", "v2")


class ConfigError(LevoInferError):
    """A model config is malformed or inconsistent; the message names the file and key."""


class ConfigWarning(UserWarning):
    """A model config has an unknown key, or lacks a key whose default changes the model
    (an error under ``strict``)."""


# ----------------------------------------------------------------------------- known keys
#: Keys (dotted) that levo_infer reads or checks.
READ_KEYS: frozenset[str] = frozenset({
    "max_dur", "audio_tokenizer_frame_rate", "sample_rate",
    "lm.lm_type", "lm.dim", "lm.intermediate_size", "lm.num_heads", "lm.num_layers", "lm.num_layers_sub",
    "lm.code_depth", "lm.code_size", "lm.max_position_embeddings", "lm.max_position_embeddings_sub",
    "lm.rope_theta", "lm.rope_theta_sub", "lm.dropout", "lm.attention_dropout", "lm.use_flash_attn_2",
    "codebooks_pattern.modeling", "codebooks_pattern.delay.delays", "codebooks_pattern.delay.flatten_first",
    "codebooks_pattern.delay.empty_initial",
    "classifier_free_guidance.training_dropout", "classifier_free_guidance.inference_coef",
    "attribute_dropout.text.description", "attribute_dropout.text.type_info", "attribute_dropout.audio.prompt_audio",
    "fuser.sum", "fuser.prepend",
    "conditioners.prompt_audio.model", "conditioners.prompt_audio.qt_embedding.code_size",
    "conditioners.prompt_audio.qt_embedding.code_depth", "conditioners.prompt_audio.qt_embedding.max_len",
    "conditioners.description.model", "conditioners.description.QwTokenizer.token_path",
    "conditioners.description.QwTokenizer.max_len", "conditioners.description.QwTokenizer.add_token_list",
    "conditioners.type_info.model", "conditioners.type_info.QwTextTokenizer.max_len",
    "levo.version", "levo.text_words", "levo.tokenizer_path",
})
#: Keys of released ``config.yaml`` files that the LM ignores: legacy audiocraft ``lm.*`` options
#: (the model is fixed: RMSNorm, SwiGLU, RoPE, no biases), codec/VAE paths, training-data options,
#: and ``prompt_len`` (used only through interpolations). Accepted silently, never read.
RELEASED_IGNORED_KEYS: frozenset[str] = frozenset({
    "lyric_processor", "min_dur", "prompt_len", "pad_to_max", "use_text_training",
    "audio_tokenizer_checkpoint", "audio_tokenizer_code_depth", "audio_tokenizer_checkpoint_sep",
    "audio_tokenizer_frame_rate_sep", "audio_tokenizer_code_depth_sep", "sample_rate_sep", "vae_config", "vae_model",
    "lm.activation", "lm.norm_first", "lm.bias_ff", "lm.bias_attn", "lm.causal", "lm.custom", "lm.memory_efficient",
    "lm.attention_as_float32", "lm.layer_scale", "lm.positional_embedding", "lm.xpos", "lm.checkpointing",
    "lm.weight_init", "lm.depthwise_init", "lm.zero_bias_init", "lm.norm", "lm.cross_attention", "lm.qk_layer_norm",
    "lm.qk_layer_norm_cross", "lm.kv_repeat",
    "attribute_dropout.args.active_on_eval",
    "conditioners.type_info.QwTextTokenizer.token_path",
    "offload",  # runtime layer-offloading settings: any content
})
#: Optional keys whose default changes what the model computes or how it trains/samples: a file
#: without one gets a warning naming the default taken (an error under ``strict``).
MATH_DEFAULTS: dict[str, Any] = {
    "lm.code_depth": len(STREAMS), "lm.code_size": CODE_SIZE,
    "lm.max_position_embeddings": 10000, "lm.max_position_embeddings_sub": 10000,
    "lm.rope_theta": 500000.0, "lm.rope_theta_sub": 500000.0,
    "codebooks_pattern.delay.delays": [0, 250, 250],
    "classifier_free_guidance.training_dropout": 0.15, "classifier_free_guidance.inference_coef": 1.5,
    "attribute_dropout.text.description": 0.0, "attribute_dropout.text.type_info": 0.2,
    "attribute_dropout.audio.prompt_audio": 0.5,
    "conditioners.description.QwTokenizer.add_token_list": list(STRUCTURE_TAGS),
}
PREPEND_ORDER = ["description", "prompt_audio", "type_info"]
CONDITIONER_MODELS = {"prompt_audio": "qt_embedding", "description": "QwTokenizer", "type_info": "QwTextTokenizer"}


def _key_tree(keys: frozenset[str]) -> dict[str, Any]:
    """Nested dict of dotted keys (leaves are None)."""
    tree: dict[str, Any] = {}
    for key in keys:
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(leaf, None)
    return tree


_KNOWN_TREE = _key_tree(READ_KEYS | RELEASED_IGNORED_KEYS)


def unknown_keys(data: Any, tree: dict[str, Any] | None = None, prefix: str = "") -> list[str]:
    """One finding per key or section of ``data`` (a parsed config) that no reader knows, with a
    "did you mean" suggestion when a known sibling is close."""
    tree = _KNOWN_TREE if tree is None else tree
    out: list[str] = []
    if not isinstance(data, dict):
        return out
    for k, v in data.items():
        name = str(k)
        if name not in tree:
            kind = "section" if isinstance(v, dict) else "key"
            close = difflib.get_close_matches(name, list(tree), n=1, cutoff=0.8)
            hint = f" (did you mean `{prefix}{close[0]}`?)" if close else ""
            out.append(f"unknown {kind} `{prefix}{name}`{hint}: levo_infer does not read it")
        elif isinstance(tree[name], dict):
            out += unknown_keys(v, tree[name], f"{prefix}{name}.")
    return out


# ----------------------------------------------------------------------------- resolvers
#: the only resolvers a config file handed to us may call (a model, export, reward or codec
#: folder's ``config.yaml``, a checkpoint's model config), whatever else the process registered
#: (hydra's ``oc.env``, ...): released configs use exactly ``${eval:${prompt_len}*...+2}`` and
#: ``${load_yaml:conf/vocab.yaml}``. Our own hydra training configs keep every resolver.
FILE_RESOLVERS = ("eval", "load_yaml")
#: ``eval`` takes small arithmetic on numbers: expression length, |operand|, |exponent|, |result|
EVAL_MAX_CHARS, EVAL_MAX_OPERAND, EVAL_MAX_EXPONENT, EVAL_MAX_RESULT = 200, 10**9, 64, 10**15
_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def _safe_eval(expr: Any) -> int | float:
    """The ``eval`` resolver: small arithmetic on numbers only (``+ - * / // % **``, bounded
    operands, exponents and results, checked before each operation runs: ``9**9**9`` is refused at
    once instead of hanging); never runs code."""
    text = str(expr)
    if len(text) > EVAL_MAX_CHARS:
        raise ConfigError(f"`eval` expression of {len(text)} characters (at most {EVAL_MAX_CHARS})")

    def bounded(v: Any, what: str, limit: float) -> int | float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > limit:
            raise ConfigError(f"`eval` {what} {v!r} is out of range (|x| <= {limit:g}) in {text!r}")
        return v

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return bounded(node.value, "operand", EVAL_MAX_OPERAND)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow):
                bounded(b, "exponent", EVAL_MAX_EXPONENT)
                if a == 0 and b < 0:
                    raise ConfigError(f"`eval`: 0 to a negative power in {text!r}")
                if abs(a) > 1 and b * math.log10(abs(a)) > math.log10(EVAL_MAX_RESULT):
                    raise ConfigError(f"`eval` result {a!r}**{b!r} is out of range (|x| <= {EVAL_MAX_RESULT:g}) "
                                      f"in {text!r}")
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
                raise ConfigError(f"`eval`: division by zero in {text!r}")
            return bounded(_OPS[type(node.op)](a, b), "result", EVAL_MAX_RESULT)
        raise ConfigError(f"`eval` takes only arithmetic on numbers, got {text!r}")

    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ConfigError(f"`eval` takes only arithmetic on numbers, got {text!r}") from None
    return ev(tree)


#: the one ``load_yaml`` path that names the bundled lyric tag list (the released code root's file)
BUNDLED_VOCAB = "conf/vocab.yaml"


def _load_yaml(folder: Path | None, rel: Any) -> Any:
    """The ``load_yaml`` resolver of a config in ``folder``: a relative path that stays inside the
    folder (read as plain YAML; no interpolations inside), else, for ``conf/vocab.yaml`` (the
    released configs' path, relative to the released code root), the bundled lyric tag list."""
    r = str(rel)
    parts = PurePosixPath(r).parts
    if not r or PurePosixPath(r).is_absolute() or ".." in parts or "\\" in r:
        raise ConfigError(f"`load_yaml` takes a path relative to the config's folder that stays inside it, got {r!r}")
    if folder is not None:
        cand = folder / r
        if cand.is_file():
            if not cand.resolve().is_relative_to(folder.resolve()):
                raise ConfigError(f"`load_yaml:{r}` leaves the config's folder (a link to {cand.resolve()})")
            try:
                data = OmegaConf.to_container(OmegaConf.load(cand), resolve=False)
            except Exception as e:  # noqa: BLE001 - YAML syntax, unreadable file
                raise ConfigError(f"`load_yaml:{r}`: {cand} cannot be read ({type(e).__name__}: {e})") from None
            if "${" in str(data):
                raise ConfigError(f"`load_yaml:{r}`: {cand} holds interpolations; a loaded file must be plain data")
            return data
    if PurePosixPath(r).as_posix().removeprefix("./") == BUNDLED_VOCAB:
        log.info("load_yaml:%s is not in the config's folder; using the bundled (released) lyric tag list", r)
        return list(STRUCTURE_TAGS)
    raise ConfigError(f"`load_yaml:{r}`: no such file in {folder if folder is not None else 'the config'} (only "
                      f"files inside the config's folder, or {BUNDLED_VOCAB} for the lyric tag list)")


def _resolver_calls(value: str, where: str, key: str) -> list[str]:
    """The resolver names an OmegaConf string calls (OmegaConf's own grammar; nested calls too)."""
    try:
        tree = parse_interpolation(value)
    except GrammarParseError as e:
        raise ConfigError(f"{where}: `{key}` = {value!r} is not a valid interpolation ({e})") from None
    names: list[str] = []
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            rn = node.resolverName()
            if any(isinstance(c, OmegaConfGrammarParser.InterpolationContext) for c in rn.children or []):
                raise ConfigError(f"{where}: `{key}` = {value!r}: a resolver named by an interpolation is refused")
            names.append(rn.getText())
        stack.extend(getattr(node, "children", None) or [])
    return names


def _interpolated_leaves(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, string)`` of every leaf string of a plain container that holds ``${``."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    out: list[tuple[str, str]] = []
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            out += _interpolated_leaves(v, key + ".")
        elif isinstance(v, str) and "${" in v:
            out.append((key, v))
    return out


_RESOLVE_LOCK = threading.Lock()


@contextlib.contextmanager
def _only_file_resolvers(folder: Path | None) -> Iterator[None]:
    """OmegaConf's resolver table holds exactly :data:`FILE_RESOLVERS` (ours) meanwhile."""
    with _RESOLVE_LOCK:
        saved = BaseContainer._resolvers
        BaseContainer._resolvers = {}
        try:
            OmegaConf.register_new_resolver("eval", _safe_eval)
            OmegaConf.register_new_resolver("load_yaml", lambda rel: _load_yaml(folder, rel))
            yield
        finally:
            BaseContainer._resolvers = saved


def resolve_file_config(data: Any, *, where: str, folder: Path | None) -> DictConfig:
    """A config handed to us (a file's parsed content, a checkpoint's model config: dict or
    DictConfig) with every interpolation resolved, through :data:`FILE_RESOLVERS` only: ``eval``
    bounded (:func:`_safe_eval`), ``load_yaml`` inside ``folder`` (:func:`_load_yaml`); any other
    resolver (``oc.env``, ...) is refused before anything resolves. Errors name ``where`` and the key."""
    cfg = data if isinstance(data, DictConfig) else OmegaConf.create(data)
    leaves = _interpolated_leaves(OmegaConf.to_container(cfg, resolve=False))
    for key, value in leaves:
        refused = [n for n in _resolver_calls(value, where, key) if n not in FILE_RESOLVERS]
        if refused:
            raise ConfigError(f"{where}: `{key}` = {value!r} calls the resolver `{refused[0]}`; a config file may only "
                              f"use {' and '.join(FILE_RESOLVERS)}")
    with _only_file_resolvers(folder):
        for key, value in leaves:
            try:
                OmegaConf.select(cfg, key, throw_on_missing=True)
            except ConfigError as e:
                raise ConfigError(f"{where}: `{key}` = {value!r}: {e}") from None
            except Exception as e:  # noqa: BLE001 - a missing key, a resolver's error wrapped by OmegaConf
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"{where}: `{key}` = {value!r} cannot be resolved: "
                                  f"{msg.split(' raised while resolving interpolation: ')[-1]}") from None
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if not isinstance(resolved, DictConfig):
        raise ConfigError(f"{where}: expected a mapping of sections (lm:, conditioners:, ...), got a list")
    return resolved


# ----------------------------------------------------------------------------- dataclasses
@dataclass
class LMConfig:
    """Sizes of the two Llama-style stacks (``lm:`` in the released file)."""

    dim: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    num_layers_sub: int
    code_depth: int = len(STREAMS)
    code_size: int = CODE_SIZE
    max_position_embeddings: int = 10000
    max_position_embeddings_sub: int = 10000
    rope_theta: float = 500000.0
    rope_theta_sub: float = 500000.0
    use_flash_attn_2: bool = False
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def eos_id(self) -> int:
        """The end-of-song code (:func:`levo_infer.tokens.eos_id`)."""
        return eos_id(self.code_size)

    @property
    def pad_id(self) -> int:
        """The special/pad code, never predicted (:func:`levo_infer.tokens.pad_id`)."""
        return pad_id(self.code_size)


@dataclass
class ModelConfig:
    """Everything that fixes LeLM's parameters and conditioning.

    ``text_words`` selects a small word-level text vocabulary (tiny/toy models); ``None`` means
    the Qwen2 tokenizer (``tokenizer_path`` folder, or rebuilt offline when absent).
    """

    lm: LMConfig
    delays: list[int] = field(default_factory=lambda: [0, 250, 250])
    version: str = "v2"
    lyric_max_len: int = 600
    style_max_len: int = 100
    prompt_max_len: int = 252
    frame_rate: int = FRAME_RATE
    sample_rate: int = 48000
    max_dur: int = 270
    cfg_dropout: float = 0.15
    cfg_coef: float = 1.5
    attribute_dropout: dict[str, float] = field(
        default_factory=lambda: {"description": 0.0, "type_info": 0.2, "prompt_audio": 0.5}
    )
    lyric_tags: list[str] = field(default_factory=lambda: list(STRUCTURE_TAGS))
    text_words: list[str] | None = None
    tokenizer_path: str | None = None
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    base_dir: str | None = field(default=None, repr=False, compare=False)  # folder the file was read from

    def resolve_tokenizer_path(self) -> str | None:
        """The Qwen2 tokenizer folder, searched relative to the config's folder and its parents
        (released paths are relative to the code root); None -> offline build."""
        tp = self.tokenizer_path
        if tp is None or self.text_words is not None:
            return None
        p = Path(tp)
        if p.is_absolute():
            return str(p) if p.is_dir() else None
        bases = [Path(self.base_dir)] if self.base_dir else []
        bases += [b for base in list(bases) for b in list(base.parents)[:3]] + [Path.cwd()]
        for b in bases:
            if (b / p).is_dir():
                return str(b / p)
        log.info("tokenizer folder %s not found; building the Qwen2 tokenizer offline", tp)
        return None

    def text_table_sizes(self) -> tuple[int, int, int]:
        """Rows of the lyric table, the style table, and the pad id of both: the tokenizers' id layout
        (base vocabulary, the control tokens, then the added tags: :class:`~levo_infer.tokenizer.TextTokenizer`)."""
        base = len(self.text_words) if self.text_words is not None else QWEN2_BASE_VOCAB
        style_tags = STYLE_TAGS_V2 if self.version == "v2" else ()
        return base + len(CONTROL_TOKENS) + len(self.lyric_tags), base + len(CONTROL_TOKENS) + len(style_tags), base

    def text_tokenizers(self) -> tuple[TextTokenizer, TextTokenizer]:
        """The (lyric, style) tokenizers this config names (Qwen2 from ``tokenizer_path`` or rebuilt
        offline, or the word-level ``text_words``), checked against the model's text tables."""
        kw = {"version": self.version, "token_path": self.resolve_tokenizer_path(), "words": self.text_words}
        lyr, sty = build_text_tokenizer("lyrics", **kw), build_text_tokenizer("style", **kw)
        want_l, want_s, _ = self.text_table_sizes()
        if (lyr.vocab_size, sty.vocab_size) != (want_l, want_s):
            raise ConfigError(f"tokenizer vocab sizes {(lyr.vocab_size, sty.vocab_size)} do not match the "
                              f"model's text tables {(want_l, want_s)}")
        return lyr, sty

    @property
    def prompt_frames(self) -> int:
        """Audio-prompt frames the conditioner keeps (max_len minus the EOS and EOT slots)."""
        return self.prompt_max_len - 2

    @property
    def prefix_len(self) -> int:
        return self.lyric_max_len + self.prompt_max_len + self.style_max_len

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def max_positions(self) -> tuple[str, int]:
        """The tighter of the two stacks' position limits, as (config key, value)."""
        lm = self.lm
        if lm.max_position_embeddings_sub < lm.max_position_embeddings:
            return "lm.max_position_embeddings_sub", lm.max_position_embeddings_sub
        return "lm.max_position_embeddings", lm.max_position_embeddings

    @property
    def max_frames(self) -> int:
        """Most frames a forward or a generation can hold: positions count from the start of the
        prefix, and T frames take ``prefix_len + T + max_delay`` of them."""
        return self.max_positions[1] - self.prefix_len - self.max_delay

    def validate(self, where: str = "config") -> None:
        lm = self.lm
        if self.version not in KNOWN_VERSIONS:
            raise ConfigError(f"{where}: unknown model version {self.version!r}; expected one of {KNOWN_VERSIONS}")
        if lm.dim % lm.num_heads:
            raise ConfigError(f"{where}: lm.dim={lm.dim} is not divisible by lm.num_heads={lm.num_heads}")
        if lm.head_dim % 2:
            raise ConfigError(f"{where}: head dim {lm.head_dim} must be even for RoPE")
        if len(self.delays) != lm.code_depth:
            raise ConfigError(
                f"{where}: codebooks_pattern.delay.delays has {len(self.delays)} entries, lm.code_depth={lm.code_depth}"
            )
        if min(self.delays) < 0:
            raise ConfigError(f"{where}: codebooks_pattern.delay.delays = {self.delays}; expected delays >= 0")
        if self.max_frames < 1:
            key, limit = self.max_positions
            raise ConfigError(
                f"{where}: {key}={limit} leaves no frame: the conditioning prefix ({self.prefix_len} positions) and "
                f"the delay tail ({self.max_delay}) take them all; expected more than {self.prefix_len + self.max_delay}"
            )
        if self.prompt_max_len < 2:
            raise ConfigError(f"{where}: conditioners.prompt_audio max_len must be >= 2, got {self.prompt_max_len}")
        for k in ("description", "type_info", "prompt_audio"):
            if k not in self.attribute_dropout:
                raise ConfigError(f"{where}: attribute_dropout lacks {k!r}")

    def to_dict(self) -> dict[str, Any]:
        """Released-layout dict (unresolved interpolations kept) with our fields synced in."""
        return _to_released_layout(self)


# ----------------------------------------------------------------------------- reading
def _version_from_folder(folder: Path) -> str:
    """Upstream's rule: ``songgeneration_base*`` and ``songgeneration_large`` are v1, else v2."""
    name = folder.name
    if name.startswith("songgeneration_base") or name == "songgeneration_large":
        return "v1"
    return "v2"


_MISSING = object()


def _get(cfg: Any, dotted: str, where: str, default: Any = _MISSING) -> Any:
    """The value at ``dotted`` (a missing key: ``default``, or an error naming it when none is given)."""
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            if default is _MISSING:
                raise ConfigError(f"{where}: missing key `{dotted}`")
            return default
    return node


def _has(cfg: Any, dotted: str) -> bool:
    """Whether the key is present (a present ``null`` counts)."""
    node: Any = cfg
    for part in dotted.split("."):
        if not (isinstance(node, DictConfig) and part in node):
            return False
        node = node[part]
    return True


def _read(cfg: Any, dotted: str, where: str, conv: type, default: Any = _MISSING) -> Any:
    """The value at ``dotted`` converted by ``conv`` (int or float); a missing key gives ``default``
    (or an error without one), a value of the wrong type an error naming the key."""
    if default is not _MISSING and not _has(cfg, dotted):
        return default
    value = _get(cfg, dotted, where)
    try:
        if value is None or isinstance(value, (bool, DictConfig, ListConfig)):
            raise TypeError(type(value).__name__)
        return conv(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: `{dotted}` = {_plain(value)!r}; expected {'an' if conv is int else 'a'} "
                          f"{conv.__name__}") from e


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _check_contradictions(cfg: DictConfig, lm: LMConfig, where: str) -> None:
    """Settings we cannot honour (they ask for a different model) are errors whatever ``strict`` says."""

    def expect(key: str, ok: Any, expected: str) -> None:
        if not _has(cfg, key):
            return
        value = _plain(_get(cfg, key, where))
        if not ok(value):
            raise ConfigError(f"{where}: `{key}` = {value!r}; expected {expected}")

    def zero(v: Any) -> bool:
        return v is None or (not isinstance(v, bool) and isinstance(v, (int, float)) and v == 0)

    expect("lm.lm_type", lambda v: v == "Llama", "'Llama' (the only LM the released code and levo_infer build)")
    for key in ("lm.dropout", "lm.attention_dropout"):
        expect(key, zero, "0 (the released LeLM and levo_infer apply no dropout)")
    expect("codebooks_pattern.modeling", lambda v: v == "delay", "'delay' (the only codebook pattern supported)")
    for key in ("codebooks_pattern.delay.flatten_first", "codebooks_pattern.delay.empty_initial"):
        expect(key, zero, "0 (as released; other values change the delay pattern, which is not supported)")
    expect("fuser.prepend", lambda v: v == PREPEND_ORDER,
           f"{PREPEND_ORDER} (the released prefix order [lyrics | audio prompt | style])")
    expect("fuser.sum", lambda v: v in (None, []), "[] (all conditions are prepended)")
    for name, model in CONDITIONER_MODELS.items():
        expect(f"conditioners.{name}.model", lambda v, m=model: v == m, repr(model))
    q = "conditioners.prompt_audio.qt_embedding"
    expect(f"{q}.code_size", lambda v: v == lm.code_size, f"lm.code_size = {lm.code_size} (the prompt tables have "
           "code_size + 2 rows, as the LM's input tables)")
    expect(f"{q}.code_depth", lambda v: v == lm.code_depth, f"lm.code_depth = {lm.code_depth}")
    expect("conditioners.description.QwTokenizer.add_token_list", lambda v: v == list(STRUCTURE_TAGS),
           f"the 13 released structure tags in their released order {list(STRUCTURE_TAGS)}")


def _report(findings: list[str], where: str, strict: bool) -> None:
    """Unknown and defaulted keys: warnings, or one error listing them all under ``strict``."""
    if not findings:
        return
    if strict:
        raise ConfigError(f"{where}: strict config check failed: " + "; ".join(findings)
                          + " (fix the file, or load without strict to accept it with warnings)")
    for f in findings:
        warnings.warn(f"{where}: {f}", ConfigWarning, stacklevel=4)  # the load_config caller


def config_from_omegaconf(cfg: DictConfig, *, where: str = "config", folder: Path | None = None,
                          strict: bool = False) -> ModelConfig:
    """Build a :class:`ModelConfig` from a parsed (resolved) released-layout config.

    Unknown keys and missing keys that change the model (:data:`MATH_DEFAULTS`) are reported
    (:class:`ConfigWarning`; :class:`ConfigError` under ``strict``); contradictions always fail.
    Interpolations are resolved here, through :func:`resolve_file_config` only (``folder``: where
    ``load_yaml`` may read).
    """
    source = cfg
    cfg = resolve_file_config(cfg, where=where, folder=folder)
    findings = unknown_keys(OmegaConf.to_container(cfg, resolve=False))
    findings += [f"`{key}` is missing: the default {default} is used (another value gives a different model with "
                 "the same shapes: write it into the file)" for key, default in MATH_DEFAULTS.items()
                 if not _has(cfg, key)]
    _report(findings, where, strict)
    d = MATH_DEFAULTS
    lm = LMConfig(
        dim=_read(cfg, "lm.dim", where, int),
        intermediate_size=_read(cfg, "lm.intermediate_size", where, int),
        num_heads=_read(cfg, "lm.num_heads", where, int),
        num_layers=_read(cfg, "lm.num_layers", where, int),
        num_layers_sub=_read(cfg, "lm.num_layers_sub", where, int),
        code_depth=_read(cfg, "lm.code_depth", where, int, d["lm.code_depth"]),
        code_size=_read(cfg, "lm.code_size", where, int, d["lm.code_size"]),
        max_position_embeddings=_read(cfg, "lm.max_position_embeddings", where, int, d["lm.max_position_embeddings"]),
        max_position_embeddings_sub=_read(cfg, "lm.max_position_embeddings_sub", where, int,
                                          d["lm.max_position_embeddings_sub"]),
        rope_theta=_read(cfg, "lm.rope_theta", where, float, d["lm.rope_theta"]),
        rope_theta_sub=_read(cfg, "lm.rope_theta_sub", where, float, d["lm.rope_theta_sub"]),
        use_flash_attn_2=bool(_get(cfg, "lm.use_flash_attn_2", where, False)),
    )
    _check_contradictions(cfg, lm, where)
    levo = _get(cfg, "levo", where, None)
    version = None
    if levo is not None and levo.get("version") is not None:
        version = str(levo.get("version"))
    if version is None:
        version = _version_from_folder(folder) if folder is not None else "v2"
    tags = _get(cfg, "conditioners.description.QwTokenizer.add_token_list", where, None)
    words = levo.get("text_words") if levo is not None else None
    tok_path = levo.get("tokenizer_path") if levo is not None else None
    if tok_path is None and words is None:
        tok_path = _get(cfg, "conditioners.description.QwTokenizer.token_path", where, None)
    attr_d = {name: _read(cfg, f"attribute_dropout.{group}.{name}", where, float, d[f"attribute_dropout.{group}.{name}"])
              for group, name in (("text", "description"), ("text", "type_info"), ("audio", "prompt_audio"))}
    delays = _plain(_get(cfg, "codebooks_pattern.delay.delays", where, d["codebooks_pattern.delay.delays"]))
    if not isinstance(delays, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in delays):
        raise ConfigError(f"{where}: `codebooks_pattern.delay.delays` = {delays!r}; expected a list of integers")
    mc = ModelConfig(
        lm=lm,
        delays=list(delays),
        version=version,
        lyric_max_len=_read(cfg, "conditioners.description.QwTokenizer.max_len", where, int),
        style_max_len=_read(cfg, "conditioners.type_info.QwTextTokenizer.max_len", where, int),
        prompt_max_len=_read(cfg, "conditioners.prompt_audio.qt_embedding.max_len", where, int),
        frame_rate=_read(cfg, "audio_tokenizer_frame_rate", where, int, FRAME_RATE),
        sample_rate=_read(cfg, "sample_rate", where, int, 48000),
        max_dur=_read(cfg, "max_dur", where, int, 270),
        cfg_dropout=_read(cfg, "classifier_free_guidance.training_dropout", where, float,
                          d["classifier_free_guidance.training_dropout"]),
        cfg_coef=_read(cfg, "classifier_free_guidance.inference_coef", where, float,
                       d["classifier_free_guidance.inference_coef"]),
        attribute_dropout=attr_d,
        lyric_tags=[str(t) for t in tags] if tags is not None else list(STRUCTURE_TAGS),
        text_words=[str(w) for w in words] if words is not None else None,
        tokenizer_path=str(tok_path) if tok_path is not None else None,
        raw=OmegaConf.to_container(source, resolve=False) if isinstance(source, DictConfig) else copy.deepcopy(source),
    )
    mc.validate(where)
    return mc


def load_config(path: str | os.PathLike, *, strict: bool = False) -> ModelConfig:
    """Read a released (or our) ``config.yaml``; ``path`` may be the file or its folder.

    Unknown keys or sections (other than the released ones we know to ignore) and missing keys
    whose default changes the model warn (:class:`ConfigWarning`, naming the file and the dotted
    key); ``strict=True`` turns them into a :class:`ConfigError`. Contradictions (a setting the
    model cannot honour) are always a :class:`ConfigError`.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.yaml"
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        cfg = OmegaConf.load(p)  # PyYAML's safe loader: no python/object tags
    except Exception as e:  # noqa: BLE001 - YAML syntax, unreadable file
        raise ConfigError(f"{p}: cannot parse config: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{p}: expected a mapping of sections (lm:, conditioners:, ...), got a list")
    mc = config_from_omegaconf(cfg, where=str(p), folder=p.parent, strict=strict)
    mc.raw = OmegaConf.to_container(cfg, resolve=False)  # keep interpolations for write-back
    mc.base_dir = str(p.parent.resolve())
    return mc


# ----------------------------------------------------------------------------- writing
def _released_template() -> dict[str, Any]:
    """Skeleton of the released layout for configs made from scratch (tiny models)."""
    return {
        "max_dur": 270,
        "min_dur": 30,
        "prompt_len": 10,
        "pad_to_max": True,
        "audio_tokenizer_frame_rate": FRAME_RATE,
        "audio_tokenizer_code_depth": 1,
        "sample_rate": 48000,
        "lm": {"lm_type": "Llama"},
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": [0, 250, 250], "flatten_first": 0, "empty_initial": 0}},
        "classifier_free_guidance": {"training_dropout": 0.15, "inference_coef": 1.5},
        "attribute_dropout": {
            "args": {"active_on_eval": False},
            "text": {"description": 0.0, "type_info": 0.2},
            "audio": {"prompt_audio": 0.5},
        },
        "use_text_training": True,
        "fuser": {"sum": [], "prepend": ["description", "prompt_audio", "type_info"]},
        "conditioners": {
            "prompt_audio": {"model": "qt_embedding", "qt_embedding": {"code_size": CODE_SIZE, "code_depth": len(STREAMS), "max_len": 252}},
            "description": {"model": "QwTokenizer", "QwTokenizer": {"token_path": None, "max_len": 600, "add_token_list": list(STRUCTURE_TAGS)}},
            "type_info": {"model": "QwTextTokenizer", "QwTextTokenizer": {"token_path": None, "max_len": 100}},
        },
    }


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _peek(d: dict[str, Any], dotted: str) -> Any:
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _sync(d: dict[str, Any], dotted: str, value: Any, resolved: Any) -> None:
    """Write ``value`` unless the raw entry is an interpolation that already resolves to it."""
    cur = _peek(d, dotted)
    if isinstance(cur, str) and "${" in cur and resolved == value:
        return
    _set(d, dotted, value)


def _to_released_layout(mc: ModelConfig) -> dict[str, Any]:
    d = copy.deepcopy(mc.raw) if mc.raw is not None else _released_template()
    resolved: dict[str, Any] = {}
    if mc.raw is not None:
        try:
            folder = Path(mc.base_dir) if mc.base_dir else None
            resolved = OmegaConf.to_container(resolve_file_config(d, where="config", folder=folder))  # type: ignore[assignment]
        except ConfigError:
            resolved = {}
    lm = mc.lm
    for key in ("dim", "intermediate_size", "num_heads", "num_layers", "num_layers_sub", "code_depth",
                "code_size", "max_position_embeddings", "max_position_embeddings_sub", "rope_theta",
                "rope_theta_sub", "use_flash_attn_2"):
        _set(d, f"lm.{key}", getattr(lm, key))
    _set(d, "codebooks_pattern.delay.delays", list(mc.delays))
    _sync(d, "conditioners.prompt_audio.qt_embedding.max_len", mc.prompt_max_len,
          _peek(resolved, "conditioners.prompt_audio.qt_embedding.max_len"))
    _set(d, "conditioners.prompt_audio.qt_embedding.code_size", lm.code_size)
    _set(d, "conditioners.prompt_audio.qt_embedding.code_depth", lm.code_depth)
    _set(d, "conditioners.description.QwTokenizer.max_len", mc.lyric_max_len)
    _sync(d, "conditioners.description.QwTokenizer.add_token_list", list(mc.lyric_tags),
          _peek(resolved, "conditioners.description.QwTokenizer.add_token_list"))
    _set(d, "conditioners.type_info.QwTextTokenizer.max_len", mc.style_max_len)
    _sync(d, "audio_tokenizer_frame_rate", mc.frame_rate, _peek(resolved, "audio_tokenizer_frame_rate"))
    _set(d, "sample_rate", mc.sample_rate)
    _set(d, "max_dur", mc.max_dur)
    _set(d, "classifier_free_guidance.training_dropout", mc.cfg_dropout)
    _set(d, "classifier_free_guidance.inference_coef", mc.cfg_coef)
    _set(d, "attribute_dropout.text.description", mc.attribute_dropout["description"])
    _set(d, "attribute_dropout.text.type_info", mc.attribute_dropout["type_info"])
    _set(d, "attribute_dropout.audio.prompt_audio", mc.attribute_dropout["prompt_audio"])
    _set(d, "levo", {
        "version": mc.version,
        "text_words": list(mc.text_words) if mc.text_words is not None else None,
        "tokenizer_path": mc.tokenizer_path,
    })
    return d


def save_config(mc: ModelConfig, path: str | os.PathLike) -> Path:
    """Write ``config.yaml`` (released layout) atomically; ``path`` may be a folder."""
    p = Path(path)
    if p.is_dir() or p.suffix == "":
        p.mkdir(parents=True, exist_ok=True)
        p = p / "config.yaml"
    write_text_atomic(p, OmegaConf.to_yaml(OmegaConf.create(mc.to_dict())))
    return p


def config_differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Every compared leaf field where two configs (nested dataclasses) differ, as
    ``(dotted name, a's value, b's value)``."""
    if is_dataclass(a) and is_dataclass(b):
        out: list[tuple[str, Any, Any]] = []
        for f in fields(a):
            if f.compare:
                out += config_differences(getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}.")
        return out
    return [] if a == b else [(prefix[:-1], a, b)]


def make_config(
    *,
    dim: int,
    num_heads: int,
    num_layers: int,
    num_layers_sub: int,
    intermediate_size: int | None = None,
    code_size: int = CODE_SIZE,
    delays: list[int] | None = None,
    lyric_max_len: int = 600,
    style_max_len: int = 100,
    prompt_frames: int = 250,
    text_words: list[str] | None = None,
    version: str = "v2",
    rope_theta: float = 500000.0,
    **extra: Any,
) -> ModelConfig:
    """A config made from scratch (tiny test and toy models), in the released layout."""
    lm = LMConfig(
        dim=dim,
        intermediate_size=intermediate_size or 4 * dim,
        num_heads=num_heads,
        num_layers=num_layers,
        num_layers_sub=num_layers_sub,
        code_size=code_size,
        rope_theta=rope_theta,
        rope_theta_sub=rope_theta,
    )
    mc = ModelConfig(
        lm=lm,
        delays=list(delays) if delays is not None else [0, 250, 250],
        version=version,
        lyric_max_len=lyric_max_len,
        style_max_len=style_max_len,
        prompt_max_len=prompt_frames + 2,
        text_words=list(text_words) if text_words is not None else None,
        **extra,
    )
    mc.validate("make_config")
    return mc
