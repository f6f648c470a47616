"""The flow-matching half of the LeVo codec decoder: codes -> 64-d VAE latents (``codec_facts.md`` §2-5, §10).

One window of ``Lw`` frames (1000 in practice) goes through

1. :class:`RVQDecode` per stream (vocal, bgm): a codebook look-up and a weight-normed 1×1 projection;
2. ten Euler steps of the flow ODE with classifier-free guidance, the velocity coming from
   :class:`FlowEstimator`, a non-causal GPT2-style transformer (learned positions + interleaved RoPE,
   AdaLN-single time conditioning);
3. de-normalisation with the checkpoint's fixed latent statistics.

:class:`FlowDecoder` holds exactly the released tensors that decoding reads, under their released
names, so a ``model_2.safetensors`` loads into it key for key (the loader in :mod:`.decoder`). Unlike
the released module, the latent statistics are never updated here: decoding a song never changes
the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

#: counts below which the released ``normfeat`` would still update its statistics while decoding
MIN_TRUSTED_COUNTS = 100_000


# ----------------------------------------------------------------------------- RVQ decode
class _WeightNormConv1x1(nn.Module):
    """A 1×1 Conv1d with weight norm (dim 0), stored as released: ``weight_v [D,in,1]``,
    ``weight_g [D,1,1]``, ``bias [D]``; applied as a linear map over the last dimension."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim, 1))
        self.weight_g = nn.Parameter(torch.empty(out_dim, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_dim))
        nn.init.normal_(self.weight_v, std=in_dim ** -0.5)
        nn.init.ones_(self.weight_g)
        nn.init.zeros_(self.bias)

    def weight(self) -> torch.Tensor:
        """``W = g·v/‖v‖`` ``[D,in]``, the norm per output channel over (in, k)."""
        v = self.weight_v.float()
        w = self.weight_g.float() * v / v.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
        return w[:, :, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias.to(x.dtype))


class RVQDecode(nn.Module):
    """One stream's RVQ look-up (first quantizer only): ``codes [B,T] -> [B,T,D]``.

    ``e = codebook[c]`` (no L2 normalisation on decode), then the weight-normed projection 32 -> D."""

    def __init__(self, codebook_size: int, codebook_dim: int, out_dim: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self.out_proj = _WeightNormConv1x1(codebook_dim, out_dim)

    @property
    def codebook_size(self) -> int:
        return self.codebook.num_embeddings

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"RVQ codes must be integers, got dtype {codes.dtype}")
        V = self.codebook_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= V):
            bad = codes[(codes < 0) | (codes >= V)]
            raise ValueError(f"RVQ code {int(bad[0])} out of range [0, {V}) ({bad.numel()} such code(s); "
                             "EOS/pad 16384/16385 must be cut before decoding)")
        e = F.embedding(codes.long(), self.codebook.weight)
        return self.out_proj(e)


