"""GPU check for training at the released size (not a test; run where the `device` tool lends a GPU).

A. Real-width v2-large decoder layers (D 2048, F 11008, 16 heads; ``LAYERS``+``LAYERS_SUB`` of them,
   default 8+4) under FSDP2 (:func:`levo_train.parallel.parallelize`, a 1-rank mesh: the code path
   of ``strategy=fsdp2``), bf16 (FSDP2 mixed precision: bf16 compute, fp32 master weights and
   AdamW), flash-attn when importable, else SDPA: SFT steps of ``BATCH`` songs x ``FRAMES`` frames
   (the batch halved until the card's free memory holds it, per the memory model). Reports tokens/s
   (positions of each stack: prefix, frames + EOS and the delay tail) and MFU (:func:`train_flops`).
B. v2-large at the size the card holds (``eval/bench/memory_model.py``: fp32 weights, gradients and
   AdamW are 16 B per parameter, so the whole 5.12 B model needs ~82 GB before activations: it fits
   a 141 GB H200, not an 80 GB H100, where the decoder layers are cut until it fits; the JSON says
   which): one SFT step (full AdamW, FSDP2 bf16, activation checkpointing), and one LoRA-DPO step
   of the whole model (r 16 on all projections, reference = adapters off, autocast bf16, activation
   checkpointing; ~31 GB): peak memory, or the OOM.

MFU = :func:`train_flops` of a step / step time / the GPU's dense bf16 peak. The FLOPs are counted
from the modules a training step runs, per song of ``n`` positions per stack (conditioning prefix +
frames + EOS + the delay tail) and ``f`` scored frames (+ EOS) per stream:
``3 x [ layers x (2 n (4 D^2 + 3 D F) + 4 n^2 D) + 6 n D^2 + 3 x 2 f D V ]``: each decoder layer's
q, k, v, o and gate, up, down projections, its attention (QK^T and the weighted sum, counted in
full as torch's ``FlopCounterMode`` and the PaLM / Megatron MFU convention count them, although a
causal flash kernel skips about half), the fusion MLP between the stacks, and the three
16385-way heads on the frames the loss scores; embeddings and conditioners are table lookups (no
FLOPs); backward = 2 x forward; activation-checkpointing recompute is not counted (model FLOPs,
not hardware FLOPs). ``DEV=cpu SMALL=1`` checks this count against ``FlopCounterMode`` on a real
step (every term but attention, which CPU SDPA does not report to it; its term is torch's own
``sdpa_flop_count``).

Between parts the previous part's model is freed: FSDP2 keeps a reference cycle between a module
and its state (``fully_shard``'s forward hooks hold the ``FSDPState``, which holds the modules,
and ``register_fsdp_forward_method`` stores a bound method of the model on the model), so dropping
the last name does not free it until the cyclic collector runs: ``gc.collect()`` and
``torch.cuda.empty_cache()`` after every part, and a part whose LeLM is still alive afterwards
fails the run.

    python eval/bench/gpu_check_train.py                  # writes $OUT/gpu_check_train.json
    DEV=cpu SMALL=1 python eval/bench/gpu_check_train.py  # dry run of the code paths on CPU

Exit status 1 when a part raised, ran out of memory or leaked its model. Results go into the
README's performance table with the GPU named.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from levo_infer.config import make_config
from levo_infer.model import LeLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_model import fsdp2_one_gpu_sft, layer_params  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/out"))
DEV = os.environ.get("DEV", "cuda")
CUDA = DEV == "cuda"
SMALL = os.environ.get("SMALL") == "1"
BATCH, FRAMES = int(os.environ.get("BATCH", 4)), int(os.environ.get("FRAMES", 500 if not SMALL else 16))
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}  # dense TFLOP/s
WORDS = ["<unk>", ".", ",", "la", "da", "love", "night", "rock", "pop", "sad", "happy"]
HEADROOM = 0.85  # share of the free memory a part may plan to use
#: LeLMs built by a part: none may be alive once it is over
BUILT: list[weakref.ref] = []


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else 0.0


def free_bytes() -> float:
    """Free memory of the GPU now (CPU dry run: pretend an 80 GB card)."""
    return float(torch.cuda.mem_get_info()[0]) if CUDA else 80e9


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


def root_params(cfg: Any) -> int:
    """Parameters outside the decoder layers (FSDP2's root unit), from a meta-device model."""
    with torch.device("meta"):
        m = LeLM(cfg)
    return sum(p.numel() for n, p in m.named_parameters() if ".layers." not in n)


def train_flops(cfg: Any, batch: int, frames: int) -> float:
    """Model FLOPs of one SFT training step on ``batch`` songs of ``frames`` frames (module docstring)."""
    lm = cfg.lm
    D, F, V, L = lm.dim, lm.intermediate_size, lm.code_size + 1, lm.num_layers + lm.num_layers_sub
    n = cfg.prefix_len + frames + 1 + max(cfg.delays)
    per_layer = 2 * n * (4 * D * D + 3 * D * F) + 4 * n * n * D
    fwd = L * per_layer + 6 * n * D * D + lm.code_depth * 2 * (frames + 1) * D * V
    return 3.0 * batch * fwd


def check_flop_count(module: Any) -> dict[str, Any]:
    """:func:`train_flops` against torch's ``FlopCounterMode`` on one real step (CPU dry run)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    cfg = module.model_config
    batch = songs(module.model, 2, FRAMES, 0)
    with FlopCounterMode(display=False) as fc:
        loss, _ = module.lm_loss(batch, module.model.prepare_conditions(batch["lyrics"], batch["styles"]))
        loss.backward()
    module.zero_grad(set_to_none=True)
    lm = cfg.lm
    n = cfg.prefix_len + FRAMES + 1 + max(cfg.delays)
    shape = torch.Size([2, lm.num_heads, n, lm.dim // lm.num_heads])
    attention = 3 * (lm.num_layers + lm.num_layers_sub) * sdpa_flop_count(shape, shape, shape)
    counted = fc.get_total_flops() + (attention if not CUDA else 0)
    want = train_flops(cfg, 2, FRAMES)
    return {"counted": counted, "formula": want, "equal": counted == want}


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
    BUILT.append(weakref.ref(module.model))
    module.model.set_flash_attention(True)  # used only where flash-attn is installed (bf16, cuda)
    parallelize(module.model, activation_checkpointing=checkpointing, mesh=init_device_mesh(DEV, (1,)),
                mixed_precision="bf16")
    return module


def sft_steps(module: Any, steps: int, batch_size: int) -> dict[str, Any]:
    opt = module.configure_optimizers()["optimizer"]
    times, losses = [], []
    for s in range(steps):
        batch = songs(module.model, batch_size, FRAMES, s)
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
    lm, root, free = cfg.lm, root_params(cfg), free_bytes()
    batch = BATCH
    while batch > 1 and fsdp2_one_gpu_sft(lm.dim, lm.intermediate_size, L + Ls, root, FRAMES, batch,
                                          checkpointing=False) > HEADROOM * free:
        batch //= 2
    reset_peak()
    module = sft_module(cfg, checkpointing=False)
    r = sft_steps(module, int(os.environ.get("STEPS", 6)), batch)
    step = sorted(r["step_s"][2:] or r["step_s"])[len(r["step_s"][2:] or r["step_s"]) // 2]
    positions = batch * (cfg.prefix_len + FRAMES + 1 + max(cfg.delays))
    name = torch.cuda.get_device_name(0) if CUDA else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = train_flops(cfg, batch, FRAMES)
    out = {"layers": [L, Ls], "batch": batch, "batch_asked": BATCH, "frames": FRAMES, "free_GB": round(free / 1e9, 1),
           "positions_per_step": positions, "median_step_s": round(step, 4), "tokens_per_s": round(positions / step),
           "train_flops_per_step": flops, "peak_GiB": peak_gib(), "losses": r["losses"],
           "flash_attn": bool(getattr(__import__("levo_infer.model", fromlist=["x"]), "_flash_attn_func", None))}
    if peak:
        out["mfu"] = round(flops / step / peak, 3)
    if not CUDA:
        out["flop_count_check"] = check_flop_count(module)
        if not out["flop_count_check"]["equal"]:
            raise AssertionError(f"train_flops disagrees with FlopCounterMode: {out['flop_count_check']}")
    return out


def sft_layers_that_fit(free: float) -> tuple[int, int]:
    """The most v2-large decoder layers (main : sub = 3 : 1, as 36 : 12) whose FSDP2 SFT step the
    memory model puts under ``HEADROOM`` x ``free`` (36+12 when the whole model fits)."""
    if SMALL:
        return 2, 1
    root = root_params(config(0, 0))
    for total in range(48, 0, -1):
        main = min(36, round(total * 0.75))
        sub = total - main
        need = fsdp2_one_gpu_sft(2048, 11008, total, root, FRAMES, 1, checkpointing=True)
        if need <= HEADROOM * free and sub <= 12:
            return main, sub
    return 1, 0


def part_b_sft() -> dict[str, Any]:
    free = free_bytes()
    L, Ls = sft_layers_that_fit(free)
    cfg = config(L, Ls)
    reset_peak()
    module = sft_module(cfg, checkpointing=True)
    n = sum(p.numel() for p in module.model.parameters())
    r = sft_steps(module, 2, 1)
    return {"layers": [L, Ls], "whole_model": (L, Ls) == (36, 12) or SMALL, "free_GB": round(free / 1e9, 1),
            "planned_GB": round(fsdp2_one_gpu_sft(cfg.lm.dim, cfg.lm.intermediate_size, L + Ls,
                                                  root_params(cfg), FRAMES, 1) / 1e9, 1),
            "params": n, "bytes_per_param_static": 16, "step_s": [round(t, 2) for t in r["step_s"]],
            "losses": r["losses"], "peak_GiB": peak_gib()}


def part_b_lora_dpo() -> dict[str, Any]:
    from levo_train.lora import LoraSpec, apply_lora
    from levo_train.parallel import apply_activation_checkpointing
    from levo_train.train.dpo import DPOModule

    cfg = config(36 if not SMALL else 2, 12 if not SMALL else 1)
    reset_peak()
    with torch.device(DEV):
        module = DPOModule(cfg, lr=1e-4, warmup_steps=1, total_steps=10, beta=0.5)
    BUILT.append(weakref.ref(module.model))
    module.model.set_flash_attention(True)
    apply_activation_checkpointing(module.model)
    apply_lora(module.model, LoraSpec(r=16))
    module.freeze_reference()  # adapters off: no second copy
    opt = module.configure_optimizers()["optimizer"]
    n_train = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    times = []
    pairs = max(1, BATCH // 2)
    for s in range(2):
        a, b = songs(module.model, pairs, FRAMES, s), songs(module.model, pairs, FRAMES, s + 100)
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
    return {"trainable": n_train, "pairs": pairs, "step_s": times, "peak_GiB": peak_gib(),
            "loss": round(loss.item(), 4), "layer_params": layer_params(cfg.lm.dim, cfg.lm.intermediate_size)}


def free_part() -> int:
    """Collect the part's cycles and return the GPU's cached blocks; how many of its models live on."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    alive = sum(r() is not None for r in BUILT)
    BUILT.clear()
    return alive


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1)
    res: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if CUDA else "cpu",
                           "small": SMALL}
    failed = []
    for name, fn in (("A_fsdp2_real_width_layers", part_a), ("B_v2large_sft_step", part_b_sft),
                     ("B_v2large_lora_dpo_step", part_b_lora_dpo)):
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except torch.OutOfMemoryError as e:  # recorded, and a failure: the part was sized to fit
            res[name] = {"oom": str(e).splitlines()[0], "peak_GiB": peak_gib()}
        except Exception:  # noqa: BLE001 - report and go on to the next part
            res[name] = {"error": traceback.format_exc()[-3000:]}
        res[name]["models_alive_after"] = free_part()
        res[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        if {"oom", "error"} & set(res[name]) or res[name]["models_alive_after"]:
            failed.append(name)
        print(name, json.dumps(res[name])[:600], flush=True)
        (OUT / "gpu_check_train.json").write_text(json.dumps(res, indent=1))
    res["failed"] = failed
    (OUT / "gpu_check_train.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
