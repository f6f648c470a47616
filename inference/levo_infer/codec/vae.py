"""The decode half of the released Oobleck VAE (64-d latent at 25 Hz -> 48 kHz stereo), in plain torch.

Written from ``shared/codec_facts.md`` §7 (no upstream code): the state-dict keys are exactly the
released ``decoder.*`` keys of ``vae/autoencoder_music_1320k.ckpt`` (182 tensors at real size), so the
released file loads with a strict key/shape check and no renaming.

Layout (``decoder.layers.*``)::

    0      WN Conv1d latent_dim -> channels*c_mults[-1], k7, pad 3 (bias)
    1..N   DecoderBlock, multipliers and strides in reverse order (real size: 2048->1024 s10,
           1024->512 s6, 512->256 s4, 256->128 s4, 128->128 s2)
    N+1    SnakeBeta(channels)
    N+2    WN Conv1d channels -> out_channels, k7, pad 3, no bias   (tanh after it only if final_tanh)

    DecoderBlock.layers: 0 SnakeBeta(in); 1 WN ConvTranspose1d(in->out, k=2s, stride s, pad s/2);
                         2, 3, 4 ResidualUnit(out, dilation 1, 3, 9)
    ResidualUnit.layers: 0 SnakeBeta; 1 WN Conv1d k7 dil d pad 3d; 2 SnakeBeta; 3 WN Conv1d k1;
                         output = input + branch

Weight norm is the old ``torch.nn.utils.weight_norm`` (dim 0) layout, implemented here so the keys stay
``weight_g``/``weight_v``: ``w = g * v / ||v||`` with the norm over all dims but 0 (per output channel
for Conv1d, per *input* channel for ConvTranspose1d, whose ``v`` is ``[in, out, k]``). Under no-grad the
folded weight is cached per module and recomputed only when ``g``/``v`` change.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LevoInferError

__all__ = [
    "ChunkSpan", "DecoderBlock", "OobleckDecoder", "ResidualUnit", "SnakeBeta", "VAEConfig",
    "VAEConfigError", "VAEStateError", "WNConv1d", "WNConvTranspose1d", "chunk_schedule",
]

SNAKE_EPS = 1e-9
RESIDUAL_DILATIONS = (1, 3, 9)


class VAEConfigError(LevoInferError):
    """A VAE json (or VAEConfig) that is not the Oobleck/VAE decoder implemented here."""


class VAEStateError(LevoInferError):
    """VAE weights that do not fit the decoder built from the config (names the key and the shape)."""


# --------------------------------------------------------------------------------------------- config

_MISSING = object()


@dataclass(frozen=True)
class VAEConfig:
    """Decoder hyper-parameters of the released VAE; the defaults are the released values (§7).

    ``VAEConfig.from_json`` reads the released ``stable_audio_1920_vae.json`` (a stable-audio-tools
    autoencoder config). Its known structure (extra keys, e.g. the encoder's or training settings,
    are tolerated and ignored)::

        {
          "model_type": "autoencoder",
          "sample_rate": 48000,
          "audio_channels": 2,                       # optional; must equal out_channels if present
          "model": {
            "encoder": {"type": "oobleck", "config": {...}},          # not read
            "decoder": {"type": "oobleck", "config": {
                "out_channels": 2, "channels": 128, "c_mults": [1, 2, 4, 8, 16],
                "strides": [2, 4, 4, 6, 10], "latent_dim": 64,
                "use_snake": true, "final_tanh": false}},
            "bottleneck": {"type": "vae"},
            "latent_dim": 64,                        # optional; must equal decoder latent_dim
            "downsampling_ratio": 1920,              # must equal prod(strides)
            "io_channels": 2                         # optional; must equal out_channels
          }
        }

    Refused (not implemented): ``use_snake`` false, a bottleneck other than ``vae`` (which is the
    identity on decode), a decoder type other than ``oobleck``, truthy ``use_nearest_upsample`` /
    ``antialias_activation``, odd strides (their transposed conv would give ``s·L − 1`` samples).
    """

    channels: int = 128
    c_mults: tuple[int, ...] = (1, 2, 4, 8, 16)
    strides: tuple[int, ...] = (2, 4, 4, 6, 10)
    latent_dim: int = 64
    out_channels: int = 2
    use_snake: bool = True
    final_tanh: bool = False
    bottleneck: str = "vae"
    downsampling_ratio: int = 1920
    sample_rate: int = 48000

    def __post_init__(self) -> None:
        object.__setattr__(self, "c_mults", tuple(self.c_mults))
        object.__setattr__(self, "strides", tuple(self.strides))
        for name in ("channels", "latent_dim", "out_channels", "downsampling_ratio", "sample_rate"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise VAEConfigError(f"VAEConfig.{name}: expected a positive integer, got {v!r}")
        for name in ("c_mults", "strides"):
            v = getattr(self, name)
            if not v or not all(_is_int(x) and x >= 1 for x in v):
                raise VAEConfigError(f"VAEConfig.{name}: expected a non-empty list of positive integers, got {list(v)}")
        if len(self.c_mults) != len(self.strides):
            raise VAEConfigError(f"VAEConfig: c_mults and strides must have the same length, got "
                                 f"{len(self.c_mults)} and {len(self.strides)}")
        odd = [s for s in self.strides if s % 2]
        if odd:
            raise VAEConfigError(f"VAEConfig.strides: expected even strides (a transposed conv with k=2s, pad "
                                 f"ceil(s/2) gives s*L-1 samples for odd s; not implemented), got {list(self.strides)}")
        if math.prod(self.strides) != self.downsampling_ratio:
            raise VAEConfigError(f"VAEConfig: prod(strides) = {math.prod(self.strides)} != downsampling_ratio "
                                 f"{self.downsampling_ratio}")
        if self.use_snake is not True:
            raise VAEConfigError(f"VAEConfig.use_snake: expected true (only SnakeBeta is implemented), got {self.use_snake!r}")
        if not isinstance(self.final_tanh, bool):
            raise VAEConfigError(f"VAEConfig.final_tanh: expected a boolean, got {self.final_tanh!r}")
        if self.bottleneck != "vae":
            raise VAEConfigError(f"VAEConfig.bottleneck: expected 'vae', got {self.bottleneck!r}")

    @property
    def blocks(self) -> list[tuple[int, int, int]]:
        """``(in_channels, out_channels, stride)`` of decoder blocks 1..N, in the order they run."""
        mults = (1, *self.c_mults)
        return [(self.channels * mults[i], self.channels * mults[i - 1], self.strides[i - 1])
                for i in range(len(mults) - 1, 0, -1)]

    @classmethod
    def from_json(cls, src: str | os.PathLike | Mapping[str, Any]) -> VAEConfig:
        """Read the released VAE json (path or parsed dict); errors name the file, the field and what was expected."""
        if isinstance(src, Mapping):
            where, doc = "VAE config", src
        else:
            where = str(src)
            try:
                text = Path(src).read_text(encoding="utf-8")
            except OSError as e:
                raise VAEConfigError(f"{where}: cannot read the VAE json ({e.strerror or e})") from None
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise VAEConfigError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(doc, Mapping):
            raise VAEConfigError(f"{where}: expected a JSON object at the top level, got {type(doc).__name__}")

        def get(path: str, default: Any = _MISSING) -> Any:
            node: Any = doc
            for i, part in enumerate(path.split(".")):
                if not isinstance(node, Mapping):
                    raise VAEConfigError(f"{where}: field '{'.'.join(path.split('.')[:i])}': expected an object, "
                                         f"got {type(node).__name__}")
                if part not in node:
                    if default is not _MISSING:
                        return default
                    raise VAEConfigError(f"{where}: missing field '{path}' (not a stable-audio Oobleck VAE config?)")
                node = node[part]
            return node

        def bad(path: str, expected: str, got: Any) -> VAEConfigError:
            return VAEConfigError(f"{where}: field '{path}': expected {expected}, got {json.dumps(got)}")

        def want_int(path: str) -> int:
            v = get(path)
            if not _is_int(v) or v < 1:
                raise bad(path, "a positive integer", v)
            return int(v)

        def want_ints(path: str) -> tuple[int, ...]:
            v = get(path)
            if not isinstance(v, list) or not v or not all(_is_int(x) and x >= 1 for x in v):
                raise bad(path, "a non-empty list of positive integers", v)
            return tuple(int(x) for x in v)

        def want_bool(path: str) -> bool:
            v = get(path)
            if not isinstance(v, bool):
                raise bad(path, "true or false", v)
            return v

        if get("model_type") != "autoencoder":
            raise bad("model_type", '"autoencoder"', get("model_type"))
        dec = "model.decoder"
        if get(f"{dec}.type") != "oobleck":
            raise bad(f"{dec}.type", '"oobleck"', get(f"{dec}.type"))
        c = f"{dec}.config"
        channels, latent = want_int(f"{c}.channels"), want_int(f"{c}.latent_dim")
        out_ch = want_int(f"{c}.out_channels")
        c_mults, strides = want_ints(f"{c}.c_mults"), want_ints(f"{c}.strides")
        if len(c_mults) != len(strides):
            raise VAEConfigError(f"{where}: fields '{c}.c_mults' and '{c}.strides': expected the same length, "
                                 f"got {len(c_mults)} and {len(strides)}")
        if not want_bool(f"{c}.use_snake"):
            raise bad(f"{c}.use_snake", "true (only the SnakeBeta decoder is implemented)", False)
        final_tanh = want_bool(f"{c}.final_tanh")
        for opt in ("use_nearest_upsample", "antialias_activation"):
            if get(f"{c}.{opt}", False):
                raise bad(f"{c}.{opt}", "false or absent (not implemented)", get(f"{c}.{opt}"))
        odd = [s for s in strides if s % 2]
        if odd:
            raise bad(f"{c}.strides", "even strides (odd ones give s*L-1 samples upstream; not implemented)",
                      list(strides))
        bottleneck = get("model.bottleneck.type")
        if bottleneck != "vae":
            raise bad("model.bottleneck.type", '"vae" (the only bottleneck implemented)', bottleneck)
        ratio = want_int("model.downsampling_ratio")
        if math.prod(strides) != ratio:
            raise VAEConfigError(f"{where}: field 'model.downsampling_ratio': expected prod({c}.strides) = "
                                 f"{math.prod(strides)}, got {ratio}")
        rate = want_int("sample_rate")
        for path, expect in (("model.latent_dim", latent), ("model.io_channels", out_ch), ("audio_channels", out_ch)):
            v = get(path, None)
            if v is not None and v != expect:
                raise bad(path, f"{expect} (as in the decoder config)", v)
        return cls(channels=channels, c_mults=c_mults, strides=strides, latent_dim=latent, out_channels=out_ch,
                   use_snake=True, final_tanh=final_tanh, bottleneck="vae", downsampling_ratio=ratio,
                   sample_rate=rate)

    def to_json(self) -> dict[str, Any]:
        """The decode-relevant part of the released json layout (what ``from_json`` reads back)."""
        return {
            "model_type": "autoencoder",
            "sample_rate": self.sample_rate,
            "audio_channels": self.out_channels,
            "model": {
                "decoder": {"type": "oobleck", "config": {
                    "out_channels": self.out_channels, "channels": self.channels, "c_mults": list(self.c_mults),
                    "strides": list(self.strides), "latent_dim": self.latent_dim, "use_snake": self.use_snake,
                    "final_tanh": self.final_tanh}},
                "bottleneck": {"type": self.bottleneck},
                "latent_dim": self.latent_dim,
                "downsampling_ratio": self.downsampling_ratio,
                "io_channels": self.out_channels,
            },
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -------------------------------------------------------------------------------------------- modules

def _fast_path(*tensors: Tensor) -> bool:
    """In-place/cached arithmetic is safe when autograd is not recording through these tensors."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


