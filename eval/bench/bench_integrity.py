"""What the integrity checks cost (not a test): MB/s of each check on this CPU and the seconds it
projects for a 5.1 B-parameter fp32 model.

(a) a torch file of ``--gb`` GB of fp32 tensors (``torch.save``, as a Lightning checkpoint or an
    export is written): the CRC-32 check of every zip record (:func:`levo_infer.integrity.verify_torch_zip`),
    with 1 thread and with the default thread count;
(b) the same bytes as a non-torch file (a DCP shard, a safetensors export): the sha256 that a
    manifest entry is checked with;
(c) song shards: records per second read through ``iter_raw`` (digest checked) against the same
    tar read and grouped into records without the check, at the released song length (3 x 7500
    int16 codes, 5 minutes).

Each file is read once before timing (warm page cache: the cost of the check, not of the disk;
a cold read adds the disk's own time, which the load that follows would pay anyway).

    python eval/bench/bench_integrity.py [--gb 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PARAMS_5B = 5.1e9


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the test torch file")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from levo_infer import integrity
    from levo_train.data import shards as S

    out: dict = {"threads_default": integrity.THREADS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = int(args.gb * 1e9 / 4 / 16)
        sd = {f"layer{i}.weight": torch.randn(n) for i in range(16)}
        pt = tmp / "model.pt"
        torch.save(sd, pt)
        del sd
        size = pt.stat().st_size
        pt.read_bytes()  # warm the page cache

        def crc(threads: int) -> float:
            integrity.THREADS = threads

            def run() -> None:
                integrity.clear_memo()
                assert integrity.verify_torch_zip(pt)
            return _timed(run)

        default = out["threads_default"]
        t1 = crc(1)
        tn = crc(default)
        integrity.THREADS = default
        ts = _timed(lambda: integrity.sha256_file(pt))
        mbs = {"zip_crc32_1_thread": size / t1 / 1e6, f"zip_crc32_{default}_threads": size / tn / 1e6,
               "sha256_1_thread": size / ts / 1e6}
        out["file_bytes"] = size
        out["MB_per_s"] = {k: round(v) for k, v in mbs.items()}
        weights = PARAMS_5B * 4
        full = 3 * weights  # + AdamW's two fp32 moments: a training checkpoint
        out["projected_seconds_5.1B_fp32"] = {
            k: {"weights_20.4GB": round(weights / 1e6 / v, 1), "training_checkpoint_61GB": round(full / 1e6 / v, 1)}
            for k, v in mbs.items()}

        # (c) shards
        rng = np.random.default_rng(0)
        with S.ShardWriter(tmp / "s", max_records=10**6, code_size=16384) as w:
            for i in range(200):
                w.write_song(f"s{i:04d}", rng.integers(0, 16384, size=(3, 7500)), "[verse] la la", "pop")
        shard = str(tmp / "s" / "songs-000000.tar")
        list(S.iter_raw(shard))
        with_check = _timed(lambda: list(S.iter_raw(shard)))
        no_check = _timed(lambda: list(S._group_records(shard)))  # the same tar read, records grouped, no digest
        out["shard_records_per_s"] = {"with_digest_check": round(200 / with_check),
                                      "tar_read_only": round(200 / no_check)}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
