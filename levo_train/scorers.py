"""Scorers beyond the built-in ones: weighted combinations, an audio-domain adapter, and one
spec string (``--scorer``) for every scorer the offline pipeline can use.

* :class:`WeightedScorer` — a weighted sum of several scorers' overall scores, or of one scorer's
  dimensions. Its dimensions are the union of its parts' outputs (each part's dimensions and its
  overall key); a name two parts share is prefixed by the part's label (``rm.overall``,
  ``toy.overall``), names only one part has are kept as they are.
* :class:`AudioScorer` — decodes each song's tokens with a codec and calls a user function on the
  waveform: how a lab plugs SongEval- or audiobox-aesthetics-style scorers in. Codec surface:
  ``codec.decode(tokens [B, 3, T] LongTensor, mode=...) -> (waveform [B, 2, N] float32, sample_rate)``
  (what ``levo_infer.codec.Decoder.decode`` implements). Function surface:
  ``fn(waveform: np.ndarray [2, N] float32, sample_rate: int, song: Song) -> {dimension: score}``.
* :func:`load_scorer` — ``toy`` | ``toy:SEED`` | ``rm:EXPORT_DIR`` | ``audio:MODULE:FUNCTION`` |
  ``callable:MODULE:FUNCTION`` | ``weighted:SPEC=W,SPEC=W,...`` | ``weighted:FILE.json``.
* :func:`load_audio_fn` — the one loader of audio scorer functions (``AudioScorer``, ``audio:``
  specs, ``levo-eval audio-score``): ``fn(waveform, sample_rate)`` works as well as
  ``fn(waveform, sample_rate, song)``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levo_infer.codec import CodecError, load_decoder, song_groups
from levo_train.data.shards import Song
from levo_train.reward.model import RewardScorer
from levo_train.rollout import Scorer, check_scores
from levo_train.toy.scorer import ToyOracleScorer

SPEC_FORMS = (
    "toy (the toy world's hidden oracle, world seed 0)",
    "toy:SEED (the toy oracle of world SEED)",
    "rm:EXPORT_DIR (a trained reward model export)",
    "audio:MODULE:FUNCTION (decode with a codec, score the waveform; needs --codec CODEC_DIR or MODULE:FACTORY)",
    "callable:MODULE:FUNCTION (a factory returning a Scorer)",
    "weighted:SPEC=W,SPEC=W,... (weighted sum of the scorers' overall scores)",
    "weighted:FILE.json (weights per scorer or per dimension, see levo_train.scorers.weighted_from_json)",
)


# ----------------------------------------------------------------------------- callables
def load_callable(spec: str, *, setting: str = "callable") -> Callable[..., Any]:
    """The object named by ``"module:function"`` (``function`` may be dotted, ``Class.method``).
    Errors (ValueError) name ``setting``, the module or attribute, and what was expected."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{setting} {spec!r}: expected MODULE:FUNCTION (e.g. my_lab.scoring:songeval)")
    mod_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"{setting} {spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e}); "
                         "is it installed or on PYTHONPATH?") from e
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = ".".join([mod_name, *attr.split(".")[:i]])
            raise ValueError(f"{setting} {spec!r}: {where} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{setting} {spec!r}: {mod_name}.{attr} is a {type(obj).__name__}, not callable")
    return obj