class _WeightNormed(nn.Module):
    """Holds ``weight_g``/``weight_v`` (+ optional ``bias``); ``weight()`` folds them, cached under no-grad."""

    weight_g: nn.Parameter
    weight_v: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, v_shape: tuple[int, int, int], bias_size: int | None) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(v_shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(*v_shape))
        if bias_size is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(bias_size))
        self._cache: tuple[tuple, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init (for tests / from-scratch use): default conv-like ``v``, ``g = ||v||`` so ``w = v``."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
            self.weight_g.copy_(_norm_except_dim0(self.weight_v))
            if self.bias is not None:
                fan_in = self.weight_v.shape[1] * self.weight_v.shape[2]
                nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self._cache = None

    def weight(self) -> Tensor:
        """``g * v / ||v||`` (norm over all dims but 0), reused while ``g`` and ``v`` are unchanged."""
        g, v = self.weight_g, self.weight_v
        if torch.is_grad_enabled() or g.is_inference() or v.is_inference():
            return v * (g / _norm_except_dim0(v))  # autograd may record it / no version counter to key on
        key = (g.data_ptr(), v.data_ptr(), g._version, v._version, g.dtype, v.dtype, g.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, v * (g / _norm_except_dim0(v)))
        return self._cache[1]

    def clear_cache(self) -> None:
        """Drop the folded weight (frees its memory; the next no-grad call recomputes it)."""
        self._cache = None


def _norm_except_dim0(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)


class WNConv1d(_WeightNormed):
    """Weight-normed Conv1d: ``weight_v [out,in,k]``, ``weight_g [out,1,1]``, ``bias [out]`` (optional)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, dilation: int = 1, padding: int = 0,
                 bias: bool = True) -> None:
        self.dilation, self.padding = dilation, padding
        super().__init__((cout, cin, kernel), cout if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        """``[B,in,L] -> [B,out,L + 2·pad − dil·(k−1)]``."""
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, dilation=self.dilation)


class WNConvTranspose1d(_WeightNormed):
    """Weight-normed ConvTranspose1d, k = 2s, stride s, pad s/2: ``[B,in,L] -> [B,out,s·L]`` exactly.

    ``weight_v [in,out,2s]``, ``weight_g [in,1,1]`` (norm per input channel), ``bias [out]``. Output length
    ``(L−1)s − 2·ceil(s/2) + 2s`` is ``s·L`` for even s, so nothing is trimmed or padded (odd s refused).
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        if stride < 1 or stride % 2:
            raise ValueError(f"WNConvTranspose1d: stride must be even and positive, got {stride}")
        self.stride = stride
        self.padding = math.ceil(stride / 2)
        super().__init__((cin, cout, 2 * stride), cout)

    def forward(self, x: Tensor) -> Tensor:
        """``[B,in,L] -> [B,out,s·L]``."""
        return F.conv_transpose1d(x, self.weight(), self.bias, stride=self.stride, padding=self.padding)


class SnakeBeta(nn.Module):
    """``y = x + sin²(exp(α)·x) / (exp(β) + 1e-9)`` per channel; ``alpha``, ``beta`` ``[C]`` are log-scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """Elementwise on ``[B,C,L]``; in place on a temporary under no-grad (one extra activation)."""
        a = self.alpha.exp()[:, None]
        b = self.beta.exp()[:, None] + SNAKE_EPS
        if _fast_path(x, self.alpha, self.beta):
            y = x * a
            y.sin_().square_().div_(b)
            return y.add_(x)
        return x + torch.sin(x * a).pow(2) / b


class ResidualUnit(nn.Module):
    """SnakeBeta, WN conv k7 (dilation d, pad 3d), SnakeBeta, WN conv k1; ``out = x + branch``."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            SnakeBeta(channels), WNConv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            SnakeBeta(channels), WNConv1d(channels, channels, 1),
        ])

    def forward(self, x: Tensor) -> Tensor:
        """Length-preserving residual branch."""
        y = x
        for layer in self.layers:
            y = layer(y)
        return y.add_(x) if _fast_path(y, x) else x + y


