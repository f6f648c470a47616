"""The codec decoder end to end (levo_infer.codec.decoder) on tiny released-layout files: the window
and length rules, an independent recomposition of a whole decode, modes, noise, batching, the
loader's checks (tiny files and the real-size layout), levo-infer audio out and `levo-infer decode`.

Measured (tiny files, fp32, 1 thread): Decoder.decode vs the recomposition (unchunked VAE, float64
crossfade written out here) 9.2e-5 relative to the peak; all of it is the chunked vs unchunked VAE
in fp32 (3.5e-8 with the VAE unchunked): the tiny random VAE is ill-conditioned, its fp32 output
is itself 6e-5 from float64, while chunked and unchunked agree to 6e-14 in float64 (the receptive
field is narrower than the 16 trimmed frames). A batch of 2 vs each song alone: bit for bit (the
solver's time embedding is computed once for all rows, the VAE runs per song).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from codec_fixtures import save_tiny_lm, tiny_flow, tiny_vae, write_tiny_codec
from conftest import CODEC_LAYOUT

from levo_infer.codec.decoder import (
    SEPTOKEN_FILE,
    VAE_CKPT,
    VAE_JSON,
    CodecError,
    Decoder,
    load_decoder,
    output_samples,
    tile_codes,
    tiled_length,
)

REL_TOL = 3e-4  # fp32 rounding of the tiny random VAE (see above), not a difference of method


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    """One estimator layer: the tiny decode's cost is the attention over 1000 frames (test time)."""
    return write_tiny_codec(tmp_path_factory.mktemp("codec"), flow=tiny_flow(0, layers=1))


@pytest.fixture(scope="module")
def dec(codec_dir) -> Decoder:
    d = load_decoder(codec_dir)
    d.steps = 3  # the solver loop itself is checked step by step in test_codec_flow.py
    return d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ----------------------------------------------------------------------------- rules
def test_tiling_windows_and_output_length_rules():
    assert [tiled_length(t) for t in (1, 300, 1000, 1001, 1100, 1750, 1751, 6750)] == \
        [1000, 1000, 1000, 1750, 1750, 1750, 2500, 7000]
    c = torch.arange(300)[None]
    t = tile_codes(c)  # doubled until >= 1000, then cut: never zero-padded
    assert t.shape == (1, 1000) and torch.equal(t[0, :300], c[0]) and torch.equal(t[0, 300:600], c[0])
    c = torch.arange(1100)[None]
    t = tile_codes(c)  # 1100 -> 2200 (the whole sequence doubled) -> cut to 1750
    assert t.shape == (1, 1750) and torch.equal(t[0, 1100:1750], c[0, :650])
    assert output_samples(29) == 55_679 and output_samples(100) == 192_000
    assert sum(output_samples(t) != t * 1920 for t in range(1, 6751)) == 427


