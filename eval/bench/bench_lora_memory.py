"""DPO peak memory: full fine-tuning with a frozen reference copy vs LoRA with the adapters-off reference (not a test).

Each variant runs in its own process (so peaks do not mix): build a LeLM (default dim 512, 4 + 2
layers, 16384 codes), make the DPO module the way ``levo-train recipe=dpo`` does (``full``: policy +
``deepcopy`` reference, AdamW over every weight; ``lora``: peft adapters r 16 on every projection,
reference = the same weights with the adapters off, AdamW over the adapters), run ``--steps``
optimizer steps on random pairs, and report the peak resident memory above the process's baseline
once the policy is built (``ru_maxrss``; CPU). On a GPU (``--device cuda``) it reports
``torch.cuda.max_memory_allocated`` instead.

    OMP_NUM_THREADS=1 python eval/bench/bench_lora_memory.py [--dim 512] [--layers 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from levo_infer.config import make_config
    from levo_train.lora import LoraSpec, apply_lora, trainable_share
    from levo_train.train.dpo import DPOModule

    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = make_config(dim=args.dim, num_heads=max(1, args.dim // 64), num_layers=args.layers,
                      num_layers_sub=max(1, args.layers // 2), intermediate_size=4 * args.dim, code_size=16384,
                      delays=[0, 1, 1], lyric_max_len=64, style_max_len=16, prompt_frames=4,
                      text_words=["<unk>", ".", ",", ";", "la", "love"])
    m = DPOModule(cfg, reference="model", init_weights=True, lr=1e-4, warmup_steps=0, total_steps=10).to(dev)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the policy's weights are in
    if args.variant == "lora":
        apply_lora(m.model, LoraSpec(r=16, alpha=32))
    m.freeze_reference()
    trainable, total = trainable_share(m.model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    opt = m.configure_optimizers()["optimizer"]
    B, T = args.pairs, args.frames
    batch = {"chosen": torch.randint(0, 16384, (B, 3, T)), "rejected": torch.randint(0, 16384, (B, 3, T)),
             "chosen_lengths": torch.full((B,), T), "rejected_lengths": torch.full((B,), T),
             "lyrics": ["la love"] * B, "styles": ["la"] * B, "prompts": None}
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = m.dpo_step(batch)
        loss.backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"variant": args.variant, "params": total, "trainable": trainable, "reference_copy": m.ref is not None,
           "step_seconds": round(step_s, 3)}
    if dev.type == "cuda":
        out["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        out["rss_with_policy_mib"] = round(base, 1)
        out["peak_rss_mib"] = round(peak, 1)
        out["peak_above_policy_mib"] = round(peak - base, 1)  # reference, gradients, optimizer state, activations
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=("full", "lora"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for v in ("full", "lora"):
        cmd = [sys.executable, __file__, "--variant", v] + [f"--{k}={getattr(args, k)}" for k in
                                                          ("dim", "layers", "pairs", "frames", "steps", "device")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
