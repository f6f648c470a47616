"""The encoder side of the codec: audio -> song tokens ``[B,3,T]`` (mixed, vocal, bgm at 25 Hz).

:class:`Encoder` is the interface levo-infer (prompt audio) and the data tools (``levo-data encode``,
audio catalogues -> shards) call. Two implementations:

* :class:`NativeEncoder` (``load_encoder(CODEC_DIR)``): the released encode path written out from
  ``encoder_facts.md``, reading the runtime's ``ckpt/model_1rvq/model_2_fixed.safetensors`` (row 0)
  and ``ckpt/model_septoken/model_2.safetensors`` (rows 1–2). Per stream and song:

  1. **peak**: ``x ← x·0.8/p`` when the peak ``p = max|x|`` over both channels exceeds 0.8 (each
     stem by its own peak; the released second, per-chunk 0.9 rule is then a no-op and is skipped);
  2. **tiling**: the song is doubled until it lasts 40 s, cut into 40 s chunks after one more
     doubling (so sample ``j`` of the tiled song is sample ``j mod N``), and only the chunks holding
     output frames are encoded (the released code also encodes filler chunks it then cuts away);
  3. **mono** ``(L + R)/2``, then per chunk :class:`~levo_infer.codec.musicfm.MusicFMTokenizer`:
     48 k → 24 k, log-mel, conv front end, conformer up to the stream's layer (mixed 6, vocal 7,
     bgm 3), cosine-nearest codebook entry;
  4. the chunks' 1000 frames each are joined and cut to ``T = int(N/48000·25) + 1``.

  Chunks of all songs in a call are batched together (``chunk_batch`` at a time), so songs of
  different lengths share a batch and a batch equals its songs encoded one by one. Mono input is
  duplicated to two channels (the released code, which assumes stereo, would reshape a mono
  signal's time axis into two "channels": garbage except for exactly 10 s). fp32 by default;
  ``dtype=torch.bfloat16``/``float16`` runs the conv front end and the conformer in that dtype (the
  mel and the quantizer stay fp32). Deterministic: no noise, no dropout.
* :class:`SongGenerationEncoder` (``--codec-encoder songgeneration:PATH``): calls a user's own
  SongGeneration checkout at run time; nothing of it is copied, installed or imported until an
  encoder is asked for.

The checkout surface the adapter calls (SongGeneration ``b1b03ec9``; run from the checkout root):

* ``codeclm.models.builders.get_audio_tokenizer_model(checkpoint: str, cfg) -> tokenizer``, once for
  the mixed-track tokenizer (``cfg.audio_tokenizer_checkpoint``) and once for the vocal/bgm one
  (``cfg.audio_tokenizer_checkpoint_sep``); ``cfg`` is the model folder's ``config.yaml``;
* ``tokenizer.encode(wav [B,2,N] at 48 kHz) -> (codes [B,1,T], scale)`` for the mixed track and
  ``sep_tokenizer.encode(vocal, bgm) -> (vocal_codes [B,1,T], bgm_codes [B,1,T])``;
* ``generate.Separator().run(path) -> (mix, vocal, bgm)`` waveforms ``[2,N]`` (demucs).

A checkout whose surface differs fails with an error naming the missing attribute.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from ..config import ConfigError, resolve_file_config
from ..errors import LevoInferError
from ..tokens import FRAME_RATE, STREAMS
from . import dsp
from .decoder import SEPTOKEN_FILE, CodecError
from .musicfm import CHUNK, FRAMES_PER_CHUNK, MusicFMTokenizer
from .separate import DemucsSeparator, SeparatorError, bundle_demucs_dir, stems

log = logging.getLogger(__name__)

SAMPLE_RATE = dsp.SAMPLE_RATE
PEAK = 0.8
#: seconds of a prompt recording that are encoded: the released ``load_audio`` keeps the first 10 s
#: (after separating the whole file), so a prompt gives ``frames_for(480000)`` = 251 frames
PROMPT_SECONDS = 10.0
#: the released runtime layout of the encoder's files under a codec folder (``ckpt/``)
MIXED_FILE = Path("model_1rvq") / "model_2_fixed.safetensors"
ENCODER_FILES = {"mixed": MIXED_FILE, "separate": SEPTOKEN_FILE}
#: stream (in :data:`~levo_infer.tokens.STREAMS` order: mixed, vocal, bgm) -> (tokenizer file,
#: ``hidden_states`` index taken, quantizer) (``encoder_facts.md`` §2.4 step 6)
STREAM_SOURCES: dict[str, tuple[str, int, str]] = dict(zip(STREAMS, (
    ("mixed", 6, "rvq_bestrq_emb"),
    ("separate", 7, "rvq_bestrq_emb"),
    ("separate", 3, "rvq_bestrq_bgm_emb"),
)))
#: the released conformer's head count (``w2v2_config.json``); the files do not record it
DEFAULT_HEADS = 16
INV_FREQ_KEY = "bestrq.model.conformer.embed_positions.inv_freq"


class EncoderError(LevoInferError):
    """An encoder spec, checkout or encode input that cannot be used."""


class Encoder(Protocol):
    """Audio -> song tokens."""

    sample_rate: int

    def encode_file(self, path: str | os.PathLike) -> torch.Tensor:
        """An audio file -> tokens ``[1,3,T]`` (rows: mixed, vocal, bgm) at 25 Hz."""

    def encode(self, mix: torch.Tensor, vocal: torch.Tensor | None = None,
               bgm: torch.Tensor | None = None) -> torch.Tensor:
        """Waveforms ``[B,2,N]`` at :attr:`sample_rate` -> tokens ``[B,3,T]`` (``[B,1,T]``, row 0
        only, when ``vocal`` and ``bgm`` are None)."""


# ----------------------------------------------------------------------------- the recipe
def frames_for(n_samples: int) -> int:
    """Output frames of a song of ``n_samples`` at 48 kHz: ``int(N/48000·25) + 1`` (Python floats, as released)."""
    return int(n_samples / SAMPLE_RATE * FRAME_RATE) + 1


def chunks_needed(n_samples: int) -> int:
    """40 s chunks of the tiled song that hold output frames (the rest are filler)."""
    return math.ceil(frames_for(n_samples) / FRAMES_PER_CHUNK)


def peak_normalise(x: torch.Tensor, threshold: float = PEAK) -> torch.Tensor:
    """``x / (p/threshold)`` when the peak ``p = max|x|`` (all channels together) exceeds ``threshold``."""
    p = x.abs().max()
    return x / (p / threshold) if bool(p > threshold) else x


def tiled_chunk(mono: torch.Tensor, k: int) -> torch.Tensor:
    """Chunk ``k`` ``[1 920 000]`` of the released tiling of ``mono [N]``: sample ``j`` of the tiled
    song is ``mono[j mod N]`` (the whole song doubled until >= 40 s, then once more, then cut)."""
    N = mono.shape[-1]
    lo, hi = k * CHUNK, (k + 1) * CHUNK
    if hi <= N:
        return mono[lo:hi]
    return mono[torch.arange(lo, hi, device=mono.device) % N]


Song = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


@contextlib.contextmanager
def _tf32(allow: bool | None) -> Any:
    """CUDA's TF32 switches set to ``allow`` for the duration (None: left alone), then restored:
    cuDNN convolutions default to TF32, which would make "fp32" codes differ from a CPU encode."""
    if allow is None:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@dataclass
class NativeEncoder:
    """The two released tokenizers (row 0 from ``mixed``, rows 1–2 from ``separate``), ready to encode."""

    mixed: MusicFMTokenizer       # model_1rvq/model_2_fixed.safetensors
    separate: MusicFMTokenizer    # model_septoken/model_2.safetensors
    separator: Any = None         # for encode_file: wave [2,N], sample rate -> vocals (levo_infer.codec.separate)
    chunk_batch: int = 4          # 40 s chunks per forward pass (~1 GB each at real size in fp32)
    sample_rate: int = SAMPLE_RATE
    ignored: dict[str, int] = field(default_factory=dict)  # tensors of each file that encoding does not read
    allow_tf32: bool = False      # CUDA fp32: TF32 convolutions / matmuls (faster; codes may differ from fp32)

    @property
    def device(self) -> torch.device:
        return self.mixed.bestrq.model.conv.linear.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mixed.bestrq.model.conv.linear.weight.dtype

    @property
    def codebook_size(self) -> int:
        return int(self.mixed.codebook_size)

    def to(self, device: str | torch.device) -> NativeEncoder:
        self.mixed.to(device)
        self.separate.to(device)
        return self

    def tokenizer(self, stream: str) -> MusicFMTokenizer:
        return self.mixed if STREAM_SOURCES[stream][0] == "mixed" else self.separate

    # -- input ------------------------------------------------------------------------
    def check_song(self, full: torch.Tensor, vocal: torch.Tensor | None, bgm: torch.Tensor | None,
                   what: str = "song") -> Song:
        """One song's waveforms as float32 ``[2, N]`` (mono duplicated); vocal and bgm both given or
        both None, every stem as long as the mix. :class:`~levo_infer.codec.dsp.AudioError` naming
        ``what`` (and the stem) otherwise."""
        full = dsp.check_waveform(full, f"{what}: full mix")
        if (vocal is None) != (bgm is None):
            raise EncoderError(f"{what}: give both vocal and bgm stems, or neither (row 0 only); to derive one "
                               "from the mix use levo_infer.codec.separate.stems")
        if vocal is None:
            return full, None, None
        out = [full]
        for name, x in (("vocal", vocal), ("bgm", bgm)):
            x = dsp.check_waveform(x, f"{what}: {name} stem")
            if x.shape[-1] != full.shape[-1]:
                raise dsp.AudioError(f"{what}: the {name} stem holds {x.shape[-1]} samples "
                                     f"({x.shape[-1] / SAMPLE_RATE:.3f} s) but the full mix {full.shape[-1]} "
                                     f"({full.shape[-1] / SAMPLE_RATE:.3f} s); stems must have the mix's length")
            out.append(x)
        return out[0], out[1], out[2]

    # -- encode -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_songs(self, songs: Sequence[Sequence[torch.Tensor | None]]) -> list[torch.Tensor]:
        """Songs ``(full, vocal, bgm)`` (``[C, N_i]`` at 48 kHz, any lengths; vocal/bgm None for row 0
        only) -> tokens ``[3, T_i]`` (``[1, T_i]``) each, ``T_i = int(N_i/48000·25) + 1``, on the CPU.

        All songs' chunks of a stream go through the network ``chunk_batch`` at a time."""
        checked = [self.check_song(*s, what=f"song {i}") for i, s in enumerate(songs)]  # type: ignore[misc]
        with _tf32(self.allow_tf32 if self.device.type == "cuda" else None):
            return self._encode_checked(checked)

    def _encode_checked(self, checked: list[Song]) -> list[torch.Tensor]:
        rows: list[dict[str, torch.Tensor]] = [{} for _ in checked]
        for stream, (_, layer, quantizer) in STREAM_SOURCES.items():
            col = 0 if stream == "mixed" else 1 if stream == "vocal" else 2
            monos = {}
            for i, s in enumerate(checked):
                if s[col] is not None:
                    x = peak_normalise(s[col])  # type: ignore[arg-type]
                    monos[i] = (x[0] + x[1]) / 2
            work = [(i, k) for i, m in monos.items() for k in range(chunks_needed(m.shape[-1]))]
            if not work:
                continue
            tok = self.tokenizer(stream)
            codes: dict[int, list[torch.Tensor]] = {i: [] for i in monos}
            for g in range(0, len(work), max(1, self.chunk_batch)):
                group = work[g:g + max(1, self.chunk_batch)]
                batch = torch.stack([tiled_chunk(monos[i], k) for i, k in group]).to(self.device)
                out = tok.encode_chunks(batch, layer, quantizer).cpu()
                for (i, _), c in zip(group, out):
                    codes[i].append(c)
            for i, parts in codes.items():
                rows[i][stream] = torch.cat(parts)[: frames_for(monos[i].shape[-1])]
        return [torch.stack([r[s] for s in STREAM_SOURCES if s in r]).long() for r in rows]

    def encode(self, mix: torch.Tensor, vocal: torch.Tensor | None = None,
               bgm: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C, N]`` waveforms at 48 kHz (``[C, N]``: one song) -> ``LongTensor [B, 3, T]`` (``[B, 1, T]``
        when ``vocal`` and ``bgm`` are None), ``T = int(N/48000·25) + 1``."""
        batch = []
        for name, x in (("mix", mix), ("vocal", vocal), ("bgm", bgm)):
            if x is not None and (not isinstance(x, torch.Tensor) or x.dim() not in (2, 3)):
                raise EncoderError(f"{name}: expected a waveform tensor [B, channels, samples], got "
                                   f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            batch.append(None if x is None else (x[None] if x.dim() == 2 else x))
        B = batch[0].shape[0]
        for name, x in zip(("vocal", "bgm"), batch[1:]):
            if x is not None and x.shape[0] != B:
                raise EncoderError(f"{name} holds {x.shape[0]} songs but mix {B}")
        songs = [tuple(None if x is None else x[b] for x in batch) for b in range(B)]
        return torch.stack(self.encode_songs(songs))

    def encode_file(self, path: str | os.PathLike, *, max_seconds: float | None = None) -> torch.Tensor:
        """An audio file (any rate libsndfile reads, resampled to 48 kHz; mono duplicated) -> ``[1, 3, T]``,
        its stems from :attr:`separator` (vocal = its output, bgm = full − vocal). ``max_seconds``:
        separate the whole file, then keep only its start (the released prompt path: 10 s -> 251 frames)."""
        if self.separator is None:
            raise EncoderError(f"{path}: encoding a file needs a separator for its vocal/bgm stems "
                               "(load_encoder(..., separator=DemucsSeparator.from_path(...)))")
        full = dsp.load_stereo_48k(path)
        vocal, bgm = stems(full, separator=self.separator, what=str(path))
        if max_seconds is not None:
            n = int(max_seconds * SAMPLE_RATE)
            full, vocal, bgm = full[:, :n], vocal[:, :n], bgm[:, :n]
        return self.encode_songs([(full, vocal, bgm)])[0][None]


# ----------------------------------------------------------------------------- loading
def file_plan() -> dict[str, tuple[list[str], int]]:
    """Per tokenizer file: the quantizers its streams use and how many conformer blocks they need."""
    plan = {}
    for name in ENCODER_FILES:
        streams = [s for s, v in STREAM_SOURCES.items() if v[0] == name]
        plan[name] = (list(dict.fromkeys(STREAM_SOURCES[s][2] for s in streams)), max(STREAM_SOURCES[s][1] for s in streams))
    return plan


def _load_tokenizer(path: Path, *, quantizers: Sequence[str], depth: int, heads: int | None,
                    dtype: torch.dtype) -> tuple[MusicFMTokenizer, int]:
    """The tokenizer of one released file with ``depth`` conformer blocks; every tensor it reads
    checked by name and shape, the others counted."""
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - not a safetensors file, truncated header, I/O error
        raise CodecError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    with f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        try:
            sizes = MusicFMTokenizer.sizes_from_shapes(shapes, quantizers)
        except (KeyError, ValueError) as e:
            raise CodecError(f"{path}: not the released MusicFM tokenizer layout: {e}") from None
        blocks = sizes.pop("blocks")
        if blocks < depth:
            raise CodecError(f"{path}: holds {blocks} conformer blocks, but encoding takes hidden_states[{depth}] "
                             f"(blocks 0..{depth - 1})")
        if heads is None:  # the file may carry the rotary buffer, whose length is half the head size
            hd = 2 * shapes[INV_FREQ_KEY][0] if len(shapes.get(INV_FREQ_KEY, ())) == 1 else None
            heads = sizes["hidden"] // hd if hd and sizes["hidden"] % hd == 0 else DEFAULT_HEADS
        try:
            with torch.device("meta"):
                tok = MusicFMTokenizer(quantizers=quantizers, depth=depth, heads=heads, **sizes)
        except ValueError as e:
            raise CodecError(f"{path}: {e}") from None
        want = tok.state_dict()
        state = {}
        for k, t in want.items():
            if k not in shapes:
                raise CodecError(f"{path}: missing tensor {k!r} (expected shape {tuple(t.shape)})")
            if shapes[k] != tuple(t.shape):
                raise CodecError(f"{path}: tensor {k!r} has shape {shapes[k]}, expected {tuple(t.shape)}")
            state[k] = f.get_tensor(k).to(dtype if t.dtype.is_floating_point else t.dtype)
    tok.load_state_dict(state, strict=True, assign=True)  # the meta-device module takes the file's tensors
    return tok.eval(), len(shapes) - len(want)


def load_native_encoder(ckpt_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, heads: int | None = None,
                        separator: Any = None) -> NativeEncoder:
    """:class:`NativeEncoder` from a released runtime ``ckpt/`` folder (see :func:`load_encoder`)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise CodecError(f"{folder}: no such codec folder")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CodecError(f"dtype {dtype}: expected torch.float32, bfloat16 or float16")
    paths = {}
    for name, rel in ENCODER_FILES.items():
        if not (folder / rel).is_file():
            raise CodecError(f"{folder}: no {rel} (the encoder reads the released runtime's {MIXED_FILE} and "
                             f"{SEPTOKEN_FILE})")
        paths[name] = folder / rel
    toks, ignored = {}, {}
    for name, (quantizers, depth) in file_plan().items():
        toks[name], ignored[name] = _load_tokenizer(paths[name], quantizers=quantizers, depth=depth, heads=heads,
                                                    dtype=dtype)
    log.info("codec encoder: %s (%d tensors not used for encoding ignored), %s (%d ignored)", paths["mixed"],
             ignored["mixed"], paths["separate"], ignored["separate"])
    return NativeEncoder(mixed=toks["mixed"], separate=toks["separate"], separator=separator,
                         ignored=ignored).to(device)


