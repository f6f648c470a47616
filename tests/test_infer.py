"""levo-infer generation: the teacher-forced logits and the sampler against naive re-implementations
written here from the facts page (upstream_model_facts.md), not from the model code.

* logits: prefix ``[lyrics | prompt | style]`` with zero-padded fixed lengths, structure embedding,
  EOS-prefixed prompt rows, the bridge MLP, eager fp32-softmax attention, rotate-half RoPE;
* the released generation loop (batch 1, no cache, full recomputation every step): CFG as
  ``uncond + (cond - uncond) * coef``, logit division by 1.1 of the codes seen in the last 50 steps,
  prompt-token ban on codebook 0, greedy, pattern masking, EOS handling, earliest-EOS cut.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from levo_infer.api import SongLM
from levo_infer.generate import generate
from levo_infer.model import LeLM, LyricTooLong
from levo_infer.offload import enable_layer_offload
from levo_infer.styles import null_styles, released_style
from levo_infer.tokens import SILENT_BGM_CODE, SILENT_VOCAL_CODE, mode_tokens

LYRICS = ["[verse] la da love . night la ; [chorus] love love", None, "[verse] rock pop", "[chorus] sad happy . la",
          "[bridge] night", "[verse] da da da", "[intro-short] ; [verse] love", "[chorus] pop . rock . la"]
STYLES = ["[Musicality-very-high], rock, sad", "pop", None, "[Musicality-very-high], .", "happy", "sad night",
          "[Musicality-high], pop", None]




def make_model(seed: int = 1, main_eos: float = 1.2, sub_eos: float = 0.9, code_size: int = 64, **kw) -> LeLM:
    """A tiny random model (64 codes) whose EOS rows are scaled so that songs end at varied frames,
    by a mixed-stream EOS for some and a vocal/bgm EOS for others, and some run past the 50-step
    penalty window (so a wrong window length changes tokens)."""
    torch.manual_seed(seed)
    m = LeLM(tiny_config(code_size=code_size, **kw))
    m.init_weights(std=0.2)
    eos = m.eos_id
    with torch.no_grad():
        m.transformer.lm_head.weight[eos] *= main_eos
        for lin in m.linears:
            lin.weight[eos] *= sub_eos
    return m.eval()


@pytest.fixture(scope="module")
def model() -> LeLM:
    return make_model()


def prompts_for(m: LeLM, n: int, seed: int = 3) -> torch.Tensor:
    """Raw prompt tokens [n, K, frames]: every other song has one (the rest all pad = no prompt)."""
    g = torch.Generator().manual_seed(seed)
    P = m.cfg.prompt_frames
    pr = torch.randint(0, m.cfg.lm.code_size, (n, m.code_depth, P), generator=g)
    pr[1::2] = m.pad_id
    return pr


# ----------------------------------------------------------------------------- naive model (facts page)
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    hd, L = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    f = torch.arange(L).float()[:, None] * inv[None]
    emb = torch.cat([f, f], -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def _stack(x: torch.Tensor, sd: dict, name: str, n_layers: int, heads: int, theta: float) -> torch.Tensor:
    """Pre-norm Llama stack, eager attention with fp32 softmax and a causal mask, no padding mask."""
    B, L, D = x.shape
    hd = D // heads
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(n_layers):
        p = f"{name}.model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"])
        q, k, v = (h @ sd[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        q, k, v = (t.view(B, L, heads, hd).transpose(1, 2) for t in (q, k, v))
        q, k = _rope(q, theta), _rope(k, theta)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = torch.softmax(scores.float().masked_fill(~causal, float("-inf")), -1).to(q.dtype)
        x = x + (att @ v).transpose(1, 2).reshape(B, L, D) @ sd[p + "self_attn.o_proj.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return _rms(x, sd[f"{name}.model.norm.weight"])


def naive_prefix(m: LeLM, lyric: str | None, style: str | None, prompt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Main- and sub-stack prefixes [1, 952-like, D] built per the facts page."""
    sd, cfg = m.state_dict(), m.cfg
    D, K, pad, eos = cfg.lm.dim, m.code_depth, m.pad_id, m.eos_id
    lyr_tok, sty_tok = m.tokenizers
    c = "condition_provider.conditioners."
    # lyrics: <|im_start|> + text, truncated / right-padded to max_len; token table + structure table
    ids = lyr_tok.encode(lyric)[: cfg.lyric_max_len]
    tag_ids = {lyr_tok.token_to_id(t) for t in cfg.lyric_tags}
    lyr = torch.zeros(cfg.lyric_max_len, D)  # padded positions hold zero vectors
    cur = 0
    for j, t in enumerate(ids):
        if t in tag_ids:
            cur = t - lyr_tok.im_end_id  # 1..13
        lyr[j] = sd[c + "description.output_proj.weight"][t] + (sd[c + "description.structure_emb.weight"][cur] if cur else 0)
    sids = sty_tok.encode(style)[: cfg.style_max_len]
    sty = torch.zeros(cfg.style_max_len, D)
    for j, t in enumerate(sids):
        sty[j] = sd[c + "type_info.output_proj.weight"][t]
    # prompt: [K, frames] padded/truncated with pad, EOS prepended per row (a row starting with pad stays pad)
    P = cfg.prompt_frames
    rows = torch.full((K, P), pad, dtype=torch.long)
    if prompt is not None:
        rows[:, : min(P, prompt.shape[1])] = prompt[:, :P]
    rows = torch.cat([torch.full((K, 1), eos), rows], 1)
    rows[rows[:, 1] == pad] = pad

    def emb(k: int, r: torch.Tensor) -> torch.Tensor:
        table = sd[c + f"prompt_audio.emb.{k}.weight"]
        return torch.stack([torch.zeros(D) if int(t) == pad else table[t] for t in r])

    p_main = torch.cat([sd[c + "prompt_audio.EOT_emb"], emb(0, rows[0])])
    p_sub = torch.cat([sd[c + "prompt_audio.layer2_EOT_emb"], emb(1, rows[1]) + emb(2, rows[2])])
    return torch.cat([lyr, p_main, sty])[None], torch.cat([lyr, p_sub, sty])[None]


