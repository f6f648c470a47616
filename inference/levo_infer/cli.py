"""``levo-infer``: generate songs from a released SongGeneration model folder or a levo-train export.

    levo-infer CKPT_DIR INPUT.jsonl OUT_DIR [--mode mixed|vocal|bgm|separate] [--low-mem]
               [--not-use-flash-attn] [--batch-size N] [--duration S] [--cfg-coef X] [--top-k K]
               [--temperature T] [--seed N] [--codec CODEC_DIR | --tokens-only]
               [--auto-prompt-file PATH] [--device ...] [--lyrics check|normalize|raw] [--strict]
    levo-infer decode TOKENS_DIR OUT_DIR --codec CODEC_DIR [--device ...] [--seed N] [--batch-size N]
    levo-infer random-codec DIR [--seed N]   (a small random codec: noise, for plumbing smoke tests)

The released ``generate.sh`` spellings (``--low_mem``, ``--not_use_flash_attn``, ``--separate``,
``--bgm``, ``--vocal``; ``generate.py``'s ``--ckpt_path``/``--input_jsonl``/``--save_dir``/
``--generate_type``) are accepted too.

Input: one JSON object per line (the released request, :mod:`levo_infer.request`) with ``idx``
(output name), ``gt_lyric``, optional ``descriptions`` and optional ``prompt_audio_path`` (a prompt
token file, see :mod:`levo_infer.prompts`, or an audio file: its first 10 s encoded natively with the
codec folder's encoder and the runtime bundle's htdemucs, ``--separator-ckpt`` to give it elsewhere,
or with ``--codec-encoder songgeneration:PATH``) or ``auto_prompt_audio_type`` (needs ``--auto-prompt-file``). A bad
line is reported with its line number and the broken rule; the other songs are still generated
and the exit status is 1 (also when the file holds no song at all). ``idx`` must fit a file name:
at most :data:`levo_infer.request.IDX_MAX_BYTES` bytes in UTF-8.

Lyrics: the model is fed what the released ``generate.py`` feeds it, ``gt_lyric`` with double
spaces collapsed, whatever the lyric checker (:mod:`levo_infer.lyrics`) finds; a finding is a
warning naming the line and the rule (recorded in the song's ``warnings``). ``--strict`` makes
lyric findings fail their line and config problems (unknown keys, missing keys whose default
changes the model, see :func:`levo_infer.config.load_config`) fail the run. A lyric longer than the
model's lyric conditioner (``lyric_max_len`` tokens) fails its line, naming both lengths: the
released code cuts it silently, so two lyrics differing only after the cut make the same song;
``--truncate-lyrics`` cuts it with a warning for that song.

The input is read by :mod:`levo_infer.jsonl` (lines end at ``"\\n"`` only, so U+2028, U+2029 and
U+0085 inside strings are kept; a UTF-8 BOM is skipped; a line over the size limit fails alone).

Output (``OUT_DIR``):

* ``tokens/<idx>.pt``: LongTensor [3, T] (mixed, vocal, bgm; T = frames before the earliest EOS),
  exactly the tokens the codec decodes into ``audios/<idx>.flac``. So for ``--mode vocal`` the bgm
  row is the silent code 9670, for ``--mode bgm`` the vocal row is 3142 (the released decoder's
  substitution; the mixed row is never decoded and kept as generated); ``--mode separate`` writes
  ``<idx>.pt`` (as generated) plus ``<idx>_vocal.pt`` and ``<idx>_bgm.pt``.
* ``audios/<idx>[_vocal|_bgm].flac`` (48 kHz stereo, :mod:`levo_infer.codec`) with a codec folder:
  ``--codec CODEC_DIR`` (the released runtime ``ckpt/`` holding ``model_septoken/`` and ``vae/``), or
  one found beside the model folder (the folder itself, its parent or the parent's ``ckpt/``).
  Without one, tokens only (said once); ``--tokens-only`` never decodes. A song's audio noise is
  drawn from its seed, so the same seed gives the same audio; songs with the same number of 40 s
  windows are decoded together (``--batch-size`` at a time, the audio of one at a time).
  ``levo-infer decode`` turns token files written earlier (or elsewhere) into audio, each song with
  the seed of its record: the FLAC levo-infer wrote, bit for bit.
* ``jsonl/<input name>.jsonl``: one record per generated song (input fields, the text the model
  saw, prompt, settings, seed, frames, seconds, ``tokens``, ``audios``, ``clipped_samples``, lyric
  ``warnings`` if any, ``status``); ``jsonl/<input name>.errors.jsonl``: the bad lines and the songs
  whose output could not be written (each song is written on its own: one failed write fails that
  song alone). Token files, once written, stay: a song whose audio cannot be decoded or written
  (out of memory, a full disk) keeps its tokens and its record (``status: audio_failed``, with
  ``audio_error``) and is listed in the errors file; ``--skip-existing`` decodes it later.

``--skip-existing`` makes exactly what is missing: songs whose token files exist are not generated
again; with a codec, those among them without audio files are decoded from the stored tokens with
the seed of the earlier record; the records are merged (the earlier run's records of songs this run
does not redo are kept). Output names that collide (``a`` + ``_vocal`` in ``--mode separate`` and a
song ``a_vocal``, or names differing only in case) fail the later line, naming both; a song whose
output would overwrite a ``prompt_audio_path`` of the run fails; an input JSONL inside the output
folders, an output folder that cannot be written or a codec folder that does not load stop the run
before the model loads.

Caller formatting as released: the description is lower-cased; v2 prefixes
``[Musicality-very-high], `` (``.`` alone without a description) and, in bgm mode, ``[Pure-Music], ``
with the lyric replaced by ``.``. Sampling defaults to the released rules (``--compat``: top-k 5000
and temperature 0.8 on codebook 0, greedy on vocal/bgm, repetition penalty 1.1 over 50 steps,
prompt-token ban, CFG 1.5; the released low-memory script used ``--top-k 50 --temperature 0.9``).
Each song's seed is ``--seed`` + its line index, so results do not depend on ``--batch-size``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import codec as song_codec
from .api import load_model
from .checkpoint import CheckpointError, atomic_torch_save, resolve_dtype
from .codec.encoder import EncoderError, PromptEncoder, load_encoder
from .commands import Command, parse_command
from .config import ConfigError, ConfigWarning
from .engine import QUEUE_PER_SLOT
from .errors import LevoInferError
from .generate import RELEASED_PENALTY, RELEASED_TEMPERATURE, RELEASED_TOP_K, RELEASED_WINDOW, generate
from .jsonio import jsonl_text, write_text_atomic
from .jsonl import JsonlError, jsonl_lines
from .outputs import OutputError, check_writable, decode_in_groups, inside, read_records, record_seeds
from .planner import InsufficientMemoryError, plan_generation
from .prompts import AutoPromptLibrary, PromptError
from .request import LYRIC_POLICIES, RequestError, RequestOptions, SongRequest, line_idx, parse_request
from .tokens import MODES, mode_tokens


class UsageError(LevoInferError):
    """A problem with the command line or the model folder (exit status 2)."""


class Codec(Protocol):
    """What ``levo-infer`` needs from an audio codec (``levo_infer.codec.load_codec`` returns one)."""

    sample_rate: int

    def decode(self, tokens: Any, seed: int | None = None) -> Any:
        """[3, T] tokens (mixed, vocal, bgm) -> waveform [channels, samples] (float tensor); the
        decoder's noise drawn from ``seed``."""

    def decode_batch(self, tokens: Sequence[Any], seeds: Sequence[int | None]) -> list[Any]:
        """Songs of the same window count decoded together, each as ``decode(tokens[i], seeds[i])``."""


