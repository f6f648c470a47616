"""The native codec encoder (levo_infer.codec.encoder / musicfm / dsp) on tiny released-layout files:
every step against an independent float64 recomputation written from encoder_facts.md, the
recipe's rules (peak, tiling, frames), batching, bf16/fp16 agreement, the loader (tiny files and the
real-size layout) and bad input.

Measured (tiny files of tests/codec_fixtures.py, random weights, 1 thread): against float64 the
48 k -> 24 k signal agrees to 3.1e-7, the mel to 3.3e-3 dB (the quietest bins), the conv front end,
the taken layer and the pre-quantisation latent to 4.0e-5 / 5.2e-5 / 5.4e-5 relative; codes
identical in all three streams and across two chunks (the closest call: a frame whose best two
codebook entries are 2.4e-5 apart in the released squared distance; fixed seeds, so this holds). bf16 / fp16 (conv front end and conformer) keep 96.7 % / 100 %
of the codes on these random weights (printed; a plumbing figure, not a quality one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from codec_fixtures import test_song as song
from codec_fixtures import tiny_tokenizer, write_tiny_encoder
from conftest import ENCODER_LAYOUT

from levo_infer.codec.decoder import SEPTOKEN_FILE, CodecError
from levo_infer.codec.dsp import (
    AudioError,
    ResampleError,
    mel_filterbank,
    resample,
    resampled_length,
    sinc_resample_kernel,
)
from levo_infer.codec.encoder import (
    MIXED_FILE,
    STREAM_SOURCES,
    EncoderError,
    NativeEncoder,
    chunks_needed,
    file_plan,
    frames_for,
    load_encoder,
    peak_normalise,
    tiled_chunk,
)

CHUNK = 1_920_000


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory) -> Path:
    return write_tiny_encoder(tmp_path_factory.mktemp("enc"))


@pytest.fixture(scope="module")
def enc(enc_dir) -> NativeEncoder:
    return load_encoder(enc_dir)


# ----------------------------------------------------------------------------- float64 reference
def ref_kernel() -> np.ndarray:
    """The 28 taps of encoder_facts §2.3: t_k = 0.99(k−13)/2 clamped to ±6, sinc(πt)·cos²(πt/12)·0.99/2."""
    t = np.clip(0.99 * (np.arange(28) - 13) / 2, -6, 6)
    return np.sinc(t) * np.cos(np.pi * t / 12) ** 2 * 0.99 / 2


def ref_resample_2to1(x: np.ndarray) -> np.ndarray:
    xp = np.pad(x, (13, 15))  # y[i] = Σ_k h[k]·xp[2i + k]
    return np.correlate(xp, ref_kernel(), mode="valid")[::2][: math.ceil(len(x) / 2)]


def ref_mel_db(x24: np.ndarray) -> np.ndarray:
    """128-band HTK mel power in dB [128, frames−1] of 24 kHz audio, from the formulas (float64)."""
    n_fft, hop = 2048, 240
    xp = np.pad(x24, (n_fft // 2, n_fft // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(xp, n_fft)[::hop]
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * win, axis=-1)) ** 2  # [frames, 1025]
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(0), mel(12000), 130) / 2595) - 1)
    freqs = np.linspace(0, 12000, 1025)
    fb = np.zeros((1025, 128))
    for m in range(128):
        lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
        fb[:, m] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
    return (10 * np.log10(np.maximum(power @ fb, 1e-10))).T[:, :-1]


def _bn(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - sd[p + "running_mean"].view(shape)) / torch.sqrt(sd[p + "running_var"].view(shape) + 1e-5)
            * sd[p + "weight"].view(shape) + sd[p + "bias"].view(shape))


def _ln(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * sd[p + "weight"] + sd[p + "bias"]


def _lin(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return x @ sd[p + "weight"].T + sd[p + "bias"]


def ref_front_end(mel_db: np.ndarray, sd: dict) -> torch.Tensor:
    """Normalised mel -> the two residual conv blocks -> Linear, float64 [1000, H]."""
    import torch.nn.functional as F

    x = torch.from_numpy((mel_db - 6.768444971712967) / 18.417922652295623)[None, None]
    for b in range(2):
        p = f"bestrq.model.conv.conv.{b}."

        def conv(z: torch.Tensor, name: str, stride: int, p: str = p) -> torch.Tensor:
            return F.conv2d(z, sd[p + name + ".weight"], sd[p + name + ".bias"], stride=stride, padding=1)

        y = torch.relu(_bn(conv(x, "conv1", 2), sd, p + "bn1."))
        y = _bn(conv(y, "conv2", 1), sd, p + "bn2.")
        x = torch.relu(y + _bn(conv(x, "conv3", 2), sd, p + "bn3."))
    C, Fq, T = x.shape[1:]
    flat = x[0].permute(2, 0, 1).reshape(T, C * Fq)  # feature c·32 + f
    return _lin(flat, sd, "bestrq.model.conv.linear.")


def ref_block(h: torch.Tensor, sd: dict, L: int, heads: int) -> torch.Tensor:
    import torch.nn.functional as F

    p = f"bestrq.model.conformer.layers.{L}."
    T, H = h.shape
    hd = H // heads

    def ffn(z: torch.Tensor, q: str) -> torch.Tensor:
        a = _lin(z, sd, p + q + ".intermediate_dense.")
        return _lin(a * torch.sigmoid(a), sd, p + q + ".output_dense.")

    h = h + 0.5 * ffn(_ln(h, sd, p + "ffn1_layer_norm."), "ffn1")
    a = _ln(h, sd, p + "self_attn_layer_norm.")
    inv = 10000.0 ** (-2 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    th = torch.arange(T, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([th.cos(), th.cos()], -1), torch.cat([th.sin(), th.sin()], -1)
    ah = a.view(T, heads, hd)
    rot = torch.cat([-ah[..., hd // 2:], ah[..., :hd // 2]], -1)
    ar = (ah * cos[:, None] + rot * sin[:, None]).reshape(T, H)
    q = _lin(ar, sd, p + "self_attn.linear_q.").view(T, heads, hd).transpose(0, 1)
    k = _lin(ar, sd, p + "self_attn.linear_k.").view(T, heads, hd).transpose(0, 1)
    v = _lin(a, sd, p + "self_attn.linear_v.").view(T, heads, hd).transpose(0, 1)
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1)
    h = h + _lin((w @ v).transpose(0, 1).reshape(T, H), sd, p + "self_attn.linear_out.")
    c = _ln(h, sd, p + "conv_module.layer_norm.").T  # [H, T]
    c = sd[p + "conv_module.pointwise_conv1.weight"][:, :, 0] @ c
    c = c[:H] * torch.sigmoid(c[H:])
    kw = sd[p + "conv_module.depthwise_conv.weight"]
    c = F.conv1d(c[None], kw, padding=(kw.shape[-1] - 1) // 2, groups=H)[0]
    c = _bn(c[None], sd, p + "conv_module.batch_norm.")[0]
    c = sd[p + "conv_module.pointwise_conv2.weight"][:, :, 0] @ (c * torch.sigmoid(c))
    h = h + c.T
    h = h + 0.5 * ffn(_ln(h, sd, p + "ffn2_layer_norm."), "ffn2")
    return _ln(h, sd, p + "final_layer_norm.")


def ref_latent_and_codes(emb: torch.Tensor, sd: dict, q: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    p = f"{q}.quantizers.0."
    v, g = sd[p + "in_proj.weight_v"][:, :, 0], sd[p + "in_proj.weight_g"][:, 0]
    W = g * v / v.norm(dim=1, keepdim=True)
    z = emb @ W.T + sd[p + "in_proj.bias"]
    e = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    C = sd[p + "codebook.weight"]
    c = C / C.norm(dim=1, keepdim=True).clamp_min(1e-12)
    score = -((e ** 2).sum(1, keepdim=True) - 2 * e @ c.T + (c ** 2).sum(1)[None])
    top2 = score.topk(2, dim=1).values
    return z, score.argmax(1), float((top2[:, 0] - top2[:, 1]).min())


def ref_stream(x: np.ndarray, sd: dict, layer: int, q: str, heads: int) -> dict:
    """One stream of one song [2, N] in float64, literally as the facts page says; per chunk's steps."""
    N = x.shape[1]
    p = np.abs(x).max()
    if p > 0.8:
        x = x / (p / 0.8)
    while x.shape[1] < CHUNK:
        x = np.concatenate([x, x], 1)
    K = x.shape[1] // CHUNK + 1
    x = np.concatenate([x, x], 1)[:, :K * CHUNK]
    chunks = x.reshape(2, K, CHUNK).transpose(1, 0, 2)
    T = int(N / 48000 * 25) + 1
    out: dict = {"codes": [], "steps": [], "gap": math.inf}
    for k in range(math.ceil(T / 1000)):
        ch = chunks[k]
        m = np.abs(ch).max(axis=1, keepdims=True)  # the per-chunk, per-channel 0.9 rule (a no-op here)
        ch = np.where(m > 0.9, ch / (m / 0.9), ch)
        mono = (ch[0] + ch[1]) / 2
        w24 = ref_resample_2to1(mono)
        mel = ref_mel_db(w24[: len(w24) // 960 * 960])
        h = conv = ref_front_end(mel, sd)
        for L in range(layer):
            h = ref_block(h, sd, L, heads)
        z, codes, gap = ref_latent_and_codes(h, sd, q)
        out["codes"].append(codes)
        out["gap"] = min(out["gap"], gap)
        out["steps"].append({"mono": mono, "w24": w24, "mel": mel, "conv": conv, "emb": h, "z": z})
    out["codes"] = torch.cat(out["codes"])[:T]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).abs().max() / b.abs().max())


