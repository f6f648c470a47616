"""Native LeVo codec: song tokens <-> 48 kHz stereo, from the released runtime files.

``load_decoder(ckpt_dir)`` (:mod:`levo_infer.codec.decoder`) gives a :class:`Decoder` whose
``decode(tokens [B,3,T], mode)`` returns ``(waveform [B,2,N], 48000)``; :mod:`.flow` holds the RVQ
look-up, the flow-matching estimator and its Euler/CFG solver, :mod:`.vae` the Oobleck VAE decoder.

``load_encoder(ckpt_dir)`` (:mod:`levo_infer.codec.encoder`) gives a :class:`NativeEncoder` whose
``encode(full, vocal, bgm)`` turns ``[B,2,N]`` waveforms at 48 kHz into tokens ``[B,3,T]``;
:mod:`.musicfm` holds the MusicFM front end, conformer and RVQ encode, :mod:`.dsp` the resampler,
mel and audio reading, :mod:`.separate` the vocal/bgm separation (htdemucs through the optional
``separate`` extra). ``load_encoder("songgeneration:PATH", config=...)`` is the adapter to a
user's SongGeneration checkout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .decoder import (
    DECODE_MODES,
    SAMPLE_RATE,
    CodecError,
    Decoder,
    find_codec_dir,
    is_codec_dir,
    load_decoder,
    output_samples,
    song_groups,
)
from .dsp import write_flac
from .encoder import Encoder, EncoderError, NativeEncoder, frames_for, load_encoder
from .toy import is_random_codec, write_random_codec


class SongCodec:
    """What ``levo-infer`` calls: one song's token file ``[3,T]`` -> waveform ``[2,N]``, decoded as
    stored (the file's rows already carry a single-stream mode's silent codes), its noise drawn
    from ``seed`` (the released decoder never seeds it; ours reproduces a song's audio)."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.sample_rate = decoder.sample_rate

    def decode(self, tokens: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        wav, _ = self.decoder.decode(tokens[None] if tokens.dim() == 2 else tokens, "mixed", generator=g)
        return wav[0]

    def decode_batch(self, tokens: Sequence[torch.Tensor], seeds: Sequence[int | None]) -> list[torch.Tensor]:
        """Songs ``[3,T_i]`` of the same window count (:func:`song_groups`) decoded together, each with
        the noise of its own seed: ``decode(tokens[i], seeds[i])`` for each, up to float rounding."""
        gens = [torch.Generator().manual_seed(int(s)) if s is not None else None for s in seeds]
        return self.decoder.decode_batch(list(tokens), "mixed", generators=gens)


def load_codec(ckpt_dir: str | os.PathLike, device: str) -> Any:
    """:class:`SongCodec` over the codec folder ``ckpt_dir``; on CUDA the solver runs under fp16
    autocast as released (the VAE in fp32, TF32 off: :func:`~levo_infer.codec.decoder.strict_fp32`)."""
    dec = load_decoder(ckpt_dir, device=device)
    if torch.device(device).type == "cuda":
        dec.autocast = torch.float16
    return SongCodec(dec)


__all__ = ["DECODE_MODES", "SAMPLE_RATE", "CodecError", "Decoder", "Encoder", "EncoderError", "NativeEncoder",
           "SongCodec", "find_codec_dir", "frames_for", "is_codec_dir", "load_codec", "load_decoder", "load_encoder",
           "is_random_codec", "output_samples", "song_groups", "write_flac", "write_random_codec"]
