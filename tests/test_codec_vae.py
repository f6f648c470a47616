"""levo_infer.codec.vae: the Oobleck VAE decoder against naive float64 references written from codec_facts §7.

The references below do not use the module: weight norm by explicit per-channel loops, SnakeBeta written
out, Conv1d as a sum over taps, ConvTranspose1d as a scatter-add of every input frame into the full
``(L−1)s + k`` output followed by a crop of ``ceil(s/2)`` at both ends, residual units written out.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CODEC_LAYOUT as LAYOUT  # noqa: E402

from levo_infer.codec.vae import (
    OobleckDecoder,
    SnakeBeta,
    VAEConfig,
    VAEConfigError,
    VAEStateError,
    WNConv1d,
    WNConvTranspose1d,
    chunk_schedule,
)

TINY = VAEConfig(channels=4, c_mults=(1, 2, 2, 2, 2), strides=(2, 4, 4, 6, 10), latent_dim=64, out_channels=2)
REAL = dict(channels=128, c_mults=[1, 2, 4, 8, 16], strides=[2, 4, 4, 6, 10], latent_dim=64, out_channels=2)

# fp32 module vs float64 reference, random weights, L=5: max |diff| / max |ref| measured 1.2e-6 to
# 1.7e-6 (seeds 0-2, this machine); the bound leaves ~6x margin for other CPUs / BLAS kernels.
REF_RTOL = 1e-5
# chunked vs unchunked at L=1000 (tiny config): max |diff| / max |y| measured 2.1e-6 to 2.8e-6 (abs
# 1.7e-6 to 3.0e-6 with max |y| ~1; seeds 0-2). Every kept sample lies >= 16 latent frames from its chunk's zero-padded edges, farther than
# the receptive field (test_receptive_field_is_within_the_trimmed_overlap), so they differ by rounding only.
CHUNK_RTOL = 2e-5


def _released_json(**decoder_overrides) -> dict:
    """The released stable_audio_1920_vae.json structure (codec_facts §7), with encoder/training extras."""
    dec = dict(REAL, use_snake=True, final_tanh=False)
    dec.update(decoder_overrides)
    return {
        "model_type": "autoencoder", "sample_size": 403200, "sample_rate": 48000, "audio_channels": 2,
        "model": {
            "encoder": {"type": "oobleck", "requires_grad": False, "config": {
                "in_channels": 2, "channels": 128, "c_mults": [1, 2, 4, 8, 16], "strides": [2, 4, 4, 6, 10],
                "latent_dim": 128, "use_snake": True}},
            "decoder": {"type": "oobleck", "config": dec},
            "bottleneck": {"type": "vae"},
            "latent_dim": 64, "downsampling_ratio": 1920, "io_channels": 2,
        },
        "training": {"learning_rate": 1.5e-4, "warmup_steps": 0},
    }


# ------------------------------------------------------------------------------- naive references

def ref_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w[i] = g[i] * v[i] / ||v[i]|| for every index i of dim 0, one channel at a time, in float64."""
    g, v = g.detach().double(), v.detach().double()
    w = torch.empty_like(v)
    for i in range(v.shape[0]):
        norm = math.sqrt(float((v[i] ** 2).sum()))
        w[i] = float(g[i, 0, 0]) * v[i] / norm
    return w


def ref_snake(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    a = torch.exp(alpha.double())[None, :, None]
    b = torch.exp(beta.double())[None, :, None]
    return x + torch.sin(a * x) ** 2 / (b + 1e-9)


def ref_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dilation: int, pad: int) -> torch.Tensor:
    """out[o,t] = sum_{i,j} w[o,i,j] x_padded[i, t + j·dilation]."""
    k = w.shape[2]
    xp = torch.cat([x.new_zeros(*x.shape[:2], pad), x, x.new_zeros(*x.shape[:2], pad)], dim=2)
    n_out = xp.shape[2] - dilation * (k - 1)
    out = x.new_zeros(x.shape[0], w.shape[0], n_out)
    for j in range(k):
        out += torch.einsum("oi,bit->bot", w[:, :, j], xp[:, :, j * dilation:j * dilation + n_out])
    return out if b is None else out + b.detach().double()[None, :, None]


