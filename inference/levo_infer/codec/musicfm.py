"""The MusicFM encoder + RVQ of one released tokenizer file: 40 s chunks -> 25 Hz codes (``encoder_facts.md`` §2.4–2.5).

One 40 s mono chunk at 48 kHz goes through

1. 48 k → 24 k sinc resampling and the log-mel front end (:mod:`.dsp`), the last mel frame dropped,
   then the fixed normalisation ``(dB − 6.768444971712967) / 18.417922652295623``;
2. :class:`ConvSubsampling`: two residual 3×3 conv blocks of stride (2, 2) with eval-mode
   BatchNorm, 128 bands × 4000 frames -> ``[C, 32, 1000]``, flattened ``c·32 + f``, ``Linear -> H``;
3. the first ``layer`` blocks of :class:`Conformer` (HF Wav2Vec2-Conformer, rotary on the attention
   input, no relative positions, ``pos_conv_embed`` never applied); ``hidden_states[layer]`` is the
   raw output of block ``layer``, before any final LayerNorm;
4. :class:`RVQEncode`: a weight-normed 1×1 projection ``H -> 32``, then the codebook entry of
   largest cosine (the released squared distance of L2-normalised vectors, first index on ties).

:class:`MusicFMTokenizer` holds exactly the tensors this reads, under their released names (``bestrq.model.*``
and ``rvq_bestrq_emb`` / ``rvq_bestrq_bgm_emb``), only up to the deepest block a stream takes, so
a ``model_2.safetensors`` / ``model_2_fixed.safetensors`` loads into it key for key (the loader is
in :mod:`.encoder`). The resampling kernel, window and mel filterbank are computed, never loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import dsp
from .flow import _ResidualVQ, _WeightNormConv1x1, rope_tables

#: MusicFM's built-in mel statistics (``stat_path=None``)
MEL_MEAN = 6.768444971712967
MEL_STD = 18.417922652295623
CHUNK_SECONDS = 40
CHUNK = CHUNK_SECONDS * dsp.SAMPLE_RATE      # 1 920 000 samples at 48 kHz
FRAMES_PER_CHUNK = CHUNK_SECONDS * 25       # 1000 frames at 25 Hz
PREFIX = "bestrq.model."


# ----------------------------------------------------------------------------- front end
class Res2d(nn.Module):
    """``ReLU(BN2(conv2(ReLU(BN1(conv1 x)))) + BN3(conv3 x))``; conv1 and conv3 have stride (2, 2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.conv3 = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.bn3(self.conv3(x)))