def load_audio_fn(fn: Callable[..., Any] | str, *, setting: str = "audio scorer function") -> Callable[..., Any]:
    """An audio scorer function (a callable, or ``"module:function"`` through :func:`load_callable`)
    as ``f(waveform [C, N], sample_rate, song=None, **context)``. The function may take
    ``(waveform, sample_rate)`` or ``(waveform, sample_rate, song)``: ``song`` (a :class:`Song`;
    None where there is none, as in ``levo-eval audio-score``) goes only to functions with a third
    positional parameter, each ``context`` keyword only to functions declaring it (or ``**kwargs``).
    The one loader of :class:`AudioScorer`, ``audio:`` specs and ``levo-eval audio-score``."""
    f = load_callable(fn, setting=setting) if isinstance(fn, str) else fn
    if not callable(f):
        raise ValueError(f"{setting}: {f!r} is not callable")
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):  # no signature (some builtins): the AudioScorer call
        return lambda waveform, sample_rate, song=None, **context: f(waveform, sample_rate, song)
    P = inspect.Parameter
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    takes_song = len(positional) >= 3 or any(p.kind is P.VAR_POSITIONAL for p in params)
    used = {p.name for p in positional[:3 if takes_song else 2]}
    any_kw = any(p.kind is P.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)} - used

    def call(waveform: Any, sample_rate: int, song: Any = None, **context: Any) -> Any:
        kw = {k: v for k, v in context.items() if any_kw or k in named}
        return f(waveform, sample_rate, song, **kw) if takes_song else f(waveform, sample_rate, **kw)

    call.__wrapped__ = f  # type: ignore[attr-defined]
    return call