# ----------------------------------------------------------------------------- estimator
class Conv1D(nn.Module):
    """GPT2's Conv1D: weight stored ``[in, out]``, applied as ``x·W + b``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], out.shape[-1])


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """``0.5x(1+tanh(√(2/π)(x+0.044715x³)))`` (the tanh approximation)."""
    return F.gelu(x, approximate="tanh")


def rope_tables(length: int, head_dim: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin [L, head_dim/2]`` of the angles ``pos·θ_p``, ``θ_p = 10000^(−2p/head_dim)``."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    ang = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return ang.cos(), ang.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs ``(x_2p, x_2p+1)`` of ``x [..., L, hd]`` by their angles, in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with interleaved RoPE on q and k."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(width, 3 * width)
        self.c_proj = Conv1D(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        N, L, W = x.shape
        qkv = self.c_attn(x).view(N, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [N, H, L, hd]; head h = channels hd·h .. hd·h+hd−1 of each third
        q = apply_rope_interleaved(q, cos, sin).to(v.dtype)
        k = apply_rope_interleaved(k, cos, sin).to(v.dtype)
        o = F.scaled_dot_product_attention(q, k, v)  # no mask: every frame sees every frame
        return self.c_proj(o.transpose(1, 2).reshape(N, L, W))


class MLP(nn.Module):
    """``c_proj(gelu_new(c_fc(x)))``; the hidden width is the file's (released: 4400 = 2 × 2200)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(width, hidden)
        self.c_proj = Conv1D(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block modulated by AdaLN-single (shift, scale, gate per sub-layer)."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(6, width))
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = MLP(width, mlp_width)

    def forward(self, h: torch.Tensor, m: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        mod = (self.scale_shift_table[None] + m).unsqueeze(2)  # [N, 6, 1, W]
        s1, c1, g1, s2, c2, g2 = mod.unbind(1)
        h = h + g1 * self.attn(self.ln_1(h) * (1 + c1) + s1, cos, sin)
        return h + g2 * self.mlp(self.ln_2(h) * (1 + c2) + s2)


class _TimestepEmbedder(nn.Module):
    def __init__(self, freq_dim: int, width: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, width)
        self.linear_2 = nn.Linear(width, width)


class _AdaLNEmbedding(nn.Module):
    def __init__(self, freq_dim: int, width: int) -> None:
        super().__init__()
        self.timestep_embedder = _TimestepEmbedder(freq_dim, width)


class _AdaLNSingle(nn.Module):
    def __init__(self, freq_dim: int, width: int) -> None:
        super().__init__()
        self.emb = _AdaLNEmbedding(freq_dim, width)
        self.linear = nn.Linear(width, 6 * width)


class FlowEstimator(nn.Module):
    """The velocity network (§3): ``forward(x [N,L,W], t [N]) -> [N,L,W]``, non-causal.

    Parameter names are the released ones under ``cfm_wrapper.estimator.`` except ``wte`` (the
    token embedding, which decoding never reads). ``mlp_width``: the MLP's hidden width, a setting
    of the released GPT-2 config (``n_inner``, 4400 there); default ``2·width``, the released ratio."""

    def __init__(self, layers: int, width: int, heads: int, max_positions: int = 1000, time_freqs: int = 256,
                 mlp_width: int | None = None) -> None:
        super().__init__()
        mlp_width = 2 * width if mlp_width is None else mlp_width
        if mlp_width < 1:
            raise ValueError(f"estimator MLP width must be positive, got {mlp_width}")
        if heads <= 0 or width % heads:
            raise ValueError(f"estimator width {width} is not divisible by {heads} heads")
        if (width // heads) % 2:
            raise ValueError(f"estimator head_dim {width // heads} (width {width} / {heads} heads) must be even "
                             "for the interleaved RoPE pairs")
        self.layers, self.width, self.heads, self.mlp_width = layers, width, heads, mlp_width
        self.head_dim = width // heads
        self.max_positions, self.time_freqs = max_positions, time_freqs
        self.wpe = nn.Embedding(max_positions, width)
        self.h = nn.ModuleList(Block(width, heads, mlp_width) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, eps=1e-5)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, width))
        self.proj_out = nn.Linear(width, width)
        self.adaln_single = _AdaLNSingle(2 * time_freqs, width)

    def time_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e [N,W], m [N,6W])`` for flow times ``t [N]`` (sinusoids cos first, times scaled by 1000)."""
        F_ = self.time_freqs
        j = torch.arange(F_, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000.0) * j / F_)
        a = (t.float()[:, None] * freqs[None, :]) * 1000.0
        te = self.adaln_single.emb.timestep_embedder
        tau = torch.cat([a.cos(), a.sin()], dim=-1).to(te.linear_1.weight.dtype)
        e = te.linear_2(F.silu(te.linear_1(tau)))
        m = self.adaln_single.linear(F.silu(e))
        return e, m

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity-network output ``[N,L,W]`` for input ``x [N,L,W]`` at flow times ``t [N]`` (or one
        time for all rows, a 0-dim tensor or a float)."""
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"estimator input must be [N, L, {self.width}], got {tuple(x.shape)}")
        N, L, _ = x.shape
        if L > self.max_positions:
            raise ValueError(f"estimator input has {L} frames; the learned positions allow at most "
                             f"{self.max_positions} per window")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            # one time for every row, embedded once and shared, so that no row's numbers depend on N
            # (BLAS kernels differ by matrix size, and even equal rows of one product can round apart);
            # computed as two equal rows, because a one-row product takes a path whose rounding depends
            # on the weights' memory alignment
            e, m = self.time_embedding(t.reshape(1).expand(2))
            e, m = e[:1].expand(N, -1), m[:1].expand(N, -1)
        elif t.shape != (N,):
            raise ValueError(f"flow times must be [N={N}] or one time, got {tuple(t.shape)}")
        else:
            e, m = self.time_embedding(t)
        h = x.to(self.wpe.weight.dtype) + self.wpe.weight[:L]  # weights stored in bf16/fp16: run in it
        m = m.reshape(N, 6, self.width)
        cos, sin = rope_tables(L, self.head_dim, x.device)
        for block in self.h:
            h = block(h, m, cos, sin)
        s, c = (self.scale_shift_table[None] + e[:, None]).unsqueeze(2).unbind(1)  # shift, scale [N,1,W]
        return self.proj_out(self.ln_f(h) * (1 + c) + s)