class DecoderBlock(nn.Module):
    """SnakeBeta(in), WN ConvTranspose1d(in→out, stride s), residual units with dilation 1, 3, 9."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([SnakeBeta(cin), WNConvTranspose1d(cin, cout, stride),
                                     *(ResidualUnit(cout, d) for d in RESIDUAL_DILATIONS)])

    def forward(self, x: Tensor) -> Tensor:
        """``[B,in,L] -> [B,out,s·L]``."""
        for layer in self.layers:
            x = layer(x)
        return x


class _DecoderStack(nn.Module):
    """The ``decoder`` sub-module: ``layers`` as in the released key names."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        top = cfg.channels * cfg.c_mults[-1]
        layers: list[nn.Module] = [WNConv1d(cfg.latent_dim, top, 7, padding=3)]
        layers += [DecoderBlock(cin, cout, s) for cin, cout, s in cfg.blocks]
        layers += [SnakeBeta(cfg.channels), WNConv1d(cfg.channels, cfg.out_channels, 7, padding=3, bias=False)]
        if cfg.final_tanh:
            layers.append(nn.Tanh())  # no parameters: the key set is unchanged
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        """``[B,latent,L] -> [B,out,L·ratio]``."""
        for layer in self.layers:
            x = layer(x)
        return x


# ------------------------------------------------------------------------------------------- chunking

