"""GPU check for levo-infer (not a test; run where a GPU is lent): load a released-format folder on
cuda in bf16 and generate; the ``--low-mem`` layer offload must give the same tokens with less GPU
memory; GPU frames/s at batch 1 and 8; the CLI on cuda with and without ``--low-mem``.

    PYTHONPATH=inference python eval/bench/gpu_check_infer.py      # DEV=cpu DIM=128 for a dry run

Seen on an H100 (torch 2.11, dim 1024, 6+3 layers, bf16): identical tokens with and without
--low-mem (greedy and seeded sampling, library and CLI), GPU memory after loading 231 vs 710 MiB,
peak 866 vs 1346 MiB; 112 frames/s at batch 1, 674-836 frames/s at batch 8.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from levo_infer import load_model
from levo_infer.checkpoint import save_released
from levo_infer.config import make_config
from levo_infer.generate import generate
from levo_infer.model import LeLM

OUT = Path(os.environ.get("OUT", "/tmp/out"))
DEV = os.environ.get("DEV", "cuda")
CUDA = DEV == "cuda"
res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if CUDA else "cpu"}
sync = torch.cuda.synchronize if CUDA else (lambda: None)
WORDS = ["<unk>", ".", ",", "la", "da", "love", "night", "rock", "pop", "sad", "happy"]
cfg = make_config(dim=int(os.environ.get("DIM", 1024)), num_heads=8, num_layers=6, num_layers_sub=3, intermediate_size=4 * int(os.environ.get("DIM", 1024)), code_size=16384,
                  delays=[0, 3, 3], lyric_max_len=600, style_max_len=100, prompt_frames=250, text_words=WORDS)
torch.manual_seed(0)
m = LeLM(cfg)
m.init_weights(std=0.02)
folder = Path("/tmp/levo_gpu_ckpt")
save_released(m, str(folder), dtype=torch.bfloat16)
del m
L = ["[verse] la da love . night la ; [chorus] love love", "[verse] rock pop", "[chorus] sad happy . la", None]
S = ["[Musicality-very-high], rock, sad", "pop", None, "[Musicality-very-high], ."]


def run(low_mem: bool) -> tuple[torch.Tensor, dict]:
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    mm = load_model(folder, device=DEV, dtype=torch.bfloat16, low_mem=low_mem)
    sync()
    t_load = time.perf_counter() - t0
    resident = torch.cuda.memory_allocated() if CUDA else 0
    t0 = time.perf_counter()
    out = generate(mm, L, S, max_frames=64, compat=True, top_k=1)
    sync()
    t_gen = time.perf_counter() - t0
    info = {"load_s": round(t_load, 2), "gen_s": round(t_gen, 2), "resident_after_load_MiB": resident // 2**20,
            "peak_MiB": (torch.cuda.max_memory_allocated() if CUDA else 0) // 2**20, "steps": out.steps,
            "param_devices": sorted({str(p.device) for p in mm.parameters()})}
    codes = out.raw_codes.cpu()
    del mm, out
    return codes, info


a, ia = run(False)
b, ib = run(True)
res["normal"], res["low_mem"] = ia, ib
res["low_mem_same_tokens"] = bool(torch.equal(a, b))
res["lengths"] = [int(x) for x in (a != 16385).any(1).sum(-1)]

# throughput on GPU, batch 1 vs 8 (bf16, KV cache), 200 frames
mm = load_model(folder, device=DEV, dtype=torch.bfloat16)
for B in (1, 8):
    generate(mm, L[:1] * B, S[:1] * B, max_frames=4, compat=True, top_k=50, seed=0)
    sync()
    t0 = time.perf_counter()
    o = generate(mm, L[:1] * B, S[:1] * B, max_frames=200, compat=True, top_k=50, seed=0)
    sync()
    dt = time.perf_counter() - t0
    res[f"gpu_batch{B}_frames_per_s"] = round(float(o.lengths.sum()) / dt, 1)
del mm

# CLI on cuda, with and without --low-mem (same seeds -> same tokens)
jl = Path("/tmp/in.jsonl")
jl.write_text("".join(json.dumps({"idx": f"s{i}", "gt_lyric": "[verse] la da love", "descriptions": "rock"}) + "\n"
                      for i in range(3)))
for name, extra in (("cli_plain", []), ("cli_lowmem", ["--low-mem"])):
    p = subprocess.run([sys.executable, "-m", "levo_infer.cli", str(folder), str(jl), f"/tmp/{name}", "--device", DEV,
                        "--duration", "1", "--seed", "3", "--no-progress", "--batch-size", "2", *extra],
                       capture_output=True, text=True)
    res[name + "_rc"] = p.returncode
    res[name + "_stderr"] = p.stderr[-800:]
same = all(torch.equal(torch.load(f"/tmp/cli_plain/tokens/s{i}.pt", weights_only=True),
                     torch.load(f"/tmp/cli_lowmem/tokens/s{i}.pt", weights_only=True))
           for i in range(3)) if res["cli_plain_rc"] == 0 and res["cli_lowmem_rc"] == 0 else False
res["cli_lowmem_same_tokens"] = same
print(json.dumps(res, indent=1))
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "gpu_check.json").write_text(json.dumps(res, indent=1))
