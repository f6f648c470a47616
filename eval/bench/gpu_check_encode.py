"""GPU check for the native codec encoder (not a test; run where the `device` tool lends a GPU): the
real-size encoder with random weights in the released layout, written to disk and loaded back
through ``load_encoder`` (so the loader's real-size path runs too), encoding 180 s songs with given
stems (all three rows) at batch 1 and 4 in strict fp32 (TF32 off, the default), fp32 with TF32, and
bf16: seconds, real-time factor, songs per hour, peak GPU memory, and the code agreement of TF32 and
bf16 with strict fp32 (random weights: a plumbing figure).

    python eval/bench/gpu_check_encode.py        # writes $OUT/gpu_check_encode.json
    DEV=cpu SMALL=1 python eval/bench/gpu_check_encode.py   # dry run of the code path on CPU (tiny files)
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
REAL = {"hidden": 1024, "ffn": 4096, "channels": 512, "kernel": 31, "heads": 16}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def song(seconds: float, seed: int) -> torch.Tensor:
    from codec_fixtures import test_song

    return test_song(int(seconds * 48000), seed, 0.5)


def main() -> None:
    from codec_fixtures import tiny_tokenizer, write_tiny_encoder

    from levo_infer.codec.encoder import load_encoder

    OUT.mkdir(parents=True, exist_ok=True)
    res: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "small": SMALL}
    sizes = {} if SMALL else REAL
    seconds = 6.0 if SMALL else 180.0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_tiny_encoder(tmp, mixed=tiny_tokenizer(0, depth=6, **sizes),
                           separate=tiny_tokenizer(1, quantizers=("rvq_bestrq_emb", "rvq_bestrq_bgm_emb"), depth=7,
                                                   **sizes))
        res["write_s"] = round(time.perf_counter() - t0, 1)
        encs = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            t0 = time.perf_counter()
            encs[name] = load_encoder(tmp, device=DEV, dtype=dtype)
            sync()
            res[f"load_{name}_s"] = round(time.perf_counter() - t0, 1)
    songs = [song(seconds, i) for i in range(4)]
    vocals = [song(seconds, 10 + i) * 0.5 for i in range(4)]
    ref: dict[int, torch.Tensor] = {}
    for batch in (1, 4):
        full = torch.stack(songs[:batch])
        vocal = torch.stack(vocals[:batch])
        for mode in ("fp32", "tf32", "bf16"):
            enc = encs["bf16" if mode == "bf16" else "fp32"]
            enc.allow_tf32 = mode == "tf32"
            enc.chunk_batch = 8
            if CUDA:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            enc.encode(full[:1, :, :48000], vocal[:1, :, :48000], (full - vocal)[:1, :, :48000])  # warm-up
            sync()
            t0 = time.perf_counter()
            codes = enc.encode(full, vocal, full - vocal)
            sync()
            dt = time.perf_counter() - t0
            r = {"encode_s": round(dt, 2), "audio_s": seconds * batch, "rtf": round(dt / (seconds * batch), 5),
                 "songs_per_hour_180s": round(3600 / dt * batch * seconds / 180, 1),
                 "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else 0.0}
            if mode == "fp32":
                ref[batch] = codes
            else:
                r["agreement_with_fp32"] = round(float((codes == ref[batch]).double().mean()), 4)
            res[f"b{batch}_{mode}"] = r
            print(f"batch {batch}, {mode}:", json.dumps(r), flush=True)
            (OUT / "gpu_check_encode.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
