"""Memory model on paper: per-GPU bytes of training the released LeLM sizes (not a test).

For SFT and DPO (frozen reference / LoRA with the adapters-off reference / precomputed reference
log-probs), per strategy, on 8 x 80 GB and on one 141 GB GPU. What is counted, per GPU:

* **trainable state**: fp32 weights 4 B + fp32 gradients 4 B + AdamW moments 8 B + the bf16
  working copy autocast makes 2 B = 18 B per trainable parameter (Lightning ``bf16-mixed``, the GPU
  default, keeps fp32 weights). The parameters the released layout keeps but never reads (two
  ``embed_tokens``, ``transformer2.lm_head``, ``layer2_emb.0``, ``out_norm``: 0.13 B in v2-large)
  never get gradients: 4 B each, like frozen weights. DDP keeps all of it on every GPU; ZeRO-2
  shards gradients and optimizer state (weights and the working copy stay whole); ZeRO-3 and FSDP2
  shard everything.
* **gathered weights**: FSDP2 gathers one decoder layer at a time (the next one prefetched: two
  layers' fp32 weights in flight, plus one layer's unsharded gradients in backward), and keeps the
  **root unit** gathered from the forward to the end of the backward (``reshard_after_forward=False``
  on the root, which the losses need: ``head`` runs after ``frame_hidden``): every parameter outside
  the decoder layers -- the text tables, code embeddings, heads, the fusion MLP, norms: 1.07 B in
  v2-large -- at 4 B, plus its unsharded fp32 gradients before the reduce-scatter (trainable part),
  and the same gathered root for a frozen reference (its forward keeps it too). ZeRO-3 gathers
  module by module and releases each after use: two decoder layers' bf16 weights in flight.
* **frozen weights**: a DPO reference copy, and the base weights under LoRA, at 4 B (fp32, as the
  code keeps them), sharded like the policy under FSDP2 / ZeRO-3. Precomputed references need none.
* **activations** of one song (DPO: a pair = two songs) of ``T`` positions: the 952-token
  conditioning prefix, the frames (25 Hz) plus EOS, and the delay pattern's tail of
  ``max(delays)`` = 250 positions (every stream's last frame is predicted 250 steps later),
  bf16, SDPA/flash attention (no S x S scores kept), per decoder layer: ``34 * T * D`` bytes without
  checkpointing (Korthikanti et al. 2022, without the attention-score term), ``2 * T * D`` with
  per-layer checkpointing (the layer input) plus one layer's full set while it is recomputed; plus
  the fp32 logits of the three 16385-way heads and their log-softmax (``2 * 3 * 16385 * 4`` bytes
  per frame) that the loss keeps for backward. The reference forward keeps none.

``--check`` compares the static part with a real module at a small size: it counts the bytes of
every parameter, gradient and AdamW state tensor after one DPO step (full fine-tuning with a frozen
copy, and LoRA) and prints them beside this model's prediction.

    python eval/bench/memory_model.py [--song-seconds 270] [--check] [--markdown]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

GB = 1e9
PREFIX_TOKENS, DELAY_TAIL, FRAME_RATE, VOCAB = 952, 250, 25, 16385


def layer_params(dim: int, ffn: int) -> int:
    """One decoder layer: q, k, v, o (D x D each), gate, up, down (D x F each), two RMSNorms."""
    return 4 * dim * dim + 3 * dim * ffn + 2 * dim


@dataclass(frozen=True)
class Size:
    name: str
    params: float       # all parameters of the released state dict
    dim: int
    ffn: int
    layers: int         # main + sub stack decoder layers
    unused: float       # parameters the released layout keeps but the forward never reads (no gradients)

    @property
    def root(self) -> float:
        """Parameters outside the decoder layers: FSDP2's root unit (text tables, embeddings, heads, ...)."""
        return self.params - self.layers * layer_params(self.dim, self.ffn)

    @property
    def lora_params(self) -> float:
        """r 16 adapters on q, k, v, o, gate, up, down of every decoder layer."""
        return lora_count(self.dim, self.ffn, self.layers)


def lora_count(dim: int, ffn: int, layers: int, r: int = 16) -> float:
    per_layer = 4 * r * (dim + dim) + 2 * r * (dim + ffn) + r * (ffn + dim)
    return float(per_layer * layers)


