"""DPO vs SFT training-step benchmark (not a test).

Same model as ``bench_train.py``'s default (dim 128, 2 + 1 layers, code_size 16384, 100 frames,
delay 25, lyric 100 tokens) and the **same songs**: the SFT step trains on ``B`` songs; the DPO step
on ``B/2`` pairs made of those ``B`` songs (chosen = the first half, rejected = the second half;
all songs share one condition, so every pair does). One step = ``zero_grad`` + the module's own
loss path (SFT: ``LMModule.lm_loss`` with its conditions; DPO: ``DPOModule.dpo_step``) + backward
+ AdamW step. DPO runs twice:

* ``dpo_live``: frozen reference model, a second (no-grad) forward over the pairs each step;
* ``dpo_precomputed``: reference log-probs read from the batch (``levo-data ref-logps``), one model.

The variants are timed interleaved (``--repeats`` rounds of ``--steps`` steps each), so a busy
machine slows all alike; medians over the rounds are reported, with the ratios to SFT (goal: DPO
with precomputed references ≤ 2.2× SFT).

    python eval/bench/bench_dpo.py [--songs 8] [--threads 1] [--repeats 7] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import add_model_args, bench_config, make_batch  # noqa: E402

from levo_train.train.dpo import DPOModule  # noqa: E402
from levo_train.train.lm import LMModule  # noqa: E402
from levo_train.train.logps import pair_logps  # noqa: E402


def to_device(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_steps(args: argparse.Namespace) -> tuple[dict[str, Callable[[], None]], dict]:
    """The three step functions on one set of weights and songs, plus facts about the batch."""
    dev = torch.device(args.device)
    cfg = bench_config(args)
    songs = make_batch(args.songs, args.frames, args.code_size)
    h = args.songs // 2
    pairs = {"chosen": songs["codes"][:h], "chosen_lengths": songs["lengths"][:h],
             "rejected": songs["codes"][h:], "rejected_lengths": songs["lengths"][h:],
             "lyrics": songs["lyrics"][:h], "styles": songs["styles"][:h], "prompts": None}

    torch.manual_seed(0)
    sft = LMModule(cfg, condition_dropout=False).to(dev)
    init = {k: v.clone() for k, v in sft.model.state_dict().items()}
    live = DPOModule(cfg, reference="model").to(dev)
    live.model.load_state_dict(init)
    live.freeze_reference()
    pre = DPOModule(cfg, reference="precomputed").to(dev)
    pre.model.load_state_dict(init)
    songs, pairs = to_device(songs, dev), to_device(pairs, dev)
    with torch.no_grad():  # what `levo-data ref-logps` would have written for these pairs
        ref, _ = pair_logps(live.ref, pairs)
    pairs_pre = {**pairs, "ref_chosen_logps": ref[:h], "ref_rejected_logps": ref[h:]}

    def stepper(module, loss_fn) -> Callable[[], None]:
        params = [p for p in module.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()

        return step

    steps = {
        "sft": stepper(sft, lambda: sft.lm_loss(songs, sft.conditions(songs, dropout=False))[0]),
        "dpo_precomputed": stepper(pre, lambda: pre.dpo_step(pairs_pre)[0]),
        "dpo_live": stepper(live, lambda: live.dpo_step(pairs)[0]),
    }
    facts = {"songs": args.songs, "pairs": h, "frames_scored": int(songs["lengths"].sum()) + args.songs,
             "params": sum(p.numel() for p in sft.model.parameters())}
    return steps, facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--songs", type=int, default=8, help="SFT batch; DPO gets songs/2 pairs of the same songs")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=7, help="rounds (medians are reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.songs < 2 or args.songs % 2:
        ap.error("--songs must be even and >= 2")
    torch.set_num_threads(args.threads)

    steps, facts = make_steps(args)
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = {k: statistics.median(t / s for t, s in zip(times[k], times["sft"])) for k in ("dpo_precomputed", "dpo_live")}
    res = {
        "config": {k: getattr(args, k) for k in ("dim", "layers", "layers_sub", "code_size", "frames", "delay",
                                                  "lyric_len", "threads", "device", "steps", "repeats")},
        "batch": facts,
        "median_step_s": med,
        "ratio_to_sft": {k: med[k] / med["sft"] for k in ("dpo_precomputed", "dpo_live")},
        "median_per_round_ratio": per_round,
        "goal_precomputed_le_2.2x": med["dpo_precomputed"] / med["sft"] <= 2.2,
        "all_step_s": times,
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