@contextlib.contextmanager
def _checkout_on_path(root: Path) -> Any:
    """Import from ``root`` (and run there: upstream resolves ``./ckpt`` and ``third_party`` paths
    against the current folder) for the duration of a call."""
    old_cwd, added = Path.cwd(), str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if added:
            sys.path.remove(str(root))


def _attr(module: Any, dotted: str, where: str) -> Any:
    obj = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            raise EncoderError(f"{where}: the SongGeneration checkout has no `{dotted}` (stopped at `{part}`); the "
                               "adapter calls the surface of SongGeneration b1b03ec9 (levo_infer/codec/encoder.py)")
        obj = getattr(obj, part)
    return obj


class SongGenerationEncoder:
    """:class:`Encoder` through a SongGeneration checkout at ``root`` with the model folder's config."""

    sample_rate = 48000

    def __init__(self, root: str | os.PathLike, config: str | os.PathLike, device: str = "cpu") -> None:
        self.root = Path(root).resolve()
        if not (self.root / "codeclm").is_dir():
            raise EncoderError(f"songgeneration:{root}: not a SongGeneration checkout (no codeclm/ package)")

        try:  # resolved here, through the bounded eval / in-folder load_yaml only (a file handed to us)
            self.cfg = resolve_file_config(OmegaConf.load(str(config)), where=str(config), folder=Path(config).parent)
        except ConfigError as e:
            raise EncoderError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - YAML syntax, unreadable file
            raise EncoderError(f"{config}: cannot parse config: {' '.join(str(e).split())}") from None
        keys = ("audio_tokenizer_checkpoint", "audio_tokenizer_checkpoint_sep")
        missing = [k for k in keys if not self.cfg.get(k)]
        if missing:
            raise EncoderError(f"{config}: no {' / '.join(missing)}: the encoder adapter needs a released model "
                               "folder's config.yaml (it names the tokenizer checkpoints)")
        self.device = device
        with _checkout_on_path(self.root):
            builders = importlib.import_module("codeclm.models.builders")
            get = _attr(builders, "get_audio_tokenizer_model", "codeclm.models.builders")
            self.mixed = get(str(self.cfg[keys[0]]), self.cfg)
            self.separate = get(str(self.cfg[keys[1]]), self.cfg)
            self._separator: Any = None

    def encode(self, mix: torch.Tensor, vocal: torch.Tensor | None = None,
               bgm: torch.Tensor | None = None) -> torch.Tensor:
        with _checkout_on_path(self.root), torch.no_grad():
            codes, _ = _attr(self.mixed, "encode", "mixed tokenizer")(mix.to(self.device))
            if vocal is None and bgm is None:
                return codes[:, :1].long().cpu()
            if vocal is None or bgm is None:
                raise EncoderError("give both vocal and bgm stems, or neither (row 0 only)")
            v, b = _attr(self.separate, "encode", "vocal/bgm tokenizer")(vocal.to(self.device), bgm.to(self.device))
        T = min(codes.shape[-1], v.shape[-1], b.shape[-1])
        return torch.cat([codes[:, :1, :T], v[:, :1, :T], b[:, :1, :T]], dim=1).long().cpu()

    def encode_file(self, path: str | os.PathLike) -> torch.Tensor:
        with _checkout_on_path(self.root):
            if self._separator is None:
                gen = importlib.import_module("generate")
                self._separator = _attr(gen, "Separator", "generate")()
            mix, vocal, bgm = self._separator.run(str(Path(path).resolve()))
        return self.encode(mix[None], vocal[None], bgm[None])