def _call_factory(factory: Callable[..., Any], **kw: Any) -> Any:
    """Call ``factory`` with those of ``kw`` its signature accepts (all of them for ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**kw)
    return factory(**{k: v for k, v in kw.items() if k in params})


def check_scorer(obj: Any, what: str) -> Scorer:
    """``obj`` if it has the :class:`~levo_train.rollout.Scorer` surface, else a ValueError naming ``what``."""
    missing = [a for a in ("name", "overall", "dimensions", "score") if not hasattr(obj, a)]
    if missing or not callable(obj.score):
        raise ValueError(f"{what} returned a {type(obj).__name__} without the Scorer surface (missing "
                         f"{', '.join(missing) or 'a callable score'}): expected name, overall, dimensions, "
                         "score(songs) -> list[dict]")
    return obj


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{what} is {value!r}, expected a number")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} is {v}, expected a finite number")
    return v


# ----------------------------------------------------------------------------- weighted
class WeightedScorer:
    """A weighted combination (higher is better; weights may be negative, e.g. to penalise).

    * ``WeightedScorer([(scorer_a, 0.7), (scorer_b, 0.3)])`` (or ``(label, scorer, weight)``
      triples): overall = ``Σ w_i · scorer_i[scorer_i.overall]``.
    * ``WeightedScorer({"lyrics": 0.5, "mix": 0.5}, scorer=s)``: overall = ``Σ w_d · s[d]`` over
      some of one scorer's outputs (its dimensions or its overall key).

    ``dimensions``: every output of every part; a name two parts share is prefixed
    ``{label}.{name}`` (labels default to ``s0``, ``s1``, ...). The overall score is under
    ``overall`` (default ``weighted``), which must not be one of the dimensions.
    """

    def __init__(self, parts: Sequence[tuple[Any, ...]] | Mapping[str, float], *, scorer: Scorer | None = None,
                 overall: str = "weighted", name: str | None = None) -> None:
        self.overall = overall
        if isinstance(parts, Mapping):
            if scorer is None:
                raise ValueError("WeightedScorer over dimensions needs the scorer whose dimensions they are (scorer=)")
            outputs = (*scorer.dimensions, scorer.overall)
            unknown = [d for d in parts if d not in outputs]
            if unknown:
                raise ValueError(f"weights name {unknown}, which scorer {scorer.name!r} does not output "
                                 f"(it has {list(outputs)})")
            self.parts = [("s0", scorer, 1.0)]
            self.dim_weights: dict[str, float] | None = {str(d): float(w) for d, w in parts.items()}
            terms = " + ".join(f"{w:g}*{d}" for d, w in self.dim_weights.items())
        else:
            if scorer is not None:
                raise ValueError("scorer= is for weights over one scorer's dimensions (a dict); a list of "
                                 "(scorer, weight) parts names its scorers itself")
            if not parts:
                raise ValueError("WeightedScorer needs at least one (scorer, weight) part")
            self.parts = []
            for i, p in enumerate(parts):
                label, s, w = (f"s{i}", *p) if len(p) == 2 else p
                self.parts.append((str(label), s, float(w)))
            labels = [lb for lb, _, _ in self.parts]
            if len(set(labels)) != len(labels):
                raise ValueError(f"WeightedScorer labels must differ, got {labels}")
            self.dim_weights = None
            terms = " + ".join(f"{w:g}*{s.name}" for _, s, w in self.parts)
        self.name = name or f"weighted({terms})"
        counts: dict[str, int] = {}
        for _, s, _ in self.parts:
            for d in dict.fromkeys((*s.dimensions, s.overall)):
                counts[d] = counts.get(d, 0) + 1
        #: (label, source name) -> output name
        self._names: dict[tuple[str, str], str] = {}
        for label, s, _ in self.parts:
            for d in dict.fromkeys((*s.dimensions, s.overall)):
                self._names[(label, d)] = f"{label}.{d}" if counts[d] > 1 else d
        self.dimensions: tuple[str, ...] = tuple(self._names.values())
        if overall in self.dimensions:
            raise ValueError(f"WeightedScorer overall key {overall!r} is also a dimension of a part; pass another "
                             "overall= name")

    def score(self, songs: Sequence[Song]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = [{} for _ in songs]
        totals = [0.0] * len(songs)
        for label, s, w in self.parts:
            scores = s.score(songs)
            check_scores(s, scores, len(songs), songs)
            for i, sc in enumerate(scores):
                for d in dict.fromkeys((*s.dimensions, s.overall)):
                    if d not in sc:
                        raise ValueError(f"scorer {s.name!r}: song {songs[i].key!r} has no {d!r} score")
                    out[i][self._names[(label, d)]] = _finite(sc[d], f"scorer {s.name!r} score {d!r}")
                if self.dim_weights is None:
                    totals[i] += w * float(sc[s.overall])
                else:
                    totals[i] += sum(wd * float(sc[d]) for d, wd in self.dim_weights.items())
        for o, t in zip(out, totals):
            o[self.overall] = t
        return out


# ----------------------------------------------------------------------------- audio
class AudioScorer:
    """Scores songs in the audio domain: tokens -> ``codec.decode`` -> ``fn(waveform, sr, song)``.

    ``codec.decode(tokens [B, 3, T] LongTensor, mode=mode)`` must return ``(waveform [B, C, N]
    float, sample_rate)``; songs of equal length are decoded together (``batch_size`` at most).
    ``fn`` (a callable or ``"module:function"``) gets one song's waveform as a float32
    ``np.ndarray [C, N]``, its sample rate and the :class:`Song` (not given to a function of two
    parameters, see :func:`load_audio_fn`), and returns ``{dimension: score}``.
    ``sample_rate``: the rate ``fn`` wants (None: the codec's); a different codec rate is resampled
    with torchaudio, which must then be installed. ``dimensions``: the names ``fn`` must return
    (default: those of its first result). ``overall``: one of them, or a new key holding their mean
    (default ``overall``).
    """

    def __init__(self, codec: Any, fn: Callable[..., Mapping[str, float]] | str, *, mode: str = "mixed",
                 sample_rate: int | None = 48000, dimensions: Sequence[str] | None = None,
                 overall: str = "overall", batch_size: int = 8, name: str | None = None) -> None:
        if not callable(getattr(codec, "decode", None)):
            raise ValueError(f"AudioScorer codec {type(codec).__name__} has no decode(tokens, mode=...) method")
        self.codec = codec
        self.fn_name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        raw = load_callable(fn, setting="audio scorer function") if isinstance(fn, str) else fn
        #: a function marked ``batched = True`` scores a batch: ``fn(waveforms, sample_rate, songs)``
        self.batched = bool(getattr(raw, "batched", False))
        self.fn = raw if self.batched else load_audio_fn(raw)
        self.mode = mode
        self.sample_rate = sample_rate
        self.batch_size = max(1, int(batch_size))
        self.overall = overall
        self._declared = dimensions is not None
        self.dimensions: tuple[str, ...] = tuple(dimensions or ())
        self.name = name or f"audio({self.fn_name})"

    def to(self, device: str | torch.device) -> AudioScorer:
        """Decode on ``device`` (the policy's, in a semi-online round): moves a codec that can move."""
        if callable(getattr(self.codec, "to", None)):
            self.codec.to(device)
        return self

    def _decode_native(self, songs: Sequence[Song]) -> list[tuple[np.ndarray, int]]:
        """The native decoder's ``decode_batch``: songs of one window count together, each with its own
        noise seeded from its key (a song's score does not depend on its batch, rank or rerun)."""
        toks = [torch.as_tensor(np.asarray(s.tokens), dtype=torch.long) for s in songs]
        gens = [torch.Generator().manual_seed(zlib.crc32(s.key.encode())) for s in songs]
        wavs = self.codec.decode_batch(toks, self.mode, generators=gens)
        sr = int(self.codec.sample_rate)
        return self._resampled([w.detach().float().cpu().numpy() for w in wavs], sr)

    def _resampled(self, wavs: list[np.ndarray], sr: int) -> list[tuple[np.ndarray, int]]:
        if self.sample_rate is not None and sr != self.sample_rate:
            try:  # torchaudio: optional, only to resample
                import torchaudio.functional as taf
            except ImportError as e:
                raise ValueError(f"the codec decodes at {sr} Hz but the audio scorer wants {self.sample_rate} Hz "
                                 "and torchaudio (for resampling) is not installed: install it or pass "
                                 "sample_rate=None") from e
            wavs = [taf.resample(torch.from_numpy(w), sr, self.sample_rate).numpy() for w in wavs]
            sr = self.sample_rate
        return [(np.ascontiguousarray(w, dtype=np.float32), sr) for w in wavs]

    def _decode(self, songs: Sequence[Song]) -> list[tuple[np.ndarray, int]]:
        toks = torch.as_tensor(np.stack([s.tokens for s in songs]), dtype=torch.long)
        res = self.codec.decode(toks, mode=self.mode)
        if not (isinstance(res, tuple) and len(res) == 2):
            raise ValueError(f"codec {type(self.codec).__name__}.decode returned {type(res).__name__}, expected "
                             "(waveform [B, C, N], sample_rate)")
        wav, sr = res
        wav = wav.detach().float().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav, np.float32)
        if wav.ndim != 3 or wav.shape[0] != len(songs):
            raise ValueError(f"codec {type(self.codec).__name__}.decode returned a waveform of shape "
                             f"{list(wav.shape)} for {len(songs)} songs, expected [B, C, N]")
        return self._resampled(list(wav), int(sr))

    def score(self, songs: Sequence[Song]) -> list[dict[str, float]]:
        waves: dict[int, tuple[np.ndarray, int]] = {}
        for s in songs:
            if s.frames < 1:
                raise ValueError(f"audio scorer {self.fn_name}: song {s.key!r} has no frames to decode")
        if callable(getattr(self.codec, "decode_batch", None)) and hasattr(self.codec, "sample_rate"):
            for chunk in song_groups([s.frames for s in songs], self.batch_size):
                waves.update(zip(chunk, self._decode_native([songs[i] for i in chunk])))
        else:  # another codec: songs of equal length in one decode(tokens [B, 3, T]) call
            by_len: dict[int, list[int]] = {}
            for i, s in enumerate(songs):
                by_len.setdefault(s.frames, []).append(i)
            for idx in by_len.values():
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start:start + self.batch_size]
                    waves.update(zip(chunk, self._decode([songs[i] for i in chunk])))
        if self.batched:  # fn(waveforms, sample_rate, songs) -> one dict per song
            results = list(self.fn(*([waves[i][0] for i in range(len(songs))], waves[0][1] if songs else 0,
                                     list(songs))))
            if len(results) != len(songs):
                raise ValueError(f"audio scorer {self.fn_name} (batched) returned {len(results)} results for "
                                 f"{len(songs)} songs")
        out = []
        for i, s in enumerate(songs):
            wav, sr = waves[i]
            res = results[i] if self.batched else self.fn(wav, sr, s)
            if not isinstance(res, Mapping) or not res:
                raise ValueError(f"audio scorer {self.fn_name}: song {s.key!r}: returned {type(res).__name__} "
                                 f"{res!r:.80}, expected a non-empty {{dimension: score}} dict")
            if not self.dimensions:
                self.dimensions = tuple(str(k) for k in res if str(k) != self.overall) or (self.overall,)
            missing = [d for d in self.dimensions if d not in res]
            if missing:
                raise ValueError(f"audio scorer {self.fn_name}: song {s.key!r}: no score for {missing} (returned "
                                 f"{sorted(res)}; expected {list(self.dimensions)})")
            sc = {d: _finite(res[d], f"audio scorer {self.fn_name}: song {s.key!r}: score {d!r}")
                  for d in self.dimensions}
            if self.overall not in sc:
                sc[self.overall] = (_finite(res[self.overall], f"audio scorer {self.fn_name}: score {self.overall!r}")
                                    if self.overall in res else float(np.mean(list(sc.values()))))
            out.append(sc)
        return out