def _spy(tok, calls: list) -> dict:
    """Record what each step of ``tok`` returns while the encoder runs (instance attributes shadow the methods)."""
    names = ("resample24k", "mel_db", "features", "embed")
    for n in names:
        real = getattr(tok, n)

        def wrap(*a, _real=real, _n=n, **k):
            out = _real(*a, **k)
            calls.append((_n, out.detach().clone()))
            return out

        setattr(tok, n, wrap)
    return dict.fromkeys(names)


def test_every_step_matches_a_float64_recomputation_of_the_facts(enc):
    """Row 0 of a 45 s song (two 40 s chunks, the second tiled from the song's start) and all three
    rows of a 3 s song with stems, each step captured while ``encode_songs`` runs."""
    long_full = song(45 * 48000, 0, amp=1.6)  # peak > 0.8: normalised
    N = 3 * 48000
    full, vocal, bgm = song(N, 1), song(N, 2, amp=0.5), song(N, 3, amp=1.2)
    calls: dict[str, list] = {"mixed": [], "separate": []}
    toks = {"mixed": enc.mixed, "separate": enc.separate}
    enc.chunk_batch = 4
    try:
        for name, tok in toks.items():
            _spy(tok, calls[name])
        out = enc.encode_songs([(long_full, None, None), (full, vocal, bgm)])
    finally:
        for tok in toks.values():
            for n in ("resample24k", "mel_db", "features", "embed"):
                tok.__dict__.pop(n, None)
    assert [t.shape for t in out] == [(1, 1126), (3, 76)] and out[0].dtype == torch.long
    # mixed ran once over the chunks [(song 0, k 0), (song 0, k 1), (song 1, k 0)]; vocal, then bgm, over song 1
    steps = {"mixed": {n: t for n, t in calls["mixed"]}}
    sep = calls["separate"]
    steps["vocal"] = {n: t for n, t in sep[:4]}
    steps["bgm"] = {n: t for n, t in sep[4:]}
    cases = [("mixed", long_full, [0, 1], out[0][0]), ("vocal", vocal, [0], out[1][1]), ("bgm", bgm, [0], out[1][2])]
    worst: dict[str, float] = {}
    for stream, x, rows, codes in cases:
        _, layer, q = STREAM_SOURCES[stream]
        tok = enc.tokenizer(stream)
        sd = {k: v.detach().double() for k, v in tok.state_dict().items()}
        ref = ref_stream(x.double().numpy(), sd, layer, q, tok.heads)
        got = steps[stream]
        z = tok.quantizer(q).latent(got["embed"][rows])
        for j, st in zip(rows, ref["steps"]):
            d = {"w24": float(np.abs(got["resample24k"][j].double().numpy() - st["w24"]).max()),
                 "mel_dB": float(np.abs(got["mel_db"][j].double().numpy() - st["mel"]).max()),
                 "conv": _rel(got["features"][j], st["conv"]), "layer": _rel(got["embed"][j], st["emb"]),
                 "z": _rel(z[rows.index(j)], st["z"])}
            for key, v in d.items():
                worst[key] = max(worst.get(key, 0.0), v)
        assert torch.equal(codes, ref["codes"]), f"{stream}: codes differ from float64"
        worst["min_top2_gap"] = min(worst.get("min_top2_gap", math.inf), ref["gap"])
    print("encoder vs float64:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert worst["w24"] < 1e-6 and worst["mel_dB"] < 5e-3
    assert worst["conv"] < 1e-4 and worst["layer"] < 1e-4 and worst["z"] < 1e-4
    assert len(set(out[0][0].tolist())) > 100  # the tiny network does not collapse to a few codes


# ----------------------------------------------------------------------------- the recipe's rules
def test_frames_tiling_and_peak_rules():
    assert [frames_for(n) for n in (480_000, 144_000, 576_000, 1)] == [251, 76, 301, 1]
    assert [chunks_needed(n) for n in (144_000, 1_920_000, 1_919_999, 2_160_000)] == [1, 2, 1, 2]
    for N in (7, 144_000, 1_000_003):
        x = torch.arange(N, dtype=torch.float64)
        lit = x.clone()
        while lit.shape[0] < CHUNK:
            lit = torch.cat([lit, lit])
        K = lit.shape[0] // CHUNK + 1
        lit = torch.cat([lit, lit])[: K * CHUNK]
        for k in range(K):
            assert torch.equal(tiled_chunk(x, k), lit[k * CHUNK:(k + 1) * CHUNK])
    x = torch.tensor([[0.1, -2.0], [1.0, 0.5]])
    assert torch.allclose(peak_normalise(x), x * 0.4)  # one peak for both channels
    small = torch.tensor([[0.1, -0.8]])
    assert torch.equal(peak_normalise(small), small)  # at the threshold: untouched


def test_resampler_and_filterbank_follow_the_formulas():
    k, width = sinc_resample_kernel(48000, 24000)
    assert width == 13 and k.shape == (1, 1, 28) and k.dtype == torch.float32
    assert np.abs(k[0, 0].double().numpy() - ref_kernel()).max() < 1e-7
    # any ratio: the polyphase kernels against the torchaudio formula, written out for 44.1 k -> 48 k
    k, width = sinc_resample_kernel(44100, 48000, dtype=torch.float64)
    o, n = 147, 160
    base = 147 * 0.99
    assert width == math.ceil(6 * o / base) and k.shape == (n, 1, 2 * width + o)
    j = np.arange(-width, width + o)[None] / o - np.arange(n)[:, None] / n
    t = np.clip(j * base, -6, 6)
    assert np.abs(k[:, 0].numpy() - np.sinc(t) * np.cos(np.pi * t / 12) ** 2 * base / o).max() < 1e-12
    # a 1 kHz tone keeps its frequency and level through 44.1 k -> 48 k
    x = torch.sin(2 * math.pi * 1000 * torch.arange(44100, dtype=torch.float64) / 44100)
    y = resample(x, 44100, 48000)
    assert y.shape[-1] == resampled_length(44100, 44100, 48000) == 48000
    want = torch.sin(2 * math.pi * 1000 * torch.arange(48000, dtype=torch.float64) / 48000)
    assert (y[500:-500] - want[500:-500]).abs().max() < 2e-3
    for bad in (0, -8000, 44100.5):
        with pytest.raises(ResampleError, match="positive integer"):
            resample(x, bad, 48000)
    with pytest.raises(ResampleError, match="44056 Hz -> 48000 Hz"):
        resample(x, 44056, 48000)
    fb = mel_filterbank()
    assert fb.shape == (1025, 128) and fb.dtype == torch.float32
    assert float(fb.sum(0).min()) > 0  # every band covers at least one bin


# ----------------------------------------------------------------------------- batching and precision
def test_a_batch_of_different_lengths_equals_its_songs_and_mono_is_duplicated(enc):
    a = song(3 * 48000, 3)[:1].expand(2, -1)  # dual mono
    va = song(3 * 48000, 5, 0.5)
    b = song(50 * 48000, 4)  # two chunks, one of them tiled from the start
    enc.chunk_batch = 2  # mixed chunks [(a, 0), (b, 0)] share a forward pass, then [(b, 1)]
    both = enc.encode_songs([(a, va, a - va), (b, None, None)])
    assert [t.shape for t in both] == [(3, 76), (1, 1251)]
    assert torch.equal(both[0], enc.encode(a[None], va[None], (a - va)[None])[0])
    assert torch.equal(both[1], enc.encode(b[None])[0])
    assert torch.equal(enc.encode(a[:1])[0, 0], both[0][0])  # [C, N] is one song; mono = both channels alike


def test_bf16_and_fp16_are_opt_in_with_a_measured_agreement(enc_dir, enc):
    x, v = song(6 * 48000, 7), song(6 * 48000, 8, 0.5)
    ref = enc.encode(x[None], v[None], (x - v)[None])
    for dtype in (torch.bfloat16, torch.float16):
        low = load_encoder(enc_dir, dtype=dtype)
        assert low.dtype == dtype
        got = low.encode(x[None], v[None], (x - v)[None])
        agree = float((got == ref).double().mean())
        print(f"{dtype}: {agree:.3f} of the codes agree with fp32 (tiny random weights)")
        assert got.shape == ref.shape and agree > 0.5


# ----------------------------------------------------------------------------- loading
def test_loader_checks_what_encoding_reads_and_ignores_the_rest(tmp_path, enc):
    # one unread block each, + 9 unread tensors each, + the quantizers' out_proj, + 2 more in the 1rvq file
    per_block = len([k for k in enc.mixed.state_dict() if k.startswith("bestrq.model.conformer.layers.0.")])
    assert enc.ignored == {"mixed": per_block + 12, "separate": per_block + 11}
    assert enc.mixed.heads == 4  # from the file's rotary buffer (half the head size)
    assert (enc.mixed.depth, enc.separate.depth) == (6, 7)
    for kw, words in [
        ({"drop": "bestrq.model.conformer.layers.6.ffn2.output_dense.bias"}, "missing tensor 'bestrq.model.conformer.layers.6.ffn2.output_dense.bias'"),
        ({"drop": "rvq_bestrq_bgm_emb.quantizers.0.in_proj.weight_g"}, "rvq_bestrq_bgm_emb.quantizers.0.in_proj.weight_g"),
        ({"reshape": ("bestrq.model.conv.conv.1.bn2.running_var", (7,))}, "'bestrq.model.conv.conv.1.bn2.running_var' has shape"),
        ({"blocks": (5, 8)}, "holds 5 conformer blocks, but encoding takes hidden_states\\[6\\]"),
        ({"reshape": ("bestrq.model.conv.linear.weight", (64, 100))}, "conv.linear.weight has 100 inputs"),
    ]:
        f = write_tiny_encoder(tmp_path / str(len(list(tmp_path.iterdir()))), **kw)
        with pytest.raises(CodecError, match=words.replace("(", r"\(").replace("'", "'")):
            load_encoder(f)
    f = write_tiny_encoder(tmp_path / "nofile")
    (f / MIXED_FILE).unlink()
    with pytest.raises(CodecError, match="no model_1rvq/model_2_fixed.safetensors"):
        load_encoder(f)
    (f / MIXED_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CodecError, match="not a readable safetensors file"):
        load_encoder(f)
    with pytest.raises(CodecError, match="no such codec folder"):
        load_encoder(tmp_path / "nothing")
    with pytest.raises(EncoderError, match="expected songgeneration:PATH"):
        load_encoder("demucs:/x")


def test_real_size_layout_through_the_loader(monkeypatch):
    """At real size, without weights: the loader asks for exactly the encode tensors of the facts
    page (used_by_encode, less the computed torchaudio/rotary buffers) with their shapes, ignores
    every other listed one, and names a missing or misshaped one."""
    if not ENCODER_LAYOUT.is_file():
        pytest.skip(f"{ENCODER_LAYOUT} is not available (set LEVO_SHARED_DIR)")
    layout = json.loads(ENCODER_LAYOUT.read_text())
    import levo_infer.codec.encoder as E

    asked: set[str] = set()

    class FakeSafe:
        def __init__(self, tensors: dict) -> None:
            self.t = tensors

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def keys(self):
            return list(self.t)

        def get_slice(self, k):
            return type("S", (), {"get_shape": lambda _s: list(self.t[k].shape)})()

        def get_tensor(self, k):
            asked.add(k)
            return self.t[k]

    computed = {"bestrq.model.preprocessor_melspec_2048.mel_stft.spectrogram.window",
                "bestrq.model.preprocessor_melspec_2048.mel_stft.mel_scale.fb",
                "bestrq.model.conformer.embed_positions.inv_freq", "rsq48tobestrq.kernel"}
    def serve(tensors: dict) -> None:
        monkeypatch.setattr(E, "safe_open", lambda *a, **k: FakeSafe(tensors))

    plan = file_plan()
    for name, entry in (("mixed", layout["1rvq"]), ("separate", layout["septoken"])):
        tensors = {e["key"]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]), device="meta")
                   for e in entry["tensors"]}
        serve(tensors)
        quantizers, depth = plan[name]
        asked.clear()
        tok, ignored = E._load_tokenizer(Path(f"{name}.safetensors"), quantizers=quantizers, depth=depth, heads=None,
                                         dtype=torch.float32)
        used = {e["key"] for e in entry["tensors"] if e["used_by_encode"]} - computed
        assert asked == used and ignored == len(tensors) - len(used)
        assert (tok.hidden, tok.heads, tok.ffn, tok.channels, tok.kernel, tok.depth) == (1024, 16, 4096, 512, 31, depth)
        assert len(used) == entry["n_tensors_used_by_encode"] - 4
        key = f"bestrq.model.conformer.layers.{depth - 1}.conv_module.depthwise_conv.weight"
        serve({k: v for k, v in tensors.items() if k != key})
        with pytest.raises(CodecError, match=f"missing tensor '{key}'"):
            E._load_tokenizer(Path("x"), quantizers=quantizers, depth=depth, heads=None, dtype=torch.float32)
        serve({**tensors, key: torch.empty(1024, 1, 15, device="meta")})
        with pytest.raises(CodecError, match=f"'{key}' has shape"):
            E._load_tokenizer(Path("x"), quantizers=quantizers, depth=depth, heads=None, dtype=torch.float32)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_named_one_song_at_a_time(tmp_path, enc):
    import soundfile as sf

    from levo_infer.codec.dsp import load_stereo_48k

    ok = song(48000, 9)
    nan = ok.clone()
    nan[1, 123] = float("nan")
    for args, words in [
        ((nan[None],), "song 0: full mix: 1 sample\\(s\\) are NaN or infinite \\(first: channel 1, sample 123\\)"),
        ((torch.zeros(1, 2, 0),), "song 0: full mix: has no samples"),
        ((torch.zeros(1, 5, 100),), "expected mono or stereo"),
        ((ok[None], ok[None, :, :-1], ok[None]), "song 0: the vocal stem holds 47999 samples"),
        ((ok[None], ok[None], None), "give both vocal and bgm"),
        ((torch.zeros(1, 2, 10, dtype=torch.long),), "expected float samples"),
    ]:
        with pytest.raises((AudioError, EncoderError), match=words):
            enc.encode(*args)
    with pytest.raises(AudioError, match="song 1: full mix: has no samples"):
        enc.encode_songs([(ok, None, None), (torch.zeros(2, 0), None, None)])
    (tmp_path / "notaudio.wav").write_text("hello")
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 2), dtype=np.float32), 48000)
    sf.write(str(tmp_path / "odd.wav"), np.zeros((100, 2), dtype=np.float32), 44056)
    sf.write(str(tmp_path / "six.wav"), np.zeros((100, 6), dtype=np.float32), 48000)
    sf.write(str(tmp_path / "nan.wav"), np.full((100, 1), np.nan, dtype=np.float32), 48000, subtype="FLOAT")
    for name, words in [("notaudio.wav", "cannot read it as audio"), ("empty.wav", "has no samples"),
                        ("odd.wav", "44056 Hz -> 48000 Hz"), ("six.wav", "6 channels"),
                        ("nan.wav", "100 sample\\(s\\) are NaN"), ("missing.wav", "file not found")]:
        with pytest.raises(AudioError, match=f"{name}.*{words}"):
            load_stereo_48k(tmp_path / name)
    # a 22.05 kHz mono file: resampled to 48 kHz and duplicated
    sf.write(str(tmp_path / "mono.flac"), ok[0, :22050].numpy(), 22050)
    x = load_stereo_48k(tmp_path / "mono.flac")
    assert x.shape == (2, 48000) and torch.equal(x[0], x[1])
    with pytest.raises(EncoderError, match="needs a separator"):
        enc.encode_file(tmp_path / "mono.flac")
    enc.separator = lambda wave, sr: 0.5 * wave  # encode_file: read, separate, (cut), encode
    try:
        toks = enc.encode_file(tmp_path / "mono.flac", max_seconds=0.5)
    finally:
        enc.separator = None
    assert toks.shape == (1, 3, frames_for(24000))
    assert torch.equal(toks[0], enc.encode(x[None, :, :24000], 0.5 * x[None, :, :24000], 0.5 * x[None, :, :24000])[0])


def test_tiny_fixture_modules_round_trip(tmp_path):
    """The fixture writer and the loader agree: the loaded tokenizer is the module that was written."""
    mixed = tiny_tokenizer(3, depth=6)
    sep = tiny_tokenizer(4, quantizers=("rvq_bestrq_emb", "rvq_bestrq_bgm_emb"), depth=7)
    e = load_encoder(write_tiny_encoder(tmp_path, mixed=mixed, separate=sep))
    for a, b in ((e.mixed, mixed), (e.separate, sep)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / SEPTOKEN_FILE).is_file()
