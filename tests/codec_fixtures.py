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

import fractions
from pathlib import Path
from typing import Any

import torch

from levo_infer.codec.flow import FlowDecoder
from levo_infer.codec.toy import SMALL_FLOW as TINY_FLOW
from levo_infer.codec.toy import SMALL_VAE as TINY_VAE
from levo_infer.codec.toy import random_flow as tiny_flow
from levo_infer.codec.toy import random_vae as tiny_vae
from levo_infer.codec.toy import vae_json, write_codec_files
from levo_infer.codec.vae import OobleckDecoder

# the tiny codec's modules are levo_infer.codec.toy's (levo-infer random-codec writes the same files)
__all__ = ["TINY_FLOW", "TINY_VAE", "tiny_flow", "tiny_vae", "vae_json", "write_tiny_codec", "standin_checkout",
           "test_song", "TINY_ENCODER", "tiny_tokenizer", "write_tiny_encoder"]


def write_tiny_codec(folder: str | Path, *, seed: int = 0, counts: float = 1e6, flow: FlowDecoder | None = None,
                     vae: OobleckDecoder | None = None, drop: str | None = None,
                     reshape: tuple[str, tuple[int, ...]] | None = None, vae_json_override: dict | None = None) -> Path:
    """Write a tiny codec folder in the released layout; ``drop`` leaves a key out, ``reshape``
    writes one key with another shape (bad-file tests)."""
    flow = flow if flow is not None else tiny_flow(seed, counts=counts)
    vae = vae if vae is not None else tiny_vae(seed)
    sd = dict(flow.state_dict())
    W = flow.width
    # tensors of the released file that decoding never reads (a loader must ignore them)
    sd["cfm_wrapper.estimator.wte.weight"] = torch.zeros(4, W)
    sd["cfm_wrapper.mlp.0.weight"] = torch.zeros(8, W)
    sd["normfeat.sum_target_x2"] = torch.zeros(64)
    sd["bestrq.conv.weight"] = torch.zeros(3, 3)
    sd["rvq_bestrq_emb.quantizers.0.in_proj.weight_v"] = torch.zeros(32, 16, 1)
    vsd = dict(vae.state_dict())
    vsd["encoder.layers.0.weight_v"] = torch.zeros(4, 2, 7)
    vsd["encoder.layers.0.weight_g"] = torch.zeros(4, 1, 1)
    for d in (sd, vsd):
        if drop in d:
            del d[drop]
        if reshape is not None and reshape[0] in d:
            d[reshape[0]] = torch.zeros(reshape[1])
    spec = vae_json_override if vae_json_override is not None else vae_json(
        vae.cfg.channels, list(vae.cfg.c_mults), list(vae.cfg.strides), vae.cfg.latent_dim)
    return write_codec_files(folder, sd, vsd, spec)


def save_tiny_lm(folder: str | Path, *, code_size: int = 16384, prompt_frames: int = 3) -> Path:
    """A tiny LM (seed 0) in the released folder layout, whose tokens the tiny codec decodes (the real
    codebook size by default; ``prompt_frames`` long enough for the audio prompts a test encodes)."""
    from levo_infer.checkpoint import save_released
    from levo_infer.config import make_config
    from levo_infer.model import LeLM

    torch.manual_seed(0)
    m = LeLM(make_config(dim=32, num_heads=2, num_layers=1, num_layers_sub=1, intermediate_size=64,
                         code_size=code_size, delays=[0, 2, 2], lyric_max_len=12, style_max_len=6,
                         prompt_frames=prompt_frames, text_words=["<unk>", ".", ",", ";", "la", "da", "rock"]))
    m.init_weights()
    return save_released(m, str(folder))


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


# ----------------------------------------------------------------------------- encoder files
def test_song(n: int, seed: int, amp: float = 1.0) -> torch.Tensor:
    """A stereo test song ``[2, n]`` at 48 kHz (float32): 0.2 s sections of tones (100 Hz..6.4 kHz) at
    random levels, plus noise; the right channel a noisy 0.7× copy. Its frames differ, so a tiny
    random encoder gives many different codes."""
    import math

    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / 48000
    sec = (t * 5).long()
    f = 100 * 2 ** (torch.rand(int(sec.max()) + 1, generator=g, dtype=torch.float64) * 6)
    a = torch.rand(int(sec.max()) + 1, generator=g, dtype=torch.float64)
    x = torch.sin(2 * math.pi * f[sec] * t) * a[sec] + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    y = 0.7 * x + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return (amp * torch.stack([x, y])).float()


test_song.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


#: a tiny MusicFM tokenizer: width 64 (4 heads of 16), FFN 128, 8 conv channels; the format's own
#: sizes kept: 128 mel bands, depthwise kernel 31, the real 16384 × 32 codebooks
TINY_ENCODER = {"hidden": 64, "ffn": 128, "channels": 8, "kernel": 31, "heads": 4}


def tiny_tokenizer(seed: int = 0, *, quantizers: tuple[str, ...] = ("rvq_bestrq_emb",), depth: int = 7,
                   **kw: int) -> Any:
    """A random tiny :class:`~levo_infer.codec.musicfm.MusicFMTokenizer` whose activations stay O(1)
    (eval-mode BatchNorm with non-trivial running statistics)."""
    from levo_infer.codec.musicfm import MusicFMTokenizer

    sizes = {**TINY_ENCODER, **kw}
    g = torch.Generator().manual_seed(seed)
    tok = MusicFMTokenizer(quantizers=quantizers, depth=depth, codebook_size=16384, codebook_dim=32, **sizes)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        for name, t in tok.state_dict(keep_vars=True).items():
            if name.endswith("num_batches_tracked"):
                t.fill_(1000)
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("running_mean", "bias")):
                t.copy_(rnd(*t.shape) * 0.05)
            elif "norm" in name.split(".")[-2] or name.split(".")[-2].startswith("bn"):  # LayerNorm / BN scale
                t.copy_(1.0 + rnd(*t.shape) * 0.1)
            elif name.endswith("weight_g"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("weight_v", "codebook.weight")):
                t.copy_(rnd(*t.shape))
            else:  # conv / linear weights: unit-variance outputs; the conformer's branches smaller, so
                fan_in = t[0].numel()  # that frames keep their differences through 7 blocks
                branch = 0.3 if ".conformer." in name else 1.0
                t.copy_(rnd(*t.shape) * branch * (1.0 / fan_in) ** 0.5)
    return tok.eval()