# ----------------------------------------------------------------------------- specs
def load_codec_factory(spec: str | None, *, device: str = "cpu", setting: str = "--codec") -> Any:
    """A codec object: the native LeVo decoder of a codec folder (``model_septoken/`` and ``vae/``,
    :func:`levo_infer.codec.load_decoder`), or ``"module:factory"`` (called with ``device=`` when
    it takes it) for another codec with ``decode(tokens [B,3,T], mode=...) -> (waveform, sr)``."""
    if not spec:
        raise ValueError("audio scorers need a codec to decode tokens: pass --codec CODEC_DIR (the released runtime "
                         "folder with model_septoken/ and vae/, decoded by levo_infer.codec) or --codec "
                         "MODULE:FACTORY, a factory returning an object with decode(tokens [B,3,T], mode=...) -> "
                         "(waveform [B,2,N], sample_rate)")
    if Path(spec).is_dir():
        try:
            return load_decoder(spec, device=device)
        except CodecError as e:
            raise ValueError(f"{setting} {spec}: {e}") from None
    codec = _call_factory(load_callable(spec, setting=setting), device=device)
    if not callable(getattr(codec, "decode", None)):
        raise ValueError(f"{setting} {spec!r} returned a {type(codec).__name__} without a decode(tokens, mode=...) "
                         "method")
    return codec


