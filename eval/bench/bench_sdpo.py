"""One semi-online DPO cycle on CPU, phase by phase, and a projection for v2-large on a GPU (not a test).

Measured (the code ``recipe=sdpo`` runs, without the Lightning loop around it): one round of
:class:`~levo_train.train.sdpo.SemiOnlineDPOModule` — generate ``prompts x per_prompt`` candidates
with the policy (KV cache, CFG), score them (a reward-model export with ``--rm``, else the toy
world's hidden oracle), select best-vs-worst pairs — then ``sync_every`` DPO optimizer steps at
``--batch`` pairs with a live reference (forward + backward + AdamW). Prints each phase's seconds
and share of the cycle.

Projected: the same cycle for the released v2-large LeLM (D 2048, F 11008, 36 + 12 layers, 16385
classes per stream, 952-token prefix) on one GPU, from FLOP counts and stated throughput
assumptions (``--gpu-tflops``, ``--gen-mfu``, ``--train-mfu``, ``--hbm-tbs``): generation is
bounded below by reading the weights once per decoding step (memory bound at small batch) and by
its FLOPs at large batch; training by its FLOPs. The assumptions are printed with the result.

    OMP_NUM_THREADS=1 python eval/bench/bench_sdpo.py --init runs/sft/export [--rm runs/rm/export]
        [--prompts 300 --per-prompt 4 --sync-every 30 --batch 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from levo_infer.checkpoint import find_weights, load_weights
    from levo_infer.config import load_config
    from levo_train.rollout import Sampling
    from levo_train.scorers import load_scorer
    from levo_train.toy.pairs import ToyPairSpec, split_seeds, toy_prompts
    from levo_train.toy.scorer import ToyOracleScorer
    from levo_train.toy.world import ToyWorld
    from levo_train.train.sdpo import SemiOnlineDPOModule

    torch.manual_seed(0)
    cfg = load_config(args.init)
    spec = ToyPairSpec()
    prompts = toy_prompts(ToyWorld(0), args.prompts, seed=split_seeds(spec, 0)["train"], tier=spec.tier)
    scorer = load_scorer(f"rm:{args.rm}", setting="--rm") if args.rm else ToyOracleScorer(0)
    m = SemiOnlineDPOModule(cfg, prompts=prompts, scorer=scorer, oracle=None, sync_every=args.sync_every,
                            per_prompt=args.per_prompt, prompts_per_round=args.prompts, min_margin=0.05,
                            sampling=Sampling(batch_size=args.gen_batch), batch_size=args.batch, beta=0.5,
                            lr=5e-6, warmup_steps=0, total_steps=args.sync_every, min_lr_ratio=1.0,
                            weight_decay=0.0, init_weights=False)
    load_weights(m.model, find_weights(Path(args.init)))
    m.freeze_reference()
    opt = m.configure_optimizers()["optimizer"]
    t0 = time.perf_counter()
    st = m.run_round(0)
    t_round = time.perf_counter() - t0
    t_pair = max(0.0, t_round - st["gen_seconds"] - st["score_seconds"])
    m.model.train()
    t0 = time.perf_counter()
    for _ in range(args.sync_every):
        batch = m.draw_batch()
        opt.zero_grad(set_to_none=True)
        loss, _ = m.dpo_step(batch)
        loss.backward()
        opt.step()
    t_train = time.perf_counter() - t0
    phases = {"generate": st["gen_seconds"], "score": st["score_seconds"], "pair": t_pair, "train": t_train}
    total = sum(phases.values())
    return {"candidates": st["candidates"], "pairs": st["pairs"], "frames_mean": st["frames_mean"],
            "scorer": scorer.name, "seconds": {k: round(v, 2) for k, v in phases.items()},
            "share": {k: round(v / total, 3) for k, v in phases.items()}, "cycle_seconds": round(total, 2),
            "threads": torch.get_num_threads()}


def project(args: argparse.Namespace) -> dict[str, Any]:
    """v2-large on one GPU: FLOPs and weight traffic of one cycle under the stated assumptions."""
    D, F, L1, L2, V, K, prefix = 2048, 11008, 36, 12, 16385, 3, 952
    per_layer = 4 * D * D + 3 * D * F
    stack = per_layer * (L1 + L2) + (K) * D * V + 2 * (2 * D * D)  # layers, heads, sub-stack input MLP
    T = int(args.song_seconds * 25)
    ctx = prefix + T / 2  # mean attended length while decoding
    attn = 4 * (L1 + L2) * D * ctx  # QK^T and AV per token
    fwd_per_frame = 2 * stack + attn  # FLOPs of one forward per frame (2 per weight, plus attention)
    cands = args.prompts * args.per_prompt
    gen_flops = 2 * fwd_per_frame * T * cands  # x2: CFG runs the conditional and unconditional halves
    peak = args.gpu_tflops * 1e12
    weight_bytes = stack * 2  # bf16
    steps = T * -(-cands // args.gen_batch)  # decoding steps: one per frame per generation batch
    gen_mem_s = steps * weight_bytes / (args.hbm_tbs * 1e12)
    gen_s = max(gen_flops / (peak * args.gen_mfu), gen_mem_s)
    score_s = fwd_per_frame * T * cands / (peak * args.train_mfu)  # an RM the policy's size: one forward
    # one DPO step: policy forward + backward (3 forwards' FLOPs) + reference forward, 2 songs per pair
    train_flops = args.sync_every * args.batch * 2 * T * fwd_per_frame * (3 + 1)
    train_s = train_flops / (peak * args.train_mfu)
    total = gen_s + score_s + train_s
    return {"model": "v2-large LeLM (D 2048, F 11008, 36+12 layers)", "song_seconds": args.song_seconds,
            "candidates": cands, "assumptions": {"gpu_tflops_bf16": args.gpu_tflops, "gen_mfu": args.gen_mfu,
                                                 "train_mfu": args.train_mfu, "hbm_TB_s": args.hbm_tbs,
                                                 "gen_batch": args.gen_batch},
            "seconds": {"generate": round(gen_s), "score": round(score_s), "train": round(train_s)},
            "share": {"generate": round(gen_s / total, 3), "score": round(score_s / total, 3),
                      "train": round(train_s / total, 3)},
            "generate_memory_bound_seconds": round(gen_mem_s), "cycle_hours": round(total / 3600, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", default="runs/sft/export", help="toy SFT export (the policy)")
    ap.add_argument("--rm", default=None, help="reward-model export (default: the toy world's hidden oracle)")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--sync-every", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gen-batch", type=int, default=128)
    ap.add_argument("--skip-measure", action="store_true", help="print the projection only")
    g = ap.add_argument_group("projection (v2-large, one GPU)")
    g.add_argument("--song-seconds", type=float, default=150.0)
    g.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    g.add_argument("--hbm-tbs", type=float, default=4.8, help="memory bandwidth, TB/s (H200: 4.8)")
    g.add_argument("--gen-mfu", type=float, default=0.25)
    g.add_argument("--train-mfu", type=float, default=0.4)
    args = ap.parse_args()
    out: dict[str, Any] = {}
    if not args.skip_measure:
        out["measured_cpu"] = measure(args)
    out["projected_gpu"] = project(args)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