def naive_step_logits(m: LeLM, steps: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Logits [1, K, S, V] of every pattern step ``steps`` [1, K, S] (each predicts the next step)."""
    sd, lm = m.state_dict(), m.cfg.lm
    n = prefix[0].shape[1]
    x1 = torch.cat([prefix[0], sd["emb.0.weight"][steps[:, 0]]], 1)
    x2 = torch.cat([prefix[1], sd["layer2_emb.1.weight"][steps[:, 1]] + sd["layer2_emb.2.weight"][steps[:, 2]]], 1)
    h1 = _stack(x1, sd, "transformer", lm.num_layers, lm.num_heads, lm.rope_theta)
    z = torch.cat([x2, h1], -1) @ sd["mlp.0.weight"].T + sd["mlp.0.bias"]
    z = F.gelu(z) @ sd["mlp.2.weight"].T + sd["mlp.2.bias"]  # exact-erf GELU
    h2 = _stack(z, sd, "transformer2", lm.num_layers_sub, lm.num_heads, lm.rope_theta_sub)
    outs = [h1[:, n:] @ sd["transformer.lm_head.weight"].T, h2[:, n:] @ sd["linears.0.weight"].T,
            h2[:, n:] @ sd["linears.1.weight"].T]
    return torch.stack(outs, 1)


def naive_logits(m: LeLM, codes: torch.Tensor, lyric: str | None, style: str | None,
                 prompt: torch.Tensor | None) -> torch.Tensor:
    """Teacher-forced logits [K, T, V] of one song aligned with ``codes`` [K, T]."""
    K, T = codes.shape
    d = m.cfg.delays
    S = T + max(d) + 1
    steps = torch.full((K, S), m.pad_id, dtype=torch.long)  # step 0 all special
    for k in range(K):
        for t in range(T):
            steps[k, t + 1 + d[k]] = codes[k, t]  # step t+1 holds frame t - d_k
    lg = naive_step_logits(m, steps[None, :, :-1], naive_prefix(m, lyric, style, prompt))[0]
    return torch.stack([lg[k, d[k]:d[k] + T] for k in range(K)])  # frame t of stream k <- step t + d_k


def naive_released_generate(m: LeLM, lyric: str | None, style: str | None, prompt: torch.Tensor | None,
                            max_frames: int, cfg_coef: float = 1.5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The released loop with top_k=1 (greedy): batch 1, no cache, the whole sequence every step.
    Returns (raw frames [K, max_frames] before the cut, cut frames, length)."""
    K, eos, special, d = m.code_depth, m.eos_id, m.pad_id, m.cfg.delays
    cond = naive_prefix(m, lyric, style, prompt)
    null = naive_prefix(m, None, null_styles([style], m.cfg.version)[0], None)
    banned = set() if prompt is None else {int(t) for t in prompt[0, : m.cfg.prompt_frames] if t < eos}
    seq = [[special] for _ in range(K)]
    is_end = [False] * K
    for s in range(1, max_frames + max(d) + 1):
        steps = torch.tensor(seq)[None]
        lc = naive_step_logits(m, steps, cond)[0, :, -1]
        lu = naive_step_logits(m, steps, null)[0, :, -1]
        lg = lu + (lc - lu) * cfg_coef
        for q in range(K):
            for code in set(seq[q][-50:]):
                if code < eos:
                    lg[q, code] = lg[q, code] / 1.1
        for code in banned:
            lg[0, code] = float("-inf")
        tok = lg.argmax(-1).tolist()
        for q in range(K):
            frame = s - 1 - d[q]
            if frame < 0 or frame >= max_frames or is_end[q]:
                tok[q] = special
            is_end[q] = is_end[q] or tok[q] == eos
            seq[q].append(tok[q])
        if all(is_end):
            break
    raw = torch.full((K, max_frames), special, dtype=torch.long)
    for q in range(K):
        row = seq[q][1 + d[q]: 1 + d[q] + max_frames]
        raw[q, : len(row)] = torch.tensor(row, dtype=torch.long)
    ends = [int((raw[q] == eos).nonzero()[0]) if (raw[q] == eos).any() else max_frames for q in range(K)]
    n = min(ends)
    cut = raw.clone()
    cut[:, n:] = special
    return raw, cut, n


# ----------------------------------------------------------------------------- logits
def test_logits_equal_naive_recomputation(model):
    m = model
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, m.cfg.lm.code_size, (3, m.code_depth, 7), generator=g)
    prompt = prompts_for(m, 3)
    prompt[2, :, 1:] = m.pad_id  # a one-frame prompt: padded after its first frame
    lyrics = [LYRICS[0], None, "[verse] " + " ".join(["la"] * 20)]  # the last one is cut to max_len on request
    styles = [STYLES[0], STYLES[1], None]
    with pytest.raises(LyricTooLong, match="lyric 2 of the batch is 22 tokens long.* holds 12"):
        m.logits(codes, lyrics, styles, prompt)  # never cut silently
    m.truncate_lyrics = True  # the released conditioner's cut
    try:
        got = m.logits(codes, lyrics, styles, prompt)
    finally:
        m.truncate_lyrics = False
    assert got.shape == (3, 3, 7, m.eos_id + 1)
    for i in range(3):
        want = naive_logits(m, codes[i], lyrics[i], styles[i], prompt[i])
        torch.testing.assert_close(got[i], want, atol=2e-5, rtol=1e-4)