def load_codec(codec_dir: str | os.PathLike, device: str) -> Codec:
    """The audio codec of a codec folder (:func:`levo_infer.codec.load_codec`); ``UsageError``
    naming the file and the problem when the folder cannot be used."""
    try:
        codec = song_codec.load_codec(codec_dir, device)
    except song_codec.CodecError as e:
        raise UsageError(f"--codec {codec_dir}: {e}") from None
    if song_codec.is_random_codec(codec_dir):
        print(f"levo-infer: note: {codec_dir} is a random codec (levo-infer random-codec): its audio is noise, for "
              "plumbing tests only", file=sys.stderr)
    return codec


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="levo-infer",
        description="Generate songs (tokens, and 48 kHz audio with a codec folder) from a released SongGeneration "
                    "model folder or a levo-train export, for a JSONL file with one song per line.",
        epilog="Output: OUT_DIR/tokens/<idx>.pt, OUT_DIR/audios/<idx>.flac (with a codec), OUT_DIR/jsonl/<input>.jsonl "
               "(+ .errors.jsonl). Subcommands: levo-infer decode, levo-infer random-codec. Exit status: 0 all "
               "songs generated, 1 some lines failed or the input holds no song, 2 usage or model-loading error "
               "(with --strict also a config problem).")
    ap.add_argument("ckpt_dir", nargs="?", help="model folder: config.yaml + model.pt (or model.safetensors)")
    ap.add_argument("input_jsonl", nargs="?", help="one JSON object per line: idx, gt_lyric, [descriptions], "
                    "[prompt_audio_path | auto_prompt_audio_type]")
    ap.add_argument("out_dir", nargs="?", help="output folder")
    ap.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_opt", help=argparse.SUPPRESS)
    ap.add_argument("--input_jsonl", "--input-jsonl", dest="input_opt", help=argparse.SUPPRESS)
    ap.add_argument("--save_dir", "--save-dir", dest="out_opt", help=argparse.SUPPRESS)
    g = ap.add_argument_group("output mode")
    g.add_argument("--mode", "--generate_type", "--generate-type", dest="mode", choices=MODES, default="mixed",
                   help="mixed (default), vocal, bgm (instrumental: adds [Pure-Music], lyric '.') or separate")
    for m in MODES:
        g.add_argument(f"--{m}", dest="mode", action="store_const", const=m, help=argparse.SUPPRESS)
    g.add_argument("--codec", default=None, metavar="CODEC_DIR",
                   help="codec folder (released runtime ckpt/: model_septoken/, vae/); default: found beside CKPT_DIR")
    g.add_argument("--codec-encoder", default=None, metavar="songgeneration:PATH",
                   help="encode audio prompt_audio_path files with your SongGeneration checkout at PATH (default: "
                        "natively, with the codec folder's encoder)")
    g.add_argument("--separator-ckpt", default=None, metavar="PATH",
                   help="htdemucs.pth (or a folder holding it) that separates audio prompts (default: the runtime "
                        "bundle's, ../third_party/demucs/ckpt beside the codec folder)")
    g.add_argument("--tokens-only", "--tokens_only", action="store_true",
                   help="write tokens only, never audio")
    s = ap.add_argument_group("sampling")
    s.add_argument("--duration", type=float, default=None, help="seconds to generate at most (default: the "
                   "config's max_dur, 270 for released models)")
    s.add_argument("--cfg-coef", "--cfg_coef", type=float, default=None, help="guidance (default: config, 1.5)")
    s.add_argument("--top-k", "--top_k", type=int, default=RELEASED_TOP_K, help="top-k (default %(default)s)")
    s.add_argument("--temperature", "--temp", type=float, default=RELEASED_TEMPERATURE,
                   help="temperature (default %(default)s; 0 = greedy)")
    s.add_argument("--top-p", "--top_p", type=float, default=0.0, help="top-p (default 0 = off)")
    s.add_argument("--compat", action=argparse.BooleanOptionalAction, default=True,
                   help="released sampling rules exactly: top-k/temperature on codebook 0, greedy on vocal/bgm, "
                        f"penalty {RELEASED_PENALTY} over {RELEASED_WINDOW} steps (default). --no-compat: "
                        "top-k/top-p/temperature on every codebook")
    s.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"--no-compat only: logit divisor for codes seen in the window (default {RELEASED_PENALTY}; "
                        "1 = off)")
    s.add_argument("--penalty-window", type=int, default=None,
                   help=f"--no-compat only: window in steps (default {RELEASED_WINDOW})")
    s.add_argument("--seed", type=int, default=None, help="base seed; song seed = base + line index (default: random, "
                   "recorded in the output JSONL)")
    r = ap.add_argument_group("runtime")
    r.add_argument("--batch-size", "--batch_size", type=int, default=4,
                   help="songs generating at once: the engine's slots, refilled from the queue as songs end "
                        "(default %(default)s)")
    r.add_argument("--memory-gb", type=float, default=None,
                   help="choose --batch-size from a memory budget in GiB (levo_infer.planner: weights, KV cache per "
                        "song, workspace); refused up front, with the numbers, when one song does not fit")
    r.add_argument("--kv-cache", choices=("model", "8bit"), default="model",
                   help="KV cache in the model's dtype (default) or 8-bit with per-head scales (about half the "
                        "cache memory of bf16)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on GPU; falls back to eager on failure)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    r.add_argument("--dtype", default="auto", help="bf16, fp16 or fp32 (default: the checkpoint's dtype on GPU, "
                   "fp32 on CPU)")
    r.add_argument("--low-mem", "--low_mem", action="store_true",
                   help="keep decoder layers in CPU memory and move each to the GPU as it runs (no effect on CPU)")
    r.add_argument("--not-use-flash-attn", "--not_use_flash_attn", action="store_true",
                   help="do not use flash-attn even when installed (it is only used on GPU in bf16/fp16)")
    r.add_argument("--use-flash-attn", "--use_flash_attn", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("--tokenizer-dir", default=None, help="Qwen2 tokenizer folder (default: the config's path, else "
                   "rebuilt offline)")
    r.add_argument("--auto-prompt-file", default=None, help="released prompt library for auto_prompt_audio_type "
                   "(tools/new_auto_prompt.pt for v2, ckpt/prompt.pt for v1)")
    r.add_argument("--lyrics", choices=LYRIC_POLICIES, default="check",
                   help="check (default): check the released lyric rules and feed the text the released code feeds "
                        "(gt_lyric with double spaces collapsed); a finding is a warning naming the line and rule "
                        "(an error with --strict). normalize: feed the canonical form of lyrics that pass the check. "
                        "raw: no check")
    r.add_argument("--truncate-lyrics", action="store_true",
                   help="cut a lyric longer than the model's lyric conditioner (lyric_max_len tokens, the start token "
                        "included: 600 for v2 models, 300 for base) to its first tokens, as the released code does "
                        "silently; a warning per song says so. Default: such a line fails, naming the song and both "
                        "lengths (two lyrics differing only after the cut would make the same song)")
    r.add_argument("--strict", action="store_true",
                   help="make warnings errors: lyric-rule findings fail their line, and config problems (unknown or "
                        "misspelled keys, missing keys whose default changes the model) fail the run. Default: "
                        "warnings, since the released code runs such inputs")
    r.add_argument("--skip-existing", action="store_true",
                   help="make only what is missing: songs whose token files exist are not generated again (with a "
                        "codec, their missing audio files are decoded from the stored tokens with the recorded seed); "
                        "the earlier records are kept and merged")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.ckpt_dir = args.ckpt_opt or args.ckpt_dir
    args.input_jsonl = args.input_opt or args.input_jsonl
    args.out_dir = args.out_opt or args.out_dir
    missing = [n for n in ("ckpt_dir", "input_jsonl", "out_dir") if not getattr(args, n)]
    if missing:
        ap.error(f"missing {', '.join(m.upper() for m in missing)} (usage: levo-infer CKPT_DIR INPUT.jsonl OUT_DIR)")
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if args.duration is not None and args.duration <= 0:
        ap.error("--duration must be > 0")
    if args.compat and (args.repetition_penalty is not None or args.penalty_window is not None):
        ap.error("--repetition-penalty/--penalty-window need --no-compat (--compat fixes the released 1.1 over 50 steps)")
    return args


# ----------------------------------------------------------------------------- input
class SongOutputError(LevoInferError):
    """One song's output could not be written (that song fails; the run goes on)."""


def read_lines(path: Path) -> list[tuple[int, str | JsonlError]]:
    """The input's non-blank lines, by the one JSONL reader (:mod:`levo_infer.jsonl`: lines end at
    ``\\n`` only, a BOM is skipped); a line too long or not UTF-8 is a :class:`JsonlError` in place of
    its text (that line fails, the others run). An unreadable file is a :class:`UsageError`."""
    try:
        return list(jsonl_lines(path))
    except (JsonlError, ValueError) as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------- run
class _PlainBar:
    """Progress lines on stderr when tqdm is not installed (it is optional for the inference package)."""

    def __init__(self, total: int, disable: bool) -> None:
        self.total, self.n, self.disable = total, 0, disable

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def update(self, n: int) -> None:
        self.n += n
        if not self.disable:
            print(f"levo-infer: {self.n}/{self.total} songs", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, *, disable: bool) -> Any:
    """A tqdm bar over songs (updated per batch, with the step in the postfix), or plain lines."""
    try:  # tqdm: optional for the inference package
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(total, disable)
    return tqdm(total=total, unit="song", desc="levo-infer", disable=disable or None, file=sys.stderr,
                dynamic_ncols=True)


class Runner:
    """Loads the model once and generates the songs of one JSONL file in batches."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out_dir)
        self.input = Path(args.input_jsonl)
        self.errors: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.old_records: dict[str, dict[str, Any]] = {}  # --skip-existing: the earlier run's records, by idx
        self.pending: list[tuple[SongRequest, list[str]]] = []  # (song, suffixes) whose audio files are missing

    # -- setup ------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
        try:
            self.device = torch.device(dev)
        except RuntimeError as e:
            raise UsageError(f"--device {a.device}: {e}") from e
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {a.device}: CUDA is not available on this machine")
        try:
            dtype = resolve_dtype(a.dtype)
        except ValueError as e:
            raise UsageError(f"--dtype: {e}") from e
        if dtype is None and self.device.type == "cpu":
            dtype = torch.float32
        # what can fail cheaply fails before the model loads: unwritable output folders, a bad codec folder
        self.codec = None
        self.codec_dir: str | None = None
        found = a.codec or song_codec.find_codec_dir(a.ckpt_dir)  # decodes audio out, encodes audio prompts
        if not a.tokens_only:
            codec_dir = found
            if codec_dir is None:
                print(f"levo-infer: no audio codec: no --codec CODEC_DIR given and no codec folder (model_septoken/ and "
                      f"vae/) beside {a.ckpt_dir}; writing tokens only to {self.out / 'tokens'} (--tokens-only "
                      "says that is intended)", file=sys.stderr)
            else:
                self.codec_dir = str(codec_dir)
        for sub in ("tokens", "jsonl", *(("audios",) if self.codec_dir else ())):
            try:
                check_writable(self.out / sub)
            except OutputError as e:
                raise UsageError(str(e)) from None
        if self.codec_dir is not None:
            self.codec = load_codec(self.codec_dir, str(self.device))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConfigWarning)
                self.model = load_model(a.ckpt_dir, tokenizer_dir=a.tokenizer_dir, device=self.device, dtype=dtype,
                                        low_mem=a.low_mem, strict=a.strict)
        except (CheckpointError, ConfigError, ValueError, OSError) as e:
            raise UsageError(str(e)) from e
        for w in caught:
            if issubclass(w.category, ConfigWarning):
                print(f"levo-infer: warning: {w.message} (--strict makes this an error)", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        self.model.set_flash_attention(not a.not_use_flash_attn)
        self.model.truncate_lyrics = a.truncate_lyrics  # lines were checked (and warned about) one by one
        self.library = None
        if a.auto_prompt_file:
            try:
                self.library = AutoPromptLibrary.load(a.auto_prompt_file, code_depth=self.model.code_depth,
                                                      code_size=self.model.cfg.lm.code_size)
            except PromptError as e:
                raise UsageError(str(e)) from e
        cfg = self.model.cfg
        self.duration = float(a.duration if a.duration is not None else cfg.max_dur)
        self.max_frames = max(1, int(round(self.duration * cfg.frame_rate)))
        if self.max_frames > self.model.max_frames:
            key, limit = cfg.max_positions
            most = self.model.max_frames / cfg.frame_rate
            given = f"--duration {self.duration:g}" + (" (the config's max_dur)" if a.duration is None else "")
            raise UsageError(
                f"{given} needs {self.max_frames} frames, but {key}={limit} of {a.ckpt_dir} leaves room for at most "
                f"{self.model.max_frames} frames ({most:g} s) after the {cfg.prefix_len} conditioning positions and "
                f"the delay tail of {cfg.max_delay}: pass --duration {most:g} or less")
        self.slots = a.batch_size
        if a.memory_gb is not None:
            try:
                plan = plan_generation(cfg, memory_gb=a.memory_gb, max_frames=self.max_frames, dtype=self.model.dtype,
                                       kv_bits=8 if a.kv_cache == "8bit" else None,
                                       cfg_guidance=(a.cfg_coef if a.cfg_coef is not None else cfg.cfg_coef) != 1.0)
            except InsufficientMemoryError as e:
                raise UsageError(f"--memory-gb {a.memory_gb:g}: {e}") from None
            self.slots = plan.slots
            print(f"levo-infer: --memory-gb {a.memory_gb:g}: {plan.describe()}", file=sys.stderr)
        self.base_seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**31)
        self.encoder: Any = None
        native_dir = None if a.codec_encoder else found
        if a.codec_encoder and Path(a.codec_encoder).is_dir():  # a codec folder: the native encoder
            native_dir = a.codec_encoder
        elif a.codec_encoder:
            try:
                self.encoder = load_encoder(a.codec_encoder, config=Path(a.ckpt_dir) / "config.yaml",
                                            device=str(self.device))
            except EncoderError as e:
                raise UsageError(str(e)) from None
        if a.separator_ckpt and native_dir is None:
            raise UsageError("--separator-ckpt separates audio prompts for the native encoder: give a codec folder "
                             "(--codec CODEC_DIR), not --codec-encoder songgeneration:PATH")
        if native_dir is not None:  # audio prompts: loaded on the first one
            self.encoder = PromptEncoder(native_dir, device=str(self.device), separator_ckpt=a.separator_ckpt)
        self.settings = {
            "checkpoint": str(a.ckpt_dir), "version": cfg.version, "mode": a.mode, "compat": a.compat,
            "cfg_coef": a.cfg_coef if a.cfg_coef is not None else cfg.cfg_coef, "top_k": a.top_k,
            "temperature": a.temperature, "top_p": a.top_p,
            "repetition_penalty": (RELEASED_PENALTY if a.compat or a.repetition_penalty is None
                                   else a.repetition_penalty),
            "penalty_window": RELEASED_WINDOW if a.compat or a.penalty_window is None else a.penalty_window,
            "duration": self.duration, "max_frames": self.max_frames, "batch_size": self.slots,
            "kv_cache": a.kv_cache,
            "device": str(self.device), "dtype": str(self.model.dtype).removeprefix("torch."), "low_mem": a.low_mem,
            "flash_attn": not a.not_use_flash_attn, "lyrics": a.lyrics, "truncate_lyrics": a.truncate_lyrics,
            "strict": a.strict,
            "base_seed": self.base_seed, "codec": self.codec_dir,
        }

    # -- helpers ----------------------------------------------------------------------
    def fail(self, line: int, idx: str | None, msg: str, status: str = "error", **extra: Any) -> None:
        self.errors.append({"line": line, "idx": idx, "status": status, "error": msg, **extra})
        print(f"levo-infer: {self.input}:{line}: {msg}", file=sys.stderr)

    def suffixes(self) -> list[str]:
        """The file-name suffixes of one song's outputs in this run's mode (``""``, ``"_vocal"``, ``"_bgm"``)."""
        return list(mode_tokens(torch.zeros(3, 1, dtype=torch.long), self.args.mode))

    def token_paths(self, idx: str) -> dict[str, Path]:
        return {sfx: self.out / "tokens" / f"{idx}{sfx}.pt" for sfx in self.suffixes()}

    def audio_paths(self, idx: str) -> dict[str, Path]:
        return {sfx: self.out / "audios" / f"{idx}{sfx}.flac" for sfx in self.suffixes()}

    def name_clash(self, song: SongRequest, names: dict[str, tuple[int, str]]) -> str | None:
        """Why ``song``'s output names collide with an earlier line's (the same name after the mode's
        suffixes, e.g. ``a`` + ``_vocal`` and ``a_vocal``, or names differing only in case, one file on
        a case-insensitive file system), else None; ``names``: casefolded name -> (line, name)."""
        mine = [f"{song.idx}{sfx}" for sfx in self.suffixes()]
        for name in mine:
            if name.casefold() in names:
                line, theirs = names[name.casefold()]
                how = "is the output name" if theirs == name else "differs only in case from the output name"
                return (f"idx {song.idx!r}: its output name {name!r} (--mode {self.args.mode}) {how} {theirs!r} of "
                        f"line {line}: one song's files would overwrite the other's; give line {song.line} or line "
                        f"{line} another idx")
        names.update({name.casefold(): (song.line, name) for name in mine})
        return None

    def check_paths(self) -> None:
        """Refuse an input that this run would overwrite: the input JSONL inside the output's record,
        token or audio folder (``levo-infer EXPORT OUT/jsonl/x.jsonl OUT`` rewrites its own input)."""
        for sub in ("jsonl", "tokens", "audios"):
            if inside(self.input, self.out / sub):
                raise UsageError(f"{self.input}: the input JSONL lies in {self.out / sub}, where this run writes its "
                                 f"output ({self.out / 'jsonl' / self.input.name} would overwrite it): copy it "
                                 "elsewhere or choose another OUT_DIR")

    def keep_inputs(self, songs: list[SongRequest]) -> list[SongRequest]:
        """Fail the songs that would overwrite an input of this run: a song whose token or audio file
        is another song's (or its own) ``prompt_audio_path`` (``OUT/tokens/<idx>.pt`` given as a
        prompt) is refused, naming the line that reads it, so the prompt file survives."""
        inputs: dict[Path, SongRequest] = {}
        for s in songs:
            path = s.prompt_info.get("path") if isinstance(s.prompt_info, dict) else None
            if path:
                inputs.setdefault(Path(path).resolve(), s)

        def clash(s: SongRequest, paths: Sequence[Path]) -> bool:
            for p in paths:
                reader = inputs.get(p.resolve())
                if reader is not None:
                    self.fail(s.line, s.idx, f"idx {s.idx!r}: its output {p} is the prompt_audio_path of line "
                              f"{reader.line} (idx {reader.idx!r}) and would overwrite it: copy the prompt "
                              f"elsewhere or give line {s.line} another idx")
                    return True
            return False

        if not inputs:
            return songs
        self.pending = [(s, missing) for s, missing in self.pending
                        if not clash(s, [p for sfx, p in self.audio_paths(s.idx).items() if sfx in missing])]
        return [s for s in songs if not clash(s, [*self.token_paths(s.idx).values(),
                                                  *self.audio_paths(s.idx).values()])]

    def existing(self, song: SongRequest) -> bool:
        """With ``--skip-existing``: whether ``song`` needs no generation (all its token files exist).
        Songs whose tokens exist but whose audio files (with a codec) do not are queued to be decoded
        from the stored tokens."""
        if not all(p.is_file() for p in self.token_paths(song.idx).values()):
            return False
        if self.codec is not None:
            missing = [sfx for sfx, p in self.audio_paths(song.idx).items() if not p.is_file()]
            if missing:
                self.pending.append((song, missing))
        return True

    def read_songs(self, lines: list[tuple[int, str | JsonlError]]) -> list[SongRequest]:
        a = self.args
        options = RequestOptions(mode=a.mode, lyrics=a.lyrics, strict=a.strict, truncate_lyrics=a.truncate_lyrics,
                                 input_dir=Path(a.input_jsonl).parent)
        songs: list[SongRequest] = []
        seen: dict[str, int] = {}
        names: dict[str, tuple[int, str]] = {}
        for n, line in lines:
            if isinstance(line, JsonlError):
                self.fail(n, None, line.message)
                continue
            try:
                song = parse_request(n, line, model=self.model, options=options, base_seed=self.base_seed,
                                     seen=seen, library=self.library, encoder=self.encoder)
            except RequestError as e:
                self.fail(n, line_idx(line), str(e))
                continue
            clash = self.name_clash(song, names)
            if clash is not None:
                self.fail(n, song.idx, clash)
                continue
            for w in song.warnings:
                print(f"levo-infer: warning: {self.input}:{n}: {w}", file=sys.stderr)
            seen[song.idx] = n
            if self.args.skip_existing and self.existing(song):
                continue
            songs.append(song)
        return songs

    def write_jsonl(self) -> tuple[Path, Path]:
        """Write the records (with ``--skip-existing`` merged into the earlier run's: its records of the
        songs this run did not redo are kept) and this run's errors."""
        d = self.out / "jsonl"
        d.mkdir(parents=True, exist_ok=True)
        ok, bad = d / f"{self.input.stem}.jsonl", d / f"{self.input.stem}.errors.jsonl"
        mine = {r["idx"] for r in self.records}
        kept = [r for r in self.old_records.values() if r["idx"] not in mine] + self.records
        kept.sort(key=lambda r: r["line"] if isinstance(r.get("line"), int) else 0)
        for path, rows in ((ok, kept), (bad, sorted(self.errors, key=lambda r: r["line"]))):
            write_text_atomic(path, jsonl_text(rows, ensure_ascii=False, what=str(path)))
        return ok, bad

    def new_record(self, s: SongRequest, frames: int, files: list[str], seconds: float | None,
                   batch_songs: int) -> dict[str, Any]:
        record = {
            "idx": s.idx, "line": s.line, "status": "ok", "input": s.item, "lyric": s.lyric, "style": s.style,
            "prompt": s.prompt_info, "seed": s.seed, "frames": frames,
            "audio_seconds": frames / self.model.cfg.frame_rate, "ended_with_eos": frames < self.max_frames,
            "seconds": None if seconds is None else seconds / batch_songs, "batch_seconds": seconds,
            "batch_songs": batch_songs, "tokens": files, "audios": [], "clipped_samples": [],
            "settings": self.settings,
        }
        if s.warnings:
            record["warnings"] = s.warnings
        return record

    # -- generation -------------------------------------------------------------------
    def generate_batch(self, batch: list[SongRequest], bar: Any) -> None:
        a, m = self.args, self.model
        P, pad = m.cfg.prompt_frames, m.pad_id
        prompt = None
        if any(s.prompt is not None for s in batch):
            prompt = torch.full((len(batch), m.code_depth, max(P, 1)), pad, dtype=torch.long)
            for i, s in enumerate(batch):
                if s.prompt is not None:
                    t = s.prompt[:, :P]
                    prompt[i, :, :t.shape[1]] = t

        def progress(step: int, total: int, running: int) -> None:
            if bar is not None and (step % 25 == 0 or step == total):
                bar.set_postfix_str(f"step {step}/{total}, {running} running", refresh=False)

        kw: dict[str, Any] = {}
        if not a.compat:
            kw = {"repetition_penalty": RELEASED_PENALTY if a.repetition_penalty is None else a.repetition_penalty,
                  "penalty_window": a.penalty_window}
        t0 = time.perf_counter()
        out = generate(m, [s.lyric for s in batch], [s.style for s in batch], prompt, max_frames=self.max_frames,
                       cfg_coef=a.cfg_coef, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       seed=[s.seed for s in batch], compat=a.compat, stop_at_cut=True, progress=progress,
                       slots=self.slots, kv_bits=8 if a.kv_cache == "8bit" else None, compile=a.compile, **kw)
        if m.device.type == "cuda":
            torch.cuda.synchronize(m.device)
        seconds = time.perf_counter() - t0
        codes, lengths = out.codes.cpu(), out.lengths.cpu()
        jobs = []
        for i, s in enumerate(batch):
            n = int(lengths[i])
            sets = mode_tokens(codes[i, :, :n].clone(), a.mode)
            try:  # each song on its own: a failed write fails this song alone
                files = self.write_tokens(s, sets)
            except SongOutputError as e:
                self.fail(s.line, s.idx, f"idx {s.idx!r}: {e}")
                continue
            record = self.new_record(s, n, files, seconds, len(batch))
            self.records.append(record)
            jobs.append((record, s.seed, sets))
        if self.codec is not None:
            self.write_audios(jobs)

    def write_tokens(self, s: SongRequest, sets: dict[str, Any]) -> list[str]:
        """Write one song's token files (atomic); :class:`SongOutputError` naming the file that could
        not be written. Files written stay: generated tokens are never deleted."""
        files = []
        target = self.out / "tokens"
        try:
            target.mkdir(parents=True, exist_ok=True)
            for sfx, t in sets.items():
                target = self.out / "tokens" / f"{s.idx}{sfx}.pt"
                atomic_torch_save(t.contiguous(), target)
                files.append(str(target))
        except Exception as e:  # noqa: BLE001 - reported for this song, the others go on
            raise SongOutputError(f"cannot write {target}: {_describe(e)}") from e
        return files

    def write_audios(self, jobs: list[tuple[dict[str, Any], int | None, dict[str, Any]]]) -> None:
        """Decode and write the audio files of songs whose tokens are on disk: ``jobs`` of (record,
        seed, {suffix: tokens [3, T]} to decode). Songs with the same window count are decoded
        together (``--batch-size`` at a time, each with its own seed: the audio of one at a time). A
        decode or write that fails fails that song's audio alone: its token files stay, its record
        says ``status: audio_failed`` with the error, the errors file lists it, and a rerun with
        ``--skip-existing`` decodes it from the stored tokens."""
        assert self.codec is not None
        items = [(j, sfx, t) for j, (_, _, sets) in enumerate(jobs) for sfx, t in sets.items()]
        written: dict[tuple[int, str], int] = {}
        failures: dict[int, list[str]] = {}
        results = decode_in_groups(self.codec, [t for _, _, t in items], [jobs[j][1] for j, _, _ in items],
                                   self.args.batch_size)
        for i, wav in results:
            j, sfx, _ = items[i]
            path = self.out / "audios" / f"{jobs[j][0]['idx']}{sfx}.flac"
            if isinstance(wav, Exception):
                failures.setdefault(j, []).append(f"cannot decode {path.name}: {_describe(wav)}")
                continue
            try:
                written[j, sfx] = song_codec.write_flac(wav, int(self.codec.sample_rate), path)
            except Exception as e:  # noqa: BLE001 - this song's audio fails alone
                failures.setdefault(j, []).append(f"cannot write {path}: {_describe(e)}")
        for j, (record, _, sets) in enumerate(jobs):
            before = dict(zip(record.get("audios") or [], record.get("clipped_samples") or []))
            audios, clipped = [], []
            for sfx, path in self.audio_paths(record["idx"]).items():
                if (j, sfx) in written:
                    audios.append(str(path))
                    clipped.append(written[j, sfx])
                elif sfx not in sets and path.is_file():  # written by an earlier run
                    audios.append(str(path))
                    clipped.append(before.get(str(path)))
            record["audios"], record["clipped_samples"] = audios, clipped
            if j in failures:
                record["status"], record["audio_error"] = "audio_failed", "; ".join(failures[j])
                self.fail(record["line"], record["idx"],
                          f"idx {record['idx']!r}: audio not written ({record['audio_error']}); its tokens are kept "
                          f"in {self.out / 'tokens'}: rerun with --skip-existing to decode them",
                          status="audio_failed", tokens=record["tokens"])
            else:
                record["status"] = "ok"
                record.pop("audio_error", None)

    def decode_pending(self) -> None:
        """``--skip-existing``: decode the audio of songs whose token files an earlier run wrote but
        whose audio files are missing, with the seed of the earlier run's record."""
        jobs = []
        for s, missing in self.pending:
            old = self.old_records.get(s.idx)
            try:
                sets = {sfx: load_token_file(self.token_paths(s.idx)[sfx]) for sfx in missing}
            except Exception as e:  # noqa: BLE001 - this song fails alone
                self.fail(s.line, s.idx, f"idx {s.idx!r}: cannot read its stored tokens: {_describe(e)}")
                continue
            if old is not None and isinstance(old.get("seed"), int):
                record = {**old, "line": s.line}
            else:  # no record of the run that wrote the tokens: the seed this run would use
                frames = int(next(iter(sets.values())).shape[-1])
                record = self.new_record(s, frames, [str(p) for p in self.token_paths(s.idx).values()], None, 1)
            self.records.append(record)
            jobs.append((record, record["seed"], sets))
        if jobs:
            print(f"levo-infer: decoding the audio of {len(jobs)} song(s) from their stored tokens "
                  f"({self.out / 'tokens'})", file=sys.stderr)
            self.write_audios(jobs)

    def run(self) -> int:
        if not self.input.is_file():
            raise UsageError(f"{self.input}: input JSONL not found")
        self.check_paths()
        lines = read_lines(self.input)
        if not lines:
            print(f"levo-infer: error: {self.input}: no song found (the file is empty or holds only blank lines); "
                  "nothing to generate", file=sys.stderr)
            return 1
        if self.args.skip_existing:
            try:
                self.old_records = {r["idx"]: r for r in read_records(self.out / "jsonl" / f"{self.input.stem}.jsonl")}
            except OutputError as e:
                raise UsageError(f"--skip-existing merges the earlier records, but {e}") from None
        self.setup()
        songs = self.keep_inputs(self.read_songs(lines))
        self.decode_pending()
        self.write_jsonl()
        bs = self.slots * QUEUE_PER_SLOT  # one engine call per group: its slots refill from the group's queue
        bar = progress_bar(len(songs), disable=self.args.no_progress)
        try:
            for start in range(0, len(songs), bs):
                batch = songs[start:start + bs]
                try:
                    self.generate_batch(batch, bar)
                except Exception as e:  # noqa: BLE001 - report, go on with the next batch
                    hint = " (try a smaller --batch-size or --low-mem)" if "out of memory" in str(e).lower() else ""
                    done = {r["line"] for r in self.records} | {r["line"] for r in self.errors}
                    for s in batch:
                        if s.line in done:  # already written (or already failed) on its own
                            continue
                        self.fail(s.line, s.idx, f"idx {s.idx!r}: generation failed: {type(e).__name__}: {e}{hint}")
                    if self.model.device.type == "cuda":
                        torch.cuda.empty_cache()
                bar.update(len(batch))
                self.write_jsonl()
        finally:
            bar.close()
        ok, bad = self.write_jsonl()
        n_ok = sum(r["status"] == "ok" for r in self.records)
        msg = f"levo-infer: {n_ok} song(s) written -> {self.out / 'tokens'}"
        if self.codec is not None:
            msg += f" and {self.out / 'audios'}"
        msg += f"; records in {ok}"
        if self.errors:
            failed = ", ".join(str(e["line"]) for e in sorted(self.errors, key=lambda r: r["line"]))
            msg += f"; {len(self.errors)} failed (line {failed}), see {bad}"
        print(msg, file=sys.stderr)
        return 1 if self.errors else 0


def _describe(e: BaseException) -> str:
    """An exception in a song's error message: the OS's words for a file error, else type and text
    (with the --batch-size hint for running out of memory)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    hint = " (try a smaller --batch-size)" if "out of memory" in str(e).lower() else ""
    return f"{type(e).__name__}: {e}{hint}"


def load_token_file(path: Path) -> torch.Tensor:
    """A token file as written by levo-infer (``*.pt``, loaded with ``weights_only``) or ``levo-data
    encode`` (``*.npy``): an integer tensor ``[3, T]`` or ``[N, 3, T]``; ``ValueError`` otherwise."""
    if path.suffix == ".npy":
        toks = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        toks = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(toks, torch.Tensor) or toks.dim() not in (2, 3) or toks.shape[-2] != 3:
        what = tuple(toks.shape) if isinstance(toks, torch.Tensor) else type(toks).__name__
        raise ValueError(f"holds {what}, expected a LongTensor [3, T] (or [N, 3, T] for N songs)")
    return toks


# ----------------------------------------------------------------------------- levo-infer decode
def _decode_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("tokens_dir", help="folder of token files (OUT_DIR/tokens of an earlier levo-infer run, or the "
                                       "<idx>.npy files of levo-data encode)")
    ap.add_argument("out_dir", help="folder for the .flac files")
    ap.add_argument("--codec", required=True, metavar="CODEC_DIR", help="codec folder (model_septoken/, vae/)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=0,
                    help="noise seed of songs without a record: a token file that levo-infer's records "
                         "(TOKENS_DIR/../jsonl/*.jsonl) name is decoded with its song's seed, so the audio is the "
                         "FLAC levo-infer wrote; the others, song k in file order (sorted), use seed + k (default 0)")
    ap.add_argument("--batch-size", type=int, default=1, metavar="N",
                    help="decode up to N songs with the same number of 40 s windows together (default 1); each "
                         "keeps its seed, the audio equals one-at-a-time decoding up to float rounding")


def _decode_check(a: argparse.Namespace) -> str | None:
    return f"--batch-size {a.batch_size}: must be >= 1" if a.batch_size < 1 else None


def decode(a: argparse.Namespace) -> int:
    """``levo-infer decode TOKENS_DIR OUT_DIR --codec CODEC_DIR``: token files (``*.pt`` [3, T] as
    levo-infer writes them, ``*.npy`` as ``levo-data encode`` writes them) -> ``OUT_DIR/<name>.flac``.
    Each song is decoded with the seed levo-infer's record gives it (the same audio levo-infer wrote);
    a ``[N, 3, T]`` file holds N songs, written as ``<name>_<i>.flac``. A file that cannot be decoded
    is reported and skipped (exit status 1); the others are written."""
    src, out = Path(a.tokens_dir), Path(a.out_dir)
    files = sorted([*src.glob("*.pt"), *src.glob("*.npy")]) if src.is_dir() else []
    if not files:
        print(f"levo-infer decode: error: {src}: no token files (*.pt, *.npy)", file=sys.stderr)
        return 2
    try:
        seeds = record_seeds(src.parent / "jsonl")
        check_writable(out)
    except OutputError as e:
        print(f"levo-infer decode: error: {e}", file=sys.stderr)
        return 2
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    try:
        codec = load_codec(a.codec, dev)
    except UsageError as e:
        print(f"levo-infer decode: error: {e}", file=sys.stderr)
        return 2
    failed: set[Path] = set()
    songs: list[tuple[Path, Path, Any, int]] = []  # (file, output, tokens [3, T], seed)
    k, from_records = 0, 0
    for f in files:
        try:
            toks = load_token_file(f)
        except Exception as e:  # noqa: BLE001 - one bad file fails alone
            failed.add(f)
            k += 1
            print(f"levo-infer decode: {f}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if toks.dim() == 2 and f.name in seeds:
            songs.append((f, out / f"{f.stem}.flac", toks, seeds[f.name]))
            from_records += 1
            k += 1
            continue
        rows = [toks] if toks.dim() == 2 else list(toks)
        names = [f"{f.stem}.flac"] if toks.dim() == 2 else [f"{f.stem}_{i}.flac" for i in range(len(rows))]
        for name, t in zip(names, rows):
            songs.append((f, out / name, t, a.seed + k))
            k += 1
    taken: dict[Path, Path] = {}
    for f, path, _, _ in songs:
        if path in taken and taken[path] != f:
            print(f"levo-infer decode: error: {f} and {taken[path]} would both write {path}; rename one",
                  file=sys.stderr)
            return 2
        taken[path] = f
    if songs:
        print(f"levo-infer decode: {len(songs)} song(s); seeds: {from_records} from levo-infer's records in "
              f"{src.parent / 'jsonl'}, {len(songs) - from_records} from --seed {a.seed}", file=sys.stderr)
    written = 0
    for i, wav in decode_in_groups(codec, [t for _, _, t, _ in songs], [s for *_, s in songs], a.batch_size):
        f, path, _, _ = songs[i]
        try:
            if isinstance(wav, Exception):
                raise wav
            clipped = song_codec.write_flac(wav, int(codec.sample_rate), path)
        except Exception as e:  # noqa: BLE001 - one bad file fails alone
            failed.add(f)
            print(f"levo-infer decode: {f}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        written += 1
        note = f" ({clipped} sample(s) beyond full scale, clipped)" if clipped else ""
        print(f"levo-infer decode: {f} -> {path}{note}", file=sys.stderr)
    print(f"levo-infer decode: {written} song(s) from {len(files) - len(failed)} of {len(files)} file(s) decoded -> "
          f"{out}", file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- levo-infer random-codec
def _random_codec_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("out_dir", help="folder to write the codec files to (not one that holds a codec already)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    ap.add_argument("--layers", type=int, default=1, help="flow estimator layers (default 1; the released: 16)")


def random_codec(a: argparse.Namespace) -> int:
    """``levo-infer random-codec DIR``: write a small random codec folder in the released runtime
    layout (``model_septoken/``, ``vae/``, labelled ``NOISE.txt``) for a plumbing smoke test of
    ``--codec`` and ``levo-infer decode``: its audio is noise."""
    out = Path(a.out_dir)
    if song_codec.is_codec_dir(out):
        print(f"levo-infer random-codec: error: {out} already holds a codec folder; not overwriting it",
              file=sys.stderr)
        return 2
    if a.layers < 1:
        print("levo-infer random-codec: error: --layers must be >= 1", file=sys.stderr)
        return 2
    song_codec.write_random_codec(out, seed=a.seed, layers=a.layers)
    print(f"levo-infer random-codec: wrote {out}: random weights, its audio is NOISE (a plumbing smoke test of "
          f"--codec {out}; the real codec is the released runtime ckpt/)", file=sys.stderr)
    return 0


#: levo-infer's subcommands (the plain form ``levo-infer CKPT_DIR INPUT.jsonl OUT_DIR`` is not one)
SUBCOMMANDS: dict[str, Command] = {
    "decode": Command("turn token files into audio with a codec folder", _decode_args, decode,
                      description=decode.__doc__.splitlines()[0], check=_decode_check),
    "random-codec": Command("write a small random codec folder (its audio is noise) for a plumbing smoke test",
                            _random_codec_args, random_codec, description=random_codec.__doc__.splitlines()[0]),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        cmd = SUBCOMMANDS[argv[0]]
        return cmd.run(parse_command(f"levo-infer {argv[0]}", cmd, argv[1:]))
    args = parse_args(argv)
    try:
        return Runner(args).run()
    except UsageError as e:
        print(f"levo-infer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