def write_tiny_encoder(folder: str | Path, *, seed: int = 0, mixed: Any = None, separate: Any = None,
                       blocks: tuple[int, int] = (7, 8), drop: str | None = None,
                       reshape: tuple[str, tuple[int, ...]] | None = None) -> Path:
    """Write the encoder's two files in the released layout under ``folder`` (a codec folder):
    ``model_1rvq/model_2_fixed.safetensors`` (``blocks[0]`` conformer blocks, 6 read) and the
    MusicFM + RVQ-encode tensors of ``model_septoken/model_2.safetensors`` (``blocks[1]`` blocks, 7
    read), merged into that file when the decoder's fixture already wrote it (sharing its
    codebooks, as the released file does). Each file also gets tensors encoding must ignore: later
    blocks, the final LayerNorm and logits head, ``out_proj``, and the torchaudio buffers with wrong
    values (computed, never read). ``drop`` / ``reshape``: one key left out / misshaped."""
    from safetensors.torch import load_file, save_file

    from levo_infer.codec.decoder import SEPTOKEN_FILE
    from levo_infer.codec.encoder import MIXED_FILE

    folder = Path(folder)
    mixed = mixed if mixed is not None else tiny_tokenizer(seed, depth=blocks[0])
    separate = separate if separate is not None else tiny_tokenizer(
        seed + 1, quantizers=("rvq_bestrq_emb", "rvq_bestrq_bgm_emb"), depth=blocks[1])
    for tok, rel in ((mixed, MIXED_FILE), (separate, SEPTOKEN_FILE)):
        path = folder / rel
        old = load_file(str(path)) if path.is_file() else {}
        with torch.no_grad():
            for q in tok.quantizer_names:  # the decoder's codebook is the encoder's (one released tensor)
                key = f"{q}.quantizers.0.codebook.weight"
                if key in old:
                    getattr(tok, q).quantizers[0].codebook.weight.copy_(old[key])
        sd = {**old, **{k: v.detach().clone().contiguous() for k, v in tok.state_dict().items()}}
        H = tok.hidden
        sd["bestrq.model.conformer.layer_norm.weight"] = torch.ones(H)
        sd["bestrq.model.conformer.layer_norm.bias"] = torch.zeros(H)
        sd["bestrq.model.linear.weight"] = torch.zeros(4096 // 32, H)
        sd["bestrq.model.linear.bias"] = torch.zeros(4096 // 32)
        sd["bestrq.model.cls_token"] = torch.zeros(H)
        sd["bestrq.model.conformer.embed_positions.inv_freq"] = torch.zeros(H // tok.heads // 2)  # shape only
        sd["bestrq.model.preprocessor_melspec_2048.mel_stft.spectrogram.window"] = torch.zeros(2048)
        sd["bestrq.model.preprocessor_melspec_2048.mel_stft.mel_scale.fb"] = torch.zeros(1025, 128)
        sd["rsq48tobestrq.kernel"] = torch.zeros(1, 1, 28)
        for q in tok.quantizer_names:
            sd.setdefault(f"{q}.quantizers.0.out_proj.weight_v", torch.zeros(H, 32, 1))
        if rel == MIXED_FILE:
            sd["normfeat.counts"] = torch.zeros(1)
            sd["mask_emb.weight"] = torch.zeros(3, 48)
        if drop in sd:
            del sd[drop]
        if reshape is not None and reshape[0] in sd:
            sd[reshape[0]] = torch.zeros(reshape[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path))
    return folder


# ----------------------------------------------------------------------------- separation model
def tiny_htdemucs(seed: int = 0) -> Any:
    """A tiny random HTDemucs (needs the `separate` extra, demucs-infer)."""
    from demucs_infer.htdemucs import HTDemucs

    torch.manual_seed(seed)
    # depth 4 as released (the time branch's transformer then sees 1/256 of the samples); 4 channels
    return HTDemucs(sources=["drums", "bass", "other", "vocals"], channels=4, depth=4, t_layers=1, t_heads=2,
                    dconv_comp=2, t_hidden_scale=1.0, segment=fractions.Fraction(39, 5), samplerate=44100).eval()


def write_released_demucs(folder: Path, model: Any) -> None:
    """``htdemucs.pth`` as demucs serialises a model (``klass`` pickled as ``demucs.htdemucs.HTDemucs``,
    its constructor kwargs including a Fraction, fp16 state) and the bag ``htdemucs.yaml``."""
    from demucs_infer.htdemucs import HTDemucs

    folder.mkdir(parents=True, exist_ok=True)
    args, kwargs = model._init_args_kwargs
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    HTDemucs.__module__ = "demucs.htdemucs"  # the class path of the released checkpoints
    try:
        torch.save({"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": state,
                    "training_args": {"seed": 42}}, folder / "htdemucs.pth")
    finally:
        HTDemucs.__module__ = "demucs_infer.htdemucs"
    (folder / "htdemucs.yaml").write_text("models: ['955717e8']\n")