def test_logits_without_prompt_equal_all_pad_prompt(model):
    m = model
    codes = torch.randint(0, m.cfg.lm.code_size, (2, 3, 5))
    none = m.logits(codes, LYRICS[:2], STYLES[:2], None)
    pad = m.logits(codes, LYRICS[:2], STYLES[:2], torch.full((2, 3, m.cfg.prompt_frames), m.pad_id))
    torch.testing.assert_close(none, pad, rtol=0, atol=0)


# ----------------------------------------------------------------------------- generation
def test_compat_greedy_equals_naive_released_loop(model):
    m = model
    prompt = prompts_for(m, len(LYRICS))
    T = 64  # > 50 steps: the penalty window slides
    out = generate(m, LYRICS, STYLES, prompt, max_frames=T, compat=True, top_k=1, temperature=0.8, seed=0)
    lengths = []
    for i in range(len(LYRICS)):
        p = prompt[i] if i % 2 == 0 else None
        raw, cut, n = naive_released_generate(m, LYRICS[i], STYLES[i], p, T)
        assert torch.equal(out.raw_codes[i], raw), f"song {i}: tokens before the EOS cut differ"
        assert torch.equal(out.codes[i], cut) and int(out.lengths[i]) == n
        lengths.append(n)
    # the check is meaningful: songs end at various frames, some by a vocal/bgm EOS before the mixed one
    assert len(set(lengths)) >= 3 and T in lengths and min(lengths) < T and max(n for n in lengths if n < T) > 40
    eos_rows = [(out.raw_codes[i] == m.eos_id).any(-1).tolist() for i in range(len(LYRICS))]
    assert any(r[1] or r[2] for r in eos_rows) and any(r[0] for r in eos_rows)


