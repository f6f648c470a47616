"""Vocal / accompaniment stems for the encoder (rows 1–2 of a song's tokens).

The released ``generate.py`` separates with Demucs **htdemucs** and takes ``vocal`` = its vocals
stem, ``bgm`` = full − vocal (``encoder_facts.md`` §1). :class:`DemucsSeparator` does the same from
the runtime bundle's ``third_party/demucs/ckpt/htdemucs.{pth,yaml}`` (a local path, never a
download), through the optional ``demucs-infer`` package (``pip install 'levo-train[separate]'``;
imported only here, only when a separator is built).

A separator is any callable ``separator(wave [2, N] float32 tensor, sample_rate) -> vocals [C, N]``
(tensor or array, at the same rate): the same shape as ``levo-eval per --separate``, so one
function serves both. :func:`stems` turns a full mix and a separator (or given stems) into the
``(vocal, bgm)`` pair the encoder takes.

Loading the demucs checkpoint: a demucs ``.pth`` is a pickle ``{klass, args, kwargs, state, ...}``
whose ``klass`` is a class reference. It is read with ``torch.load(weights_only=True)``, every
global it names mapped to an inert stand-in (so nothing in the file runs); the model is then built
by us as ``demucs_infer.htdemucs.HTDemucs(*args, **kwargs)`` and its state loaded.

Differences from the released path, on purpose: stems stay in memory (the released wrapper writes
them to audio files and reads them back), and the random time shift of Demucs' shift trick
(``shifts=1``, drawn from Python's ``random``) is seeded per song (``seed``), so encoding is
deterministic; the caller's ``random`` state is restored afterwards.
"""

from __future__ import annotations

import fractions
import inspect
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml

from ..errors import LevoInferError
from . import dsp

PTH_NAME, YAML_NAME = "htdemucs.pth", "htdemucs.yaml"
#: where the runtime bundle keeps the separation model, relative to the bundle root (the codec
#: folder ``ckpt/`` is its sibling)
BUNDLE_DEMUCS = Path("third_party") / "demucs" / "ckpt"
INSTALL_HINT = "pip install 'levo-train[separate]' (the demucs-infer package: Demucs without torchaudio)"


class SeparatorError(LevoInferError):
    """A separation model that cannot be loaded, or a separator whose output is unusable."""


class Separator(Protocol):
    """``separator(wave [2, N] float32, sample_rate) -> vocals [C, N]`` at the same rate."""

    def __call__(self, wave: torch.Tensor, sample_rate: int) -> Any: ...


def stems(full: torch.Tensor, vocal: torch.Tensor | None = None, bgm: torch.Tensor | None = None, *,
          separator: Separator | Callable[..., Any] | None = None, sample_rate: int = dsp.SAMPLE_RATE,
          what: str = "song") -> tuple[torch.Tensor, torch.Tensor]:
    """``(vocal, bgm)`` ``[2, N]`` float32 for the full mix ``full [2, N]``.

    Given both stems: checked and returned. Given one: the other is ``full − stem``. Given neither:
    ``vocal = separator(full)``, ``bgm = full − vocal`` (released ``generate.py``). Every stem must
    hold exactly ``N`` samples: :class:`~levo_infer.codec.dsp.AudioError` naming ``what`` otherwise."""
    full = dsp.check_waveform(full, f"{what}: full mix")
    N = full.shape[-1]
    if vocal is None and bgm is None:
        if separator is None:
            raise SeparatorError(f"{what}: no vocal/bgm stems and no separator to make them")
        try:
            out = separator(full, sample_rate)
        except (SeparatorError, dsp.AudioError):
            raise
        except Exception as e:  # noqa: BLE001 - the user's separator; its failure is this song's
            raise SeparatorError(f"{what}: the separator failed ({type(e).__name__}: {e})") from e
        if not isinstance(out, torch.Tensor):
            try:
                out = torch.from_numpy(np.array(out, dtype=np.float32))
            except (TypeError, ValueError) as e:
                raise SeparatorError(f"{what}: the separator returned {type(out).__name__}, expected a waveform "
                                     f"[channels, samples] ({e})") from None
        vocal = out.detach().cpu()
    have = {}
    for name, x in (("vocal", vocal), ("bgm", bgm)):
        if x is not None:
            x = dsp.check_waveform(x, f"{what}: {name} stem")
            if x.shape[-1] != N:
                raise dsp.AudioError(f"{what}: the {name} stem holds {x.shape[-1]} samples ({x.shape[-1] / sample_rate:.3f} s) "
                                     f"but the full mix {N} ({N / sample_rate:.3f} s); stems must have the mix's length")
            have[name] = x
    v = have.get("vocal", full - have["bgm"] if "bgm" in have else None)
    b = have.get("bgm", full - v)
    return v, b