# ----------------------------------------------------------------------------- decode
@torch.no_grad()
def _recompose(dec: Decoder, tokens: torch.Tensor, noise: list[torch.Tensor], mode: str = "mixed") -> torch.Tensor:
    """The decode written out from the facts page: numpy tiling, each window solved, the VAE
    unchunked, the crossfade in float64 numpy, the released length."""
    T = tokens.shape[-1]
    cv, cb = tokens[:, 1].numpy(), tokens[:, 2].numpy()
    if mode == "vocal":
        cb = np.full_like(cb, 9670)
    if mode == "bgm":
        cv = np.full_like(cv, 3142)

    def tile(x: np.ndarray) -> np.ndarray:
        while x.shape[1] < 1000:
            x = np.concatenate([x, x], 1)
        x = x[:, :max(1000, T)] if T < 1000 else x
        n = x.shape[1]
        want = n if (n - 250) % 750 == 0 else ((n - 250 + 749) // 750) * 750 + 250
        while x.shape[1] < want:
            x = np.concatenate([x, x], 1)
        return x[:, :want]

    cv, cb = tile(cv), tile(cb)
    K = (cv.shape[1] - 250) // 750
    audio, prev = None, None
    for k in range(K):
        s = slice(750 * k, 750 * k + 1000)
        Z = None if prev is None else torch.cat([prev[..., -250:].transpose(1, 2), torch.zeros(len(cv), 750, 64)], 1)
        lat = dec.flow.solve_window(torch.from_numpy(cv[:, s]), torch.from_numpy(cb[:, s]), Z, 0 if k == 0 else 250,
                                    noise[k], steps=dec.steps, cfg=dec.cfg)
        prev = lat
        w = dec.vae.decode(lat).double().numpy()
        if audio is None:
            audio = w
        else:
            f = np.linspace(0, 1, 480_000)
            audio[..., -480_000:] = audio[..., -480_000:] * (1 - f) + w[..., :480_000] * f
            audio = np.concatenate([audio, w[..., 480_000:]], -1)
    return torch.from_numpy(audio[..., :int(T / 100 * 4 * 48000)])


def test_two_windows_equal_the_recomposition_and_chain_their_context(dec):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16384, (1, 3, 1100), generator=g)
    noise = [torch.randn(1, 1000, 64, generator=g) for _ in range(2)]
    calls = []
    real = dec.flow.solve_window

    def spy(cv, cb, Z, n_ctx, x0, **kw):
        out = real(cv, cb, Z, n_ctx, x0, **kw)
        calls.append((cv.clone(), cb.clone(), None if Z is None else Z.clone(), n_ctx, out.clone()))
        return out

    dec.flow.solve_window = spy
    try:
        wav, sr = dec.decode(tokens, noise=noise)
    finally:
        del dec.flow.solve_window
    assert sr == 48000 and wav.shape == (1, 2, 1100 * 1920) and wav.dtype == torch.float32
    assert len(calls) == 2  # T = 1100 -> 1750 frames -> two windows
    (cv0, cb0, z0, n0, lat0), (cv1, cb1, z1, n1, _) = calls
    assert z0 is None and n0 == 0 and n1 == 250
    assert torch.equal(z1[:, :250], lat0[..., -250:].transpose(1, 2))  # window 1's context = window 0's tail
    assert torch.equal(cv0, tokens[:, 1, :1000]) and torch.equal(cb1[:, :350], tokens[:, 2, 750:1100])
    assert torch.equal(cv1[:, 350:], tokens[:, 1, :650])  # the tail: the song's start again (tiled)
    ref = _recompose(dec, tokens, noise)
    d = _rel(wav, ref)
    print(f"decode vs recomposition: {d:.1e} relative")
    assert d < REL_TOL


@pytest.mark.parametrize("mode,row,code", [("vocal", 2, 9670), ("bgm", 1, 3142)])
def test_single_stream_modes_pin_the_other_stream_to_its_silent_code(dec, mode, row, code):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16384, (1, 3, 40), generator=g)
    noise = [torch.randn(1, 1000, 64, generator=g)]
    pinned = tokens.clone()
    pinned[:, row] = code
    a, _ = dec.decode(tokens, mode, noise=noise)
    b, _ = dec.decode(pinned, "mixed", noise=noise)  # what levo-infer's token files hold for that mode
    assert torch.equal(a, b) and a.shape == (1, 2, 40 * 1920)
    tokens[:, row] = 5  # the pinned stream's own codes do not matter
    assert torch.equal(dec.decode(tokens, mode, noise=noise)[0], a)
    tokens[:, 0] = 7  # the mixed row is never decoded
    assert torch.equal(dec.decode(tokens, mode, noise=noise)[0], a)


def test_same_noise_is_bit_identical_and_a_batch_equals_its_songs(dec):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 16384, (2, 3, 60), generator=g)
    noise = [torch.randn(2, 1000, 64, generator=g)]
    a, _ = dec.decode(tokens, noise=noise)
    assert torch.equal(a, dec.decode(tokens, noise=noise)[0])
    for i in range(2):
        one, _ = dec.decode(tokens[i:i + 1], noise=[noise[0][i:i + 1]])
        assert torch.equal(a[i:i + 1], one)
    # a generator replays the released draw order: placeholder, then x0 of window 0
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    torch.randn(2, 1000, 64, generator=g2)
    assert torch.equal(dec.decode(tokens, generator=g1)[0], dec.decode(tokens, noise=[torch.randn(2, 1000, 64,
                                                                                                   generator=g2)])[0])