def _split_top(text: str) -> list[str]:
    """Split ``SPEC=W,SPEC=W`` at commas (a spec itself holds no comma; use a json file then)."""
    return [p.strip() for p in text.split(",") if p.strip()]


def weighted_from_json(path: str | os.PathLike, *, setting: str = "--scorer", **kw: Any) -> WeightedScorer:
    """A :class:`WeightedScorer` from a json file: ``{"parts": [{"scorer": SPEC, "weight": W,
    "label": optional}, ...], "overall": optional}`` or ``{"scorer": SPEC, "weights": {dimension:
    W}, "overall": optional}``. ``kw`` go to :func:`load_scorer` for the inner specs."""
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{setting}: cannot read weighted-scorer file {p} ({e})") from e
    overall = cfg.get("overall", "weighted") if isinstance(cfg, dict) else "weighted"
    if isinstance(cfg, dict) and "weights" in cfg and "scorer" in cfg:
        w = cfg["weights"]
        if not isinstance(w, dict) or not w:
            raise ValueError(f"{setting}: {p}: 'weights' must be a non-empty {{dimension: weight}} object")
        inner = load_scorer(str(cfg["scorer"]), setting=f"{setting} ({p} scorer)", **kw)
        return WeightedScorer({str(k): _finite(v, f"{p}: weight of {k!r}") for k, v in w.items()}, scorer=inner,
                              overall=overall)
    parts = cfg.get("parts") if isinstance(cfg, dict) else None
    if not isinstance(parts, list) or not parts:
        raise ValueError(f"{setting}: {p}: expected {{'parts': [{{'scorer': SPEC, 'weight': W}}, ...]}} or "
                         "{'scorer': SPEC, 'weights': {dimension: W}}")
    built = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or "scorer" not in part or "weight" not in part:
            raise ValueError(f"{setting}: {p}: parts[{i}] must be an object with 'scorer' and 'weight', got {part!r}")
        spec = str(part["scorer"])
        built.append((str(part.get("label", _label(spec, i, [b[0] for b in built]))),
                      load_scorer(spec, setting=f"{setting} ({p} parts[{i}])", **kw),
                      _finite(part["weight"], f"{p}: parts[{i}] weight")))
    return WeightedScorer(built, overall=overall)