class ConvSubsampling(nn.Module):
    """Normalised mel ``[B, n_mels, 4T] -> [B, T, H]`` (``Conv2dSubsampling(1, C, H, [2, 2])``)."""

    def __init__(self, channels: int, hidden: int, n_mels: int = dsp.N_MELS) -> None:
        super().__init__()
        self.conv = nn.ModuleList([Res2d(1, channels), Res2d(channels, channels)])
        self.linear = nn.Linear(channels * (n_mels // 4), hidden)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = mel[:, None]
        for block in self.conv:
            x = block(x)
        B, C, Fq, T = x.shape
        return self.linear(x.permute(0, 3, 1, 2).reshape(B, T, C * Fq))


# ----------------------------------------------------------------------------- conformer
class FeedForward(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(hidden, ffn)
        self.output_dense = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.silu(self.intermediate_dense(x)))


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rot(x)·sin`` per head slice ``x [B, L, heads, hd]`` with ``rot([x1, x2]) = [−x2, x1]``
    (halves of the head) and ``cos, sin [L, 1, hd]``."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


class SelfAttention(nn.Module):
    """Wav2Vec2-Conformer rotary self-attention: q and k read the rotated input, v the input itself."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.linear_q = nn.Linear(hidden, hidden)
        self.linear_k = nn.Linear(hidden, hidden)
        self.linear_v = nn.Linear(hidden, hidden)
        self.linear_out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, H = x.shape
        hd = H // self.heads
        r = rotate_half(x.view(B, L, self.heads, hd), cos, sin).reshape(B, L, H)
        q = self.linear_q(r).view(B, L, self.heads, hd).transpose(1, 2)
        k = self.linear_k(r).view(B, L, self.heads, hd).transpose(1, 2)
        v = self.linear_v(x).view(B, L, self.heads, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ/√hd) v, no mask
        return self.linear_out(o.transpose(1, 2).reshape(B, L, H))


class ConvModule(nn.Module):
    """LN -> pointwise 1×1 (H -> 2H) -> GLU -> depthwise (k, same padding) -> BN (eval) -> SiLU -> 1×1."""

    def __init__(self, hidden: int, kernel: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-5)
        self.pointwise_conv1 = nn.Conv1d(hidden, 2 * hidden, 1, bias=False)
        self.depthwise_conv = nn.Conv1d(hidden, hidden, kernel, padding=(kernel - 1) // 2, groups=hidden, bias=False)
        self.batch_norm = nn.BatchNorm1d(hidden, eps=1e-5)
        self.pointwise_conv2 = nn.Conv1d(hidden, hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pointwise_conv1(self.layer_norm(x).transpose(1, 2))
        y = F.glu(y, dim=1)
        y = F.silu(self.batch_norm(self.depthwise_conv(y)))
        return self.pointwise_conv2(y).transpose(1, 2)


class ConformerBlock(nn.Module):
    """½·FFN1, rotary MHSA, conv module, ½·FFN2 (each pre-LN, residual), then the block's final LN."""

    def __init__(self, hidden: int, ffn: int, heads: int, kernel: int) -> None:
        super().__init__()
        self.ffn1_layer_norm = nn.LayerNorm(hidden, eps=1e-5)
        self.ffn1 = FeedForward(hidden, ffn)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, eps=1e-5)
        self.self_attn = SelfAttention(hidden, heads)
        self.conv_module = ConvModule(hidden, kernel)
        self.ffn2_layer_norm = nn.LayerNorm(hidden, eps=1e-5)
        self.ffn2 = FeedForward(hidden, ffn)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + 0.5 * self.ffn1(self.ffn1_layer_norm(h))
        h = h + self.self_attn(self.self_attn_layer_norm(h), cos, sin)
        h = h + self.conv_module(h)
        h = h + 0.5 * self.ffn2(self.ffn2_layer_norm(h))
        return self.final_layer_norm(h)


class Conformer(nn.Module):
    def __init__(self, depth: int, hidden: int, ffn: int, heads: int, kernel: int) -> None:
        super().__init__()
        self.heads = heads
        self.layers = nn.ModuleList(ConformerBlock(hidden, ffn, heads, kernel) for _ in range(depth))

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``hidden_states[layer]``: the output of block ``layer`` (1-based) of ``h [B, L, H]``."""
        if not 1 <= layer <= len(self.layers):
            raise ValueError(f"layer {layer} outside 1..{len(self.layers)} (the blocks this encoder holds)")
        L, hd = h.shape[1], h.shape[2] // self.heads
        c, s = rope_tables(L, hd, h.device)  # angles pos·10000^(−2j/hd), fp32
        cos = torch.cat((c, c), dim=-1)[:, None].to(h.dtype)
        sin = torch.cat((s, s), dim=-1)[:, None].to(h.dtype)
        for block in self.layers[:layer]:
            h = block(h, cos, sin)
        return h


# ----------------------------------------------------------------------------- quantizer
class RVQEncode(nn.Module):
    """One stream's first (only) quantizer: ``emb [B, T, H] -> codes [B, T]`` by cosine, in fp32."""

    def __init__(self, hidden: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_proj = _WeightNormConv1x1(hidden, codebook_dim)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def latent(self, emb: torch.Tensor) -> torch.Tensor:
        """The pre-quantisation latent ``z_e = W_in·emb + b`` ``[B, T, D]`` (fp32)."""
        return self.in_proj(emb.float())

    def forward(self, emb: torch.Tensor, rows: int = 64) -> torch.Tensor:
        z = self.latent(emb)
        B, T, D = z.shape
        e = F.normalize(z.reshape(B * T, D))
        c = F.normalize(self.codebook.weight.float())
        c2, ct = c.pow(2).sum(1, keepdim=True).t(), c.t()
        out = []
        for i in range(0, B * T, rows):  # ``rows`` frames at a time: the [rows, 16384] distances stay in cache
            ei = e[i:i + rows]
            dist = ei.pow(2).sum(1, keepdim=True) - 2 * ei @ ct + c2  # the released expression, term for term
            out.append((-dist).max(1).indices)
        return torch.cat(out).view(B, T)


class _MusicFM(nn.Module):
    def __init__(self, conv: ConvSubsampling, conformer: Conformer) -> None:
        super().__init__()
        self.conv = conv
        self.conformer = conformer


class _BestRQ(nn.Module):
    def __init__(self, model: _MusicFM) -> None:
        super().__init__()
        self.model = model


_BLOCK_KEY = re.compile(r"^bestrq\.model\.conformer\.layers\.(\d+)\.")


class MusicFMTokenizer(nn.Module):
    """The encode half of one released tokenizer file: ``depth`` conformer blocks and the named quantizers."""

    def __init__(self, *, quantizers: Sequence[str], depth: int, hidden: int, ffn: int, channels: int, kernel: int,
                 heads: int, codebook_size: int, codebook_dim: int, n_mels: int = dsp.N_MELS) -> None:
        super().__init__()
        if heads <= 0 or hidden % heads or (hidden // heads) % 2:
            raise ValueError(f"conformer width {hidden} is not {heads} heads of an even head size")
        if n_mels % 4:
            raise ValueError(f"{n_mels} mel bands are not divisible by the front end's stride 4")
        self.quantizer_names = tuple(quantizers)
        self.depth, self.hidden, self.ffn, self.channels = depth, hidden, ffn, channels
        self.kernel, self.heads, self.n_mels = kernel, heads, n_mels
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.bestrq = _BestRQ(_MusicFM(ConvSubsampling(channels, hidden, n_mels),
                                       Conformer(depth, hidden, ffn, heads, kernel)))
        for q in self.quantizer_names:
            setattr(self, q, _ResidualVQ(RVQEncode(hidden, codebook_size, codebook_dim)))  # type: ignore[arg-type]
        self._consts: dict[str, tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = {}

    # -- sizes ------------------------------------------------------------------------
    @classmethod
    def sizes_from_shapes(cls, shapes: Mapping[str, Sequence[int]], quantizers: Sequence[str]) -> dict:
        """Constructor kwargs but ``depth``, ``heads`` and ``quantizers`` from a file's ``{key: shape}``,
        plus ``blocks`` (how many conformer blocks the file holds). KeyError names a missing key,
        ValueError a shape that does not fit the layout."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            if key not in shapes:
                raise KeyError(f"missing tensor {key!r}")
            s = tuple(int(d) for d in shapes[key])
            if len(s) != ndim:
                raise ValueError(f"tensor {key!r} has shape {s}, expected {ndim} dimensions")
            return s

        blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
        if not blocks:
            raise KeyError("no conformer blocks 'bestrq.model.conformer.layers.N.*'")
        if blocks != set(range(len(blocks))):
            raise ValueError(f"conformer blocks are not numbered 0..N-1: {sorted(blocks)}")
        channels, cin = shape(PREFIX + "conv.conv.0.conv1.weight", 4)[:2]
        if cin != 1:
            raise ValueError(f"tensor {PREFIX}conv.conv.0.conv1.weight has {cin} input channels, expected 1 (the mel)")
        hidden, flat = shape(PREFIX + "conv.linear.weight", 2)
        if flat % channels or flat // channels * 4 != dsp.N_MELS:
            raise ValueError(f"tensor {PREFIX}conv.linear.weight has {flat} inputs, expected {channels} channels × "
                             f"{dsp.N_MELS // 4} bands = {channels * dsp.N_MELS // 4}")
        ffn = shape(PREFIX + "conformer.layers.0.ffn1.intermediate_dense.weight", 2)[0]
        kernel = shape(PREFIX + "conformer.layers.0.conv_module.depthwise_conv.weight", 3)[2]
        if kernel % 2 == 0:
            raise ValueError(f"depthwise kernel {kernel} is even; the conformer's same-padding needs an odd one")
        q0 = quantizers[0]
        codebook_size, codebook_dim = shape(f"{q0}.quantizers.0.codebook.weight", 2)
        return dict(blocks=len(blocks), hidden=hidden, ffn=ffn, channels=channels, kernel=kernel,
                    codebook_size=codebook_size, codebook_dim=codebook_dim)

    # -- the steps --------------------------------------------------------------------
    def _constants(self, device: torch.device) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        """The torchaudio buffers, computed (never loaded): resampling kernel and its width, window, filterbank."""
        key = str(device)
        if key not in self._consts:
            kernel, width = dsp.sinc_resample_kernel(dsp.SAMPLE_RATE, dsp.MUSICFM_RATE)  # float64 taps -> fp32
            self._consts[key] = (kernel.to(device), width, dsp.hann_window().to(device),
                                 dsp.mel_filterbank().to(device))
        return self._consts[key]

    def resample24k(self, mono48: torch.Tensor) -> torch.Tensor:
        """Mono 48 kHz ``[N, L]`` -> 24 kHz ``[N, ceil(L/2)]`` (the ``rsq48tobestrq`` resampler), fp32."""
        kernel, width, _, _ = self._constants(mono48.device)
        return dsp.resample(mono48.float(), dsp.SAMPLE_RATE, dsp.MUSICFM_RATE, kernel=(kernel, width))

    def mel_db(self, wav24: torch.Tensor) -> torch.Tensor:
        """24 kHz ``[N, L]`` (cut to whole 960-sample frames) -> mel dB ``[N, 128, L/240]``, last frame dropped."""
        _, _, window, fb = self._constants(wav24.device)
        wav24 = wav24[:, : wav24.shape[-1] // 960 * 960]
        return dsp.log_mel(wav24, window, fb)[..., :-1]

    def features(self, mel_db: torch.Tensor) -> torch.Tensor:
        """Normalised mel -> conv front end ``[N, frames, H]`` (in the weights' dtype)."""
        dtype = self.bestrq.model.conv.linear.weight.dtype
        return self.bestrq.model.conv(((mel_db - MEL_MEAN) / MEL_STD).to(dtype))

    def embed(self, feats: torch.Tensor, layer: int) -> torch.Tensor:
        """``hidden_states[layer]`` ``[N, frames, H]``."""
        return self.bestrq.model.conformer(feats, layer)

    def quantizer(self, name: str) -> RVQEncode:
        if name not in self.quantizer_names:
            raise ValueError(f"no quantizer {name!r} in this tokenizer (it has {', '.join(self.quantizer_names)})")
        return getattr(self, name).quantizers[0]

    @torch.no_grad()
    def encode_chunks(self, mono48: torch.Tensor, layer: int, quantizer: str) -> torch.Tensor:
        """Mono 40 s chunks at 48 kHz ``[N, 1 920 000]`` -> codes ``[N, 1000]``."""
        feats = self.features(self.mel_db(self.resample24k(mono48)))
        return self.quantizer(quantizer)(self.embed(feats, layer))


__all__ = ["CHUNK", "CHUNK_SECONDS", "FRAMES_PER_CHUNK", "MEL_MEAN", "MEL_STD", "Conformer", "ConformerBlock",
           "ConvModule", "ConvSubsampling", "FeedForward", "MusicFMTokenizer", "RVQEncode", "Res2d", "SelfAttention",
           "rotate_half"]