def test_bad_decode_input_is_a_clear_error(dec):
    ok = torch.zeros(1, 3, 10, dtype=torch.long)
    for tokens, mode, words in [
        (ok, "separate", "unknown mode"),
        (ok.float(), "mixed", "integer codes"),
        (torch.zeros(1, 2, 10, dtype=torch.long), "mixed", "[B,3,T]"),
        (torch.zeros(1, 3, 0, dtype=torch.long), "mixed", "T = 0"),
        (torch.full((1, 3, 10), 16384), "mixed", "EOS/pad"),
        (torch.full((1, 3, 10), -1), "mixed", "out of range"),
    ]:
        with pytest.raises(CodecError, match=words.replace("[", r"\[").replace("]", r"\]")):
            dec.decode(tokens, mode)
    with pytest.raises(CodecError, match="1 window"):
        dec.decode(ok, noise=[torch.zeros(1, 1000, 64)] * 2)
    bad_row1 = torch.zeros(1, 3, 10, dtype=torch.long)
    bad_row1[0, 1, 4] = 20000
    with pytest.raises(CodecError, match="row 1, frame 4 holds 20000"):
        dec.decode(bad_row1)
    dec.decode(bad_row1, "bgm", noise=[torch.zeros(1, 1000, 64)])  # bgm mode never reads row 1


# ----------------------------------------------------------------------------- loading
def test_loader_ignores_what_decoding_does_not_read_and_names_what_is_wrong(tmp_path, codec_dir):
    d = load_decoder(codec_dir)
    assert d.ignored == {"septoken": 5, "vae": 2}
    for kw, words in [
        ({"drop": "cfm_wrapper.estimator.h.1.attn.c_attn.weight"}, "missing tensor 'cfm_wrapper.estimator.h.1.attn.c_attn"),
        ({"drop": "normfeat.counts"}, "normfeat.counts"),
        ({"reshape": ("rvq_bestrq_bgm_emb.quantizers.0.out_proj.bias", (7,))}, "rvq_bestrq_bgm_emb.quantizers.0.out_proj.bias"),
        ({"drop": "decoder.layers.3.layers.2.layers.1.weight_v"}, "decoder.layers.3.layers.2.layers.1.weight_v"),
    ]:
        f = write_tiny_codec(tmp_path / str(len(os.listdir(tmp_path))), **kw)
        with pytest.raises(CodecError, match=words.replace("(", r"\(").replace("[", r"\[")):
            load_decoder(f)
    # a VAE json that does not match the checkpoint (channels 8 vs the file's 4)
    from codec_fixtures import vae_json

    f = write_tiny_codec(tmp_path / "json", vae_json_override=vae_json(8, [1, 2, 2, 2, 2], [2, 4, 4, 6, 10]))
    with pytest.raises(CodecError, match="does not match stable_audio_1920_vae.json.*decoder.layers"):
        load_decoder(f)
    # an unrelated checkpoint in the septoken place; a pickle that would run code; a missing file
    from safetensors.torch import save_file

    f = write_tiny_codec(tmp_path / "unrelated")
    save_file({"model.weight": torch.zeros(2, 2)}, str(f / SEPTOKEN_FILE))
    with pytest.raises(CodecError, match="not the released flow-matching decoder layout"):
        load_decoder(f)
    f = write_tiny_codec(tmp_path / "pickle")
    torch.save({"state_dict": {}, "x": Path("/")}, f / VAE_CKPT)
    with pytest.raises(CodecError, match="weights_only"):
        load_decoder(f)
    (f / VAE_JSON).unlink()
    with pytest.raises(CodecError, match="no vae/stable_audio_1920_vae.json"):
        load_decoder(f)


