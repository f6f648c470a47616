"""The encoder adapter (levo_infer.codec.encoder) against a stand-in SongGeneration checkout of the
same surface: the adapter imports it only when asked, runs it from the checkout root, and stacks
the mixed, vocal and bgm codes into [B,3,T]."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from levo_infer.codec.encoder import EncoderError, load_encoder

BUILDERS = '''
import os
import torch


class _Tok:
    def __init__(self, ckpt, sep):
        self.ckpt, self.sep = ckpt, sep
        self.cwd = os.getcwd()

    def encode(self, *wavs):
        # 1920 samples per frame at 48 kHz (25 Hz); codes from the sample count and the track
        out = [torch.full((w.shape[0], 1, w.shape[-1] // 1920), 7 + i + (100 if self.sep else 0)) for i, w in
               enumerate(wavs)]
        return (out[0], out[1]) if self.sep else (out[0], None)


def get_audio_tokenizer_model(checkpoint, cfg):
    return _Tok(checkpoint, "Separate" in checkpoint)
'''

GENERATE = '''
import torch


class Separator:
    def run(self, path):
        n = 1920 * 30
        return torch.zeros(2, n), torch.ones(2, n), torch.full((2, n), 2.0)
'''


@pytest.fixture()
def checkout(tmp_path):
    root = tmp_path / "SongGeneration"
    (root / "codeclm" / "models").mkdir(parents=True)
    (root / "codeclm" / "__init__.py").write_text("")
    (root / "codeclm" / "models" / "__init__.py").write_text("")
    (root / "codeclm" / "models" / "builders.py").write_text(textwrap.dedent(BUILDERS))
    (root / "generate.py").write_text(textwrap.dedent(GENERATE))
    cfg = tmp_path / "config.yaml"
    cfg.write_text("audio_tokenizer_checkpoint: Flow1dVAE1rvq_./ckpt/model_1rvq/model_2_fixed.safetensors\n"
                   "audio_tokenizer_checkpoint_sep: Flow1dVAESeparate_./ckpt/model_septoken/model_2.safetensors\n")
    yield root, cfg
    for name in [m for m in sys.modules if m == "generate" or m.startswith("codeclm")]:
        del sys.modules[name]


def test_songgeneration_adapter_stacks_mixed_vocal_bgm(checkout):
    root, cfg = checkout
    assert "codeclm" not in sys.modules  # nothing of the checkout is imported until asked for
    enc = load_encoder(f"songgeneration:{root}", config=cfg)
    assert enc.mixed.cwd == str(root.resolve())  # built from the checkout root (its ./ckpt paths)
    cwd = Path.cwd()
    toks = enc.encode_file("song.flac")
    assert Path.cwd() == cwd and str(root.resolve()) not in sys.path  # the caller's state is restored
    assert toks.shape == (1, 3, 30) and toks.dtype == torch.long
    assert toks[0, :, 0].tolist() == [7, 107, 108]  # mixed, vocal, bgm
    w = torch.zeros(2, 2, 1920 * 5)
    assert enc.encode(w, w, w).shape == (2, 3, 5)


def test_encoder_spec_and_checkout_errors(checkout, tmp_path):
    root, cfg = checkout
    with pytest.raises(EncoderError, match="expected songgeneration:PATH"):
        load_encoder("demucs:/x", config=cfg)
    with pytest.raises(EncoderError, match="not a SongGeneration checkout"):
        load_encoder(f"songgeneration:{tmp_path}", config=cfg)
    (root / "codeclm" / "models" / "builders.py").write_text("x = 1\n")
    with pytest.raises(EncoderError, match="get_audio_tokenizer_model"):
        load_encoder(f"songgeneration:{root}", config=cfg)