def test_penalty_and_prompt_ban_change_the_tokens(model):
    m = model
    prompt = prompts_for(m, len(LYRICS))
    released = generate(m, LYRICS, STYLES, prompt, max_frames=16, compat=True, top_k=1)
    plain = generate(m, LYRICS, STYLES, prompt, max_frames=16, top_k=1, ban_prompt_tokens=False)
    assert not torch.equal(released.raw_codes, plain.raw_codes)
    with_pen = generate(m, LYRICS, STYLES, prompt, max_frames=16, top_k=1, repetition_penalty=1.1)
    assert torch.equal(with_pen.raw_codes, released.raw_codes)  # same rules spelled out (greedy everywhere)
    # banned codes never appear in the mixed stream of a prompted song
    for i in range(0, len(LYRICS), 2):
        toks = released.codes[i, 0, : int(released.lengths[i])]
        assert not (set(toks.tolist()) & set(prompt[i, 0].tolist()))


@pytest.mark.parametrize("compat", [True, False])
def test_kv_cache_generation_equals_full_recomputation(model, compat):
    m = model
    prompt = prompts_for(m, 4)
    kw = dict(max_frames=12, compat=compat, temperature=1.0, top_k=8 if compat else 0, top_p=0.0 if compat else 0.9,
              seed=11, repetition_penalty=None if compat else 1.2)
    cached = generate(m, LYRICS[:4], STYLES[:4], prompt, **kw)
    full = generate(m, LYRICS[:4], STYLES[:4], prompt, use_cache=False, **kw)
    assert torch.equal(cached.raw_codes, full.raw_codes) and torch.equal(cached.lengths, full.lengths)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_batched_8_songs_equal_single_runs(model, mode):
    m = model
    prompt = prompts_for(m, 8)
    seeds = [100 + 7 * i for i in range(8)]
    kw = dict(compat=True, top_k=1) if mode == "greedy" else dict(compat=False, temperature=1.0, top_k=10)
    batch = generate(m, LYRICS, STYLES, prompt, max_frames=14, seed=seeds, **kw)
    for i in range(8):
        one = generate(m, LYRICS[i:i + 1], STYLES[i:i + 1], prompt[i:i + 1], max_frames=14, seed=[seeds[i]], **kw)
        assert int(one.lengths[0]) == int(batch.lengths[i])
        assert torch.equal(one.raw_codes[0], batch.raw_codes[i]) and torch.equal(one.codes[0], batch.codes[i])
    if mode == "sampled":  # seeds matter; an int seed is seed + row
        again = generate(m, LYRICS, STYLES, prompt, max_frames=14, seed=seeds[0], **kw)
        assert torch.equal(again.codes[0], batch.codes[0])
        other = generate(m, LYRICS, STYLES, prompt, max_frames=14, seed=[s + 1 for s in seeds], **kw)
        assert not torch.equal(other.codes, batch.codes)


def test_stop_at_cut_keeps_the_cut_output(model):
    m = model
    full = generate(m, LYRICS, STYLES, max_frames=16, compat=True, top_k=1)
    early = generate(m, LYRICS, STYLES, max_frames=16, compat=True, top_k=1, stop_at_cut=True)
    assert torch.equal(full.codes, early.codes) and torch.equal(full.lengths, early.lengths)
    assert early.steps <= full.steps