def ref_conv_transpose(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int) -> torch.Tensor:
    """Every input frame t adds w[:, :, j]ᵀ x[:, :, t] at t·s + j; then ceil(s/2) cropped at each end."""
    cin, cout, k = w.shape
    n = x.shape[2]
    full = x.new_zeros(x.shape[0], cout, (n - 1) * stride + k)
    for j in range(k):
        full.index_add_(2, torch.arange(n) * stride + j, torch.einsum("io,bit->bot", w[:, :, j], x))
    p = math.ceil(stride / 2)
    return full[:, :, p:full.shape[2] - p] + b.detach().double()[None, :, None]


def ref_decode(sd: dict[str, torch.Tensor], strides: list[int], x: torch.Tensor) -> torch.Tensor:
    """The §7 decoder read straight from the released key names, in float64."""
    def wn(prefix):
        return ref_weight_norm(sd[prefix + ".weight_g"], sd[prefix + ".weight_v"])

    def snake(prefix, h):
        return ref_snake(h, sd[prefix + ".alpha"], sd[prefix + ".beta"])

    h = ref_conv(x.double(), wn("decoder.layers.0"), sd["decoder.layers.0.bias"], 1, 3)
    n_blocks = len(strides)
    for blk, s in zip(range(1, n_blocks + 1), reversed(strides)):
        p = f"decoder.layers.{blk}.layers"
        h = snake(f"{p}.0", h)
        h = ref_conv_transpose(h, wn(f"{p}.1"), sd[f"{p}.1.bias"], s)
        for unit, d in zip((2, 3, 4), (1, 3, 9)):
            u = f"{p}.{unit}.layers"
            r = snake(f"{u}.0", h)
            r = ref_conv(r, wn(f"{u}.1"), sd[f"{u}.1.bias"], d, 3 * d)
            r = snake(f"{u}.2", r)
            r = ref_conv(r, wn(f"{u}.3"), sd[f"{u}.3.bias"], 1, 0)
            h = h + r
    h = snake(f"decoder.layers.{n_blocks + 1}", h)
    return ref_conv(h, wn(f"decoder.layers.{n_blocks + 2}"), None, 1, 3)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights where g is NOT ||v|| (so weight norm matters) and alpha/beta are non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_v"):
                p.copy_(torch.randn(p.shape, generator=gen) * 3.0)
            elif name.endswith("weight_g"):
                p.copy_(0.3 + 0.6 * torch.rand(p.shape, generator=gen))
            elif name.endswith(("alpha", "beta")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> OobleckDecoder:
    return randomize(OobleckDecoder(TINY))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------------- layers

def test_weight_norm_layers_match_per_channel_loops():
    torch.manual_seed(1)
    conv = randomize(WNConv1d(5, 3, 7, dilation=2, padding=6))
    assert set(conv.state_dict()) == {"weight_g", "weight_v", "bias"}
    assert conv.weight_v.shape == (3, 5, 7) and conv.weight_g.shape == (3, 1, 1)
    x = torch.randn(2, 5, 30)
    want = ref_conv(x.double(), ref_weight_norm(conv.weight_g, conv.weight_v), conv.bias, 2, 6)
    with torch.no_grad():
        got = conv(x)
    assert got.shape == want.shape and _rel(got, want) < REF_RTOL

    nb = WNConv1d(5, 3, 7, padding=3, bias=False)
    assert set(nb.state_dict()) == {"weight_g", "weight_v"}

    for s in (2, 4, 6, 10):
        tc = randomize(WNConvTranspose1d(6, 3, s))
        # norm per INPUT channel: v [in, out, 2s], g [in, 1, 1]
        assert tc.weight_v.shape == (6, 3, 2 * s) and tc.weight_g.shape == (6, 1, 1)
        x = torch.randn(2, 6, 9)
        want = ref_conv_transpose(x.double(), ref_weight_norm(tc.weight_g, tc.weight_v), tc.bias, s)
        with torch.no_grad():
            got = tc(x)
        assert got.shape == (2, 3, 9 * s) == want.shape
        assert _rel(got, want) < REF_RTOL
    with pytest.raises(ValueError, match="even"):
        WNConvTranspose1d(2, 2, 3)


def test_snake_beta_formula_and_grad_path():
    sn = randomize(SnakeBeta(4))
    x = torch.randn(3, 4, 50) * 3
    want = ref_snake(x.double(), sn.alpha, sn.beta)
    with torch.no_grad():
        fast = sn(x)
    slow = sn(x)                       # autograd path (out of place)
    assert _rel(fast, want) < REF_RTOL and _rel(slow, want) < REF_RTOL
    slow.sum().backward()
    assert sn.alpha.grad is not None and sn.beta.grad is not None


def test_folded_weight_cache_follows_parameter_updates():
    conv = randomize(WNConv1d(3, 3, 1))
    x = torch.randn(1, 3, 5)
    with torch.no_grad():
        y0 = conv(x)
        w0 = conv.weight()
        assert conv.weight() is w0     # cached under no-grad
        conv.weight_g.mul_(2)          # in-place change -> new version -> refolded
        y1 = conv(x)
    assert torch.allclose(y1 - conv.bias[None, :, None], 2 * (y0 - conv.bias[None, :, None]), atol=1e-6)


# ---------------------------------------------------------------------------------------- decoder

def test_decode_matches_float64_reference(tiny):
    torch.manual_seed(2)
    x = torch.randn(2, 64, 5)
    sd = tiny.state_dict()
    want = ref_decode(sd, list(TINY.strides), x)
    with torch.no_grad():
        got = tiny.decode(x)
    assert got.shape == (2, 2, 5 * 1920) == want.shape
    assert got.dtype == torch.float32
    assert _rel(got, want) < REF_RTOL
    # batch rows are independent
    with torch.no_grad():
        assert torch.allclose(tiny.decode(x[1:]), got[1:], atol=1e-6)


def test_output_length_is_exactly_L_times_ratio(tiny):
    with torch.no_grad():
        for n in (1, 2, 7):
            assert tiny.decode(torch.randn(1, 64, n)).shape == (1, 2, n * 1920)
    with pytest.raises(ValueError, match=r"\[B,64,L\]"):
        tiny.decode(torch.randn(64, 5))
    with pytest.raises(ValueError, match=r"\[B,64,L\]"):
        tiny.decode(torch.randn(1, 32, 5))


def test_final_tanh_adds_no_keys():
    cfg = VAEConfig(**{**TINY.__dict__, "final_tanh": True})
    m = randomize(OobleckDecoder(cfg))
    assert set(m.state_dict()) == set(OobleckDecoder(TINY).state_dict())
    with torch.no_grad():
        assert m.decode(torch.randn(1, 64, 3) * 10).abs().max() <= 1.0


def test_gradients_flow_when_enabled():
    m = randomize(OobleckDecoder(TINY), seed=3).train()
    m.decode(torch.randn(1, 64, 2)).square().mean().backward()
    assert m.decoder.layers[1].layers[1].weight_g.grad is not None


# --------------------------------------------------------------------------------------- chunking

def test_chunk_schedule_l1000_follows_facts():
    spans = chunk_schedule(1000, 128, 32)
    starts = [s.latent_start for s in spans]
    assert starts == list(range(0, 865, 96)) + [872]
    assert all(s.latent_end == s.latent_start + 128 for s in spans)
    assert spans[0].keep_start == 0 and spans[-1].keep_end == 1000          # no trim at the very ends
    for j, s in enumerate(spans[:-1]):
        assert s.keep_start == (j * 96 + 16 if j else 0) and s.keep_end == j * 96 + 128 - 16
    assert spans[-1].keep_start == 872 + 16 and spans[-1].out_start == 872   # right-aligned
    r = chunk_schedule(1000, 128, 32, ratio=1920)
    assert [tuple(x) for x in r] == [tuple(v * 1920 if i >= 2 else v for i, v in enumerate(s)) for s in spans]
    assert r[3] == (288, 416, 288 * 1920, 416 * 1920, 304 * 1920, 400 * 1920)


def test_chunk_schedule_edge_cases():
    assert chunk_schedule(100) == [(0, 100, 0, 100, 0, 100)]               # L < chunk: unchunked
    assert chunk_schedule(128) == [(0, 128, 0, 128, 0, 128)]
    assert [s.latent_start for s in chunk_schedule(224)] == [0, 96]        # last regular chunk ends at L
    assert chunk_schedule(224)[-1] == (96, 224, 96, 224, 112, 224)
    assert [s.latent_start for s in chunk_schedule(129)] == [0, 1]
    for n in (129, 300, 1000, 1751):                                        # contiguous cover, no gaps
        spans = chunk_schedule(n)
        covered = torch.zeros(n, dtype=torch.bool)
        for s in spans:
            covered[s.keep_start:s.keep_end] = True
        assert covered.all()
    for bad in (dict(length=0), dict(length=10, chunk=0), dict(length=10, overlap=128), dict(length=10, overlap=-1)):
        with pytest.raises(ValueError):
            chunk_schedule(**bad)


def test_decode_chunked_pastes_per_facts(tiny, monkeypatch):
    """A fake per-chunk decode marks each sample with (chunk start, source frame): check who wrote what."""
    r = tiny.ratio

    def fake_decode(x):
        frame = x[:, 0, :].repeat_interleave(r, dim=1)              # absolute latent frame of each sample
        val = x[:, 0, :1] * 2000 + frame + x[:, 1, :1]               # chunk start * 2000 + frame + batch tag
        return torch.stack([val, -val], dim=1)

    monkeypatch.setattr(tiny, "decode", fake_decode)
    L = 1000
    lat = torch.zeros(2, 64, L)
    lat[:, 0] = torch.arange(L, dtype=torch.float32)
    lat[1, 1] = 0.5
    out = tiny.decode_chunked(lat)
    assert out.shape == (2, 2, L * r)
    assert torch.equal(out[:, 1], -out[:, 0])
    assert torch.all(out[1, 0] - out[0, 0] == 0.5)
    v = out[0, 0].double()
    writer, frame = torch.div(v, 2000, rounding_mode="floor"), torch.remainder(v, 2000)
    assert torch.equal(frame, torch.arange(L * r).div(r, rounding_mode="floor").double())   # right positions
    # who wins, read from §7: chunk j at 96j keeps [96j+16, 96j+112) (start/end untrimmed), 872 keeps [888, 1000)
    want = torch.empty(L)
    for j, st in enumerate(list(range(0, 865, 96)) + [872]):
        lo = st + 16 if j else 0
        hi = st + 112 if st != 872 else 1000
        want[lo:hi] = st
    assert torch.equal(writer, want.double().repeat_interleave(r))
    assert int(writer[111 * r]) == 0 and int(writer[112 * r]) == 96 and int(writer[887 * r]) == 864


def test_decode_chunked_short_is_unchunked(tiny):
    x = torch.randn(1, 64, 20)
    with torch.no_grad():
        assert torch.equal(tiny.decode_chunked(x), tiny.decode(x))


def test_receptive_field_is_within_the_trimmed_overlap(tiny):
    """Changing one latent frame changes outputs within ±9 frames: less than the 16 frames trimmed per edge."""
    x = torch.randn(1, 64, 48)
    x2 = x.clone()
    x2[:, :, 24] += 1.0
    with torch.no_grad():
        d = (tiny.decode(x2) - tiny.decode(x)).abs()[0].amax(0)
    changed = torch.nonzero(d > 0).flatten()
    lo, hi = int(changed.min()) / tiny.ratio, int(changed.max() + 1) / tiny.ratio
    assert 24 - lo < 10 and hi - 25 < 10, (lo, hi)


def test_decode_chunked_close_to_unchunked_l1000(tiny):
    torch.manual_seed(4)
    x = torch.randn(1, 64, 1000)
    with torch.no_grad():
        full = tiny.decode(x)
        chunked = tiny.decode_chunked(x, 128, 32)
        batched = tiny.decode_chunked(x, 128, 32, chunk_batch=4)
    assert chunked.shape == full.shape == (1, 2, 1_920_000)
    assert _rel(chunked, full) < CHUNK_RTOL
    assert _rel(batched, chunked) < CHUNK_RTOL
    # without the trimmed overlap the zero-padded chunk edges do show (the check above is not vacuous)
    with torch.no_grad():
        naive = tiny.decode_chunked(x[:, :, :300], 128, 0)
    assert _rel(naive, full[:, :, :300 * 1920]) > 1e-2


# ------------------------------------------------------------------------------------------ loading

def test_from_state_dict_roundtrip_upcast_and_ignored(tiny):
    sd = {k: v.half() for k, v in tiny.state_dict().items()}
    sd["encoder.layers.0.weight_v"] = torch.zeros(3)
    sd["encoder.layers.0.weight_g"] = torch.zeros(3)
    m = OobleckDecoder.from_state_dict(TINY, sd)
    assert m.n_ignored_keys == 2 and not m.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())
    x = torch.randn(1, 64, 3)
    with torch.no_grad():
        want = OobleckDecoder.from_state_dict(TINY, {"state_dict": dict(tiny.state_dict())}).decode(x)
        assert _rel(m.decode(x), tiny.decode(x)) < 1e-2   # fp16-rounded weights
        assert torch.equal(want, tiny.decode(x))


