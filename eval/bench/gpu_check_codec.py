"""GPU check for the codec decoder (not a test; run where the `device` tool lends a GPU): the real-size
decoder with random weights in the released layout, written to disk and loaded back through
``load_decoder`` (so the loader's real-size path runs too), decoding at batch 1 and 8 with the
solver under fp16 autocast as released (VAE fp32): seconds, real-time factor, peak GPU memory, and
the fp16 output's distance from an fp32 decode of the same noise; then 8 one-window songs of different
lengths decoded one at a time vs grouped (``decode_batch``): songs per second and the largest
difference between the two; and the VAE's output with TF32 allowed vs the decoder's TF32-off
(``strict_fp32``) run.

    python eval/bench/gpu_check_codec.py        # writes $OUT/gpu_check_codec.json
    DEV=cpu SMALL=1 python eval/bench/gpu_check_codec.py   # dry run of the code path on CPU
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

OUT = Path(os.environ.get("OUT", "/tmp/out"))
DEV = os.environ.get("DEV", "cuda")
CUDA = DEV == "cuda"
SMALL = os.environ.get("SMALL") == "1"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def main() -> None:
    from codec_fixtures import tiny_flow, tiny_vae, vae_json, write_tiny_codec

    from levo_infer.codec.decoder import load_decoder
    from levo_infer.codec.flow import FlowDecoder
    from levo_infer.codec.vae import OobleckDecoder, VAEConfig

    OUT.mkdir(parents=True, exist_ok=True)
    res: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "small": SMALL}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if SMALL:
            flow, vae = tiny_flow(0), tiny_vae(0)
        else:
            flow = FlowDecoder(layers=16, width=2200, heads=20, rvq_dim=1024, codebook_size=16384)
            with torch.no_grad():
                for n, p in flow.named_parameters():
                    if p.dim() > 1:
                        p.normal_(0, 0.02)
                    else:  # layer norms at 1, biases at 0
                        p.fill_(1.0 if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n.endswith(
                            "ln_f.weight") else 0.0)
                flow.normfeat.counts.fill_(1e6)
                flow.normfeat.sum_x2.fill_(1e6)
            vae = OobleckDecoder(VAEConfig())
        write_tiny_codec(tmp, flow=flow, vae=vae, vae_json_override=None if SMALL else vae_json(
            128, [1, 2, 4, 8, 16], [2, 4, 4, 6, 10]))
        del flow, vae
        res["write_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        dec = load_decoder(tmp, device=DEV)
        sync()
        res["load_s"] = round(time.perf_counter() - t0, 1)
    for batch in (1, 8):
        for frames in (1000, 1750):
            if CUDA:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            tokens = torch.randint(0, 16384, (batch, 3, frames), generator=torch.Generator().manual_seed(batch))
            dec.autocast = torch.float16 if CUDA else None
            g = torch.Generator().manual_seed(0)
            dec.decode(tokens[:, :, :40], generator=torch.Generator().manual_seed(1))  # warm-up
            sync()
            t0 = time.perf_counter()
            wav, sr = dec.decode(tokens, generator=g)
            sync()
            dt = time.perf_counter() - t0
            secs = wav.shape[-1] / sr
            r = {"decode_s": round(dt, 2), "audio_s_per_song": secs, "rtf_per_song": round(dt / (secs * batch), 4),
                 "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else 0.0}
            if batch == 1 and frames == 1000 and CUDA:
                dec.autocast = None
                ref, _ = dec.decode(tokens, generator=torch.Generator().manual_seed(0))
                r["fp16_vs_fp32_rel"] = float((wav - ref).abs().max() / ref.abs().max())
            res[f"b{batch}_t{frames}"] = r
            print(f"batch {batch}, {frames} frames:", json.dumps(r), flush=True)
            (OUT / "gpu_check_codec.json").write_text(json.dumps(res, indent=1))
    grouped(dec, res)
    (OUT / "gpu_check_codec.json").write_text(json.dumps(res, indent=1))


def grouped(dec, res: dict) -> None:  # noqa: ANN001 - a levo_infer.codec.decoder.Decoder
    """One at a time vs decode_batch for 8 one-window songs; TF32 on vs off for the VAE."""
    from levo_infer.codec.decoder import strict_fp32

    dec.autocast = torch.float16 if CUDA else None
    g = torch.Generator().manual_seed(5)
    n = 2 if SMALL else 8
    songs = [torch.randint(0, 16384, (3, int(t)), generator=g) for t in torch.randint(100, 900, (n,), generator=g)]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731
    sync()
    t0 = time.perf_counter()
    one = [dec.decode(s[None], generator=gi)[0][0] for s, gi in zip(songs, gens())]
    sync()
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    both = dec.decode_batch(songs, generators=gens())
    sync()
    batch_s = time.perf_counter() - t0
    diff = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(one, both))
    res["grouped"] = {"songs": n, "one_at_a_time_songs_per_s": round(n / single_s, 3),
                      "grouped_songs_per_s": round(n / batch_s, 3), "speedup": round(single_s / batch_s, 2),
                      "max_rel_diff": diff, "bit_identical": all(torch.equal(a, b) for a, b in zip(one, both))}
    print("grouped:", json.dumps(res["grouped"]), flush=True)
    lat = torch.randn(1, 64, 128, generator=torch.Generator().manual_seed(2)).to(dec.device)
    with torch.no_grad():
        with strict_fp32():
            ref = dec.vae.decode(lat)
        prev = torch.backends.cudnn.conv.fp32_precision
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        try:
            tf32 = dec.vae.decode(lat)
        finally:
            torch.backends.cudnn.conv.fp32_precision = prev
    res["vae_tf32_vs_fp32_rel"] = float((tf32 - ref).abs().max() / ref.abs().max())
    print("VAE TF32 vs fp32:", res["vae_tf32_vs_fp32_rel"], flush=True)


if __name__ == "__main__":
    main()
