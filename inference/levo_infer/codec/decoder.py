"""The LeVo codec decoder: song tokens ``[B,3,T]`` (25 Hz) -> 48 kHz stereo, from the released files.

What happens to a song (``shared/codec_facts.md`` §1, §6, §8, §9):

1. **Streams.** Row 1 (vocal) and row 2 (bgm) are decoded; row 0 (mixed) is not. ``mode="vocal"``
   pins the bgm stream to its silent code 9670, ``mode="bgm"`` the vocal stream to 3142.
2. **Tiling.** The codes are repeated (the whole sequence doubled, never zero-padded: the
   estimator is bidirectional, so the tail influences real frames) to ``250 + 750·K`` frames,
   at least 1000; window ``k`` reads frames ``[750k, 750k+1000)``.
3. **Windows.** Each window is solved by :class:`~levo_infer.codec.flow.FlowDecoder` from its own
   noise ``x0 [B,1000,64]``; window ``k ≥ 1`` takes window ``k−1``'s last 250 latent frames as
   in-context frames. The VAE (:class:`~levo_infer.codec.vae.OobleckDecoder`, chunked) turns each
   window's latent into ``[B,2,1 920 000]`` samples.
4. **Joining.** Consecutive windows crossfade over 480 000 samples (10 s) with float64 weights
   ``linspace(0,1,480000)``; the song is cut to ``int(T/100*4*48000)`` samples (Python float
   arithmetic, as released: ``T·1920 − 1`` for some T).

Noise: the released code never seeds it, so ``decode`` takes the windows' ``x0`` explicitly
(``noise=[x0_window0, x0_window1, ...]``), or draws them from ``generator`` in the released order
(placeholder, ``x0`` of window 0, then per later window its pad and its ``x0``), so that a CPU
torch generator replays the released draws.

Groups of songs: ``decode_batch(songs)`` decodes songs of different lengths but the same window
count together, each with its own noise (its own generator, or its own ``x0`` list) drawn exactly
as a one-song ``decode`` draws it; :func:`song_groups` sorts a list of songs into such groups.

Precision: fp32 by default, and truly so on GPU: the whole decode runs with TF32 off for cuBLAS
matmuls and cuDNN convolutions (:func:`strict_fp32`; PyTorch lets cuDNN convolutions use TF32 on
Ampere and later by default, the released code disables cuDNN instead). ``autocast`` (fp16/bf16)
applies to the flow solver only, in one autocast scope per decode so that each weight is cast
once; the VAE always runs in its own weight dtype.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import LevoInferError
from ..integrity import IntegrityError, verify_torch_zip
from ..safe_load import torch_load
from ..tokens import DECODE_MODES, SILENT_BGM_CODE, SILENT_VOCAL_CODE  # the silent codes of codec_facts §1
from .flow import FlowDecoder
from .vae import OobleckDecoder, VAEConfig

log = logging.getLogger(__name__)

SAMPLE_RATE = 48000
WINDOW = 1000         # latent frames per window (the estimator's learned positions)
CONTEXT = 250         # in-context frames a window takes from the previous one
HOP = WINDOW - CONTEXT
CROSSFADE = 480_000   # samples (10 s)

#: the released runtime layout under a codec folder
SEPTOKEN_FILE = Path("model_septoken") / "model_2.safetensors"
VAE_JSON = Path("vae") / "stable_audio_1920_vae.json"
VAE_CKPT = Path("vae") / "autoencoder_music_1320k.ckpt"


class CodecError(LevoInferError):
    """Codec files or decode input that cannot be used (which file / key / value, what was expected)."""


def output_samples(frames: int) -> int:
    """The released output length ``int(T/100*4*48000)`` (IEEE double, left to right, truncated)."""
    return int(frames / 100 * 4 * 48000)


def tiled_length(frames: int) -> int:
    """Frames after tiling: at least 1000, then ``250 + 750·K``."""
    t = max(frames, WINDOW)
    if (t - CONTEXT) % HOP:
        t = -(-(t - CONTEXT) // HOP) * HOP + CONTEXT
    return t


def tile_codes(codes: torch.Tensor) -> torch.Tensor:
    """``[B,T]`` -> ``[B, tiled_length(T)]`` by doubling the whole sequence (codec_facts §6)."""
    T = codes.shape[-1]
    out = codes
    if T < WINDOW:
        while out.shape[-1] < WINDOW:
            out = torch.cat([out, out], dim=-1)
        out = out[..., :WINDOW]
    target = tiled_length(out.shape[-1])
    while out.shape[-1] < target:
        out = torch.cat([out, out], dim=-1)
    return out[..., :target]


def n_windows(frames: int) -> int:
    """Windows a song of ``frames`` frames is decoded in (``(tiled_length - 250) / 750``)."""
    return (tiled_length(frames) - CONTEXT) // HOP


def song_groups(frames: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of songs (by their frame counts) in groups that :meth:`Decoder.decode_batch` decodes
    together: the same window count, at most ``batch_size`` songs, groups in the order of their first
    song, songs in input order within a group."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_windows: dict[int, list[int]] = {}
    for i, t in enumerate(frames):
        by_windows.setdefault(n_windows(int(t)), []).append(i)
    return [idx[j:j + batch_size] for idx in by_windows.values() for j in range(0, len(idx), batch_size)]


@contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for cuBLAS matmuls and cuDNN convolutions inside the block; the previous settings are
    restored on exit.

    Both PyTorch APIs are set together (``torch.set_float32_matmul_precision`` and
    ``cudnn.allow_tf32``, then, where PyTorch has it (2.9+), ``fp32_precision`` of ``cuda.matmul`` and
    ``cudnn.conv``), so that code reading either sees a consistent state. The flags are process-wide: a
    concurrent thread's CUDA work runs with them too while the block lasts."""
    m = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = hasattr(m, "fp32_precision") and hasattr(conv, "fp32_precision")
    try:
        legacy_mm: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller mixed the legacy and new APIs: restore the new one only
        legacy_mm = None
    try:
        legacy_conv: bool | None = bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        legacy_conv = None
    new = (m.fp32_precision, conv.fp32_precision) if new_api else None
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    if new_api:
        m.fp32_precision, conv.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        if legacy_mm is not None:
            torch.set_float32_matmul_precision(legacy_mm)
        if legacy_conv is not None:
            torch.backends.cudnn.allow_tf32 = legacy_conv
        if new is not None:
            m.fp32_precision, conv.fp32_precision = new


