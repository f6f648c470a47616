"""The encoder side of the codec (audio -> song tokens ``[B,3,T]``), as an adapter.

Encoding needs source separation (demucs) and the MusicFM encoder with its RVQ, which we do not
port. :class:`Encoder` is the interface levo-infer (prompt audio) and data tools (audio
catalogues -> shards) call; :class:`SongGenerationEncoder` implements it by calling a user's own
SongGeneration checkout at run time (``--codec-encoder songgeneration:PATH``): nothing of it is
copied, installed or imported until an encoder is asked for.

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
import os
import sys
from pathlib import Path
from typing import Any, Protocol

import torch


class EncoderError(ValueError):
    """An encoder spec or checkout that cannot be used."""


class Encoder(Protocol):
    """Audio -> song tokens."""

    sample_rate: int

    def encode_file(self, path: str | os.PathLike) -> torch.Tensor:
        """An audio file -> tokens ``[1,3,T]`` (rows: mixed, vocal, bgm) at 25 Hz."""

    def encode(self, mix: torch.Tensor, vocal: torch.Tensor, bgm: torch.Tensor) -> torch.Tensor:
        """Separated waveforms ``[B,2,N]`` at :attr:`sample_rate` -> tokens ``[B,3,T]``."""


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
        from omegaconf import OmegaConf

        from ..config import ConfigError, resolve_file_config

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

    def encode(self, mix: torch.Tensor, vocal: torch.Tensor, bgm: torch.Tensor) -> torch.Tensor:
        with _checkout_on_path(self.root), torch.no_grad():
            codes, _ = _attr(self.mixed, "encode", "mixed tokenizer")(mix.to(self.device))
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


def load_encoder(spec: str, *, config: str | os.PathLike, device: str = "cpu") -> Encoder:
    """``songgeneration:PATH`` -> :class:`SongGenerationEncoder` (the only kind so far)."""
    kind, sep, where = spec.partition(":")
    if kind != "songgeneration" or not sep or not where:
        raise EncoderError(f"--codec-encoder {spec!r}: expected songgeneration:PATH (a SongGeneration checkout)")
    return SongGenerationEncoder(where, config, device)


__all__ = ["Encoder", "EncoderError", "SongGenerationEncoder", "load_encoder"]
