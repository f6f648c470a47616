"""Inference benchmark (not a test).

(a) generation throughput on CPU for a small LeLM with the released prefix lengths (lyrics 600,
    prompt 252, style 100) and the full 16385-way heads: frames per second at batch 1 and batch 8,
    our KV-cache path against a no-cache reference loop (every step recomputes the whole prefix +
    sequence, as a loop without a cache must), both through ``levo_infer.generate.generate`` with
    CFG and the released sampling rules;
(b) checkpoint loading memory: writes a ~1 GB released-format folder (``config.yaml`` + flat
    ``audiolm.*`` ``model.pt``, bf16, released key names and table sizes) to a temp folder and
    measures the peak resident memory of a fresh process that loads it with ``load_model``
    (mmap + meta device) against the file size (peak = VmHWM of the child), next to our re-creation of the released load (not the released code: ``torch.load``
    into memory + ``load_state_dict`` into an initialised fp32 model).

    python eval/bench/bench_infer.py [--skip-gen] [--skip-load] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from levo_infer.config import make_config, save_config
from levo_infer.generate import generate
from levo_infer.model import LeLM

WORDS = ["<unk>", ".", ",", "la", "da", "love", "night", "rock", "pop", "sad", "happy"]


# ----------------------------------------------------------------------------- (a) generation
def small_model(dim: int, layers: int, layers_sub: int) -> LeLM:
    cfg = make_config(dim=dim, num_heads=max(1, dim // 128), num_layers=layers, num_layers_sub=layers_sub,
                      intermediate_size=2 * dim, code_size=16384, delays=[0, 2, 2], lyric_max_len=600,
                      style_max_len=100, prompt_frames=250, text_words=WORDS)
    torch.manual_seed(0)
    m = LeLM(cfg)
    m.init_weights(std=0.02)
    with torch.no_grad():  # EOS logit 0: never in the top-k of 16384 random logits, so every song runs to the end
        m.transformer.lm_head.weight[m.eos_id].zero_()
        for lin in m.linears:
            lin.weight[m.eos_id].zero_()
    return m.eval()


def time_generation(m: LeLM, batch: int, frames: int, use_cache: bool) -> dict:
    lyrics = ["[verse] la da love . night la ; [chorus] love love"] * batch
    styles = ["[Musicality-very-high], rock, sad"] * batch
    generate(m, lyrics[:1], styles[:1], max_frames=2, compat=True, top_k=50, seed=0, use_cache=use_cache)  # warm-up
    t0 = time.perf_counter()
    out = generate(m, lyrics, styles, max_frames=frames, compat=True, top_k=50, temperature=0.8, seed=0,
                   use_cache=use_cache)
    dt = time.perf_counter() - t0
    produced = int(out.lengths.sum())
    return {"batch": batch, "path": "kv-cache" if use_cache else "no-cache", "frames_per_song": frames,
            "steps": out.steps, "seconds": round(dt, 3), "frames_per_s": round(produced / dt, 2),
            "ms_per_step": round(1000 * dt / max(out.steps, 1), 1)}


def bench_generation(args: argparse.Namespace) -> list[dict]:
    m = small_model(args.dim, args.layers, args.layers_sub)
    n_params = sum(p.numel() for p in m.parameters())
    print(f"(a) generation: dim {args.dim}, layers {args.layers}+{args.layers_sub}, {n_params / 1e6:.1f} M params, "
          f"prefix {m.cfg.prefix_len}, CFG (2x batch), compat sampling, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for batch in (1, 8):
        for use_cache, frames in ((True, args.frames_short), (False, args.frames_short), (True, args.frames_long)):
            r = time_generation(m, batch, frames, use_cache)
            rows.append(r)
            print(f"  batch {r['batch']}  {r['path']:8s}  {r['frames_per_song']:4d} frames/song  "
                  f"{r['seconds']:8.2f} s  {r['frames_per_s']:8.2f} frames/s  {r['ms_per_step']:7.1f} ms/step", flush=True)
    return rows


# ----------------------------------------------------------------------------- (b) loading memory
def write_big_checkpoint(folder: Path, dim: int, layers: int, layers_sub: int) -> tuple[Path, int]:
    """A released-format v2 folder with Qwen2-sized text tables, bf16, random weights."""
    cfg = make_config(dim=dim, num_heads=dim // 128, num_layers=layers, num_layers_sub=layers_sub,
                      intermediate_size=int(dim * 5.375))
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder)
    with torch.device("meta"):
        meta = LeLM(cfg)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in meta.state_dict().items():
        sd["audiolm." + k] = torch.empty(v.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
    torch.save(sd, folder / "model.pt")
    del sd
    return folder, (folder / "model.pt").stat().st_size


CHILD = textwrap.dedent("""
    import json, sys, torch
    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * 4096
    def peak():  # VmHWM: this process image's peak (ru_maxrss would carry the parent's peak over fork+exec)
        for line in open('/proc/self/status'):
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    mode, folder = sys.argv[1], sys.argv[2]
    from levo_infer import load_model
    from levo_infer.config import load_config
    from levo_infer.model import LeLM
    cfg = load_config(folder)
    with torch.device('meta'):
        LeLM(cfg)
    base = rss()
    out = {}
    if mode == 'recreated-released-load':   # torch.load into memory + load_state_dict into an initialised fp32 model
        sd = torch.load(folder + '/model.pt', map_location='cpu', weights_only=True)
        m = LeLM(cfg)
        m.load_state_dict({k[8:]: v for k, v in sd.items()}, strict=False)
        del sd
    else:
        dtype = {'bf16': None, 'fp32': torch.float32}[mode.split('-')[0]]
        m = load_model(folder, dtype=dtype, build_tokenizers=False)
    out['after_load'] = peak() - base
    with torch.no_grad():
        s = sum(float(p.sum(dtype=torch.float32)) for p in m.parameters())  # touch every weight
    out['after_touch'] = peak() - base
    out['rss_end'] = rss() - base
    out['params_bytes'] = sum(p.numel() * p.element_size() for p in m.parameters())
    print(json.dumps(out))