# ----------------------------------------------------------------------------- the decoder
class _CFMWrapper(nn.Module):
    def __init__(self, estimator: FlowEstimator) -> None:
        super().__init__()
        self.estimator = estimator


class _ResidualVQ(nn.Module):
    def __init__(self, rvq: RVQDecode) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList([rvq])


class _NormFeat(nn.Module):
    """The released running latent statistics (read-only here), kept in fp32 whatever dtype the
    decoder is cast to: ``counts`` (about 1e6 and more) overflows fp16 (inf, then NaN audio), and bf16
    rounds the sums enough to move a de-normalised std by up to 5 %. Device moves apply."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(1))
        self.register_buffer("sum_x", torch.zeros(dim))
        self.register_buffer("sum_x2", torch.zeros(dim))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def] - nn.Module's hook, typed there
        for key, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:  # a dtype cast (module.half(), .to(bf16)): move, keep the dtype
                moved = torch.empty_like(buf, device=moved.device) if buf.is_meta else buf.to(moved.device)
            self._buffers[key] = moved
        return self


_BLOCK_KEY = re.compile(r"^cfm_wrapper\.estimator\.h\.(\d+)\.")


class FlowDecoder(nn.Module):
    """Codes of one window -> de-normalised latent ``[B,64,Lw]`` (§4), holding exactly the 233
    released tensors decoding reads, under their released names.

    Estimator input channels: ``[mask_emb | in-context latent | vocal | bgm | x]``, so
    ``width = mask_dim + latent_dim + 2·rvq_dim + latent_dim``."""

    def __init__(self, *, layers: int, width: int, heads: int = 20, rvq_dim: int, codebook_size: int,
                 codebook_dim: int = 32, latent_dim: int = 64, mask_dim: int = 24, max_positions: int = 1000,
                 time_freqs: int = 256, mlp_width: int | None = None) -> None:
        super().__init__()
        need = mask_dim + latent_dim + 2 * rvq_dim + latent_dim
        if width != need:
            raise ValueError(f"estimator width {width} does not match the input layout mask {mask_dim} + context "
                             f"{latent_dim} + 2×codes {rvq_dim} + latent {latent_dim} = {need}")
        self.layers, self.width, self.heads = layers, width, heads
        self.rvq_dim, self.codebook_size, self.codebook_dim = rvq_dim, codebook_size, codebook_dim
        self.latent_dim, self.mask_dim, self.max_positions = latent_dim, mask_dim, max_positions
        self.cfm_wrapper = _CFMWrapper(FlowEstimator(layers, width, heads, max_positions, time_freqs, mlp_width))
        self.rvq_bestrq_emb = _ResidualVQ(RVQDecode(codebook_size, codebook_dim, rvq_dim))
        self.rvq_bestrq_bgm_emb = _ResidualVQ(RVQDecode(codebook_size, codebook_dim, rvq_dim))
        self.mask_emb = nn.Embedding(3, mask_dim)
        self.zero_cond_embedding1 = nn.Parameter(torch.zeros(rvq_dim))  # read by upstream, no effect at inference
        self.normfeat = _NormFeat(latent_dim)

    @property
    def estimator(self) -> FlowEstimator:
        return self.cfm_wrapper.estimator

    # -- sizes ------------------------------------------------------------------------
    @classmethod
    def sizes_from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> dict:
        """Constructor kwargs (all but ``heads``, which no shape holds) from a released file's ``{key: shape}``:
        every size, the MLP width included, comes from the tensor shapes.

        Raises KeyError naming a missing key, ValueError for inconsistent shapes."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            if key not in shapes:
                raise KeyError(f"missing tensor {key!r}")
            s = tuple(int(d) for d in shapes[key])
            if len(s) != ndim:
                raise ValueError(f"tensor {key!r} has shape {s}, expected {ndim} dimensions")
            return s

        blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
        if not blocks:
            raise KeyError("no estimator blocks 'cfm_wrapper.estimator.h.N.*'")
        if blocks != set(range(len(blocks))):
            raise ValueError(f"estimator blocks are not numbered 0..N-1: {sorted(blocks)}")
        max_positions, width = shape("cfm_wrapper.estimator.wpe.weight", 2)
        t_width, freq_dim = shape("cfm_wrapper.estimator.adaln_single.emb.timestep_embedder.linear_1.weight", 2)
        if t_width != width or freq_dim % 2:
            raise ValueError(f"time embedding linear_1 has shape {(t_width, freq_dim)}, expected ({width}, 2·freqs)")
        fc_in, mlp_width = shape("cfm_wrapper.estimator.h.0.mlp.c_fc.weight", 2)
        if fc_in != width:
            raise ValueError(f"tensor 'cfm_wrapper.estimator.h.0.mlp.c_fc.weight' has shape {(fc_in, mlp_width)}, "
                             f"expected ({width}, MLP width)")
        codebook_size, codebook_dim = shape("rvq_bestrq_emb.quantizers.0.codebook.weight", 2)
        rvq_dim = shape("rvq_bestrq_emb.quantizers.0.out_proj.weight_v", 3)[0]
        (latent_dim,) = shape("normfeat.sum_x", 1)
        mask_dim = shape("mask_emb.weight", 2)[1]
        return dict(layers=len(blocks), width=width, rvq_dim=rvq_dim, codebook_size=codebook_size,
                    codebook_dim=codebook_dim, latent_dim=latent_dim, mask_dim=mask_dim,
                    max_positions=max_positions, time_freqs=freq_dim // 2, mlp_width=mlp_width)

    # -- latent statistics (§5) ---------------------------------------------------------
    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        nf = self.normfeat
        counts = nf.counts.float()
        mean = nf.sum_x.float() / counts
        std = (nf.sum_x2.float() / counts - mean * mean).clamp_min(0).sqrt()
        few = counts < 10
        return torch.where(few, torch.zeros_like(mean), mean), torch.where(few, torch.ones_like(std), std)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """``(z − mean)·(1/max(std, 1e-12))`` over the last (latent) dimension, fp32; statistics constant."""
        mean, std = self._stats()
        return (z.float() - mean) * (1.0 / std.clamp_min(1e-12))

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """``x·std + mean`` over the last (latent) dimension, fp32."""
        mean, std = self._stats()
        return x.float() * std + mean

    def check_statistics(self) -> str | None:
        """A warning when the latent statistics look untrained (counts < 1e5), else None.

        The released module would update them while decoding in that case (so its output would
        depend on random draws and earlier decodes); this port keeps them constant."""
        counts = float(self.normfeat.counts.float().reshape(-1)[0])
        if not math.isfinite(counts) or counts < MIN_TRUSTED_COUNTS:
            extra = " (below 10: the latents are not normalised at all)" if counts < 10 else ""
            return (f"latent statistics normfeat.counts = {counts:g} < {MIN_TRUSTED_COUNTS:g}{extra}: the released "
                    "code would still be updating them while decoding; this decoder keeps them constant, so its "
                    "output may differ from the released one (is this a trained checkpoint?)")
        return None

    # -- solver (§4) --------------------------------------------------------------------
    @torch.no_grad()
    def solve_window(self, cv: torch.Tensor, cb: torch.Tensor, Z: torch.Tensor | None, n_ctx: int,
                     x0: torch.Tensor, *, steps: int = 10, cfg: float = 1.5, sigma_min: float = 1e-4,
                     autocast: torch.dtype | None = None) -> torch.Tensor:
        """One window: codes ``cv, cb [B,Lw]``, in-context latents ``Z [B,Lw,64]`` (de-normalised; only
        frames < ``n_ctx`` are read; None when ``n_ctx`` is 0), noise ``x0 [B,Lw,64]`` -> de-normalised
        latent ``[B,64,Lw]`` fp32.

        Euler over fp32 ``linspace(0,1,steps+1)`` with CFG ``v_u + cfg·(v_c − v_u)`` (uncond rows: zeros
        in the code channels); context frames re-noised each step and pasted at the end.
        ``autocast``: fp16/bf16 matmuls (as released on GPU); the solver state stays fp32."""
        dev = self.mask_emb.weight.device
        B, Lw = cv.shape if cv.dim() == 2 else (-1, -1)
        D, R = self.latent_dim, self.rvq_dim
        if cv.dim() != 2 or cb.shape != cv.shape:
            raise ValueError(f"codes must be two [B, Lw] tensors, got {tuple(cv.shape)} and {tuple(cb.shape)}")
        if Lw > self.max_positions:
            raise ValueError(f"window of {Lw} frames exceeds the estimator's {self.max_positions} positions")
        if tuple(x0.shape) != (B, Lw, D):
            raise ValueError(f"x0 must be [B={B}, Lw={Lw}, {D}], got {tuple(x0.shape)}")
        if not 0 <= n_ctx <= Lw:
            raise ValueError(f"n_ctx = {n_ctx} outside [0, {Lw}]")
        if n_ctx and (Z is None or Z.shape[0] != B or Z.shape[1] < n_ctx or Z.shape[2] != D):
            raise ValueError(f"Z must be [B={B}, >= n_ctx={n_ctx}, {D}] when n_ctx > 0, got "
                             f"{None if Z is None else tuple(Z.shape)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        # one autocast scope for the whole window (and the caller's, Decoder.decode, spans all windows):
        # autocast keeps its fp16 copy of each weight for as long as the outermost scope lasts, so the
        # weights are cast once per decode, not at every Euler step
        amp = (torch.autocast(device_type=dev.type, dtype=autocast) if autocast is not None else nullcontext())
        x0 = x0.to(dev, torch.float32)
        with amp:
            mu = torch.cat([self.rvq_bestrq_emb.quantizers[0](cv.to(dev)),
                            self.rvq_bestrq_bgm_emb.quantizers[0](cb.to(dev))], dim=-1)
            ctx = torch.zeros(B, Lw, D, device=dev)
            if n_ctx:
                ctx[:, :n_ctx] = self.normalise(Z[:, :n_ctx].to(dev))
            mask = torch.full((Lw,), 2, dtype=torch.long, device=dev)
            mask[:n_ctx] = 1
            # estimator input [uncond ; cond]: [E | ctx | codes (zeros for uncond) | x]
            inp = torch.zeros(2 * B, Lw, self.width, device=dev)
            M = self.mask_dim
            inp[:, :, :M] = self.mask_emb.weight.float()[mask]
            inp[:, :, M:M + D] = ctx.repeat(2, 1, 1)
            inp[B:, :, M + D:M + D + 2 * R] = mu.float()
            t = torch.linspace(0, 1, steps + 1, dtype=torch.float32)
            dt = t[1:] - t[:-1]
            t, dt = t.to(dev), dt.to(dev)
            x = x0.clone()
            est = self.estimator
            for i in range(steps):
                ti = t[i]
                if n_ctx:
                    x[:, :n_ctx] = (1 - (1 - sigma_min) * ti) * x0[:, :n_ctx] + ti * ctx[:, :n_ctx]
                inp[:B, :, -D:] = x
                inp[B:, :, -D:] = x
                v = est(inp, ti)[..., -D:]  # one flow time for all rows (time embedded once)
                v_u, v_c = v[:B], v[B:]
                v = v_u + cfg * (v_c - v_u)
                x = x + dt[i] * v  # the solver state stays fp32 (x fp32 + fp16 v -> fp32)
        x[:, :n_ctx] = ctx[:, :n_ctx]
        return self.denormalise(x).transpose(1, 2)


__all__ = ["MIN_TRUSTED_COUNTS", "FlowDecoder", "FlowEstimator", "RVQDecode", "apply_rope_interleaved",
           "gelu_new", "rope_tables"]