class ChunkSpan(NamedTuple):
    """One chunk of a chunked decode: latent frames read, where its output lies, which part is written.

    ``out_*`` and ``keep_*`` are positions in the output signal (``ratio`` samples per latent frame);
    the chunk's own samples ``keep_start − out_start : keep_end − out_start`` are written there.
    """

    latent_start: int
    latent_end: int
    out_start: int
    out_end: int
    keep_start: int
    keep_end: int


def chunk_schedule(length: int, chunk: int = 128, overlap: int = 32, ratio: int = 1) -> list[ChunkSpan]:
    """The released chunked-decode schedule (§7) for ``length`` latent frames, in paste order.

    Starts ``0, hop, 2·hop, …`` (hop = chunk − overlap) while ``start ≤ length − chunk``, plus the last
    ``chunk`` frames right-aligned if the previous chunk did not end at ``length``. Each chunk keeps its
    output minus ``overlap//2`` frames at every inner edge (none at the very start or end); later chunks
    overwrite earlier ones. ``length ≤ chunk`` gives one span covering everything (an unchunked decode).
    """
    if not (_is_int(length) and length >= 1):
        raise ValueError(f"chunk_schedule: length must be a positive integer, got {length!r}")
    if not (_is_int(chunk) and chunk >= 1 and _is_int(overlap) and 0 <= overlap < chunk):
        raise ValueError(f"chunk_schedule: need chunk >= 1 and 0 <= overlap < chunk, got chunk={chunk!r}, "
                         f"overlap={overlap!r}")
    if not (_is_int(ratio) and ratio >= 1):
        raise ValueError(f"chunk_schedule: ratio must be a positive integer, got {ratio!r}")
    if length <= chunk:
        return [ChunkSpan(0, length, 0, length * ratio, 0, length * ratio)]
    starts = list(range(0, length - chunk + 1, chunk - overlap))
    if starts[-1] + chunk != length:
        starts.append(length - chunk)
    half = overlap // 2
    spans = []
    for j, s in enumerate(starts):
        e = s + chunk
        ks = s + (half if j > 0 else 0)
        ke = e - (half if j < len(starts) - 1 else 0)
        spans.append(ChunkSpan(s, e, s * ratio, e * ratio, ks * ratio, ke * ratio))
    return spans