""")


def measure_child(mode: str, folder: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_loading(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        folder, size = write_big_checkpoint(Path(tmp) / "songgeneration_v2_bench", args.load_dim, args.load_layers,
                                            args.load_layers_sub)
        print(f"(b) loading: wrote {size / 2**30:.2f} GiB released-format model.pt (dim {args.load_dim}, layers "
              f"{args.load_layers}+{args.load_layers_sub}, bf16) in {time.perf_counter() - t0:.1f} s", flush=True)
        for mode in ("bf16-mmap", "fp32-convert", "recreated-released-load"):
            r = measure_child(mode, folder)
            row = {"mode": mode, "file_gib": round(size / 2**30, 3),
                   **{k: round(v / 2**30, 3) for k, v in r.items()},
                   "peak_over_file": round(r["after_touch"] / size, 2),
                   "peak_over_model": round(r["after_touch"] / r["params_bytes"], 2)}
            rows.append(row)
            print(f"  {mode:15s} peak RSS after load {row['after_load']:6.2f} GiB, after touching every weight "
                  f"{row['after_touch']:6.2f} GiB = {row['peak_over_file']:.2f} x file, "
                  f"{row['peak_over_model']:.2f} x the loaded model ({row['params_bytes']:.2f} GiB)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small-model steps are "
                    "latency-bound, and 2 threads on a busy 2-core machine thrash)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--layers-sub", type=int, default=1)
    ap.add_argument("--frames-short", type=int, default=24, help="frames per song for the cache vs no-cache comparison")
    ap.add_argument("--frames-long", type=int, default=250, help="frames per song for the long cache-only run")
    ap.add_argument("--load-dim", type=int, default=1024)
    ap.add_argument("--load-layers", type=int, default=2)
    ap.add_argument("--load-layers-sub", type=int, default=1)
    ap.add_argument("--tmp", default=None, help="folder for the temporary checkpoint")
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "torch": torch.__version__}
    if not args.skip_gen:
        results["generation"] = bench_generation(args)
    if not args.skip_load:
        results["loading"] = bench_loading(args)
    results["max_rss_parent_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