# ----------------------------------------------------------------------------- demucs
class _Inert:
    """What a global of the demucs pickle becomes: accepts any construction or state, does nothing."""

    qualified = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _read_package(pth: Path) -> dict[str, Any]:
    """The demucs package dict, read weights-only with every global mapped to an inert stand-in
    (``fractions.Fraction``, a plain number type, is kept)."""
    # torch >= 2.5 has these; imported here so that levo_infer loads on the torch 2.4 it supports
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    try:
        names = get_unsafe_globals_in_checkpoint(str(pth))
    except Exception as e:  # noqa: BLE001 - not a torch zip file
        raise SeparatorError(f"{pth}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    allowed: list[Any] = []
    for name in names:
        if name == "fractions.Fraction":
            allowed.append(fractions.Fraction)
        else:
            allowed.append((type(name.rsplit(".", 1)[-1], (_Inert,), {"qualified": name}), name))
    try:
        with safe_globals(allowed):
            pkg = torch.load(str(pth), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated file, unsupported pickle opcode
        raise SeparatorError(f"{pth}: cannot read it weights-only ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(pkg, dict) or not {"klass", "args", "kwargs", "state"} <= set(pkg):
        raise SeparatorError(f"{pth}: not a demucs model package (expected a dict with klass, args, kwargs, state)")
    return pkg


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str, fractions.Fraction))


def load_htdemucs(pth: str | os.PathLike, yaml_path: str | os.PathLike | None = None) -> Any:
    """``demucs_infer`` HTDemucs (eval mode) from a released ``htdemucs.pth`` (+ its ``htdemucs.yaml``)."""
    try:  # demucs-infer: the optional `separate` extra
        from demucs_infer.htdemucs import HTDemucs
    except ImportError as e:
        raise SeparatorError(f"the default separator (htdemucs) needs demucs-infer: {INSTALL_HINT} ({e})") from None
    pth = Path(pth)
    if not pth.is_file():
        raise SeparatorError(f"{pth}: no such separation model file")
    if yaml_path is not None:
        try:
            bag = yaml.safe_load(Path(yaml_path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SeparatorError(f"{yaml_path}: unreadable ({e})") from None
        if not isinstance(bag, dict):
            raise SeparatorError(f"{yaml_path}: expected a demucs bag yaml (a mapping), got {type(bag).__name__}")
        if len(bag.get("models") or [None]) != 1:
            raise SeparatorError(f"{yaml_path}: names {len(bag['models'])} models; the runtime bundle ships one "
                                 f"({pth.name})")
    pkg = _read_package(pth)
    klass = pkg["klass"]
    name = getattr(klass, "qualified", repr(klass))
    if not (isinstance(klass, type) and issubclass(klass, _Inert) and name.rsplit(".", 1)[-1] == "HTDemucs"):
        raise SeparatorError(f"{pth}: holds a {name} model; the default separator builds HTDemucs only "
                             "(plug another model in with --separator module:function)")
    args, kwargs = pkg["args"], pkg["kwargs"]
    if not (_plain(list(args)) and _plain(dict(kwargs))):
        raise SeparatorError(f"{pth}: the model's constructor arguments hold objects other than plain values")
    state = pkg["state"]
    if not isinstance(state, dict) or state.get("__quantized"):
        raise SeparatorError(f"{pth}: a quantized (diffq) or malformed state; expected a plain state dict")

    sig = inspect.signature(HTDemucs)
    dropped = sorted(k for k in kwargs if k not in sig.parameters)
    try:
        model = HTDemucs(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SeparatorError(f"{pth}: does not build an HTDemucs ({type(e).__name__}: {str(e).splitlines()[0]})"
                             + (f"; dropped unknown arguments {dropped}" if dropped else "")) from None
    if "vocals" not in model.sources:
        raise SeparatorError(f"{pth}: the model separates {model.sources}, no 'vocals' stem")
    return model.eval()


def find_demucs(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(htdemucs.pth, htdemucs.yaml or None)`` from the .pth itself, a folder holding it, or a
    runtime bundle root (``third_party/demucs/ckpt/``); SeparatorError naming where it looked."""
    p = Path(path)
    if p.is_file():
        y = p.with_suffix(".yaml")
        return p, y if y.is_file() else None
    looked = []
    for folder in (p, p / BUNDLE_DEMUCS):
        looked.append(str(folder / PTH_NAME))
        if (folder / PTH_NAME).is_file():
            y = folder / YAML_NAME
            return folder / PTH_NAME, y if y.is_file() else None
    raise SeparatorError(f"no htdemucs separation model: looked for {' and '.join(looked)} (the SongGeneration "
                         f"runtime bundle ships it as {BUNDLE_DEMUCS / PTH_NAME})")


def bundle_demucs_dir(codec_dir: str | os.PathLike) -> Path:
    """Where a runtime bundle keeps htdemucs, given its codec folder ``ckpt/``: ``../third_party/demucs/ckpt``."""
    return Path(codec_dir).resolve().parent / BUNDLE_DEMUCS


class DemucsSeparator:
    """The released separation: htdemucs' vocals stem (``bgm`` = full − vocal is :func:`stems`' job).

    Per song: resampled to the model's rate (44.1 kHz for htdemucs) with :func:`~levo_infer.codec.dsp.resample`,
    normalised by the mono reference's mean and std, ``apply_model`` (split into the model's
    segments with ``overlap``, ``shifts`` random shifts seeded by ``seed``), de-normalised, the
    vocals stem resampled back and cut to the input length."""

    def __init__(self, model: Any, *, device: str | torch.device = "cpu", shifts: int = 1, overlap: float = 0.25,
                 seed: int = 0) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.shifts, self.overlap, self.seed = shifts, overlap, seed
        self.vocals = list(model.sources).index("vocals")

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kw: Any) -> DemucsSeparator:
        """From ``htdemucs.pth``, a folder holding it, or a runtime bundle root (see :func:`find_demucs`)."""
        pth, yml = find_demucs(path)
        return cls(load_htdemucs(pth, yml), **kw)

    @torch.no_grad()
    def __call__(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        from demucs_infer.apply import apply_model  # demucs-infer: the optional `separate` extra

        x = dsp.check_waveform(torch.as_tensor(wave), "separator input")
        N = x.shape[-1]
        sr = int(self.model.samplerate)
        y = dsp.resample(x, sample_rate, sr)
        ref = y.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        state = random.getstate()
        random.seed(self.seed)
        try:
            out = apply_model(self.model, ((y - mean) / std)[None], shifts=self.shifts, split=True,
                              overlap=self.overlap, device=self.device)[0]
        finally:
            random.setstate(state)
        vocal = (out[self.vocals] * std + mean).float().cpu()
        vocal = dsp.resample(vocal, sr, sample_rate)
        if vocal.shape[-1] < N:
            vocal = torch.nn.functional.pad(vocal, (0, N - vocal.shape[-1]))
        return vocal[..., :N]


__all__ = ["BUNDLE_DEMUCS", "INSTALL_HINT", "DemucsSeparator", "Separator", "SeparatorError", "bundle_demucs_dir",
           "find_demucs", "load_htdemucs", "stems"]
