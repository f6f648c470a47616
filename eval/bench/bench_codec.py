"""Codec decoder speed on CPU (not a test): real-time factor of the tiny released-layout decoder, and a
projection for the real size from timed pieces of it (random weights in the released shapes).

* tiny: ``tests/codec_fixtures.py`` files (2 estimator layers of width 200, 4-channel VAE), a
  1100-frame song (44 s, two windows), 10 Euler steps with CFG as released, fp32.
* grouped songs: ``--songs`` songs of one window each (lengths 100-900 frames, each its own seed) decoded
  one at a time (``Decoder.decode``) vs together (``Decoder.decode_batch``, the songs with one window count
  in one batch): songs per second, and whether each song's audio is bit for bit the same both ways.
* real size, projected: one estimator layer at width 2200 over 1000 frames, batch 2 (CFG), timed and
  scaled to 16 layers x 10 steps, plus the real VAE decoding 128 latent frames (one chunk), scaled to a
  window's 10 chunks. A song of T frames takes ``(T'-250)/750`` windows (``T'`` tiled), each giving
  30 s of new audio beyond the first window's 40 s.

    OMP_NUM_THREADS=1 python eval/bench/bench_codec.py [--songs 4] [--skip-real] [--json FILE]
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


def tiny(frames: int) -> dict:
    from codec_fixtures import write_tiny_codec

    from levo_infer.codec.decoder import load_decoder, n_windows

    with tempfile.TemporaryDirectory() as tmp:
        dec = load_decoder(write_tiny_codec(tmp))
        tokens = torch.randint(0, 16384, (1, 3, frames), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        wav, sr = dec.decode(tokens, generator=torch.Generator().manual_seed(0))
        dt = time.perf_counter() - t0
    secs = wav.shape[-1] / sr
    return {"frames": frames, "windows": n_windows(frames), "audio_s": secs, "decode_s": dt, "rtf": dt / secs}


def grouped(songs: int) -> dict:
    """Songs per second one at a time vs grouped (one batch of ``songs`` one-window songs)."""
    from codec_fixtures import write_tiny_codec

    from levo_infer.codec.decoder import load_decoder

    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(100, 900, (songs,), generator=g).tolist()
    tokens = [torch.randint(0, 16384, (3, t), generator=g) for t in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        dec = load_decoder(write_tiny_codec(tmp))
        t0 = time.perf_counter()
        one = [dec.decode(t[None], generator=torch.Generator().manual_seed(i))[0][0] for i, t in enumerate(tokens)]
        single_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        both = dec.decode_batch(tokens, generators=[torch.Generator().manual_seed(i) for i in range(songs)])
        batch_s = time.perf_counter() - t0
    return {"songs": songs, "frames": lengths, "one_at_a_time_s": single_s, "grouped_s": batch_s,
            "one_at_a_time_songs_per_s": songs / single_s, "grouped_songs_per_s": songs / batch_s,
            "speedup": single_s / batch_s, "bit_identical": all(torch.equal(a, b) for a, b in zip(one, both))}


def real_projection() -> dict:
    from levo_infer.codec.flow import FlowEstimator
    from levo_infer.codec.vae import OobleckDecoder, VAEConfig

    torch.manual_seed(0)
    est = FlowEstimator(layers=1, width=2200, heads=20).eval()
    x, t = torch.randn(2, 1000, 2200), torch.rand(2)
    with torch.no_grad():
        est(x, t)  # warm-up
        t0 = time.perf_counter()
        est(x, t)
        layer_s = time.perf_counter() - t0
    del est
    vae = OobleckDecoder(VAEConfig()).eval()
    lat = torch.randn(1, 64, 128)
    with torch.no_grad():
        t0 = time.perf_counter()
        vae.decode(lat)
        chunk_s = time.perf_counter() - t0
    window_s = layer_s * 16 * 10 + chunk_s * 10
    return {"estimator_layer_s": layer_s, "vae_chunk_s": chunk_s, "window_s": window_s,
            "rtf_first_window": window_s / 40, "rtf_later_windows": window_s / 30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1100)
    ap.add_argument("--songs", type=int, default=4, help="one-window songs for the grouped-decode row")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    print(f"threads: {torch.get_num_threads()}")
    r = tiny(a.frames)
    print(f"tiny decoder: {r['frames']} frames ({r['audio_s']:.1f} s of audio, {r['windows']} windows) in "
          f"{r['decode_s']:.2f} s: real-time factor {r['rtf']:.3f}")
    out = {"tiny": r}
    if a.songs > 0:
        gr = out["grouped"] = grouped(a.songs)
        print(f"grouped decode, {gr['songs']} one-window songs: one at a time {gr['one_at_a_time_songs_per_s']:.3f} "
              f"songs/s, together {gr['grouped_songs_per_s']:.3f} songs/s ({gr['speedup']:.2f}x); bit-identical: "
              f"{gr['bit_identical']}")
    if not a.skip_real:
        p = out["real_projection"] = real_projection()
        print(f"real size (random weights): one estimator layer over 1000 frames x 2 (CFG) {p['estimator_layer_s']:.2f} s, "
              f"VAE 128 latent frames {p['vae_chunk_s']:.2f} s -> one window ~{p['window_s'] / 60:.1f} min; "
              f"real-time factor ~{p['rtf_first_window']:.0f} (first 40 s), ~{p['rtf_later_windows']:.0f} "
              "(each further 30 s); a 270 s song (9 windows) ~"
              f"{9 * p['window_s'] / 60:.0f} min")
    if a.json is not None:
        import json

        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