def test_state_dict_errors_name_the_key(tiny):
    sd = dict(tiny.state_dict())
    del sd["decoder.layers.3.layers.1.weight_v"]
    with pytest.raises(VAEStateError, match=r"missing key 'decoder\.layers\.3\.layers\.1\.weight_v' "
                                            r"\(expected shape \[8, 8, 8\]\)"):
        OobleckDecoder.from_state_dict(TINY, sd)
    sd = dict(tiny.state_dict())
    sd["decoder.layers.6.alpha"] = torch.zeros(5)
    with pytest.raises(VAEStateError, match=r"'decoder\.layers\.6\.alpha' has shape \[5\], expected \[4\]"):
        OobleckDecoder.from_state_dict(TINY, sd)
    sd = dict(tiny.state_dict())
    sd["decoder.layers.7.bias"] = torch.zeros(2)
    with pytest.raises(VAEStateError, match=r"unexpected decoder key 'decoder\.layers\.7\.bias'"):
        OobleckDecoder.from_state_dict(TINY, sd)
    sd = dict(tiny.state_dict())
    sd["decoder.layers.0.bias"] = torch.zeros(8, dtype=torch.long)
    with pytest.raises(VAEStateError, match=r"'decoder\.layers\.0\.bias' has dtype torch\.int64"):
        OobleckDecoder.from_state_dict(TINY, sd)


