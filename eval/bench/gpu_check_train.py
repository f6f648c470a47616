"""GPU check for training at the released size (not a test; run where the `device` tool lends a GPU).

A. Real-width v2-large decoder layers (D 2048, F 11008, 16 heads; ``LAYERS``+``LAYERS_SUB`` of them,
   default 8+4) under FSDP2 (:func:`levo_train.parallel.parallelize`, a 1-rank mesh: the code path
   of ``strategy=fsdp2``), bf16 (FSDP2 mixed precision: bf16 compute, fp32 master weights and
   AdamW), flash-attn when importable, else SDPA: SFT steps of ``BATCH`` songs x ``FRAMES`` frames.
   Reports tokens/s (positions of the main stack, prefix included) and MFU = 6·N·tokens/s over
   the GPU's dense bf16 peak (N: parameters of the layers and heads; attention FLOPs not counted).
B. The full v2-large size (5.12 B parameters, 458 keys): one SFT step (full AdamW, FSDP2 bf16,
   activation checkpointing) and one LoRA-DPO step (r 16 on all projections, reference = adapters
   off, autocast bf16, activation checkpointing), each on one GPU: peak memory, or the OOM.

    python eval/bench/gpu_check_train.py                  # writes $OUT/gpu_check_train.json
    DEV=cpu SMALL=1 python eval/bench/gpu_check_train.py  # dry run of the code paths on CPU

Results go into the README's performance table with the GPU named.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from levo_infer.config import make_config

OUT = Path(os.environ.get("OUT", "/tmp/out"))
DEV = os.environ.get("DEV", "cuda")
CUDA = DEV == "cuda"
SMALL = os.environ.get("SMALL") == "1"
BATCH, FRAMES = int(os.environ.get("BATCH", 4)), int(os.environ.get("FRAMES", 500 if not SMALL else 16))
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}  # dense TFLOP/s
WORDS = ["<unk>", ".", ",", "la", "da", "love", "night", "rock", "pop", "sad", "happy"]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else 0.0


def reset_peak() -> None:
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def config(layers: int, layers_sub: int) -> Any:
    if SMALL:
        return make_config(dim=64, num_heads=4, num_layers=layers, num_layers_sub=layers_sub, intermediate_size=128,
                           code_size=64, delays=[0, 2, 2], lyric_max_len=48, style_max_len=8, prompt_frames=3,
                           text_words=WORDS)
    # the released v2-large shapes (upstream_model_facts.md); the Qwen2 text tables (0.62 B)
    return make_config(dim=2048, num_heads=16, num_layers=layers, num_layers_sub=layers_sub, intermediate_size=11008,
                       code_size=16384)


def songs(model: Any, n: int, frames: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.lm.code_size
    codes = torch.randint(0, V, (n, model.code_depth, frames), generator=g).to(DEV)
    lyrics = ["[verse] la da love night . la da ; [chorus] love love rock"] * n
    return {"codes": codes, "lengths": torch.full((n,), frames, device=DEV), "lyrics": lyrics,
            "styles": ["rock, sad"] * n, "prompts": None}


def sft_module(cfg: Any, *, checkpointing: bool) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    from levo_train.parallel import parallelize
    from levo_train.train.lm import LMModule

    with torch.device(DEV):
        module = LMModule(cfg, lr=1e-5, warmup_steps=1, total_steps=10)
    module.model.set_flash_attention(True)  # used only where flash-attn is installed (bf16, cuda)
    parallelize(module.model, activation_checkpointing=checkpointing, mesh=init_device_mesh(DEV, (1,)),
                mixed_precision="bf16")
    return module


def sft_steps(module: Any, steps: int) -> dict[str, Any]:
    opt = module.configure_optimizers()["optimizer"]
    times, losses = [], []
    for s in range(steps):
        batch = songs(module.model, BATCH, FRAMES, s)
        sync()
        t0 = time.perf_counter()
        loss, _ = module.lm_loss(batch, module.model.prepare_conditions(batch["lyrics"], batch["styles"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    return {"step_s": times, "losses": losses}


def part_a() -> dict[str, Any]:
    L, Ls = int(os.environ.get("LAYERS", 8 if not SMALL else 2)), int(os.environ.get("LAYERS_SUB", 4 if not SMALL else 1))
    cfg = config(L, Ls)
    reset_peak()
    module = sft_module(cfg, checkpointing=False)
    n_layers = sum(p.numel() for n, p in module.model.named_parameters() if ".layers." in n or "lm_head" in n
                   or "linears" in n)
    r = sft_steps(module, int(os.environ.get("STEPS", 6)))
    step = sorted(r["step_s"][2:] or r["step_s"])[len(r["step_s"][2:] or r["step_s"]) // 2]
    positions = BATCH * (cfg.prefix_len + FRAMES + max(cfg.delays))
    name = torch.cuda.get_device_name(0) if CUDA else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = {"layers": [L, Ls], "params_layers_and_heads": n_layers, "batch": BATCH, "frames": FRAMES,
           "positions_per_step": positions, "median_step_s": round(step, 4), "tokens_per_s": round(positions / step),
           "peak_GiB": peak_gib(), "losses": r["losses"],
           "flash_attn": bool(getattr(__import__("levo_infer.model", fromlist=["x"]), "_flash_attn_func", None))}
    if peak:
        out["mfu_6N"] = round(6 * n_layers * positions / step / peak, 3)
    del module
    return out


def part_b_sft() -> dict[str, Any]:
    cfg = config(36 if not SMALL else 2, 12 if not SMALL else 1)
    reset_peak()
    module = sft_module(cfg, checkpointing=True)
    n = sum(p.numel() for p in module.model.parameters())
    r = sft_steps(module, 2)
    out = {"params": n, "step_s": [round(t, 2) for t in r["step_s"]], "losses": r["losses"], "peak_GiB": peak_gib()}
    del module
    return out


def part_b_lora_dpo() -> dict[str, Any]:
    from levo_train.lora import LoraSpec, apply_lora
    from levo_train.parallel import apply_activation_checkpointing
    from levo_train.train.dpo import DPOModule

    cfg = config(36 if not SMALL else 2, 12 if not SMALL else 1)
    reset_peak()
    with torch.device(DEV):
        module = DPOModule(cfg, lr=1e-4, warmup_steps=1, total_steps=10, beta=0.5)
    module.model.set_flash_attention(True)
    apply_activation_checkpointing(module.model)
    apply_lora(module.model, LoraSpec(r=16))
    module.freeze_reference()  # adapters off: no second copy
    opt = module.configure_optimizers()["optimizer"]
    n_train = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    times = []
    for s in range(2):
        a, b = songs(module.model, BATCH // 2 or 1, FRAMES, s), songs(module.model, BATCH // 2 or 1, FRAMES, s + 100)
        batch = {"chosen": a["codes"], "rejected": b["codes"], "chosen_lengths": a["lengths"],
                 "rejected_lengths": b["lengths"], "lyrics": a["lyrics"], "styles": a["styles"], "prompts": None}
        sync()
        t0 = time.perf_counter()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss, m = module.dpo_step(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(round(time.perf_counter() - t0, 2))
    out = {"trainable": n_train, "pairs": BATCH // 2 or 1, "step_s": times, "peak_GiB": peak_gib(),
           "loss": round(loss.item(), 4)}
    del module
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1)
    res: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if CUDA else "cpu",
                           "small": SMALL}
    for name, fn in (("A_fsdp2_real_width_layers", part_a), ("B_v2large_sft_step", part_b_sft),
                     ("B_v2large_lora_dpo_step", part_b_lora_dpo)):
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except torch.OutOfMemoryError as e:  # what does not fit is a result too
            res[name] = {"oom": str(e).splitlines()[0], "peak_GiB": peak_gib()}
        except Exception:  # noqa: BLE001 - report and go on to the next part
            res[name] = {"error": traceback.format_exc()[-3000:]}
        res[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(res[name])[:600], flush=True)
        (OUT / "gpu_check_train.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