class PromptEncoder:
    """What ``levo-infer`` encodes ``prompt_audio_path`` recordings with: the native encoder of a codec
    folder and the htdemucs separator of its runtime bundle (``--separator-ckpt``, default
    ``../third_party/demucs/ckpt`` beside the codec folder), both loaded on the first audio prompt.
    As released: the whole file is separated, then its first :data:`PROMPT_SECONDS` are encoded.
    A folder or separator that cannot be loaded fails every audio prompt with the same message
    (:class:`EncoderError` naming what is missing and how to pass it); it is not retried."""

    sample_rate = SAMPLE_RATE

    def __init__(self, codec_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
                 separator_ckpt: str | os.PathLike | None = None) -> None:
        self.codec_dir, self.device, self.separator_ckpt = Path(codec_dir), device, separator_ckpt
        self._encoder: NativeEncoder | None = None
        self._error: str | None = None

    def load(self) -> NativeEncoder:
        """The encoder with its separator (loaded once)."""
        if self._encoder is not None:
            return self._encoder
        if self._error is None:
            where = Path(self.separator_ckpt) if self.separator_ckpt is not None else bundle_demucs_dir(self.codec_dir)
            try:
                enc = load_native_encoder(self.codec_dir, device=self.device)
                enc.separator = DemucsSeparator.from_path(where, device=self.device)
                self._encoder = enc
                return enc
            except CodecError as e:
                self._error = (f"encoding audio prompts natively needs the codec folder's encoder files: {e}; or pass "
                               "--codec-encoder songgeneration:PATH, or a prompt token file (.pt/.npy [3, T])")
            except SeparatorError as e:
                hint = "" if self.separator_ckpt is not None else (
                    "; pass --separator-ckpt PATH (htdemucs.pth, a folder holding htdemucs.{pth,yaml}, or the "
                    "runtime bundle root)")
                self._error = (f"encoding audio prompts needs a vocal separator: {e}{hint}; or pass "
                               "--codec-encoder songgeneration:PATH, or a prompt token file (.pt/.npy [3, T])")
        raise EncoderError(self._error)

    def encode_file(self, path: str | os.PathLike) -> torch.Tensor:
        """A prompt recording -> tokens ``[1, 3, T]``, ``T <= 251`` (its first 10 s)."""
        return self.load().encode_file(path, max_seconds=PROMPT_SECONDS)