def _layout() -> dict:
    if not LAYOUT.is_file():
        pytest.skip(f"codec layout not available at {LAYOUT} (set LEVO_SHARED_DIR)")
    return json.loads(LAYOUT.read_text())["vae_ckpt"]


def test_real_size_keys_match_released_layout():
    lay = _layout()
    want = {t["key"]: tuple(t["shape"]) for t in lay["tensors"] if t["used_by_decode"]}
    assert len(want) == 182 == lay["n_tensors_used_by_decode"]
    cfg = VAEConfig.from_json(_released_json())
    with torch.device("meta"):
        m = OobleckDecoder(cfg)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == want
    assert sum(math.prod(s) for s in got.values()) == lay["n_elements_used_by_decode"]

    # the whole released file: decoder keys loaded, the 183 encoder keys ignored
    full = {t["key"]: torch.empty(t["shape"], device="meta") for t in lay["tensors"]}
    m = OobleckDecoder.from_state_dict(cfg, {"state_dict": full})
    assert m.n_ignored_keys == 183
    key = "decoder.layers.1.layers.1.weight_g"   # transposed conv: g per input channel
    assert want[key] == (2048, 1, 1)
    bad = dict(full)
    bad[key] = torch.empty(1024, 1, 1, device="meta")
    with pytest.raises(VAEStateError, match=r"'decoder\.layers\.1\.layers\.1\.weight_g' has shape \[1024, 1, 1\], "
                                            r"expected \[2048, 1, 1\]"):
        OobleckDecoder.from_state_dict(cfg, bad)
    del bad["decoder.layers.7.weight_g"]
    with pytest.raises(VAEStateError, match=r"missing key 'decoder\.layers\.7\.weight_g'"):
        OobleckDecoder.from_state_dict(cfg, bad)


