"""The flow-matching half of the codec decoder (levo_infer.codec.flow) against naive float64 references
written step by step from shared/codec_facts.md §2-5 (not from the module), plus the released layout.

Tiny size: 2 layers, rvq_dim 16, width 24+64+2·16+64 = 184, 4 heads × 46, codebook 16384×32."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CODEC_LAYOUT as LAYOUT  # noqa: E402

from levo_infer.codec.flow import FlowDecoder, FlowEstimator, RVQDecode

TINY = dict(layers=2, width=184, heads=4, rvq_dim=16, codebook_size=16384, codebook_dim=32, latent_dim=64,
            mask_dim=24, max_positions=1000)
EST = "cfm_wrapper.estimator."


# ----------------------------------------------------------------------------- random weights
def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random at a scale that keeps activations O(1) and every branch active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                v = 1 + 0.2 * r
            elif leaf == "bias":
                v = 0.1 * r
            elif leaf == "scale_shift_table":
                v = 0.3 * r
            elif leaf == "weight_g":
                v = 1 + 0.2 * r.abs()
            elif name.startswith("normfeat"):
                continue
            elif p.dim() == 2 and "codebook" not in name and "wpe" not in name and "mask_emb" not in name:
                fan_in = p.shape[0] if ("c_attn" in name or "c_fc" in name or "c_proj" in name) else p.shape[1]
                v = r / math.sqrt(fan_in)
            else:
                v = r
            p.copy_(v.to(p.dtype))
        if hasattr(module, "normfeat"):
            nf = module.normfeat
            n = 2.0e5
            mean = 0.5 * torch.randn(nf.sum_x.shape, generator=g, dtype=torch.float64)
            std = 0.5 + 1.5 * torch.rand(nf.sum_x.shape, generator=g, dtype=torch.float64)
            nf.counts.fill_(n)
            nf.sum_x.copy_((n * mean).float())
            nf.sum_x2.copy_((n * (std ** 2 + mean ** 2)).float())
    return module


def sd64(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.detach().double() for k, v in module.state_dict().items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- naive references (float64)
def ref_layernorm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def ref_gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_silu(x):
    return x / (1 + torch.exp(-x))


def ref_rope(x, hd):
    """x [L, hd]: rotate pair (x_2p, x_2p+1) by angle pos·10000^(−2p/hd), written out pair by pair."""
    L = x.shape[0]
    pos = torch.arange(L, dtype=torch.float64)
    out = torch.empty_like(x)
    for p in range(hd // 2):
        theta = 10000.0 ** (-2 * p / hd)
        c, s = torch.cos(pos * theta), torch.sin(pos * theta)
        a, b = x[:, 2 * p], x[:, 2 * p + 1]
        out[:, 2 * p] = a * c - b * s
        out[:, 2 * p + 1] = a * s + b * c
    return out


def ref_attention(x, sd, pre, heads):
    """x [L, W] (one row): explicit per-head loop, scores q·kᵀ/√hd, softmax over keys, no mask."""
    L, W = x.shape
    hd = W // heads
    qkv = x @ sd[pre + "attn.c_attn.weight"] + sd[pre + "attn.c_attn.bias"]
    outs = []
    for h in range(heads):
        q = ref_rope(qkv[:, h * hd:(h + 1) * hd], hd)
        k = ref_rope(qkv[:, W + h * hd:W + (h + 1) * hd], hd)
        v = qkv[:, 2 * W + h * hd:2 * W + (h + 1) * hd]
        scores = torch.einsum("id,jd->ij", q, k) / math.sqrt(hd)
        scores = scores - scores.max(dim=1, keepdim=True).values
        p = torch.exp(scores)
        p = p / p.sum(dim=1, keepdim=True)
        outs.append(torch.einsum("ij,jd->id", p, v))
    o = torch.cat(outs, dim=1)
    return o @ sd[pre + "attn.c_proj.weight"] + sd[pre + "attn.c_proj.bias"]


def ref_time_embedding(t, sd, n_freqs=256):
    """t: python float -> (e [W], m [6W])."""
    f = torch.tensor([math.exp(-math.log(10000.0) * j / n_freqs) for j in range(n_freqs)], dtype=torch.float64)
    a = (t * f) * 1000.0
    tau = torch.cat([torch.cos(a), torch.sin(a)])
    pre = "adaln_single.emb.timestep_embedder."
    h1 = sd[pre + "linear_1.weight"] @ tau + sd[pre + "linear_1.bias"]
    e = sd[pre + "linear_2.weight"] @ ref_silu(h1) + sd[pre + "linear_2.bias"]
    m = sd["adaln_single.linear.weight"] @ ref_silu(e) + sd["adaln_single.linear.bias"]
    return e, m


def ref_estimator(X, times, sd, layers, heads):
    """X [N, L, W] float64, times: N python floats -> [N, L, W]; one row at a time."""
    N, L, W = X.shape
    outs = []
    for n in range(N):
        h = X[n] + sd["wpe.weight"][:L]
        e, m = ref_time_embedding(float(times[n]), sd)
        for i in range(layers):
            pre = f"h.{i}."
            rows = sd[pre + "scale_shift_table"] + m.reshape(6, W)
            shift1, scale1, gate1, shift2, scale2, gate2 = (rows[r] for r in range(6))
            a_in = ref_layernorm(h, sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"]) * (1 + scale1) + shift1
            h = h + gate1 * ref_attention(a_in, sd, pre, heads)
            m_in = ref_layernorm(h, sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"]) * (1 + scale2) + shift2
            hid = ref_gelu_new(m_in @ sd[pre + "mlp.c_fc.weight"] + sd[pre + "mlp.c_fc.bias"])
            h = h + gate2 * (hid @ sd[pre + "mlp.c_proj.weight"] + sd[pre + "mlp.c_proj.bias"])
        fin = sd["scale_shift_table"] + e[None]
        shift, scale = fin[0], fin[1]
        z = ref_layernorm(h, sd["ln_f.weight"], sd["ln_f.bias"]) * (1 + scale) + shift
        outs.append(z @ sd["proj_out.weight"].T + sd["proj_out.bias"])
    return torch.stack(outs)


def ref_rvq(codes, sd, pre):
    e = sd[pre + "codebook.weight"][codes]
    v, g = sd[pre + "out_proj.weight_v"], sd[pre + "out_proj.weight_g"]
    norm = torch.sqrt((v ** 2).sum(dim=(1, 2), keepdim=True))
    W = (g * v / norm)[:, :, 0]
    return e @ W.T + sd[pre + "out_proj.bias"]


def ref_stats(sd):
    counts = sd["normfeat.counts"]
    mean = sd["normfeat.sum_x"] / counts
    std = torch.sqrt(torch.clamp(sd["normfeat.sum_x2"] / counts - mean ** 2, min=0))
    return mean, std


def ref_solve(cv, cb, Z, n_ctx, x0, sd, layers, heads, steps=10, cfg=1.5, sigma_min=1e-4):
    """§4 written out: returns the de-normalised latent [B, 64, Lw] (float64)."""
    B, Lw = cv.shape
    D = x0.shape[-1]
    mu = torch.cat([ref_rvq(cv, sd, "rvq_bestrq_emb.quantizers.0."),
                    ref_rvq(cb, sd, "rvq_bestrq_bgm_emb.quantizers.0.")], dim=-1)
    mask = torch.tensor([1 if j < n_ctx else 2 for j in range(Lw)])
    E = sd["mask_emb.weight"][mask][None].expand(B, Lw, -1)
    mean, std = ref_stats(sd)
    ctx = torch.zeros(B, Lw, D, dtype=torch.float64)
    if n_ctx:
        ctx[:, :n_ctx] = (Z[:, :n_ctx].double() - mean) * (1 / torch.clamp(std, min=1e-12))
    t32 = torch.linspace(0, 1, steps + 1, dtype=torch.float32)
    dt32 = t32[1:] - t32[:-1]
    x0 = x0.double()
    x = x0.clone()
    est = {k[len(EST):]: v for k, v in sd.items() if k.startswith(EST)}
    for i in range(steps):
        t, dt = float(t32[i]), float(dt32[i])
        x[:, :n_ctx] = (1 - (1 - sigma_min) * t) * x0[:, :n_ctx] + t * ctx[:, :n_ctx]
        cond = torch.cat([E, ctx, mu, x], dim=-1)
        uncond = torch.cat([E, ctx, torch.zeros_like(mu), x], dim=-1)
        out = ref_estimator(torch.cat([uncond, cond]), [t] * (2 * B), est, layers, heads)
        v_u, v_c = out[:B, :, -D:], out[B:, :, -D:]
        x = x + dt * (v_u + cfg * (v_c - v_u))
    x[:, :n_ctx] = ctx[:, :n_ctx]
    return (x * std + mean).transpose(1, 2)


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomise(FlowDecoder(**TINY), seed=1).eval()


def inputs(B, Lw, seed, V=16384, D=64):
    g = torch.Generator().manual_seed(seed)
    cv = torch.randint(0, V, (B, Lw), generator=g)
    cb = torch.randint(0, V, (B, Lw), generator=g)
    Z = 1.5 * torch.randn(B, Lw, D, generator=g) + 0.3
    x0 = torch.randn(B, Lw, D, generator=g)
    return cv, cb, Z, x0


# ----------------------------------------------------------------------------- against the references
@pytest.mark.parametrize("L", [40, 1000])
def test_estimator_matches_reference(tiny, L):
    """fp32 module vs float64 reference. Measured max error / max |out|: 4e-7 for the t = 0 row, 3.7e-6
    (L 40) and 3.8e-6 (L 1000) for the t = 0.7 row, dominated by the fp32 time-embedding angles
    (t·f·1000, up to 700 rad, as specified); tolerance 2e-5."""
    est = tiny.estimator
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, L, TINY["width"], generator=g)
    t = torch.tensor([0.0, 0.7])  # the reference gets the same fp32 times (0.7·1000 rad: fp32 rounding matters)
    with torch.no_grad():
        got = est(X, t)
    want = ref_estimator(X.double(), [float(v) for v in t], sd64(est), TINY["layers"], TINY["heads"])
    assert got.shape == (2, L, TINY["width"])
    assert rel_err(got, want) < 2e-5


def test_rvq_decode_matches_reference(tiny):
    rvq = tiny.rvq_bestrq_bgm_emb.quantizers[0]
    codes = torch.tensor([[0, 16383, 5, 9670], [3142, 1, 2, 3]])
    with torch.no_grad():
        got = rvq(codes)
    want = ref_rvq(codes, sd64(rvq), "")
    assert got.shape == (2, 4, TINY["rvq_dim"])
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize(("B", "Lw", "n_ctx"), [(2, 40, 0), (1, 40, 12), (1, 1000, 250)])
def test_solve_window_matches_reference(tiny, B, Lw, n_ctx):
    """Ten Euler/CFG steps, fp32 module vs float64 reference. Measured max error / max |latent|:
    7.7e-7 (B 2, Lw 40), 7.4e-7 (Lw 40, 12 context frames), 8.1e-7 (Lw 1000, 250 context frames);
    tolerance 1e-5."""
    cv, cb, Z, x0 = inputs(B, Lw, seed=10 + Lw + n_ctx)
    got = tiny.solve_window(cv, cb, Z if n_ctx else None, n_ctx, x0)
    want = ref_solve(cv, cb, Z, n_ctx, x0, sd64(tiny), TINY["layers"], TINY["heads"])
    assert got.shape == (B, 64, Lw) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


def test_solve_window_other_settings_match_reference(tiny):
    """steps, cfg and sigma_min are honoured (a large sigma_min makes the context re-noising formula
    visible). Measured max error / max |latent|: 1.1e-6; tolerance 1e-5."""
    cv, cb, Z, x0 = inputs(1, 48, seed=21)
    got = tiny.solve_window(cv, cb, Z, 16, x0, steps=4, cfg=2.5, sigma_min=0.3)
    want = ref_solve(cv, cb, Z, 16, x0, sd64(tiny), TINY["layers"], TINY["heads"], steps=4, cfg=2.5, sigma_min=0.3)
    assert rel_err(got, want) < 1e-5


# ----------------------------------------------------------------------------- solver behaviour
def test_same_noise_is_bit_identical_and_statistics_constant(tiny):
    cv, cb, Z, x0 = inputs(1, 60, seed=5)
    before = {k: v.clone() for k, v in tiny.normfeat.state_dict().items()}
    a = tiny.solve_window(cv, cb, Z, 20, x0)
    b = tiny.solve_window(cv, cb, Z, 20, x0.clone())
    assert torch.equal(a, b)
    for k, v in tiny.normfeat.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batched_equals_per_song(tiny):
    """B=2 vs each song alone. Measured max error / max |latent|: 1.8e-7 (BLAS blocking only); tolerance 1e-5."""
    cv, cb, Z, x0 = inputs(2, 120, seed=6)
    both = tiny.solve_window(cv, cb, Z, 30, x0)
    for i in range(2):
        one = tiny.solve_window(cv[i:i + 1], cb[i:i + 1], Z[i:i + 1], 30, x0[i:i + 1])
        assert rel_err(both[i:i + 1], one) < 1e-5


def test_context_frames_are_the_given_context(tiny):
    cv, cb, Z, x0 = inputs(1, 400, seed=7)
    out = tiny.solve_window(cv, cb, Z, 250, x0)
    roundtrip = tiny.denormalise(tiny.normalise(Z[:, :250])).transpose(1, 2)
    assert torch.equal(out[:, :, :250], roundtrip)  # exactly the released normalise -> paste -> de-normalise
    torch.testing.assert_close(out[:, :, :250], Z[:, :250].transpose(1, 2), rtol=1e-5, atol=1e-5)
    # the context influences the generated frames; the pad after it does not
    Z2 = Z.clone()
    Z2[:, 250:] = 100.0
    assert torch.equal(tiny.solve_window(cv, cb, Z2, 250, x0), out)
    Z3 = Z.clone()
    Z3[:, :250] += 1.0
    assert (tiny.solve_window(cv, cb, Z3, 250, x0)[:, :, 250:] - out[:, :, 250:]).abs().max() > 1e-3


def test_cfg_zero_leaves_the_uncond_rows_which_ignore_codes(tiny):
    """cfg = 0 leaves only the unconditional rows (zeros in the code channels): codes have no effect."""
    cv, cb, Z, x0 = inputs(1, 50, seed=8)
    cv2, cb2, _, _ = inputs(1, 50, seed=9)
    a = tiny.solve_window(cv, cb, None, 0, x0, cfg=0.0)
    b = tiny.solve_window(cv2, cb2, None, 0, x0, cfg=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (tiny.solve_window(cv, cb, None, 0, x0) - tiny.solve_window(cv2, cb2, None, 0, x0)).abs().max() > 1e-3


def test_bf16_autocast_runs_close_to_fp32(tiny):
    """CPU bf16 autocast (the GPU fp16/bf16 opt-in path's logic). Measured max error / max |latent|: 3e-3;
    tolerance 3e-2."""
    cv, cb, Z, x0 = inputs(1, 64, seed=11)
    ref = tiny.solve_window(cv, cb, Z, 16, x0)
    got = tiny.solve_window(cv, cb, Z, 16, x0, autocast=torch.bfloat16)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < 3e-2
    assert torch.equal(got[:, :, :16], ref[:, :, :16])


def test_low_precision_weights_run():
    """Weights cast to bf16 (a loader's dtype option) run without autocast; the solver state stays fp32.
    Measured max error / max |latent| against the fp32 weights: 4e-3; tolerance 3e-2."""
    fd = randomise(FlowDecoder(**TINY), seed=1).eval()
    cv, cb, Z, x0 = inputs(1, 64, seed=13)
    ref = fd.solve_window(cv, cb, Z, 16, x0)
    got = fd.to(torch.bfloat16).solve_window(cv, cb, Z, 16, x0)
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 3e-2


# ----------------------------------------------------------------------------- statistics
def test_normalise_and_check_statistics():
    fd = FlowDecoder(**TINY)
    z = torch.randn(2, 5, 64)
    torch.testing.assert_close(fd.normalise(z), z)  # counts 0 < 10: identity
    msg = fd.check_statistics()
    assert msg and "counts" in msg and "below 10" in msg
    randomise(fd, seed=2)
    assert fd.check_statistics() is None
    mean, std = ref_stats(sd64(fd))
    torch.testing.assert_close(fd.normalise(z).double(), (z.double() - mean) / std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fd.denormalise(fd.normalise(z)), z, rtol=1e-5, atol=1e-5)
    fd.normfeat.counts.fill_(5e4)
    assert "50000 < 100000" in fd.check_statistics()


# ----------------------------------------------------------------------------- errors
def test_wrong_sizes_and_inputs_raise():
    with pytest.raises(ValueError, match="input layout"):
        FlowDecoder(**{**TINY, "width": 186})
    with pytest.raises(ValueError, match="divisible"):
        FlowDecoder(**{**TINY, "heads": 5})
    with pytest.raises(ValueError, match="even"):
        FlowDecoder(**{**TINY, "heads": 8})  # head_dim 23
    est = FlowEstimator(1, 8, 2, max_positions=10)
    with pytest.raises(ValueError, match="at most 10"):
        est(torch.zeros(1, 11, 8), torch.zeros(1))
    rvq = RVQDecode(16, 4, 8)
    for bad in (16, -1):
        with pytest.raises(ValueError, match=r"out of range \[0, 16\)"):
            rvq(torch.tensor([[0, bad]]))


def test_solve_window_rejects_bad_shapes(tiny):
    cv, cb, Z, x0 = inputs(1, 20, seed=12)
    with pytest.raises(ValueError, match="x0"):
        tiny.solve_window(cv, cb, None, 0, x0[:, :10])
    with pytest.raises(ValueError, match="Z must be"):
        tiny.solve_window(cv, cb, None, 5, x0)
    with pytest.raises(ValueError, match="n_ctx"):
        tiny.solve_window(cv, cb, Z, 30, x0)
    with pytest.raises(ValueError, match="out of range"):
        tiny.solve_window(cv + 16384, cb, None, 0, x0)


# ----------------------------------------------------------------------------- the released layout
def real_layout() -> dict:
    if not LAYOUT.is_file():
        pytest.skip(f"codec layout file not available at {LAYOUT} (set LEVO_SHARED_DIR)")
    return json.loads(LAYOUT.read_text())["model_septoken_safetensors"]


def test_sizes_from_shapes_recovers_the_real_sizes():
    lay = real_layout()
    shapes = {t["key"]: tuple(t["shape"]) for t in lay["tensors"]}
    sizes = FlowDecoder.sizes_from_shapes(shapes)
    assert sizes == dict(layers=16, width=2200, rvq_dim=1024, codebook_size=16384, codebook_dim=32, latent_dim=64,
                         mask_dim=24, max_positions=1000, time_freqs=256, mlp_width=4400)
    del shapes["normfeat.sum_x"]
    with pytest.raises(KeyError, match="normfeat.sum_x"):
        FlowDecoder.sizes_from_shapes(shapes)


def test_real_size_state_dict_is_exactly_the_used_released_keys():
    lay = real_layout()
    used = {t["key"]: (tuple(t["shape"]), t["dtype"]) for t in lay["tensors"] if t["used_by_decode"]}
    assert len(used) == lay["n_tensors_used_by_decode"] == 233
    shapes = {t["key"]: tuple(t["shape"]) for t in lay["tensors"]}
    with torch.device("meta"):
        fd = FlowDecoder(heads=20, **FlowDecoder.sizes_from_shapes(shapes))
    got = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in fd.state_dict().items()}
    assert set(got) == set(used), (sorted(set(got) - set(used)), sorted(set(used) - set(got)))
    assert got == used
    assert fd.estimator.head_dim == 110
    assert sum(v.numel() for v in fd.state_dict().values()) == lay["n_elements_used_by_decode"]