def load_encoder(source: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 config: str | os.PathLike | None = None, heads: int | None = None, separator: Any = None) -> Encoder:
    """An :class:`Encoder` from a codec folder or an adapter spec.

    * ``CODEC_DIR`` (the released runtime's ``ckpt/``, holding ``model_1rvq/model_2_fixed.safetensors``
      and ``model_septoken/model_2.safetensors``) -> :class:`NativeEncoder`. Sizes come from the
      tensor shapes (depth, widths, FFN, conv channels, codebook; ``heads`` from the file's rotary
      buffer when it has one, else the released 16); every tensor encoding reads is checked by name
      and shape (:class:`~levo_infer.codec.decoder.CodecError` naming a missing or misshaped one),
      the others are ignored and counted; safetensors are read lazily (memory-mapped). ``dtype``:
      fp32 (default, as released) or bf16/fp16 for the conv front end and conformer. ``separator``:
      what :meth:`NativeEncoder.encode_file` separates stems with.
    * ``songgeneration:PATH`` -> :class:`SongGenerationEncoder` (needs ``config``: the model folder's
      ``config.yaml``)."""
    spec = os.fspath(source)
    kind, sep, where = spec.partition(":")
    if kind == "songgeneration" and sep:
        if not where:
            raise EncoderError(f"--codec-encoder {spec!r}: expected songgeneration:PATH (a SongGeneration checkout)")
        if config is None:
            raise EncoderError(f"--codec-encoder {spec!r}: the adapter needs the model folder's config.yaml")
        return SongGenerationEncoder(where, config, str(device))
    if sep and not Path(spec).exists() and len(kind) > 1 and kind.isidentifier():
        raise EncoderError(f"--codec-encoder {spec!r}: expected songgeneration:PATH (a SongGeneration checkout) or "
                           "a codec folder (the released runtime's ckpt/)")
    return load_native_encoder(spec, device=device, dtype=dtype, heads=heads, separator=separator)


__all__ = ["DEFAULT_HEADS", "ENCODER_FILES", "FRAME_RATE", "MIXED_FILE", "PEAK", "PROMPT_SECONDS", "SAMPLE_RATE",
           "STREAM_SOURCES", "Encoder", "EncoderError", "NativeEncoder", "PromptEncoder", "SongGenerationEncoder", "chunks_needed", "frames_for", "load_encoder",
           "load_native_encoder", "peak_normalise", "tiled_chunk"]
