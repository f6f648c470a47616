"""LeLM: the LeVo / SongGeneration song language model, readable top to bottom.

Two Llama-style stacks with the released parameter names (so a released ``model.pt`` loads key
for key): the main stack reads stream 0 (mixed) and predicts it; its post-norm hidden state and the
embeddings of streams 1..K-1 pass a bridge MLP into the sub-stack, which predicts streams 1..K-1
(vocal, bgm). Conditions are a fixed-length, zero-padded prefix ``[lyrics | audio prompt | style]``
in front of both stacks. Streams are interleaved with a delay pattern (:mod:`levo_infer.pattern`).

Unlike the released forward, training asks only for hidden states (:meth:`LeLM.frame_hidden`) and
projects through the 16385-way heads only where a loss needs them (:meth:`LeLM.head`).

This module imports only its config and the delay pattern (and the package's error base):
generation (:func:`levo_infer.generate.generate`), saving (:func:`levo_infer.checkpoint.save_released`)
and the request format (:mod:`levo_infer.request`) are functions of their own modules, and
:func:`levo_infer.load_model` returns :class:`levo_infer.api.SongLM`, an LeLM that also has
``.generate`` and ``.save``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import LevoInferError
from .pattern import build_delayed, revert_steps

STRUCTURE_TABLE_ROWS = 200

try:  # optional GPU extra
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - not installable on CPU machines
    _flash_attn_func = None


class SequenceTooLongError(LevoInferError):
    """A forward or a generation needs more positions than the config's ``max_position_embeddings``."""


class LyricTooLong(LevoInferError):
    """A lyric needs more tokens than the model's lyric conditioner has positions (``lyric_max_len``)."""


@dataclass(frozen=True)
class LyricFit:
    """Whether lyrics fit the lyric conditioner: ``limit`` positions (``lyric_max_len``, the start
    token included), counted with the model's own lyric ``tokenizer``. The released conditioner cuts
    a longer lyric silently, so two lyrics differing only after the cut make the same song; here a
    lyric that does not fit is an error naming the song, unless ``truncate`` asks for the cut (then
    :meth:`check` returns the warning to print for that song). Build one with :meth:`LeLM.lyric_fit`."""

    tokenizer: object
    limit: int
    truncate: bool = False

    def tokens(self, lyric: str | None) -> int:
        """Positions ``lyric`` takes in the lyric conditioner (uncut)."""
        return len(self.tokenizer.encode(lyric))  # type: ignore[attr-defined]

    def check(self, lyric: str | None, where: str | None, option: str | None) -> str | None:
        """None when ``lyric`` fits. When it does not: with ``truncate`` the warning for this song,
        else :class:`LyricTooLong`. Messages start with ``where`` (the song: line and idx, shard and
        key) and name ``option``, the setting that allows the cut (None: the tool has none)."""
        n = self.tokens(lyric)
        if n <= self.limit:
            return None
        msg = (f"{where + ': ' if where else ''}the lyric is {n} tokens long, but the model's lyric conditioner "
               f"holds {self.limit} (lyric_max_len)")
        if self.truncate:
            return f"{msg}; cut to its first {self.limit} tokens ({option}): the rest of the lyric is not sung"
        fix = f", or pass {option} to cut it to its first {self.limit} tokens" if option else ""
        raise LyricTooLong(f"{msg}: shorten it{fix}")