def crossfade_join(parts: list[torch.Tensor], fade: int = CROSSFADE) -> torch.Tensor:
    """Join window waveforms ``[B,C,N]``: the last ``fade`` samples so far and the first ``fade``
    of the next are mixed with float64 weights ``linspace(0,1,fade)``; the rest is appended."""
    out = parts[0]
    if len(parts) == 1:
        return out
    w = torch.linspace(0, 1, fade, dtype=torch.float64, device=out.device)
    pieces = [out]
    for nxt in parts[1:]:
        prev = pieces[-1]
        tail = prev[..., -fade:].double() * (1 - w) + nxt[..., :fade].double() * w
        pieces[-1] = prev[..., :-fade]
        pieces.append(tail.to(prev.dtype))
        pieces.append(nxt[..., fade:])
    return torch.cat(pieces, dim=-1)


@dataclass
class Decoder:
    """The flow-matching decoder and the VAE, ready to turn tokens into waveforms."""

    flow: Any            # levo_infer.codec.flow.FlowDecoder
    vae: Any             # levo_infer.codec.vae.OobleckDecoder
    sample_rate: int = SAMPLE_RATE
    steps: int = 10
    cfg: float = 1.5
    vae_chunk: int = 128
    vae_overlap: int = 32
    autocast: torch.dtype | None = None  # fp16/bf16 for the solver on GPU (as released); never the VAE
    ignored: dict[str, int] = field(default_factory=dict)  # tensors of each file that decoding does not read

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    @property
    def codebook_size(self) -> int:
        return int(self.flow.codebook_size)

    def to(self, device: str | torch.device) -> Decoder:
        self.flow.to(device)
        self.vae.to(device)
        return self

    # -- input ------------------------------------------------------------------------
    def check_tokens(self, tokens: Any, mode: str) -> torch.Tensor:
        """``tokens`` as a long tensor ``[B,3,T]`` on the decoder's device; :class:`CodecError` otherwise."""
        if mode not in DECODE_MODES:
            raise CodecError(f"unknown mode {mode!r}; expected one of {', '.join(DECODE_MODES)} (for 'separate', "
                             "decode the song once per mode)")
        if not isinstance(tokens, torch.Tensor):
            raise CodecError(f"tokens must be a tensor [B,3,T], got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise CodecError(f"tokens must be integer codes, got dtype {tokens.dtype}")
        if tokens.dim() == 2:
            tokens = tokens[None]
        if tokens.dim() != 3 or tokens.shape[1] != 3:
            raise CodecError(f"tokens must be [B,3,T] (rows: mixed, vocal, bgm), got shape {tuple(tokens.shape)}")
        if tokens.shape[0] == 0 or tokens.shape[2] == 0:
            raise CodecError(f"nothing to decode: tokens of shape {tuple(tokens.shape)} (T = 0 frames)")
        V = self.codebook_size
        rows = tokens[:, 1:] if mode == "mixed" else (tokens[:, 1:2] if mode == "vocal" else tokens[:, 2:3])
        bad = (rows < 0) | (rows >= V)
        if bool(bad.any()):
            b, r, t = (int(i) for i in torch.nonzero(bad)[0])
            row = (r + 1) if mode == "mixed" else (1 if mode == "vocal" else 2)
            v = int(rows[b, r, t])
            what = " (EOS/pad: cut the song at its first EOS before decoding)" if v in (V, V + 1) else ""
            raise CodecError(f"token out of range: song {b}, row {row}, frame {t} holds {v}; codes must be in "
                             f"[0, {V}){what}")
        return tokens.long().to(self.device)

    # -- decode -----------------------------------------------------------------------
    def window_noise(self, batch: int, windows: int, generator: torch.Generator | None) -> list[torch.Tensor]:
        """Each window's ``x0 [B,1000,64]``, drawn in the released order (placeholder, x0, then per
        later window its pad and its x0), on the generator's device."""
        D = int(self.flow.latent_dim)
        dev = generator.device if generator is not None else torch.device("cpu")
        torch.randn(batch, WINDOW, D, generator=generator, device=dev)  # the placeholder latent (no effect)
        out = [torch.randn(batch, WINDOW, D, generator=generator, device=dev)]
        for _ in range(1, windows):
            torch.randn(batch, HOP, D, generator=generator, device=dev)  # the pad after the context (no effect)
            out.append(torch.randn(batch, WINDOW, D, generator=generator, device=dev))
        return out

    def _streams(self, tokens: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded streams ``(vocal, bgm)`` of checked tokens ``[B,3,T]``, the other stream pinned to its
        silent code in a single-stream mode, each tiled to the window layout."""
        cv, cb = tokens[:, 1], tokens[:, 2]
        if mode == "vocal":
            cb = torch.full_like(cb, SILENT_BGM_CODE)
        elif mode == "bgm":
            cv = torch.full_like(cv, SILENT_VOCAL_CODE)
        return tile_codes(cv), tile_codes(cb)

    def _check_noise(self, noise: Sequence[torch.Tensor], B: int, K: int, what: str) -> None:
        D = int(self.flow.latent_dim)
        if len(noise) != K:
            raise CodecError(f"{what} is decoded in {K} window(s) of {WINDOW} frames, got {len(noise)} noise "
                             "tensor(s)")
        for k, x0 in enumerate(noise):
            if tuple(x0.shape) != (B, WINDOW, D):
                raise CodecError(f"{what}: noise[{k}] has shape {tuple(x0.shape)}, expected {(B, WINDOW, D)}")

    def _decode_tiled(self, cv: torch.Tensor, cb: torch.Tensor, noise: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tiled codes ``[B, 250+750K]`` and K noise tensors -> each song's joined waveform ``[1,2,·]`` (not
        yet cut).

        All windows are solved first, batched, in one autocast scope (weights cast once per decode); then
        the VAE turns each song's window latents into samples, outside that scope (fp32, or the VAE's own
        dtype), one song at a time: convolution kernels pick other algorithms for other batch sizes, and
        the solver's numbers do not depend on the batch (its time embedding is computed once for all
        rows), so on CPU a song's audio is bit for bit the same whatever songs are decoded beside it."""
        B, D = cv.shape[0], int(self.flow.latent_dim)
        K = (cv.shape[-1] - CONTEXT) // HOP
        amp = (torch.autocast(device_type=self.device.type, dtype=self.autocast) if self.autocast is not None
               else nullcontext())
        latents: list[torch.Tensor] = []
        with amp:
            prev = None
            for k in range(K):
                sl = slice(HOP * k, HOP * k + WINDOW)
                x0 = noise[k].to(self.device, torch.float32)
                if prev is None:
                    Z, n_ctx = None, 0
                else:  # the previous window's last 250 de-normalised latent frames, then nothing (masked away)
                    ctx = prev[..., -CONTEXT:].transpose(1, 2)
                    Z, n_ctx = torch.cat([ctx, ctx.new_zeros(B, HOP, D)], dim=1), CONTEXT
                prev = self.flow.solve_window(cv[:, sl], cb[:, sl], Z, n_ctx, x0, steps=self.steps, cfg=self.cfg,
                                              autocast=self.autocast).float()
                latents.append(prev)
        return [crossfade_join([self.vae.decode_chunked(lat[b:b + 1], chunk=self.vae_chunk,
                                                        overlap=self.vae_overlap).float() for lat in latents])
                for b in range(B)]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, mode: str = "mixed", *, noise: list[torch.Tensor] | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``tokens [B,3,T]`` -> ``(waveform [B,2,N] float32, 48000)`` with ``N = int(T/100*4*48000)``.

        ``noise``: each window's initial noise ``[B,1000,64]`` in order (exact replays); otherwise
        drawn from ``generator`` (a fresh unseeded draw without one, as released)."""
        tokens = self.check_tokens(tokens, mode)
        B, _, T = tokens.shape
        cv, cb = self._streams(tokens, mode)
        K = (cv.shape[-1] - CONTEXT) // HOP
        if noise is None:
            noise = self.window_noise(B, K, generator)
        self._check_noise(noise, B, K, f"a song of {T} frames")
        with strict_fp32():
            wav = torch.cat(self._decode_tiled(cv, cb, noise))[..., :output_samples(T)]
        return wav.contiguous(), self.sample_rate

    @torch.no_grad()
    def decode_batch(self, songs: Sequence[torch.Tensor], mode: str = "mixed", *,
                     generators: Sequence[torch.Generator | None] | None = None,
                     noise: Sequence[Sequence[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """Songs ``[3,T_i]`` of the same window count (:func:`song_groups`), decoded together ->
        their waveforms ``[2, int(T_i/100*4*48000)]`` float32, in order.

        Each song keeps its own noise: ``noise[i]`` (its windows' ``x0 [1,1000,64]``), else drawn from
        ``generators[i]`` in the released order, exactly the draws of ``decode(songs[i][None],
        generator=generators[i])``, so the result is that of decoding the songs one at a time: bit
        for bit on CPU (tested); on GPU up to float rounding, cuBLAS choosing its kernels by matrix size."""
        n = len(songs)
        if n == 0:
            return []
        if generators is not None and len(generators) != n:
            raise CodecError(f"{n} songs but {len(generators)} generators")
        if noise is not None and len(noise) != n:
            raise CodecError(f"{n} songs but noise for {len(noise)}")
        checked = []
        for i, song in enumerate(songs):
            try:
                t = self.check_tokens(song, mode)
            except CodecError as e:
                raise CodecError(f"song {i}: {e}") from None
            if t.shape[0] != 1:
                raise CodecError(f"song {i}: expected one song [3,T], got shape {tuple(song.shape)}")
            checked.append(t)
        frames = [int(t.shape[-1]) for t in checked]
        K = n_windows(frames[0])
        if any(n_windows(f) != K for f in frames):
            raise CodecError(f"decode_batch needs songs of the same window count; frames {frames} give windows "
                             f"{[n_windows(f) for f in frames]} (group them with song_groups)")
        per_song = []
        for i, f in enumerate(frames):
            x0s = list(noise[i]) if noise is not None else self.window_noise(
                1, K, generators[i] if generators is not None else None)
            self._check_noise(x0s, 1, K, f"song {i} ({f} frames)")
            per_song.append(x0s)
        streams = [self._streams(t, mode) for t in checked]
        cv = torch.cat([s[0] for s in streams])
        cb = torch.cat([s[1] for s in streams])
        batch_noise = [torch.cat([p[k].to(self.device, torch.float32) for p in per_song]) for k in range(K)]
        with strict_fp32():
            wavs = self._decode_tiled(cv, cb, batch_noise)
        return [w[0, :, :output_samples(f)].contiguous() for w, f in zip(wavs, frames)]


# ----------------------------------------------------------------------------- loading
def _need(folder: Path, rel: Path) -> Path:
    p = folder / rel
    if not p.is_file():
        raise CodecError(f"{folder}: no {rel} (a codec folder holds the released runtime layout "
                         f"{SEPTOKEN_FILE}, {VAE_JSON} and {VAE_CKPT})")
    return p


def is_codec_dir(folder: str | os.PathLike) -> bool:
    f = Path(folder)
    return all((f / r).is_file() for r in (SEPTOKEN_FILE, VAE_JSON, VAE_CKPT))


def find_codec_dir(model_dir: str | os.PathLike) -> Path | None:
    """The released runtime folder beside a model folder: the folder itself, its parent, or the
    parent's ``ckpt/`` (a SongGeneration checkout keeps ``ckpt/model_septoken`` and ``ckpt/vae``
    next to the model folders)."""
    m = Path(model_dir).resolve()
    for cand in (m, m.parent, m.parent / "ckpt", m.parent.parent / "ckpt"):
        if is_codec_dir(cand):
            return cand
    return None


def _load_septoken(path: Path, *, heads: int, dtype: torch.dtype) -> tuple[Any, int]:
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - not a safetensors file, truncated header, I/O error
        raise CodecError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    with f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        try:
            sizes = FlowDecoder.sizes_from_shapes(shapes)
        except (KeyError, ValueError) as e:
            raise CodecError(f"{path}: not the released flow-matching decoder layout: {e}") from None
        try:
            with torch.device("meta"):
                flow = FlowDecoder(heads=heads, **sizes)
        except ValueError as e:
            raise CodecError(f"{path}: {e}") from None
        want = flow.state_dict()
        state = {}
        for k, t in want.items():
            if k not in shapes:
                raise CodecError(f"{path}: missing tensor {k!r} (expected shape {tuple(t.shape)})")
            if shapes[k] != tuple(t.shape):
                raise CodecError(f"{path}: tensor {k!r} has shape {shapes[k]}, expected {tuple(t.shape)}")
            x = f.get_tensor(k)
            if x.is_floating_point() and x.device.type != "meta" and not bool(torch.isfinite(x).all()):
                # a released file carries no checksum: NaN/inf is what a corrupted one shows
                raise CodecError(f"{path}: tensor {k!r} holds non-finite values (NaN or inf): the file is corrupted")
            # weights in ``dtype``; the latent statistics stay fp32 whatever it is (fp16 turns counts of
            # 1e6 into inf, bf16 moves a std by up to 5 %)
            want_dtype = torch.float32 if k.startswith("normfeat.") else dtype
            state[k] = x.to(want_dtype if t.dtype.is_floating_point else t.dtype)
    flow.load_state_dict(state, strict=True, assign=True)  # the meta-device module takes the file's tensors
    return flow.eval(), len(shapes) - len(want)


def _load_vae(json_path: Path, ckpt_path: Path, *, dtype: torch.dtype) -> tuple[Any, int]:
    try:
        cfg = VAEConfig.from_json(json_path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CodecError(str(e) if str(json_path) in str(e) else f"{json_path}: {e}") from None
    try:  # the CRC-32 of every record torch wrote into the file (released files too)
        verify_torch_zip(ckpt_path)
    except IntegrityError as e:
        raise CodecError(str(e)) from None
    ck = torch_load(ckpt_path, error=CodecError)  # weights_only, memory-mapped; every error names the file
    sd = ck.get("state_dict") if isinstance(ck, dict) else None
    if not isinstance(sd, dict):
        raise CodecError(f"{ckpt_path}: expected a dict with a 'state_dict' of VAE tensors, got "
                         f"{type(ck).__name__}{' without state_dict' if isinstance(ck, dict) else ''}")
    try:
        vae = OobleckDecoder.from_state_dict(cfg, sd)
    except (KeyError, ValueError) as e:
        raise CodecError(f"{ckpt_path} does not match {json_path.name}: {e}") from None
    return vae.to(dtype).eval(), int(vae.n_ignored_keys)


def load_decoder(ckpt_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, heads: int = 20, strict_statistics: bool = False) -> Decoder:
    """The decoder from a released runtime folder (``model_septoken/model_2.safetensors``,
    ``vae/stable_audio_1920_vae.json``, ``vae/autoencoder_music_1320k.ckpt``).

    Sizes come from the tensor shapes (the estimator's layers, width, MLP width, positions, code and
    latent sizes; a file with another MLP width than the released 2x is built with its own, as the
    released GPT-2 config's ``n_inner`` allows) and the VAE json (``heads``: the estimator's head count,
    which no shape holds, released 20). ``dtype``: the weights' dtype; the latent statistics stay fp32
    whatever it is. Every tensor decoding reads is checked (missing or misshaped: :class:`CodecError`
    naming it); the others (MusicFM encoder, training heads, the VAE encoder) are ignored and
    counted. The pickle is read ``weights_only`` and memory-mapped; safetensors are read lazily.
    Released codec files carry no checksum of ours: the VAE checkpoint's own zip CRC-32s are
    checked, and a flow tensor holding NaN or inf is refused (a corrupted byte elsewhere in the
    safetensors file cannot be detected). Latent statistics with fewer than 1e5 counts (the released code would still be updating them)
    give a warning, or an error with ``strict_statistics``."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise CodecError(f"{folder}: no such codec folder")
    sep, vj, vc = _need(folder, SEPTOKEN_FILE), _need(folder, VAE_JSON), _need(folder, VAE_CKPT)
    flow, ign_flow = _load_septoken(sep, heads=heads, dtype=dtype)
    vae, ign_vae = _load_vae(vj, vc, dtype=dtype)
    msg = flow.check_statistics()
    if msg:
        if strict_statistics:
            raise CodecError(f"{sep}: {msg}")
        warnings.warn(f"{sep}: {msg}", stacklevel=2)
    log.info("codec: %s (%d tensors not used for decoding ignored), %s (%d ignored)", sep, ign_flow, vc, ign_vae)
    return Decoder(flow=flow, vae=vae, ignored={"septoken": ign_flow, "vae": ign_vae}).to(device)


__all__ = ["CONTEXT", "CROSSFADE", "DECODE_MODES", "HOP", "SAMPLE_RATE", "WINDOW",
           "CodecError", "Decoder", "crossfade_join", "find_codec_dir", "is_codec_dir", "load_decoder", "n_windows",
           "output_samples", "song_groups", "strict_fp32", "tile_codes", "tiled_length"]