def test_model_generate_method_and_greedy_switches(model):
    m = SongLM(model.cfg).eval()  # what load_model returns: an LeLM with .generate
    m.load_state_dict(model.state_dict())
    a = m.generate(LYRICS[:3], STYLES[:3], max_frames=8, top_k=1)
    b = m.generate(LYRICS[:3], STYLES[:3], max_frames=8, temperature=0.0, seed=5)
    assert a.codes.shape == (3, 3, 8) and torch.equal(a.codes, b.codes)
    with pytest.raises(ValueError, match="compat=True fixes"):
        m.generate(LYRICS[:1], STYLES[:1], max_frames=4, compat=True, repetition_penalty=1.3)


def test_offload_hooks_do_not_change_tokens():
    m = make_model()
    ref = generate(m, LYRICS[:3], STYLES[:3], max_frames=10, compat=True, top_k=4, seed=1)
    assert enable_layer_offload(m, "cpu") is None  # CPU: nothing to do
    state = enable_layer_offload(m, "cpu", force=True)  # the GPU code path, with CPU as "device"
    assert state is not None and state.cpu_bytes > 0
    out = generate(m, LYRICS[:3], STYLES[:3], max_frames=10, compat=True, top_k=4, seed=1)
    assert state.transfers > 0 and torch.equal(out.raw_codes, ref.raw_codes)
    state.remove()


# ----------------------------------------------------------------------------- caller formatting
def test_released_caller_formatting():
    assert released_style("Pop Ballad, Piano.", "v2") == "[Musicality-very-high], pop ballad, piano."
    assert released_style(None, "v2") == "[Musicality-very-high], ."
    assert released_style("Rock", "v2", "bgm") == "[Musicality-very-high], [Pure-Music], rock"
    assert released_style(None, "v2", "bgm") == "[Musicality-very-high], [Pure-Music], ."
    assert released_style("[Musicality-High], Jazz", "v2") == "[Musicality-high], jazz"
    assert released_style("Rock", "v1") == "rock" and released_style(None, "v1", "bgm") is None
    assert null_styles(["[Musicality-very-high], rock", "[Musicality-high], x", None], "v2") == [
        "[Musicality-very-low], .", None, None]
    codes = torch.arange(12).view(3, 4)
    sep = mode_tokens(codes, "separate")
    assert torch.equal(sep[""], codes)
    assert (sep["_vocal"][2] == SILENT_BGM_CODE).all() and torch.equal(sep["_vocal"][:2], codes[:2])
    assert (sep["_bgm"][1] == SILENT_VOCAL_CODE).all() and torch.equal(sep["_bgm"][[0, 2]], codes[[0, 2]])
    assert (mode_tokens(codes, "vocal")[""][2] == SILENT_BGM_CODE).all()


def test_sampler_support_and_frequencies():
    from levo_infer.generate import sample_logits

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    k = sample_logits(logits, 1.0, 3, 0.0, g)
    assert set(k.tolist()) == {0, 1, 2}
    want = torch.softmax(logits[0, :3], -1)
    got = torch.bincount(k, minlength=3).float() / len(k)
    torch.testing.assert_close(got, want, atol=0.03, rtol=0)
    p = sample_logits(logits, 1.0, 0, 0.6, g)  # mass of the top-1 is 0.57 < 0.6: top-2 remain
    assert set(p.tolist()) == {0, 1}
    cold = sample_logits(logits, 0.05, 0, 0.0, g)
    assert (cold == 0).float().mean() > 0.99
    assert sample_logits(logits[:2], 0.0, 0, 0.0).tolist() == [0, 0]
    rows = [torch.Generator().manual_seed(s) for s in (1, 2)]
    a = sample_logits(logits[:2], 1.0, 0, 0.0, rows)
    b = sample_logits(logits[:1], 1.0, 0, 0.0, [torch.Generator().manual_seed(2)])
    assert a[1] == b[0]  # per-row generators: a row's draw does not depend on the other rows
