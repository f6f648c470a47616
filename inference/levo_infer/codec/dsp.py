"""Signal processing of the encode path: sinc resampling, the log-mel front end, reading audio files
(and writing the decoder's FLAC files).

Written from the formulas of ``encoder_facts.md`` §2.3–2.4, which are what torchaudio 2.6 (pinned
by the released runtime) computes; torchaudio itself is not a dependency (it cannot be installed
beside every torch we support). The resampling kernel, the Hann window and the HTK mel filterbank
are computed here, never read from a checkpoint.

* :func:`resample` is torchaudio's ``sinc_interp_hann`` resampler (lowpass width 6, rolloff 0.99):
  the rates are reduced by their gcd to ``orig/new``, the signal is zero-padded by
  ``(width, width + orig)`` and correlated at stride ``orig`` with ``new`` polyphase kernels, and
  cut to ``ceil(new·L/orig)`` samples. Used for 48 k → 24 k inside the encoder and for any other
  input rate → 48 k when a file is read (as the released ``load_audio`` does).
* :func:`log_mel` is ``MelSpectrogram(24000, n_fft 2048, hop 240, 128 HTK bands, power 2)`` +
  ``AmplitudeToDB`` (``10·log10(max(S, 1e-10))``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LevoInferError
from ..jsonio import atomic_file

#: the encoder's sample rate (input) and the MusicFM rate (after 48 k -> 24 k)
SAMPLE_RATE = 48000
MUSICFM_RATE = 24000
N_FFT, HOP, N_MELS = 2048, 240, 128
#: a reduced rate ratio whose polyphase kernel would exceed this many taps is refused (e.g. 44056 Hz:
#: 6000 kernels of 5521 taps); every common rate (8k..192k, 11.025k, 22.05k, 44.1k, 88.2k) is far below
MAX_KERNEL_TAPS = 1 << 22


class ResampleError(LevoInferError):
    """A sample rate the resampler refuses (not a positive integer, or an unreasonable ratio)."""


def _reduced(orig: int, new: int) -> tuple[int, int]:
    for name, r in (("source", orig), ("target", new)):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r != int(r) or r <= 0:
            raise ResampleError(f"{name} sample rate {r!r}: expected a positive integer number of Hz")
    orig, new = int(orig), int(new)
    g = math.gcd(orig, new)
    return orig // g, new // g


def sinc_resample_kernel(orig: int, new: int, *, lowpass_filter_width: int = 6, rolloff: float = 0.99,
                         dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """torchaudio's ``sinc_interp_hann`` kernels ``[new', 1, 2·width + orig']`` and ``width`` for the
    reduced ratio ``orig'/new'``.

    ``dtype=None`` computes the taps in float64 and returns float32 (``transforms.Resample``, the
    encoder's 48 k → 24 k buffer); a dtype computes them in that dtype (``functional.resample``,
    which uses the waveform's dtype)."""
    o, n = _reduced(orig, new)
    base = min(o, n) * rolloff
    width = math.ceil(lowpass_filter_width * o / base)
    taps = n * (2 * width + o)
    if taps > MAX_KERNEL_TAPS:
        raise ResampleError(f"resampling {orig} Hz -> {new} Hz reduces to the ratio {o}/{n}, whose sinc kernel "
                            f"would hold {taps:,} taps (limit {MAX_KERNEL_TAPS:,}); convert the file to "
                            "48000 Hz (or a common rate such as 44100 Hz) first")
    idx_dtype = dtype if dtype is not None else torch.float64
    idx = torch.arange(-width, width + o, dtype=idx_dtype, device=device)[None, None] / o
    t = torch.arange(0, -n, -1, dtype=dtype, device=device)[:, None, None] / n + idx
    t = (t * base).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    scale = base / o
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels = kernels * (window * scale)
    if dtype is None:
        kernels = kernels.to(torch.float32)
    return kernels, width


def resampled_length(length: int, orig: int, new: int) -> int:
    """Samples after resampling ``length`` samples (torchaudio: ``ceil(new'·L/orig')``, the quotient
    rounded through a float32 tensor)."""
    if orig == new:
        return int(length)
    o, n = _reduced(orig, new)
    return int(torch.ceil(torch.as_tensor(n * length / o)))


def resample(x: torch.Tensor, orig: int, new: int, *, kernel: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """``x [..., L]`` from ``orig`` Hz to ``new`` Hz (``[..., ceil(new'·L/orig')]``), as torchaudio.

    ``kernel``: a precomputed :func:`sinc_resample_kernel` result (default: computed in ``x``'s
    dtype, as ``torchaudio.functional.resample``)."""
    if orig == new:
        return x
    o, _ = _reduced(orig, new)
    k, width = kernel if kernel is not None else sinc_resample_kernel(orig, new, dtype=x.dtype, device=x.device)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    length = flat.shape[-1]
    y = F.conv1d(F.pad(flat, (width, width + o))[:, None], k.to(device=x.device, dtype=x.dtype), stride=o)
    y = y.transpose(1, 2).reshape(flat.shape[0], -1)[..., :resampled_length(length, orig, new)]
    return y.reshape(*shape[:-1], y.shape[-1])


def hann_window(n: int = N_FFT) -> torch.Tensor:
    """The periodic Hann window ``0.5 − 0.5·cos(2πk/n)`` (float32), torch's and torchaudio's default."""
    return torch.hann_window(n, periodic=True, dtype=torch.float32)


def mel_filterbank(n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS, sample_rate: int = MUSICFM_RATE,
                   f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """HTK triangular mel filterbank ``[n_freqs, n_mels]`` (float32, ``norm=None``), computed as
    torchaudio's ``melscale_fbanks``: band edges evenly spaced in ``2595·log10(1 + f/700)``."""
    f_max = float(sample_rate // 2) if f_max is None else f_max
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_min = 2595.0 * math.log10(1.0 + f_min / 700.0)
    m_max = 2595.0 * math.log10(1.0 + f_max / 700.0)
    m_pts = torch.linspace(m_min, m_max, n_mels + 2)
    f_pts = 700.0 * (10.0 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.max(torch.zeros(1), torch.min(down, up))


def log_mel(x: torch.Tensor, window: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """``x [B, L]`` at 24 kHz -> mel power in dB ``[B, 128, 1 + L//240]`` (fp32): centred reflect-padded
    STFT (n_fft 2048, hop 240, Hann), ``|X|²``, the filterbank, ``10·log10(max(S, 1e-10))``."""
    spec = torch.stft(x.float(), n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, window=window.to(x.device),
                      center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    power = spec.abs().pow(2.0)
    mel = torch.matmul(power.transpose(-1, -2), fb.to(x.device)).transpose(-1, -2)
    return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))


# ----------------------------------------------------------------------------- files
class AudioError(LevoInferError):
    """An audio file or waveform that cannot be encoded (the message names it and what is wrong)."""


def check_waveform(x: torch.Tensor, what: str, *, stereo: bool = True) -> torch.Tensor:
    """``x`` as float32 ``[2, N]`` (mono ``[N]``/``[1, N]`` duplicated; ``stereo=False`` keeps its
    channels), N >= 1, all samples finite; :class:`AudioError` naming ``what`` otherwise."""
    if not isinstance(x, torch.Tensor):
        raise AudioError(f"{what}: expected a waveform tensor [channels, samples], got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise AudioError(f"{what}: expected float samples, got dtype {x.dtype}")
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[0] not in (1, 2):
        raise AudioError(f"{what}: expected mono or stereo [channels, samples], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise AudioError(f"{what}: has no samples (0 frames)")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        c, i = (int(v) for v in torch.nonzero(bad)[0])
        raise AudioError(f"{what}: {int(bad.sum())} sample(s) are NaN or infinite (first: channel {c}, sample {i})")
    x = x.float()
    return x.expand(2, -1).contiguous() if stereo and x.shape[0] == 1 else x


def read_audio(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """An audio file (anything libsndfile reads: wav, flac, ogg, mp3, ...) as float32 ``[C, N]`` and its
    sample rate; :class:`AudioError` naming the file when it is not audio or holds no samples."""
    import soundfile as sf  # soundfile (libsndfile): only when audio is read or written

    p = Path(path)
    if not p.is_file():
        raise AudioError(f"{p}: file not found")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - soundfile raises several types for a file that is not audio
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{p}: cannot read it as audio ({type(e).__name__}: {first})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{p}: has no samples (0 frames)")
    if data.shape[1] > 2:
        raise AudioError(f"{p}: has {data.shape[1]} channels; expected mono or stereo (mix it down first)")
    return torch.from_numpy(data.T.copy()), int(sr)


def load_stereo_48k(path: str | os.PathLike) -> torch.Tensor:
    """A file as the encoder takes it: float32 ``[2, N]`` at 48 kHz (other rates resampled with
    :func:`resample`, mono duplicated); :class:`AudioError` naming the file otherwise."""
    x, sr = read_audio(path)
    x = check_waveform(x, str(path), stereo=False)  # NaN / inf named at their place in the file
    try:
        x = resample(x, sr, SAMPLE_RATE)
    except ResampleError as e:
        raise AudioError(f"{path}: {e}") from None
    return check_waveform(x, str(path))


def write_flac(wav: torch.Tensor, sample_rate: int, path: str | os.PathLike) -> int:
    """``wav [channels, samples]`` (float, nominally within [-1, 1]) -> a 24-bit FLAC file at ``path``,
    written like every other output: to a temp file in the same folder, fsynced, then renamed over
    ``path``. Returns the clipped-sample count: the sample values (each channel counted) beyond full
    scale, ``|x| > 1``, which the 24-bit file holds at full scale instead. A waveform with NaN or
    infinite samples is refused (:class:`AudioError` naming the first), nothing is written."""
    import soundfile as sf  # soundfile (libsndfile): only when audio is read or written

    path = Path(path)
    x = check_waveform(wav.detach().cpu(), str(path), stereo=False)
    clipped = int((x.abs() > 1.0).sum())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        sf.write(f, x.numpy().T, int(sample_rate), format="FLAC", subtype="PCM_24")
    return clipped


__all__ = ["HOP", "MAX_KERNEL_TAPS", "MUSICFM_RATE", "N_FFT", "N_MELS", "SAMPLE_RATE", "AudioError", "ResampleError",
           "check_waveform", "hann_window", "load_stereo_48k", "log_mel", "mel_filterbank", "read_audio", "resample",
           "resampled_length", "sinc_resample_kernel", "write_flac"]
