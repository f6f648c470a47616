"""A small random codec folder in the released runtime layout, for plumbing smoke tests: its audio
is NOISE (random weights), but every file, key name and shape rule is the released one, so
``levo-infer --codec`` and ``levo-infer decode`` run end to end without the released runtime.

``levo-infer random-codec DIR`` writes one (:func:`write_random_codec`, a ``NOISE.txt`` beside the
files says what it is; levo-infer names it when it loads it). The tests build their tiny codec
files from the same functions.

Sizes: the estimator's width is ``mask (24) + context latents (64) + 2 × rvq_dim + latents (64)``
with the released 20 heads, the real 16384 × 32 codebooks (so real token values decode), and an
Oobleck VAE with the real strides (1920 samples per latent frame) at 4 channels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .decoder import SEPTOKEN_FILE, VAE_CKPT, VAE_JSON
from .flow import FlowDecoder
from .vae import OobleckDecoder, VAEConfig

__all__ = ["NOISE_FILE", "SMALL_FLOW", "SMALL_VAE", "is_random_codec", "random_flow", "random_vae", "vae_json",
           "write_codec_files", "write_random_codec"]

SMALL_FLOW = {"layers": 2, "rvq_dim": 24, "heads": 20}
SMALL_VAE = {"channels": 4, "c_mults": [1, 2, 2, 2, 2], "strides": [2, 4, 4, 6, 10]}
#: the label of a random codec folder
NOISE_FILE = "NOISE.txt"


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


def random_flow(seed: int = 0, *, layers: int = 2, rvq_dim: int = 24, heads: int = 20, counts: float = 1e6,
                mlp_width: int | None = None) -> FlowDecoder:
    """A random flow decoder with trained-looking latent statistics (``counts`` >= 1e5 is what a
    trained file holds); the MLP width is the released 2× the width unless given."""
    g = torch.Generator().manual_seed(seed)
    width = 24 + 64 + 2 * rvq_dim + 64
    flow = FlowDecoder(layers=layers, width=width, heads=heads, rvq_dim=rvq_dim, codebook_size=16384,
                       mlp_width=mlp_width)
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


def random_vae(seed: int = 0, **kw: Any) -> OobleckDecoder:
    """A random Oobleck VAE decoder (:data:`SMALL_VAE` sizes unless given)."""
    cfg = VAEConfig.from_json(vae_json(**{**SMALL_VAE, **kw}))
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


def write_codec_files(folder: str | os.PathLike, flow_state: dict[str, torch.Tensor],
                      vae_state: dict[str, torch.Tensor], spec: dict) -> Path:
    """Write a codec folder in the released runtime layout: the flat safetensors
    ``model_septoken/model_2.safetensors``, ``vae/stable_audio_1920_vae.json`` (``spec``) and the
    torch pickle ``vae/autoencoder_music_1320k.ckpt`` (``{'state_dict': vae_state}``)."""
    folder = Path(folder)
    (folder / SEPTOKEN_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in flow_state.items()}, str(folder / SEPTOKEN_FILE))
    (folder / VAE_JSON).parent.mkdir(parents=True, exist_ok=True)
    (folder / VAE_JSON).write_text(json.dumps(spec, indent=1))
    torch.save({"state_dict": {k: v.detach().clone().contiguous() for k, v in vae_state.items()}}, folder / VAE_CKPT)
    return folder


def write_random_codec(folder: str | os.PathLike, *, seed: int = 0, layers: int = 1) -> Path:
    """A small random codec folder (``layers`` estimator layers) labelled with :data:`NOISE_FILE`:
    for plumbing smoke tests only, its audio is noise."""
    folder = Path(folder)
    flow, vae = random_flow(seed, layers=layers), random_vae(seed)
    write_codec_files(folder, flow.state_dict(), vae.state_dict(),
                      vae_json(vae.cfg.channels, list(vae.cfg.c_mults), list(vae.cfg.strides), vae.cfg.latent_dim))
    (folder / NOISE_FILE).write_text(
        f"A random codec (seed {seed}, {layers} estimator layer(s), 4-channel VAE) written by `levo-infer "
        "random-codec`: the released file layout with random weights. Its audio is NOISE; use it to check that "
        "levo-infer's audio path runs (files, lengths, records), never to listen to a model.\n")
    return folder


def is_random_codec(folder: str | os.PathLike) -> bool:
    """Whether a codec folder is labelled as a random (noise) codec."""
    return (Path(folder) / NOISE_FILE).is_file()