SIZES = {
    # 5.12 B in the v2-large state dict; the two Qwen2 text tables alone are 0.62 B of the 1.07 B root
    "v2-large": Size("v2-large", 5.122e9, 2048, 11008, 36 + 12, 4 * VOCAB * 2048),
    "base": Size("base", 2.8e9, 1536, 8960, 28 + 12, 4 * VOCAB * 1536),  # ~2.8 B incl. the text tables
}
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp2")
SETUPS = ("sft", "dpo frozen ref", "dpo lora (adapters off)", "dpo precomputed ref")


def positions(frames: int) -> int:
    """Positions one song occupies in each stack: prefix, frames + EOS, the delay tail."""
    return PREFIX_TOKENS + frames + 1 + DELAY_TAIL


def activations(size: Size, tokens: int, frames: int, *, checkpointing: bool) -> float:
    per_layer = (2 if checkpointing else 34) * tokens * size.dim
    recompute = 34 * tokens * size.dim if checkpointing else 0
    logits = 2 * 3 * VOCAB * 4 * (frames + 1)
    return size.layers * per_layer + recompute + logits


def per_gpu(size: Size, setup: str, strategy: str, gpus: int, *, song_seconds: float, checkpointing: bool) -> dict:
    """Bytes per GPU of each part (see the module docstring), and their total."""
    frames = int(song_seconds * FRAME_RATE)
    lora = setup.startswith("dpo lora")
    trainable = size.lora_params if lora else size.params - size.unused
    frozen = size.params if lora else size.unused  # the base under LoRA; else the never-read tensors
    ref = size.params if setup == "dpo frozen ref" else 0.0
    n = max(1, gpus)
    per_layer = layer_params(size.dim, size.ffn)
    gathered = 0.0
    if strategy == "ddp":
        state = 18 * trainable
        frozen_b = 4 * (frozen + ref)
    elif strategy == "zero2":
        state = (4 + 2) * trainable + (4 + 8) * trainable / n
        frozen_b = 4 * (frozen + ref)
    elif strategy == "zero3":
        state = 18 * trainable / n
        frozen_b = 4 * (frozen + ref) / n
        gathered = 2 * per_layer * 2
    elif strategy == "fsdp2":
        state = 18 * trainable / n
        frozen_b = 4 * (frozen + ref) / n
        root_trainable = 0.0 if lora else size.root - size.unused
        gathered = (4 * size.root + 4 * root_trainable          # the policy's root, and its unsharded gradients
                    + (4 * size.root if ref else 0.0)           # a frozen reference's root
                    + 2 * 4 * per_layer + 4 * per_layer)        # layers in flight, one layer's gradients
    else:
        raise ValueError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
    songs = 1 if setup == "sft" else 2
    act = songs * activations(size, positions(frames), frames, checkpointing=checkpointing)
    total = state + frozen_b + gathered + act
    return {"state_gb": state / GB, "frozen_gb": frozen_b / GB, "gathered_gb": gathered / GB,
            "activations_gb": act / GB, "total_gb": total / GB}


def fsdp2_one_gpu_sft(dim: int, ffn: int, layers: int, root: float, frames: int, batch: int,
                      checkpointing: bool = True) -> float:
    """Bytes of an FSDP2 SFT step on one GPU with FSDP2's bf16 mixed-precision policy
    (``gpu_check_train.py``): fp32 weights, gradients and AdamW (16 B per parameter), the root's and
    two layers' bf16 gathered copies, ``batch`` songs' activations."""
    size = Size("probe", root + layers * layer_params(dim, ffn), dim, ffn, layers, 0.0)
    static = 16 * size.params + 2 * root + 2 * 2 * layer_params(dim, ffn)
    return static + batch * activations(size, positions(frames), frames, checkpointing=checkpointing)


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
                            f"(state {on['state_gb']:.0f}, frozen {on['frozen_gb']:.0f}, gathered "
                            f"{on['gathered_gb']:.1f}, act {on['activations_gb']:.1f}) "
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
        predicted = 16 * trainable + 4 * (frozen_policy + ref)  # fp32 on CPU: no bf16 working copy
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