def _label(spec: str, i: int, taken: Sequence[str]) -> str:
    kind = spec.split(":", 1)[0] or f"s{i}"
    return kind if kind not in taken else f"{kind}{i}"


def load_scorer(spec: str, *, device: str = "cpu", world_seed: int = 0, setting: str = "--scorer",
                codec: Any = None, batch_size: int = 64) -> Scorer:
    """The scorer a spec string names (forms in :data:`SPEC_FORMS`). ``codec``: a codec object or a
    ``"module:factory"`` spec for ``audio:`` scorers. Errors (ValueError) name ``setting``."""
    spec = spec.strip() if isinstance(spec, str) else spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{setting}: empty scorer spec; expected one of: " + "; ".join(SPEC_FORMS))
    kind, _, rest = spec.partition(":")
    kw = {"device": device, "world_seed": world_seed, "codec": codec, "batch_size": batch_size}
    if kind == "toy":
        if rest and not rest.lstrip("-").isdigit():
            raise ValueError(f"{setting} {spec!r}: toy:SEED needs an integer world seed")
        return ToyOracleScorer(int(rest) if rest else world_seed)
    if kind == "rm":
        if not rest:
            raise ValueError(f"{setting} {spec!r}: expected rm:EXPORT_DIR (a reward-model export folder)")
        if not Path(rest).exists():
            raise ValueError(f"{setting} {spec!r}: reward-model export {rest} not found")
        return RewardScorer(rest, device=device, batch_size=batch_size)
    if kind == "audio":
        if codec is None or isinstance(codec, str):
            codec = load_codec_factory(codec, device=device)
        return AudioScorer(codec, load_callable(rest, setting=f"{setting} {spec!r}"), sample_rate=None,
                           batch_size=max(1, min(batch_size, 8)))
    if kind == "callable":
        factory = load_callable(rest, setting=f"{setting} {spec!r}")
        return check_scorer(_call_factory(factory, device=device, world_seed=world_seed, batch_size=batch_size),
                            f"{setting} {spec!r}")
    if kind == "weighted":
        if rest.endswith(".json"):
            return weighted_from_json(rest, setting=setting, **kw)
        parts = []
        for item in _split_top(rest):
            inner, eq, w = item.rpartition("=")
            if not eq or not inner:
                raise ValueError(f"{setting} {spec!r}: part {item!r} is not SPEC=WEIGHT")
            try:
                weight = float(w)
            except ValueError:
                raise ValueError(f"{setting} {spec!r}: weight {w!r} of {inner!r} is not a number") from None
            parts.append((_label(inner, len(parts), [p[0] for p in parts]),
                          load_scorer(inner, setting=f"{setting} (part {inner!r})", **kw), weight))
        if not parts:
            raise ValueError(f"{setting} {spec!r}: expected weighted:SPEC=W,SPEC=W,... or weighted:FILE.json")
        return WeightedScorer(parts)
    raise ValueError(f"{setting} {spec!r}: unknown scorer; expected one of: " + "; ".join(SPEC_FORMS))


__all__ = ["SPEC_FORMS", "AudioScorer", "WeightedScorer", "check_scorer", "load_audio_fn", "load_callable",
           "load_codec_factory", "load_scorer", "weighted_from_json"]
