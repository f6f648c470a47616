"""Tiny codec files in the released formats and key layouts (not a test).

:func:`write_tiny_codec` writes a runtime folder like the released ``ckpt/``:
``model_septoken/model_2.safetensors`` (flat safetensors, the released key names: every tensor
decoding reads plus a few it must ignore) and ``vae/stable_audio_1920_vae.json`` +
``vae/autoencoder_music_1320k.ckpt`` (a torch pickle ``{'state_dict': ...}`` with decoder and
encoder keys) at a tiny size: 2 estimator layers of width 200 (24 mask + 64 context + 2 × 24 code +
64 latent channels), the released 20 heads (of 10 channels), the real 16384 × 32 codebooks (so real code values work), and a
VAE with the real strides (1920 samples per latent frame) but 4 channels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from levo_infer.codec.decoder import SEPTOKEN_FILE, VAE_CKPT, VAE_JSON
from levo_infer.codec.flow import FlowDecoder
from levo_infer.codec.vae import OobleckDecoder, VAEConfig

TINY_FLOW = {"layers": 2, "rvq_dim": 24, "heads": 20}
TINY_VAE = {"channels": 4, "c_mults": [1, 2, 2, 2, 2], "strides": [2, 4, 4, 6, 10]}


def vae_json(channels: int, c_mults: list[int], strides: list[int], latent_dim: int = 64) -> dict:
    """A stable-audio autoencoder json of the released structure (``stable_audio_1920_vae.json``)."""
    ratio = 1
    for s in strides:
        ratio *= s
    oobleck = {"channels": channels, "c_mults": c_mults, "strides": strides, "latent_dim": latent_dim,
               "use_snake": True}
    return {"model_type": "autoencoder", "sample_size": 65536, "sample_rate": 48000, "audio_channels": 2,
            "model": {"encoder": {"type": "oobleck", "config": {"in_channels": 2, **oobleck,
                                                                "latent_dim": 2 * latent_dim}},
                      "decoder": {"type": "oobleck", "config": {"out_channels": 2, **oobleck, "final_tanh": False}},
                      "bottleneck": {"type": "vae"}, "latent_dim": latent_dim, "downsampling_ratio": ratio,
                      "io_channels": 2}}


def tiny_flow(seed: int = 0, *, layers: int = 2, rvq_dim: int = 24, heads: int = 20, counts: float = 1e6) -> FlowDecoder:
    """A random tiny flow decoder with trained-looking latent statistics (counts >= 1e5)."""
    g = torch.Generator().manual_seed(seed)
    width = 24 + 64 + 2 * rvq_dim + 64
    flow = FlowDecoder(layers=layers, width=width, heads=heads, rvq_dim=rvq_dim, codebook_size=16384)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
            elif p.dim() >= 1 and not name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "codebook" in name else 0.05))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        mean, std = torch.randn(64, generator=g) * 0.1, 0.5 + torch.rand(64, generator=g)
        flow.normfeat.counts.fill_(counts)
        flow.normfeat.sum_x.copy_(mean * counts)
        flow.normfeat.sum_x2.copy_((std ** 2 + mean ** 2) * counts)
    return flow.eval()


def tiny_vae(seed: int = 0, **kw: object) -> OobleckDecoder:
    cfg = VAEConfig.from_json(vae_json(**{**TINY_VAE, **kw}))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    vae = OobleckDecoder(cfg)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("weight_v"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("weight_g"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return vae.eval()


def write_tiny_codec(folder: str | Path, *, seed: int = 0, counts: float = 1e6, flow: FlowDecoder | None = None,
                     vae: OobleckDecoder | None = None, drop: str | None = None,
                     reshape: tuple[str, tuple[int, ...]] | None = None, vae_json_override: dict | None = None) -> Path:
    """Write a tiny codec folder in the released layout; ``drop`` leaves a key out, ``reshape``
    writes one key with another shape (bad-file tests)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    flow = flow if flow is not None else tiny_flow(seed, counts=counts)
    vae = vae if vae is not None else tiny_vae(seed)
    sd = {k: v.detach().clone().contiguous() for k, v in flow.state_dict().items()}
    W = flow.width
    # tensors of the released file that decoding never reads (a loader must ignore them)
    sd["cfm_wrapper.estimator.wte.weight"] = torch.zeros(4, W)
    sd["cfm_wrapper.mlp.0.weight"] = torch.zeros(8, W)
    sd["normfeat.sum_target_x2"] = torch.zeros(64)
    sd["bestrq.conv.weight"] = torch.zeros(3, 3)
    sd["rvq_bestrq_emb.quantizers.0.in_proj.weight_v"] = torch.zeros(32, 16, 1)
    vsd = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    vsd["encoder.layers.0.weight_v"] = torch.zeros(4, 2, 7)
    vsd["encoder.layers.0.weight_g"] = torch.zeros(4, 1, 1)
    for d in (sd, vsd):
        if drop in d:
            del d[drop]
        if reshape is not None and reshape[0] in d:
            d[reshape[0]] = torch.zeros(reshape[1])
    (folder / SEPTOKEN_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / SEPTOKEN_FILE))
    (folder / VAE_JSON).parent.mkdir(parents=True, exist_ok=True)
    spec = vae_json_override if vae_json_override is not None else vae_json(
        vae.cfg.channels, list(vae.cfg.c_mults), list(vae.cfg.strides), vae.cfg.latent_dim)
    (folder / VAE_JSON).write_text(json.dumps(spec, indent=1))
    torch.save({"state_dict": vsd}, folder / VAE_CKPT)
    return folder


def standin_checkout(tmp_path: Path, builders: str, generate: str, config: str) -> Any:
    """A stand-in SongGeneration checkout (``codeclm/models/builders.py``, ``generate.py``) with the
    given sources and a model ``config.yaml``; yields ``(root, config_path)`` and forgets its modules
    afterwards (use with ``yield from`` in a fixture)."""
    import sys
    import textwrap

    root = tmp_path / "SongGeneration"
    (root / "codeclm" / "models").mkdir(parents=True)
    (root / "codeclm" / "__init__.py").write_text("")
    (root / "codeclm" / "models" / "__init__.py").write_text("")
    (root / "codeclm" / "models" / "builders.py").write_text(textwrap.dedent(builders))
    (root / "generate.py").write_text(textwrap.dedent(generate))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config)
    yield root, cfg
    for name in [m for m in sys.modules if m == "generate" or m.startswith("codeclm")]:
        del sys.modules[name]