def test_untrained_statistics_warn_or_refuse(tmp_path):
    f = write_tiny_codec(tmp_path / "c", counts=50.0)
    with pytest.warns(UserWarning, match="counts"):
        load_decoder(f)
    with pytest.raises(CodecError, match="counts"):
        load_decoder(f, strict_statistics=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_decoder(write_tiny_codec(tmp_path / "ok"))  # trained statistics: silent


def test_real_size_layout_through_the_loader(monkeypatch):
    """At real size, without weights: the loader asks for exactly the used_by_decode tensors with
    their shapes, ignores every other listed one, and names a missing or misshaped one."""
    p = CODEC_LAYOUT
    if not p.is_file():
        pytest.skip(f"{p} is not available (set LEVO_SHARED_DIR)")
    layout = json.loads(p.read_text())
    files = {Path(f["file"]).name: f for f in layout["files"]} if isinstance(layout.get("files"), list) else {
        Path(v["file"]).name: v for v in layout.values() if isinstance(v, dict) and "file" in v}
    sep, vae = files["model_2.safetensors"], files["autoencoder_music_1320k.ckpt"]
    import levo_infer.codec.decoder as D

    def meta(entries: list[dict]) -> dict[str, torch.Tensor]:
        return {e["key"]: torch.empty(e["shape"], device="meta") for e in entries}

    asked: set[str] = set()

    class FakeSafe:
        def __init__(self, tensors):
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

    def run(sep_tensors: dict, vae_tensors: dict) -> Decoder:
        monkeypatch.setattr(D, "safe_open", lambda *a, **k: FakeSafe(sep_tensors))
        monkeypatch.setattr(D.torch, "load", lambda *a, **k: {"state_dict": vae_tensors})
        monkeypatch.setattr(D, "verify_torch_zip", lambda path: True)  # no file behind the stand-in load
        flow, n1 = D._load_septoken(Path("model_2.safetensors"), heads=20, dtype=torch.float32)
        from codec_fixtures import vae_json

        json_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"levo_real_vae_{os.getpid()}.json"
        json_path.write_text(json.dumps(vae_json(128, [1, 2, 4, 8, 16], [2, 4, 4, 6, 10])))
        v, n2 = D._load_vae(json_path, Path("autoencoder_music_1320k.ckpt"), dtype=torch.float32)
        json_path.unlink()
        return Decoder(flow=flow, vae=v, ignored={"septoken": n1, "vae": n2})

    st, vt = meta(sep["tensors"]), meta(vae["tensors"])
    d = run(st, vt)
    used = {e["key"] for e in sep["tensors"] if e["used_by_decode"]}
    assert asked == used and len(used) == 233
    assert d.ignored == {"septoken": len(st) - 233, "vae": len(vt) - 182}
    key = "cfm_wrapper.estimator.h.7.mlp.c_fc.weight"
    with pytest.raises(CodecError, match=f"missing tensor '{key}'"):
        run({k: v for k, v in st.items() if k != key}, vt)
    with pytest.raises(CodecError, match=f"'{key}' has shape"):
        run({**st, key: torch.empty(2200, 4401, device="meta")}, vt)
    vkey = "decoder.layers.2.layers.1.weight_v"
    with pytest.raises(CodecError, match=vkey):
        run(st, {k: v for k, v in vt.items() if k != vkey})


# ----------------------------------------------------------------------------- levo-infer
def test_levo_infer_writes_flac_of_the_right_length_for_every_mode(tmp_path, codec_dir, capsys, monkeypatch):
    sf = pytest.importorskip("soundfile")
    from conftest import TINY_WORDS  # noqa: F401 - the tiny LM's vocabulary

    from levo_infer.cli import main

    save_tiny_lm(tmp_path / "lm")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"idx": "a", "gt_lyric": "[verse] la da"}) + "\n")
    for mode, names in [("mixed", ["a"]), ("vocal", ["a"]), ("bgm", ["a"]), ("separate", ["a", "a_bgm", "a_vocal"])]:
        out = tmp_path / f"out_{mode}"
        rc = main([str(tmp_path / "lm"), str(src), str(out), "--mode", mode, "--duration", "0.4", "--seed", "3",
                   "--codec", str(codec_dir), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert sorted(p.stem for p in (out / "audios").glob("*.flac")) == names
        for n in names:
            toks = torch.load(out / "tokens" / f"{n}.pt", weights_only=True)
            data, sr = sf.read(str(out / "audios" / f"{n}.flac"))
            assert sr == 48000 and data.shape == (output_samples(toks.shape[1]), 2)
        rec = json.loads((out / "jsonl" / "in.jsonl").read_text().splitlines()[0])
        assert rec["settings"]["codec"] == str(codec_dir)
        # each audio file's count of samples beyond full scale (held at full scale in the 24-bit file)
        assert len(rec["clipped_samples"]) == len(rec["audios"]) == len(names)
        for path, n in zip(rec["audios"], rec["clipped_samples"]):
            data, _ = sf.read(path)
            assert isinstance(n, int) and 0 <= n <= int((np.abs(data) >= 1 - 2 ** -22).sum())
    # later, from the token files alone: the same audio for the same seed
    dec_out = tmp_path / "decoded"
    assert main(["decode", str(tmp_path / "out_mixed" / "tokens"), str(dec_out), "--codec", str(codec_dir),
                 "--device", "cpu", "--seed", "3"]) == 0
    a, _ = sf.read(str(dec_out / "a.flac"))
    b, _ = sf.read(str(tmp_path / "out_mixed" / "audios" / "a.flac"))
    assert np.array_equal(a, b)
    # two songs of one window decoded together (--batch-size 2), each with its own seed (file i: seed + i):
    # the same audio as one at a time
    two = tmp_path / "two"
    two.mkdir()
    for name, src in (("a", "out_mixed"), ("b", "out_vocal")):
        (two / f"{name}.pt").write_bytes((tmp_path / src / "tokens" / "a.pt").read_bytes())
    from levo_infer.codec import SongCodec

    batches = []
    real = SongCodec.decode_batch
    monkeypatch.setattr(SongCodec, "decode_batch", lambda self, t, seeds: batches.append(list(seeds)) or real(self, t, seeds))
    assert main(["decode", str(two), str(tmp_path / "two_out"), "--codec", str(codec_dir), "--device", "cpu",
                 "--seed", "3", "--batch-size", "2"]) == 0
    assert batches == [[3, 4]]
    c, _ = sf.read(str(tmp_path / "two_out" / "a.flac"))
    assert np.array_equal(c, a) and (tmp_path / "two_out" / "b.flac").is_file()
    # a decode that fails fails that file alone
    torch.save(torch.full((3, 5), 99999), tmp_path / "out_mixed" / "tokens" / "bad.pt")
    assert main(["decode", str(tmp_path / "out_mixed" / "tokens"), str(dec_out), "--codec", str(codec_dir),
                 "--device", "cpu"]) == 1
    assert "bad.pt: CodecError" in capsys.readouterr().err and not (dec_out / "bad.flac").exists()
    assert main(["decode", str(tmp_path / "nothing"), str(dec_out), "--codec", str(codec_dir)]) == 2


def test_tiny_fixture_modules_round_trip(tmp_path):
    """The fixture writer and the loader agree: a decoder loaded from the files decodes exactly
    like the modules that wrote them."""
    flow, vae = tiny_flow(5), tiny_vae(5)
    d = load_decoder(write_tiny_codec(tmp_path, flow=flow, vae=vae))
    direct = Decoder(flow=flow, vae=vae)
    tokens = torch.randint(0, 16384, (1, 3, 30))
    noise = [torch.randn(1, 1000, 64)]
    assert torch.equal(d.decode(tokens, noise=noise)[0], direct.decode(tokens, noise=noise)[0])


# ----------------------------------------------------------------------------- precision, sizes, groups, files
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_keep_the_latent_statistics_fp32(codec_dir, dtype):
    """``load_decoder(dtype=fp16)`` used to cast the latent statistics too: counts of 1e6 became inf and
    the audio NaN (bf16: a std off by up to 5 %). The weights take the dtype; the statistics stay fp32,
    also through a later ``module.to(dtype)``."""
    ref = load_decoder(codec_dir)
    low = load_decoder(codec_dir, dtype=dtype)
    assert low.flow.estimator.h[0].mlp.c_fc.weight.dtype == dtype
    for name, buf in low.flow.normfeat.named_buffers():
        assert buf.dtype == torch.float32 and torch.equal(buf, getattr(ref.flow.normfeat, name)), name
    z = torch.randn(1, 5, 64)
    assert torch.equal(low.flow.denormalise(z), ref.flow.denormalise(z))
    g = torch.Generator().manual_seed(3)
    cv, x0 = torch.randint(0, 16384, (1, 40), generator=g), torch.randn(1, 40, 64, generator=g)
    lat = low.flow.solve_window(cv, cv, None, 0, x0, steps=1)
    assert torch.isfinite(lat).all() and _rel(lat, ref.flow.solve_window(cv, cv, None, 0, x0, steps=1)) < 0.05
    ref.flow.to(dtype)  # a module cast moves the weights, never the statistics
    assert ref.flow.normfeat.counts.dtype == torch.float32 and float(ref.flow.normfeat.counts) == 1e6


def _flags() -> tuple:
    m, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, m.fp32_precision, conv.fp32_precision


def test_decode_runs_with_tf32_off_and_restores_the_flags(dec, monkeypatch):
    """PyTorch lets cuDNN convolutions (the VAE) use TF32 by default, and a training script often turns
    it on for matmuls; a decode runs with both off (both PyTorch APIs) and restores them afterwards,
    also when it fails. The solver and VAE are stubs here: only the flags they run under matter."""
    seen = []

    def solve(cv, cb, Z, n_ctx, x0, **kw):
        seen.append(_flags())
        return torch.zeros(cv.shape[0], 64, cv.shape[1])

    def vae(lat, **kw):
        seen.append(_flags())
        if float(lat.sum()) != 0:
            raise RuntimeError("boom")
        return torch.zeros(lat.shape[0], 2, lat.shape[-1] * 1920)

    monkeypatch.setattr(dec.flow, "solve_window", solve)
    monkeypatch.setattr(dec.vae, "decode_chunked", vae)
    m, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, m.fp32_precision,
             conv.fp32_precision)
    torch.set_float32_matmul_precision("high")  # what a training script sets
    torch.backends.cudnn.allow_tf32 = True
    try:
        before = _flags()
        assert before == ("high", True, "tf32", "tf32")
        dec.decode(torch.zeros(1, 3, 10, dtype=torch.long), noise=[torch.zeros(1, 1000, 64)])
        dec.decode_batch([torch.zeros(3, 10, dtype=torch.long), torch.zeros(3, 20, dtype=torch.long)])
        assert _flags() == before
        monkeypatch.setattr(dec.flow, "solve_window", lambda cv, *a, **k: torch.ones(cv.shape[0], 64, cv.shape[1]))
        with pytest.raises(RuntimeError, match="boom"):
            dec.decode(torch.zeros(1, 3, 10, dtype=torch.long), noise=[torch.zeros(1, 1000, 64)])
        assert _flags() == before
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
        m.fp32_precision, conv.fp32_precision = saved[2], saved[3]
    assert len(seen) == 6 and all(f == ("highest", False, "ieee", "ieee") for f in seen), seen  # 2 + 3 + 1 calls


def test_autocast_casts_each_weight_once_per_decode(codec_dir, monkeypatch):
    """The fp16/bf16 solver used to open an autocast scope per Euler step, so every weight was cast
    again at every step of every window; one scope per decode casts each once (2 windows x 2 steps
    here). bf16 on CPU stands in for the GPU's fp16; the VAE is a stub (it is never autocast)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    d = load_decoder(codec_dir)
    d.steps, d.autocast = 2, torch.bfloat16
    monkeypatch.setattr(d.vae, "decode_chunked", lambda lat, **kw: torch.zeros(lat.shape[0], 2, lat.shape[-1] * 1920))
    names = {p.data_ptr(): n for n, p in d.flow.named_parameters()}
    casts: Counter = Counter()

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in names:
                casts[names[args[0].data_ptr()]] += 1
            return func(*args, **(kwargs or {}))

    with CountCasts():
        wav, _ = d.decode(torch.randint(0, 16384, (1, 3, 1100)), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(wav).all()
    assert "cfm_wrapper.estimator.h.0.mlp.c_fc.weight" in casts
    assert max(casts.values()) == 1, casts.most_common(3)


def test_an_estimator_with_another_mlp_width_is_built_with_its_own(tmp_path):
    """Every size comes from the tensor shapes: the MLP width too (the released GPT-2 config's
    ``n_inner``), so a file with 3x instead of the released 2x loads and decodes like its module;
    blocks that disagree are refused, naming the tensor."""
    flow = tiny_flow(3, layers=1, mlp_width=600)  # width 200
    d = load_decoder(write_tiny_codec(tmp_path / "wide", flow=flow))
    assert d.flow.estimator.mlp_width == 600 and tuple(d.flow.estimator.h[0].mlp.c_fc.weight.shape) == (200, 600)
    g = torch.Generator().manual_seed(5)
    cv, x0 = torch.randint(0, 16384, (1, 40), generator=g), torch.randn(1, 40, 64, generator=g)
    assert torch.equal(d.flow.solve_window(cv, cv, None, 0, x0, steps=1), flow.solve_window(cv, cv, None, 0, x0, steps=1))
    bad = write_tiny_codec(tmp_path / "mixed", reshape=("cfm_wrapper.estimator.h.1.mlp.c_fc.weight", (200, 500)))
    with pytest.raises(CodecError, match=r"'cfm_wrapper.estimator.h.1.mlp.c_fc.weight' has shape \(200, 500\)"):
        load_decoder(bad)


def test_songs_of_one_window_count_decode_together_as_one_at_a_time(dec, monkeypatch):
    """decode_batch: songs of different lengths but the same window count in one batch, each with the
    noise of its own generator, drawn as a one-song decode draws it: the solver sees exactly each
    song's codes and noise, and the audio is bit for bit that of decoding each alone (CPU)."""
    from levo_infer.codec.decoder import song_groups

    assert song_groups([40, 1100, 700, 1000, 1750, 1751, 30], 2) == [[0, 2], [3, 6], [1, 4], [5]]
    g = torch.Generator().manual_seed(4)
    songs = [torch.randint(0, 16384, (3, t), generator=g) for t in (40, 700)]
    calls = []
    real = dec.flow.solve_window

    def spy(cv, cb, Z, n_ctx, x0, **kw):
        calls.append((cv.clone(), cb.clone(), x0.clone()))
        return real(cv, cb, Z, n_ctx, x0, **kw)

    monkeypatch.setattr(dec.flow, "solve_window", spy)
    both = dec.decode_batch(songs, generators=[torch.Generator().manual_seed(s) for s in (11, 12)])
    (bcv, bcb, bx0), = calls
    for i, (song, seed) in enumerate(zip(songs, (11, 12))):
        one, _ = dec.decode(song[None], generator=torch.Generator().manual_seed(seed))
        (cv, cb, x0) = calls[-1]
        assert torch.equal(bcv[i:i + 1], cv) and torch.equal(bcb[i:i + 1], cb) and torch.equal(bx0[i:i + 1], x0)
        assert both[i].shape == one[0].shape == (2, output_samples(song.shape[1]))
        assert torch.equal(both[i], one[0])
    with pytest.raises(CodecError, match="same window count"):
        dec.decode_batch([songs[0], torch.zeros(3, 1100, dtype=torch.long)])
    with pytest.raises(CodecError, match="song 1: token out of range"):
        dec.decode_batch([songs[0], torch.full((3, 10), 16384)])


def test_write_flac_is_fsynced_counts_clipped_samples_and_refuses_nan(tmp_path, monkeypatch):
    """The FLAC writer: temp file, fsync, rename (like every other output); the count of sample values
    beyond full scale (which the 24-bit file clips) is returned; NaN audio is refused unwritten."""
    sf = pytest.importorskip("soundfile")
    from levo_infer.codec import write_flac
    from levo_infer.codec.dsp import AudioError

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    wav = torch.linspace(-0.5, 0.5, 4800).repeat(2, 1)
    wav[0, 10], wav[1, 20], wav[1, 30], wav[0, 40] = 1.5, -2.0, 1.0000001, 1.0  # three beyond full scale
    path = tmp_path / "out" / "a.flac"
    assert write_flac(wav, 48000, path) == 3
    assert len(synced) == 1 and Path(synced[0]).name.startswith(".a.flac.tmp")
    assert [p.name for p in path.parent.iterdir()] == ["a.flac"]
    data, sr = sf.read(str(path))
    assert sr == 48000 and data.shape == (4800, 2)
    assert abs(data[10, 0] - 1.0) < 1e-6 and abs(data[20, 1] + 1.0) < 1e-6 and abs(data[100, 0] - float(wav[0, 100])) < 1e-6
    wav[1, 7] = float("nan")
    with pytest.raises(AudioError, match="NaN or infinite.*channel 1, sample 7"):
        write_flac(wav, 48000, tmp_path / "out" / "b.flac")
    assert [p.name for p in path.parent.iterdir()] == ["a.flac"]
