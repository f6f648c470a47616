"""The encoder adapter (levo_infer.codec.encoder) against a stand-in SongGeneration checkout of the
same surface: the adapter imports it only when asked, runs it from the checkout root, and stacks
the mixed, vocal and bgm codes into [B,3,T]."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from codec_fixtures import save_tiny_lm

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
    from codec_fixtures import standin_checkout

    yield from standin_checkout(
        tmp_path, BUILDERS, GENERATE,
        "audio_tokenizer_checkpoint: Flow1dVAE1rvq_./ckpt/model_1rvq/model_2_fixed.safetensors\n"
        "audio_tokenizer_checkpoint_sep: Flow1dVAESeparate_./ckpt/model_septoken/model_2.safetensors\n")


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


def test_levo_infer_encodes_an_audio_prompt_with_the_checkout(checkout, tmp_path, capsys):
    root, cfg = checkout
    from levo_infer.cli import main

    save_tiny_lm(tmp_path / "lm", code_size=256, prompt_frames=40)
    with open(tmp_path / "lm" / "config.yaml", "a") as f:  # a released config names the tokenizer checkpoints
        f.write(cfg.read_text())
    (tmp_path / "lm" / "checksums.json").unlink()  # edited by hand, as a released folder (which has none)
    (tmp_path / "ref.flac").write_bytes(b"")  # the stand-in separator does not read it
    src = tmp_path / "in.jsonl"
    src.write_text('{"idx": "a", "gt_lyric": "[verse] la da", "prompt_audio_path": "ref.flac"}\n')
    out = tmp_path / "out"
    args = [str(tmp_path / "lm"), str(src), str(out), "--duration", "0.2", "--seed", "1", "--tokens-only"]
    assert main(args) == 1  # without an encoder an audio prompt is a bad line naming the way out
    assert "--codec-encoder songgeneration:PATH" in capsys.readouterr().err
    assert main([*args, "--codec-encoder", f"songgeneration:{root}"]) == 0, capsys.readouterr().err
    rec = [r for r in (out / "jsonl" / "in.jsonl").read_text().splitlines()][0]
    assert '"frames": 30' in rec and '"source": "prompt_audio_path"' in rec