# ----------------------------------------------------------------------------- Llama blocks
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as the released Llama), weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, head_dim] for the rotate-half RoPE layout, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, L, hd]; cos/sin: [L, hd]."""
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Preallocated key/value cache for one stack: ``layers`` x [B, H, max_len, hd]."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, n = self.length, k.shape[2]
        if start + n > self.max_len:
            raise RuntimeError(f"KV cache overflow: {start}+{n} > {self.max_len}")
        self.k[layer][:, :, start:start + n] = k
        self.v[layer][:, :, start:start + n] = v
        return self.k[layer][:, :, :start + n], self.v[layer][:, :, :start + n]


class SlotKVCache:
    """Static key/value cache of one stack for the generation engine (:mod:`levo_infer.engine`).

    Allocated once, zero-filled, for ``rows`` sequences (a song with CFG takes two adjacent rows) of
    up to ``max_len`` positions: ``k``/``v`` [layers, rows, H, max_len, hd] in the model's dtype, or
    with ``bits=8`` int8 plus one fp32 scale per (row, head, position) (symmetric absmax over the
    head dim). It holds the stack's RoPE tables for every position, so a step reads its cos/sin
    instead of recomputing them.

    The engine points a call at rows ``rows`` and either prefills them from position 0 (``pos``
    None: causal attention over the new keys, which are then stored; ``rows`` a slice or a long
    tensor of row indices) or decodes one step (``rows`` a slice; ``pos`` [n] long: each row writes
    its new key/value at its own position and attends, through
    ``mask`` [n, 1, 1, key_len] (fp32, 0 where allowed, -inf elsewhere), to its own positions <= pos
    among the first ``key_len``).
    """

    def __init__(self, layers: int, rows: int, heads: int, max_len: int, head_dim: int, theta: float,
                 device: torch.device, dtype: torch.dtype, bits: int | None = None) -> None:
        if bits not in (None, 8):
            raise ValueError(f"KV cache bits must be None (the model's dtype) or 8, got {bits}")
        self.bits, self.dtype, self.max_len = bits, dtype, max_len
        shape = (layers, rows, heads, max_len, head_dim)
        store = torch.int8 if bits == 8 else dtype
        self.k = torch.zeros(shape, device=device, dtype=store)
        self.v = torch.zeros(shape, device=device, dtype=store)
        self.k_scale = self.v_scale = None
        if bits == 8:
            self.k_scale = torch.zeros(shape[:-1] + (1,), device=device, dtype=torch.float32)
            self.v_scale = torch.zeros(shape[:-1] + (1,), device=device, dtype=torch.float32)
        self.cos, self.sin = rope_cos_sin(torch.arange(max_len, device=device), head_dim, theta, dtype)
        self.rows: slice | torch.Tensor = slice(0, rows)
        self.pos: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.key_len = max_len
        self._ar: torch.Tensor = torch.arange(rows, device=device)

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor, length: int) -> None:
        """Copy positions ``[0, length)`` of rows ``src`` into rows ``dst`` (long tensors), every layer:
        a prefix computed once serves every row with the same conditions, and a song moves to another
        slot."""
        for buf in (self.k, self.v, self.k_scale, self.v_scale):
            if buf is not None:
                buf[:, dst, :, :length] = buf[:, src, :, :length]

    @staticmethod
    def bytes_per_element(dtype: torch.dtype, bits: int | None, head_dim: int) -> float:
        """Cache bytes per stored key (or value) element, scales included."""
        if bits == 8:
            return 1.0 + 4.0 / head_dim
        return float(torch.empty((), dtype=dtype).element_size())

    def rope(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for this call: [length, hd] from position 0 (prefill), or [n, 1, 1, hd] per row (decode)."""
        if self.pos is None:
            return self.cos[:length], self.sin[:length]
        n = self.pos.shape[0]
        return self.cos[self.pos].view(n, 1, 1, -1), self.sin[self.pos].view(n, 1, 1, -1)

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / 127.0
        return (x.float() / scale).round_().clamp_(-127, 127).to(torch.int8), scale

    def _store(self, layer: int, idx: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.bits == 8:
            (qk, sk), (qv, sv) = self._quantize(k), self._quantize(v)
            self.k[layer][idx], self.k_scale[layer][idx] = qk, sk  # type: ignore[index]
            self.v[layer][idx], self.v_scale[layer][idx] = qv, sv  # type: ignore[index]
        else:
            self.k[layer][idx], self.v[layer][idx] = k, v

    def _load(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        r, n = self.rows, self.key_len
        k, v = self.k[layer, r, :, :n], self.v[layer, r, :, :n]
        if self.bits == 8:
            k = (k.float() * self.k_scale[layer, r, :, :n]).to(self.dtype)  # type: ignore[index]
            v = (v.float() * self.v_scale[layer, r, :, :n]).to(self.dtype)  # type: ignore[index]
        return k, v

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new keys/values of ``layer`` and return attention [n, H, L, hd] (see the class)."""
        if self.pos is None:  # prefill from position 0: attention over the fresh keys, then keep them
            L = k.shape[2]
            self._store(layer, (self.rows, slice(None), slice(0, L)), k, v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        rows = self._ar[self.rows][:, None]  # [n, 1] row index beside the [n, 1] position index: one entry per row
        self._store(layer, (rows, slice(None), self.pos[:, None]), k.transpose(1, 2), v.transpose(1, 2))
        kk, vv = self._load(layer)
        # one query per row: two small batched matmuls and an fp32 softmax beat the fused CPU kernel
        att = torch.matmul(q, kk.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5) + self.mask
        return torch.matmul(torch.softmax(att, dim=-1).to(vv.dtype), vv)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | SlotKVCache | None = None, layer: int = 0, use_flash: bool = False) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(cache, SlotKVCache):
            return self.o_proj(cache.attend(layer, q, k, v).transpose(1, 2).reshape(B, L, -1))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        if use_flash and _flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            # flash-attn aligns the causal mask bottom-right, which is right for cached decoding
            out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            out = out.reshape(B, L, -1)
        else:
            if past == 0:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
            elif L == 1:
                out = F.scaled_dot_product_attention(q, k, v)
            else:  # chunked prefill after a cached prefix: causal mask offset by `past`
                qpos = torch.arange(past, past + L, device=x.device)[:, None]
                kpos = torch.arange(past + L, device=x.device)[None, :]
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=kpos <= qpos)
            out = out.transpose(1, 2).reshape(B, L, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.mlp = MLP(dim, hidden)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | SlotKVCache | None = None, layer: int = 0, use_flash: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, use_flash)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStack(nn.Module):
    """``model.{embed_tokens,layers,norm}``; ``embed_tokens`` exists for the released layout only
    (inputs arrive as embeddings)."""

    def __init__(self, vocab: int, dim: int, hidden: int, heads: int, layers: int, eps: float) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([DecoderLayer(dim, hidden, heads, eps) for _ in range(layers)])
        self.norm = RMSNorm(dim, eps)


class CausalLM(nn.Module):
    """A Llama stack plus its ``lm_head``; :meth:`forward` returns the post-norm hidden state."""

    def __init__(self, vocab: int, dim: int, hidden: int, heads: int, layers: int, theta: float, eps: float) -> None:
        super().__init__()
        self.model = LlamaStack(vocab, dim, hidden, heads, layers, eps)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.theta, self.head_dim = theta, dim // heads
        self.use_flash = False

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | SlotKVCache | None = None) -> torch.Tensor:
        if isinstance(cache, SlotKVCache):  # positions are the cache's (per row when decoding)
            cos, sin = cache.rope(x.shape[1])
        else:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
            cos, sin = rope_cos_sin(positions, self.head_dim, self.theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, self.use_flash)
        if isinstance(cache, KVCache):
            cache.length += x.shape[1]
        return self.model.norm(x)


# ----------------------------------------------------------------------------- conditioners
class LyricConditioner(nn.Module):
    """``description``: token table + structure table (section index per position)."""

    def __init__(self, rows: int, dim: int, pad_id: int, max_len: int) -> None:
        super().__init__()
        self.output_proj = nn.Embedding(rows, dim, padding_idx=pad_id)
        self.structure_emb = nn.Embedding(STRUCTURE_TABLE_ROWS, dim, padding_idx=0)
        self.max_len = max_len

    def forward(self, ids: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        return self.output_proj(ids) + self.structure_emb(structure)


class StyleConditioner(nn.Module):
    """``type_info``: token table only."""

    def __init__(self, rows: int, dim: int, pad_id: int, max_len: int) -> None:
        super().__init__()
        self.output_proj = nn.Embedding(rows, dim, padding_idx=pad_id)
        self.max_len = max_len

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.output_proj(ids)


class PromptConditioner(nn.Module):
    """``prompt_audio``: embeds a [B, K, P] token prompt into one prefix per stack."""

    def __init__(self, code_size: int, code_depth: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.emb = nn.ModuleList([nn.Embedding(code_size + 2, dim, padding_idx=code_size + 1) for _ in range(code_depth)])
        self.EOT_emb = nn.Parameter(torch.randn(1, dim))
        self.layer2_EOT_emb = nn.Parameter(torch.randn(1, dim))
        self.max_len = max_len

    def forward(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt``: [B, K, max_len-1] (EOS row prefix already added) -> two [B, max_len, D]."""
        B = prompt.shape[0]
        main = self.emb[0](prompt[:, 0])
        sub = sum(self.emb[k](prompt[:, k]) for k in range(1, len(self.emb)))
        main = torch.cat([self.EOT_emb.to(main.dtype).expand(B, 1, -1), main], dim=1)
        sub = torch.cat([self.layer2_EOT_emb.to(main.dtype).expand(B, 1, -1), sub], dim=1)
        return main, sub


class ConditionProvider(nn.Module):
    """Holds the three conditioners under the released names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        lm = cfg.lm
        lyric_rows, style_rows, pad = cfg.text_table_sizes()
        self.conditioners = nn.ModuleDict({
            "description": LyricConditioner(lyric_rows, lm.dim, pad, cfg.lyric_max_len),
            "type_info": StyleConditioner(style_rows, lm.dim, pad, cfg.style_max_len),
            "prompt_audio": PromptConditioner(lm.code_size, lm.code_depth, lm.dim, cfg.prompt_max_len),
        })


@dataclass
class Conditions:
    """Tokenised conditions for a batch (tensors on the model's device)."""

    lyric_ids: torch.Tensor  # [B, lyric_max_len]
    lyric_structure: torch.Tensor  # [B, lyric_max_len]
    style_ids: torch.Tensor  # [B, style_max_len]
    prompt: torch.Tensor  # [B, K, prompt_max_len - 1] with the EOS/pad row prefix

    @property
    def batch_size(self) -> int:
        return self.lyric_ids.shape[0]

    @staticmethod
    def cat(items: Sequence[Conditions]) -> Conditions:
        return Conditions(*(torch.cat([getattr(c, f) for c in items]) for f in
                            ("lyric_ids", "lyric_structure", "style_ids", "prompt")))


# ----------------------------------------------------------------------------- LeLM
class LeLM(nn.Module):
    """The song LM. Parameter names match the released ``audiolm.*`` state dict."""

    #: cut lyrics longer than the lyric conditioner (as the released code does) instead of refusing
    #: them in :meth:`prepare_conditions`; inputs are checked per song, with names, by :meth:`lyric_fit`
    truncate_lyrics: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        lm = cfg.lm
        D, K = lm.dim, lm.code_depth
        n_in, n_out = lm.code_size + 2, lm.code_size + 1
        self.condition_provider = ConditionProvider(cfg)
        self.emb = nn.ModuleList([nn.Embedding(n_in, D)])
        self.transformer = CausalLM(n_out, D, lm.intermediate_size, lm.num_heads, lm.num_layers, lm.rope_theta, lm.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(2 * D, D), nn.GELU(), nn.Linear(D, D))
        self.layer2_emb = nn.ModuleList([nn.Embedding(n_in, D) for _ in range(K)])
        self.transformer2 = CausalLM(n_out, D, lm.intermediate_size, lm.num_heads, lm.num_layers_sub,
                                     lm.rope_theta_sub, lm.norm_eps)
        self.out_norm = nn.LayerNorm(D)  # present in the released state dict, unused
        self.linears = nn.ModuleList([nn.Linear(D, n_out, bias=False) for _ in range(K - 1)])
        self.set_flash_attention(lm.use_flash_attn_2)
        self._tokenizers: tuple | None = None

    # -- properties ------------------------------------------------------------------
    @property
    def code_depth(self) -> int:
        return self.cfg.lm.code_depth

    @property
    def eos_id(self) -> int:
        return self.cfg.lm.eos_id

    @property
    def pad_id(self) -> int:
        return self.cfg.lm.pad_id

    @property
    def device(self) -> torch.device:
        return self.emb[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.emb[0].weight.dtype

    @property
    def max_frames(self) -> int:
        """Most frames one forward or generation can hold (see :meth:`check_frames`)."""
        return self.cfg.max_frames

    def check_frames(self, frames: int) -> None:
        """Fail before any compute when ``frames`` frames do not fit the position limit.

        Positions count from the start of the prefix: T frames take ``prefix_len + T + max_delay``.
        """
        if frames > self.cfg.max_frames:
            self._too_long(self.cfg.prefix_len + frames + self.cfg.max_delay)

    def _too_long(self, positions: int) -> None:
        c = self.cfg
        key, limit = c.max_positions
        frames = positions - c.prefix_len - c.max_delay
        raise SequenceTooLongError(
            f"a sequence of {positions} positions (conditioning prefix {c.prefix_len} + {frames} frames + delay "
            f"tail {c.max_delay}) exceeds {key}={limit}: at most {c.max_frames} frames "
            f"({c.max_frames / c.frame_rate:g} s at {c.frame_rate} Hz) fit; shorten the song (levo-infer --duration, "
            "generate(max_frames=...), or the training crop); the prefix length is fixed by the config")

    def set_flash_attention(self, enabled: bool) -> None:
        """Use flash-attn 2 when installed and running on GPU in half precision."""
        self.transformer.use_flash = self.transformer2.use_flash = bool(enabled)

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh initialisation for pretraining from scratch (normal, depth-scaled outputs)."""
        n_layers = self.cfg.lm.num_layers + self.cfg.lm.num_layers_sub
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name == "out_norm.weight":
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * n_layers))
            else:
                nn.init.normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    # -- conditions ------------------------------------------------------------------
    @property
    def tokenizers(self):  # -> tuple[TextTokenizer, TextTokenizer]
        """(lyric tokenizer, style tokenizer), built on first use (Qwen2 may need an offline build):
        :meth:`levo_infer.config.ModelConfig.text_tokenizers`."""
        if self._tokenizers is None:
            self._tokenizers = self.cfg.text_tokenizers()
        return self._tokenizers

    def lyric_fit(self, truncate: bool | None = None) -> LyricFit:
        """The lyric-length check of this model (``truncate``: default :attr:`truncate_lyrics`)."""
        return LyricFit(self.tokenizers[0], self.cfg.lyric_max_len,
                        self.truncate_lyrics if truncate is None else bool(truncate))

    def prepare_conditions(self, lyrics: Sequence[str | None], styles: Sequence[str | None],
                           prompt: torch.Tensor | None = None) -> Conditions:
        """Tokenise text exactly as the released conditioners receive it (no lower-casing or tag
        prefixes here: that is the caller's formatting) and lay out the prompt rows. A lyric longer
        than ``lyric_max_len`` tokens raises :class:`LyricTooLong` unless :attr:`truncate_lyrics`
        (the released code cuts it silently); style text is cut to ``style_max_len`` as released."""
        if len(lyrics) != len(styles):
            raise ValueError(f"got {len(lyrics)} lyrics but {len(styles)} styles")
        lyr_tok, sty_tok = self.tokenizers
        B, dev = len(lyrics), self.device
        Ll, Ls = self.cfg.lyric_max_len, self.cfg.style_max_len
        lyric_ids = torch.full((B, Ll), lyr_tok.pad_id, dtype=torch.long)
        lyric_st = torch.zeros((B, Ll), dtype=torch.long)
        style_ids = torch.full((B, Ls), sty_tok.pad_id, dtype=torch.long)
        for i, ids in enumerate(lyr_tok.encode_batch(list(lyrics))):
            if len(ids) > Ll and not self.truncate_lyrics:
                raise LyricTooLong(f"lyric {i} of the batch is {len(ids)} tokens long, but the model's lyric "
                                   f"conditioner holds {Ll} (lyric_max_len); check inputs per song with "
                                   "LeLM.lyric_fit(), or set truncate_lyrics = True to cut them as released")
            ids = ids[:Ll]
            lyric_ids[i, :len(ids)] = torch.tensor(ids)
            lyric_st[i, :len(ids)] = torch.tensor(lyr_tok.structure_ids(ids))
        for i, ids in enumerate(sty_tok.encode_batch(list(styles))):
            ids = ids[:Ls]
            style_ids[i, :len(ids)] = torch.tensor(ids)
        return Conditions(lyric_ids.to(dev), lyric_st.to(dev), style_ids.to(dev), self.prompt_rows(prompt, B))

    def prompt_rows(self, prompt: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Raw prompt tokens [B, K, P] (pad = none) -> [B, K, prompt_max_len-1]: pad/truncate to the
        prompt length, then prefix each row with EOS (a row starting with pad stays all pad)."""
        K, P, pad = self.code_depth, self.cfg.prompt_frames, self.pad_id
        out = torch.full((batch, K, P + 1), pad, dtype=torch.long, device=self.device)
        if prompt is None or P == 0:
            return out
        if prompt.dim() != 3 or prompt.shape[0] != batch or prompt.shape[1] != K:
            raise ValueError(f"prompt must be [B={batch}, K={K}, frames], got {tuple(prompt.shape)}")
        p = prompt[:, :, :P].to(self.device, torch.long)
        out[:, :, 1:1 + p.shape[2]] = p
        starts_pad = out[:, :, 1] == pad
        out[:, :, 0] = torch.where(starts_pad, torch.full_like(out[:, :, 0], pad), torch.full_like(out[:, :, 0], self.eos_id))
        out[starts_pad] = pad
        return out

    def condition_prefix(self, cond: Conditions) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable prefixes [B, prefix_len, D] for the main and the sub stack."""
        c = self.condition_provider.conditioners
        lyr = c["description"](cond.lyric_ids, cond.lyric_structure)
        sty = c["type_info"](cond.style_ids)
        p_main, p_sub = c["prompt_audio"](cond.prompt)
        return torch.cat([lyr, p_main, sty], dim=1), torch.cat([lyr, p_sub, sty], dim=1)

    # -- forward ---------------------------------------------------------------------
    def _embed_main(self, steps: torch.Tensor) -> torch.Tensor:
        return self.emb[0](steps[:, 0])

    def _embed_sub(self, steps: torch.Tensor) -> torch.Tensor:
        return sum(self.layer2_emb[k](steps[:, k]) for k in range(1, self.code_depth))

    def step_hidden(self, steps: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None,
                    caches: tuple[KVCache, KVCache] | tuple[SlotKVCache, SlotKVCache] | None = None,
                    start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Run both stacks over pattern ``steps`` [B, K, L] (optionally after the prefix).
        Returns the post-norm hidden states (h1, h2) of the step positions only, [B, L, D] each."""
        n_prefix = prefix[0].shape[1] if prefix is not None else 0
        end = start + n_prefix + steps.shape[2]
        if end > self.cfg.max_positions[1]:  # before any compute; an int compare per call
            self._too_long(end)
        x1, x2 = self._embed_main(steps), self._embed_sub(steps)
        if prefix is not None:
            x1, x2 = torch.cat([prefix[0], x1], dim=1), torch.cat([prefix[1], x2], dim=1)
        c1, c2 = caches if caches is not None else (None, None)
        h1 = self.transformer(x1, start, c1)
        h2 = self.transformer2(self.mlp(torch.cat([x2, h1], dim=-1)), start, c2)
        return h1[:, n_prefix:], h2[:, n_prefix:]

    def frame_hidden(self, codes: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """Hidden states aligned with ``codes`` [B, K, T]: the state that predicts frame t of
        stream k, [B, K, T, D] (stream 0 from the main stack, the others from the sub-stack)."""
        B, K, T = codes.shape
        self.check_frames(T)
        seq = build_delayed(codes, self.cfg.delays, self.pad_id)  # [B, K, T + maxd + 1]
        h1, h2 = self.step_hidden(seq[:, :, :-1], self.condition_prefix(cond), start=0)
        return revert_steps(h1, h2, self.cfg.delays, T)

    def head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of stream ``k`` (code_size + 1 classes, EOS last) for hidden states ``h``."""
        return self.transformer.lm_head(h) if k == 0 else self.linears[k - 1](h)

    def forward(self, codes: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """Full logits [B, K, T, code_size+1] aligned with ``codes`` (pattern reverted)."""
        H = self.frame_hidden(codes, cond)
        return torch.stack([self.head(k, H[:, k]) for k in range(self.code_depth)], dim=1)

    @torch.no_grad()
    def logits(self, codes: torch.Tensor, lyrics: Sequence[str | None], styles: Sequence[str | None],
               prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced scoring API: logits [B, K, T, code_size+1] aligned with ``codes``."""
        return self(codes.to(self.device), self.prepare_conditions(lyrics, styles, prompt))

    def new_slot_caches(self, rows: int, max_len: int, bits: int | None = None,
                        dtype: torch.dtype | None = None) -> tuple[SlotKVCache, SlotKVCache]:
        """Static caches of both stacks for the generation engine (see :class:`SlotKVCache`)."""
        lm = self.cfg.lm
        dt = dtype or self.dtype
        return (SlotKVCache(lm.num_layers, rows, lm.num_heads, max_len, lm.head_dim, lm.rope_theta, self.device, dt, bits),
                SlotKVCache(lm.num_layers_sub, rows, lm.num_heads, max_len, lm.head_dim, lm.rope_theta_sub, self.device,
                            dt, bits))

    def new_caches(self, batch: int, max_len: int) -> tuple[KVCache, KVCache]:
        lm = self.cfg.lm
        mk = lambda n: KVCache(n, batch, lm.num_heads, max_len, lm.head_dim, self.device, self.dtype)  # noqa: E731
        return mk(lm.num_layers), mk(lm.num_layers_sub)