# --------------------------------------------------------------------------------------------- json

def test_config_from_released_json(tmp_path):
    assert VAEConfig.from_json(_released_json()) == VAEConfig()
    p = tmp_path / "stable_audio_1920_vae.json"
    p.write_text(json.dumps(_released_json()))
    cfg = VAEConfig.from_json(p)
    assert cfg == VAEConfig() and cfg.downsampling_ratio == 1920 and cfg.sample_rate == 48000
    assert cfg.blocks == [(2048, 1024, 10), (1024, 512, 6), (512, 256, 4), (256, 128, 4), (128, 128, 2)]
    assert VAEConfig.from_json(cfg.to_json()) == cfg
    assert VAEConfig.from_json(TINY.to_json()) == TINY


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["model"]["decoder"]["config"].pop("strides"), r"missing field 'model\.decoder\.config\.strides'"),
    (lambda d: d["model"]["decoder"]["config"].update(use_snake=False), r"'model\.decoder\.config\.use_snake': expected true"),
    (lambda d: d["model"]["decoder"]["config"].pop("final_tanh"), r"missing field 'model\.decoder\.config\.final_tanh'"),
    (lambda d: d["model"].update(bottleneck={"type": "rvq"}), r"'model\.bottleneck\.type': expected \"vae\".*got \"rvq\""),
    (lambda d: d["model"].update(downsampling_ratio=2048), r"'model\.downsampling_ratio': expected prod.* = 1920, got 2048"),
    (lambda d: d["model"]["decoder"]["config"].update(strides=[2, 4, 4, 6, 11]), r"'model\.decoder\.config\.strides': expected even"),
    (lambda d: d["model"]["decoder"]["config"].update(c_mults=[1, 2, 4]), r"same length"),
    (lambda d: d["model"]["decoder"]["config"].update(channels="128"), r"'model\.decoder\.config\.channels': expected a positive integer"),
    (lambda d: d["model"]["decoder"].update(type="dac"), r"'model\.decoder\.type': expected \"oobleck\""),
    (lambda d: d["model"]["decoder"]["config"].update(use_nearest_upsample=True), r"use_nearest_upsample"),
    (lambda d: d.update(model_type="diffusion_cond"), r"'model_type': expected \"autoencoder\""),
    (lambda d: d["model"].update(io_channels=1), r"'model\.io_channels': expected 2"),
    (lambda d: d["model"].update(latent_dim=128), r"'model\.latent_dim': expected 64"),
    (lambda d: d.pop("sample_rate"), r"missing field 'sample_rate'"),
    (lambda d: d.update(model=[]), r"field 'model': expected an object"),
])
def test_config_errors_name_file_and_field(tmp_path, mutate, match):
    d = _released_json()
    mutate(d)
    p = tmp_path / "vae.json"
    p.write_text(json.dumps(d))
    with pytest.raises(VAEConfigError, match=match) as e:
        VAEConfig.from_json(p)
    assert str(p) in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(VAEConfigError, match="cannot read"):
        VAEConfig.from_json(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VAEConfigError, match="not valid JSON"):
        VAEConfig.from_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(VAEConfigError, match="top level"):
        VAEConfig.from_json(tmp_path / "list.json")
    with pytest.raises(VAEConfigError, match="use_snake"):
        VAEConfig(use_snake=False)
    with pytest.raises(VAEConfigError, match="downsampling_ratio"):
        VAEConfig(downsampling_ratio=1000)
