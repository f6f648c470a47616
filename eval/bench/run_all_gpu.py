"""The GPU variant of the benchmark suite (not a test): one script to run when the `device` tool lends
a GPU. It runs the prepared GPU checks in order of importance, each with its own time budget, and
collects their JSON into ``$OUT/gpu_bench.json`` (a check that fails or runs out of time is
recorded as such; the others still run, and the run then exits 1):

1. ``gpu_check_train.py``: real-width v2-large layers under FSDP2 (tokens/s, MFU), full v2-large SFT
   and LoRA-DPO step peak memory on one GPU;
2. ``gpu_check_codec.py``: the real-size codec decoder at batch 1 and 8 in fp16;
3. ``gpu_check_infer.py``: levo-infer loading and generation on the GPU;
4. ``gpu_check_encode.py``: the real-size codec encoder at batch 1 and 4 (fp32, TF32, bf16).

    OUT=/tmp/out python eval/bench/run_all_gpu.py [--budget-s 540] [--only train codec ...]

Each check runs with the repository's ``inference/`` and root put in front of the caller's
``PYTHONPATH`` (never instead of it: packages carried to the GPU machine on that path, e.g.
flash-attn, stay importable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECKS = [("train", "gpu_check_train.py", "gpu_check_train.json", 0.5),
          ("codec", "gpu_check_codec.py", "gpu_check_codec.json", 0.3),
          ("infer", "gpu_check_infer.py", None, 0.2),
          ("encode", "gpu_check_encode.py", "gpu_check_encode.json", 0.15)]


def pythonpath(carried: str | None) -> str:
    """The repository's ``inference/`` and root, then the caller's ``PYTHONPATH`` entries."""
    ours = [str(REPO / "inference"), str(REPO)]
    theirs = [p for p in (carried or "").split(os.pathsep) if p and p not in ours]
    return os.pathsep.join(ours + theirs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds for all checks together")
    ap.add_argument("--only", nargs="+", choices=[c[0] for c in CHECKS], default=None, help="run only these checks")
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    start = time.perf_counter()
    checks = [c for c in CHECKS if a.only is None or c[0] in a.only]
    for name, script, jname, share in checks:
        left = a.budget_s - (time.perf_counter() - start)
        limit = max(30.0, min(left, a.budget_s * share + max(0.0, left - a.budget_s * share) * 0.5))
        env = dict(os.environ, OUT=str(out), PYTHONPATH=pythonpath(os.environ.get("PYTHONPATH")))
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, str(REPO / "eval" / "bench" / script)], env=env, capture_output=True,
                               text=True, timeout=limit)
            entry: dict = {"rc": p.returncode, "tail": (p.stdout + p.stderr)[-3000:]}
        except subprocess.TimeoutExpired:
            entry = {"rc": None, "timeout_s": round(limit)}
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        if jname and (out / jname).is_file():
            entry["result"] = json.loads((out / jname).read_text())
        res[name] = entry
        (out / "gpu_bench.json").write_text(json.dumps(res, indent=1))
        print(f"{name}: rc {entry.get('rc')} in {entry['wall_s']} s", flush=True)
    failed = [name for name, e in res.items() if e.get("rc") != 0]
    if failed:
        print(f"run_all_gpu: failed: {', '.join(failed)} (see {out / 'gpu_bench.json'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
