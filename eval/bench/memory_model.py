"""Memory model on paper: per-GPU bytes of training the released LeLM sizes (not a test).

For SFT and DPO (frozen reference / LoRA with the adapters-off reference / precomputed reference
log-probs), per strategy, on 8 x 80 GB and on one 141 GB GPU. What is counted, per GPU:

* **trainable state**: fp32 weights 4 B + fp32 gradients 4 B + AdamW moments 8 B + the bf16
  working copy autocast makes 2 B = 18 B per trainable parameter (Lightning ``bf16-mixed`` keeps
  fp32 weights). DDP keeps all of it on every GPU; ZeRO-2 shards gradients and optimizer state
  (weights and the working copy stay whole); FSDP2 / ZeRO-3 shard everything (plus one decoder
  layer gathered at a time, which is small and left out).
* **frozen weights**: a DPO reference copy, and the base weights under LoRA, at 4 B (fp32, as the
  code keeps them today; casting frozen weights to bf16 would halve this), sharded like the policy
  under FSDP2 / ZeRO-3. Precomputed references need none.
* **activations** of one song (DPO: a pair = two songs) of ``T`` positions (952-token prefix + 25 Hz
  frames), bf16, SDPA/flash attention (no S x S scores kept), per decoder layer: ``34 * T * D`` bytes
  without checkpointing (Korthikanti et al. 2022, without the attention-score term), ``2 * T * D``
  with per-layer checkpointing (the layer input) plus one layer's full set while it is recomputed;
  plus the fp32 logits of the three 16385-way heads and their log-softmax (``2 * 3 * 16385 * 4``
  bytes per frame) that the loss keeps for backward. The reference forward keeps none.

``--check`` compares the static part with a real module at a small size: it counts the bytes of
every parameter, gradient and AdamW state tensor after one DPO step (full fine-tuning with a frozen
copy, and LoRA) and prints them beside this model's prediction.

    python eval/bench/memory_model.py [--song-seconds 270] [--check]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Size:
    name: str
    params: float       # all parameters of the released state dict
    dim: int
    layers: int         # main + sub stack decoder layers
    lora_params: float  # r 16 adapters on q,k,v,o,gate,up,down of every decoder layer


def lora_count(dim: int, ffn: int, layers: int, r: int = 16) -> float:
    per_layer = 4 * r * (dim + dim) + 2 * r * (dim + ffn) + r * (ffn + dim)
    return float(per_layer * layers)


SIZES = {
    "v2-large": Size("v2-large", 5.12e9, 2048, 36 + 12, lora_count(2048, 11008, 48)),
    "base": Size("base", 2.8e9, 1536, 28 + 12, lora_count(1536, 8960, 40)),  # ~2.8 B incl. the text tables
}
STRATEGIES = ("ddp", "zero2", "fsdp2/zero3")
SETUPS = ("sft", "dpo frozen ref", "dpo lora (adapters off)", "dpo precomputed ref")


def activations(size: Size, tokens: int, frames: int, *, checkpointing: bool) -> float:
    per_layer = (2 if checkpointing else 34) * tokens * size.dim
    recompute = 34 * tokens * size.dim if checkpointing else 0
    logits = 2 * 3 * 16385 * 4 * frames
    return size.layers * per_layer + recompute + logits


def per_gpu(size: Size, setup: str, strategy: str, gpus: int, *, song_seconds: float, checkpointing: bool) -> dict:
    frames = int(song_seconds * 25)
    tokens = 952 + frames
    lora = setup.startswith("dpo lora")
    trainable = size.lora_params if lora else size.params
    frozen = size.params if (lora or setup == "dpo frozen ref") else 0.0
    shard_all = strategy == "fsdp2/zero3"
    n = gpus if gpus > 1 else 1
    if strategy == "ddp":
        state = 18 * trainable
    elif strategy == "zero2":
        state = (4 + 2) * trainable + (4 + 8) * trainable / n
    else:
        state = 18 * trainable / n
    frozen_b = 4 * frozen / (n if shard_all else 1)
    songs = 1 if setup == "sft" else 2
    act = songs * activations(size, tokens, frames, checkpointing=checkpointing)
    total = state + frozen_b + act
    return {"state_gb": state / GB, "frozen_gb": frozen_b / GB, "activations_gb": act / GB, "total_gb": total / GB}


def table(song_seconds: float) -> str:
    rows = ["| size | setup | strategy | 8 × 80 GB: per GPU, activation checkpointing off / on (parts with it on) "
            "| fits (on) | 1 × 141 GB (on) | fits |",
            "|---|---|---|---|---|---|---|"]
    for size in SIZES.values():
        for setup in SETUPS:
            for strat in STRATEGIES:
                off = per_gpu(size, setup, strat, 8, song_seconds=song_seconds, checkpointing=False)
                on = per_gpu(size, setup, strat, 8, song_seconds=song_seconds, checkpointing=True)
                one = per_gpu(size, setup, "ddp", 1, song_seconds=song_seconds, checkpointing=True)
                fits8 = "yes" if on["total_gb"] <= 80 * 0.92 else "no"
                fits1 = "yes" if one["total_gb"] <= 141 * 0.92 else "no"
                single = f"{one['total_gb']:.0f} GB" if strat == "ddp" else "—"
                rows.append(f"| {size.name} | {setup} | {strat} | {off['total_gb']:.0f} / {on['total_gb']:.0f} GB "
                            f"(state {on['state_gb']:.0f}, frozen {on['frozen_gb']:.0f}, act {on['activations_gb']:.1f}) "
                            f"| {fits8} | {single} | {fits1 if strat == 'ddp' else '—'} |")
    return "\n".join(rows)


def check() -> dict:
    """Static bytes (parameters, gradients, AdamW states) of a real DPO module after one step,
    counted tensor by tensor, against the model's 4 + 4 + 8 B per trainable (+ 4 B per frozen)
    parameter (the bf16 working copy exists only under autocast on GPU, so it is left out here)."""
    import torch

    from levo_infer.config import make_config
    from levo_train.lora import LoraSpec, apply_lora
    from levo_train.train.dpo import DPOModule

    cfg = make_config(dim=256, num_heads=4, num_layers=2, num_layers_sub=1, intermediate_size=1024, code_size=1024,
                      delays=[0, 1, 1], lyric_max_len=16, style_max_len=8, prompt_frames=2,
                      text_words=["<unk>", ".", ",", ";", "la", "love"])
    out = {}
    for variant in ("full", "lora"):
        torch.manual_seed(0)
        m = DPOModule(cfg, reference="model", init_weights=True, lr=1e-4, warmup_steps=0, total_steps=2)
        if variant == "lora":
            apply_lora(m.model, LoraSpec(r=16))
        m.freeze_reference()
        opt = m.configure_optimizers()["optimizer"]
        B, T = 2, 8
        batch = {"chosen": torch.randint(0, 1024, (B, 3, T)), "rejected": torch.randint(0, 1024, (B, 3, T)),
                 "chosen_lengths": torch.full((B,), T), "rejected_lengths": torch.full((B,), T),
                 "lyrics": ["la love"] * B, "styles": ["la"] * B, "prompts": None}
        loss, _ = m.dpo_step(batch)
        loss.backward()
        opt.step()
        params = [p for p in m.model.parameters()]
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen_policy = sum(p.numel() for p in params if not p.requires_grad)
        ref = sum(p.numel() for p in m.ref.parameters()) if m.ref is not None else 0
        counted = (sum(p.numel() * p.element_size() for p in params)
                   + sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
                   + sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                         if torch.is_tensor(t) and t.dim() > 0)
                   + (sum(p.numel() * p.element_size() for p in m.ref.parameters()) if m.ref is not None else 0))
        predicted = 16 * trainable + 4 * (frozen_policy + ref)
        out[variant] = {"trainable": trainable, "frozen": frozen_policy + ref, "counted_bytes": counted,
                        "predicted_bytes": predicted, "ratio": round(counted / predicted, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--song-seconds", type=float, default=270.0, help="song length (released maximum 270 s)")
    ap.add_argument("--check", action="store_true", help="count a real module's static bytes at a small size")
    args = ap.parse_args()
    print(table(args.song_seconds))
    if args.check:
        print(json.dumps(check(), indent=1))


if __name__ == "__main__":
    main()
