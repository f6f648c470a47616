"""Codec encoder speed on CPU (not a test): songs per hour of the tiny released-layout encoder, and a
projection for the real size from timed pieces of it (random weights in the released shapes).

* tiny: ``tests/codec_fixtures.py`` files (width 64, 8 conv channels; 16384 × 32 codebooks), a
  ``--seconds`` song (default 180 s: five 40 s chunks per stream) with given stems, fp32, all three
  rows; the same in bf16 for its speed and its code agreement with fp32.
* real size, projected: per 40 s chunk, the 48 k -> 24 k resampling and mel, the conv front end
  (512 channels, 16384 -> 1024), one conformer block (1024 wide, FFN 4096, 16 heads, kernel 31)
  over 1000 frames and the RVQ search are timed once (batch 1) and combined as a song needs them:
  ``ceil(T/1000)`` chunks per stream, 6 + 7 + 3 conformer blocks for mixed, vocal, bgm.

    OMP_NUM_THREADS=1 python eval/bench/bench_encode.py [--skip-real] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

REAL = {"hidden": 1024, "ffn": 4096, "channels": 512, "kernel": 31, "heads": 16}


def _song(seconds: float, seed: int) -> torch.Tensor:
    from codec_fixtures import test_song

    return test_song(int(seconds * 48000), seed, 0.5)


def tiny(seconds: float) -> dict:
    from codec_fixtures import write_tiny_encoder

    from levo_infer.codec.encoder import chunks_needed, load_encoder

    x, v = _song(seconds, 0), _song(seconds, 1) * 0.5
    out: dict = {"audio_s": seconds, "chunks_per_stream": chunks_needed(x.shape[-1])}
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_encoder(tmp)
        ref = None
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            enc = load_encoder(tmp, dtype=dtype)
            enc.encode(x[None, :, :48000], v[None, :, :48000], (x - v)[None, :, :48000])  # warm-up
            t0 = time.perf_counter()
            codes = enc.encode(x[None], v[None], (x - v)[None])
            dt = time.perf_counter() - t0
            r = {"encode_s": dt, "rtf": dt / seconds, "songs_per_hour": 3600 / dt * seconds / 180}
            if ref is None:
                ref = codes
            else:
                r["agreement_with_fp32"] = float((codes == ref).double().mean())
            out[name] = r
    return out


def _time(fn, repeats: int = 1) -> float:
    with torch.no_grad():
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
    return (time.perf_counter() - t0) / repeats


def real_projection(song_s: float) -> dict:
    from codec_fixtures import tiny_tokenizer

    from levo_infer.codec.encoder import STREAM_SOURCES, chunks_needed

    tok = tiny_tokenizer(0, depth=1, **REAL)
    chunk = _song(40, 2).mean(0)[None]
    w24 = tok.resample24k(chunk)
    mel = tok.mel_db(w24)
    feats = tok.features(mel)
    emb = tok.embed(feats, 1)
    q = tok.quantizer("rvq_bestrq_emb")
    p = {"resample_mel_s": _time(lambda: tok.mel_db(tok.resample24k(chunk))),
         "conv_front_end_s": _time(lambda: tok.features(mel)),
         "conformer_block_s": _time(lambda: tok.embed(feats, 1)),
         "rvq_s": _time(lambda: q(emb))}
    blocks = sum(v[1] for v in STREAM_SOURCES.values())
    per_chunk_streams = 3 * (p["resample_mel_s"] + p["conv_front_end_s"] + p["rvq_s"]) + blocks * p["conformer_block_s"]
    K = chunks_needed(int(song_s * 48000))
    p.update({"song_s": song_s, "chunks_per_stream": K, "song_encode_s": K * per_chunk_streams,
              "rtf": K * per_chunk_streams / song_s, "conformer_blocks_per_chunk": blocks})
    p["songs_per_hour"] = 3600 / p["song_encode_s"]
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="song length (default 180 s)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    print(f"threads: {torch.get_num_threads()}")
    r = tiny(a.seconds)
    f, b = r["fp32"], r["bf16"]
    print(f"tiny encoder: a {a.seconds:.0f} s song ({r['chunks_per_stream']} chunks per stream, 3 rows) in "
          f"{f['encode_s']:.2f} s fp32 (real-time factor {f['rtf']:.4f}), {b['encode_s']:.2f} s bf16 "
          f"({b['agreement_with_fp32']:.3f} of the codes agree with fp32; random weights)")
    out = {"tiny": r}
    if not a.skip_real:
        p = out["real_projection"] = real_projection(a.seconds)
        print(f"real size (random weights), per 40 s chunk: resample+mel {p['resample_mel_s']:.2f} s, conv front end "
              f"{p['conv_front_end_s']:.2f} s, one conformer block {p['conformer_block_s']:.2f} s, RVQ "
              f"{p['rvq_s']:.2f} s -> a {a.seconds:.0f} s song (3 rows, {p['chunks_per_stream']} chunks each) "
              f"~{p['song_encode_s'] / 60:.1f} min, real-time factor ~{p['rtf']:.2f}, ~{p['songs_per_hour']:.1f} "
              "songs/hour")
    if a.json is not None:
        import json

        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