# ------------------------------------------------------------------------------------------- decoder

class OobleckDecoder(nn.Module):
    """Latent ``[B,latent_dim,L]`` -> audio ``[B,out_channels,L·downsampling_ratio]``; keys = released ``decoder.*``.

    Run it under ``torch.no_grad()``/``inference_mode()`` for speed and memory (activations are then
    updated in place and folded weights cached). ``n_ignored_keys`` is set by :meth:`from_state_dict`.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = _DecoderStack(cfg)
        self.n_ignored_keys = 0

    @property
    def ratio(self) -> int:
        """Output samples per latent frame (1920 for the released VAE)."""
        return self.cfg.downsampling_ratio

    def forward(self, latent: Tensor) -> Tensor:
        """Same as :meth:`decode`."""
        return self.decode(latent)

    def _check_latent(self, latent: Tensor) -> Tensor:
        if not isinstance(latent, Tensor) or latent.dim() != 3 or latent.shape[1] != self.cfg.latent_dim \
                or latent.shape[0] < 1 or latent.shape[2] < 1:
            shape = list(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
            raise ValueError(f"OobleckDecoder: expected a latent [B,{self.cfg.latent_dim},L] with B, L >= 1, got {shape}")
        p = self.decoder.layers[0].weight_v
        return latent.to(device=p.device, dtype=p.dtype)

    def decode(self, latent: Tensor) -> Tensor:
        """Decode the whole sequence at once (zero padding only at its two ends); cast to the module's dtype."""
        x = self._check_latent(latent)
        y = self.decoder(x)
        if y.shape[-1] != x.shape[-1] * self.ratio:  # cannot happen with even strides; guards a refactor
            raise RuntimeError(f"OobleckDecoder: produced {y.shape[-1]} samples for {x.shape[-1]} frames")
        return y

    def decode_chunked(self, latent: Tensor, chunk: int = 128, overlap: int = 32, *,
                       chunk_batch: int = 1) -> Tensor:
        """The released chunked decode (§7, :func:`chunk_schedule`); ``L ≤ chunk`` decodes unchunked.

        Each chunk is decoded alone; ``chunk_batch`` chunks go through the network together (stacked on
        the batch axis: faster on a GPU, ``chunk_batch``× the activation memory; the result is the same).
        """
        x = self._check_latent(latent)
        if not (_is_int(chunk_batch) and chunk_batch >= 1):
            raise ValueError(f"decode_chunked: chunk_batch must be a positive integer, got {chunk_batch!r}")
        B, L = x.shape[0], x.shape[-1]
        spans = chunk_schedule(L, chunk, overlap, self.ratio)
        if len(spans) == 1:
            return self.decode(x)
        out = x.new_zeros(B, self.cfg.out_channels, L * self.ratio)
        for g in range(0, len(spans), chunk_batch):
            group = spans[g:g + chunk_batch]
            y = self.decode(torch.cat([x[:, :, s.latent_start:s.latent_end] for s in group], dim=0))
            for i, s in enumerate(group):
                out[:, :, s.keep_start:s.keep_end] = \
                    y[i * B:(i + 1) * B, :, s.keep_start - s.out_start:s.keep_end - s.out_start]
        return out

    def clear_weight_cache(self) -> None:
        """Free the cached folded weights (they are rebuilt on the next no-grad decode)."""
        for m in self.modules():
            if isinstance(m, _WeightNormed):
                m.clear_cache()

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key decode reads, with its shape (the released names)."""
        return {k: tuple(t.shape) for k, t in self.state_dict(keep_vars=True).items()}

    def load_decode_state(self, state: Mapping[str, Any], *, device: torch.device | str | None = None) -> int:
        """Load the decoder tensors from a released VAE state dict (fp32); returns how many keys were ignored.

        Every needed key must be present with its shape (the error names the first one that is not);
        keys outside ``decoder.*`` (the encoder) are ignored; an unknown ``decoder.*`` key is refused,
        since it means a decoder of another architecture. ``{'state_dict': {...}}`` is unwrapped. A
        tensor already fp32 on ``device`` is used without a copy (shared with ``state``).
        """
        if "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        want = self.expected_shapes()
        missing = [k for k in want if k not in state]
        if missing:
            more = f"; {len(missing)} needed keys missing in all" if len(missing) > 1 else ""
            raise VAEStateError(f"VAE state dict: missing key '{missing[0]}' (expected shape "
                                f"{list(want[missing[0]])}){more}")
        for k, shape in want.items():
            t = state[k]
            if not isinstance(t, Tensor):
                raise VAEStateError(f"VAE state dict: key '{k}' is a {type(t).__name__}, expected a tensor of "
                                    f"shape {list(shape)}")
            if tuple(t.shape) != shape:
                raise VAEStateError(f"VAE state dict: key '{k}' has shape {list(t.shape)}, expected {list(shape)}")
            if not t.is_floating_point():
                raise VAEStateError(f"VAE state dict: key '{k}' has dtype {t.dtype}, expected a float tensor")
        unknown = [k for k in state if str(k).startswith("decoder.") and k not in want]
        if unknown:
            raise VAEStateError(f"VAE state dict: unexpected decoder key '{unknown[0]}' ({len(unknown)} in all): "
                                f"the file's decoder differs from the one the config describes")
        new = {k: state[k].detach().to(device=device, dtype=torch.float32).contiguous() for k in want}
        self.load_state_dict(new, strict=True, assign=True)
        self.clear_weight_cache()
        return len(state) - len(want)

    @classmethod
    def from_state_dict(cls, cfg: VAEConfig, state: Mapping[str, Any], *,
                        device: torch.device | str | None = None) -> OobleckDecoder:
        """Build the decoder for ``cfg`` from a released VAE state dict (fp32, eval mode, no random init).

        The number of keys ignored (the encoder's) is in ``.n_ignored_keys``.
        """
        with torch.device("meta"):
            model = cls(cfg)
        model.n_ignored_keys = model.load_decode_state(state, device=device)
        return model.eval()
