"""Generation engine benchmark (issue #22; not a test).

(a) batch-1 latency per song on the 100-frame setting: the inference benchmark's model (dim 256,
    2+1 layers, 16385-way heads, the released 952-token prefix, CFG, compat sampling top-k 50,
    temperature 0.8) with v2's delays [0, 250, 250], so a 100-frame song takes 350 pattern steps;
    with ``--baseline-src DIR`` (a source tree holding ``inference/levo_infer``, e.g. ``git archive
    main``) the same measurement runs alternately with that code, in fresh processes;
(b) mixed-length workloads, the same songs bit for bit under three policies at the same slot count:
    ``static`` (a batch holds its slots until its longest song ends), ``static-drop`` (the same batches,
    finished songs leave the step: on CPU a step costs in proportion to its rows, so this is the
    strongest static baseline here) and ``continuous``; best of ``--mixed-rounds`` / ``--rounds``
    alternating rounds: the model of (a) with delays [0, 2, 2], distinct lyrics and frame limits drawn
    uniformly from 25..250 (seeded; the 1:10 range of the released ``min_dur``..``max_dur``, 30..270 s;
    EOS never sampled, so every song runs to its limit; ``--v2-workload``: delays [0, 250, 250] and
    100..1000 frames), and with ``--toy-init`` the toy world's own workload (a toy SFT export sampling
    held-out conditions, lengths set by its EOS, one ``levo-eval``/``levo-data sample`` engine call:
    ``Sampling.batch_size`` 128 slots x ``QUEUE_PER_SLOT`` songs);
(c) the memory planner's predicted peak against the measured peak RSS of a fresh process (above its
    own baseline after the imports), at three slot counts for a tiny and a medium model;
(d) the planner's slot counts for the v2-large config on 16 / 24 / 80 GB cards (bf16, songs of
    270 s; KV cache bf16 and 8-bit);
(e) the 8-bit KV cache: logit error against the full-precision cache along the same token sequences
    (teacher-forced through the engine's cache path) and, with ``--toy-init EXPORT``, the toy world's
    hidden quality of sampled songs (same held-out conditions and seeds) for both caches.

    OMP_NUM_THREADS=1 python eval/bench/bench_engine.py [--toy-init SFT_EXPORT] [--baseline-src DIR] [--quick]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levo_infer import load_model
from levo_infer.config import ModelConfig, make_config
from levo_infer.engine import planned_steps
from levo_infer.generate import generate
from levo_infer.model import LeLM
from levo_infer.pattern import build_delayed
from levo_infer.planner import GIB, InsufficientMemoryError, param_count, plan_generation
from levo_infer.styles import null_styles
from levo_train.data.shards import Song
from levo_train.toy.pairs import heldout_prompts
from levo_train.toy.scorer import ToyOracleScorer

WORDS = ["<unk>", ".", ",", "la", "da", "love", "night", "rock", "pop", "sad", "happy"]
LYRIC = "[verse] la da love . night la ; [chorus] love love"
STYLE = "[Musicality-very-high], rock, sad"
SIZES = {  # name: (dim, heads, layers, layers_sub, intermediate)
    "tiny": (256, 2, 2, 1, 512),
    "medium": (1024, 8, 4, 2, 2816),
}

MODEL_SRC = textwrap.dedent("""
    import torch
    from levo_infer.config import make_config
    from levo_infer.model import LeLM
    WORDS = {words!r}
    def song_lyrics(n, seed=0):  # n distinct lyrics: no two songs share a prefix (CFG's null rows still do)
        import random
        rng, w = random.Random(seed), WORDS[3:]
        return ["[verse] " + " ".join(rng.choice(w) for _ in range(6)) + " ; [chorus] "
                + " ".join(rng.choice(w) for _ in range(4)) + f" . {{i}}" for i in range(n)]
    def bench_model(dim, heads, layers, layers_sub, inter, delays):
        cfg = make_config(dim=dim, num_heads=heads, num_layers=layers, num_layers_sub=layers_sub,
                          intermediate_size=inter, code_size=16384, delays=delays, lyric_max_len=600,
                          style_max_len=100, prompt_frames=250, text_words=WORDS)
        torch.manual_seed(0)
        m = LeLM(cfg)
        m.init_weights(std=0.02)
        with torch.no_grad():  # EOS logit 0: never in the top-k of 16384 random logits, songs run to their limit
            m.transformer.lm_head.weight[m.eos_id].zero_()
            for lin in m.linears:
                lin.weight[m.eos_id].zero_()
        return m.eval()
""").format(words=WORDS)
_NS: dict[str, Any] = {}
exec(MODEL_SRC, _NS)  # the child processes below run the same source


def song_lyrics(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct lyrics: no two songs share a prefix (CFG's null rows still do)."""
    return _NS["song_lyrics"](n, seed)


def bench_model(dim: int, heads: int, layers: int, layers_sub: int, inter: int, delays: list[int]) -> LeLM:
    """The inference benchmark's small LeLM with the released prefix lengths and EOS never sampled."""
    return _NS["bench_model"](dim, heads, layers, layers_sub, inter, delays)


# ----------------------------------------------------------------------------- (a) batch-1 latency
LATENCY_CHILD = MODEL_SRC + textwrap.dedent("""
    import json, sys, time
    from levo_infer.generate import generate
    torch.set_num_threads(1)
    frames, reps = int(sys.argv[1]), int(sys.argv[2])
    m = bench_model(256, 2, 2, 1, 512, [0, 250, 250])
    L, S = [{lyric!r}], [{style!r}]
    generate(m, L, S, max_frames=2, compat=True, top_k=50, seed=0)  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = generate(m, L, S, max_frames=frames, compat=True, top_k=50, temperature=0.8, seed=0)
        ts.append(time.perf_counter() - t0)
    print(json.dumps({{"seconds": ts, "steps": int(out.steps), "frames": int(out.lengths.sum())}}))
""").format(lyric=LYRIC, style=STYLE)


def _child(src: str, argv: list[str], pythonpath: str | None = None) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", src, *argv], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Best time per song over ``rounds`` alternating child processes (ours, then the baseline)."""
    base_path = str(Path(args.baseline_src) / "inference") if args.baseline_src else None
    ours: list[float] = []
    base: list[float] = []
    info: dict[str, Any] = {}
    for r in range(args.rounds):
        o = _child(LATENCY_CHILD, [str(args.latency_frames), str(args.reps)])
        ours += o["seconds"]
        info = {"steps": o["steps"], "frames": o["frames"]}
        if base_path:
            base += _child(LATENCY_CHILD, [str(args.latency_frames), str(args.reps)], base_path)["seconds"]
        print(f"  (a) round {r + 1}: ours best {min(ours):.3f} s/song" +
              (f", baseline best {min(base):.3f} s/song" if base else ""), flush=True)
    out = {"frames": args.latency_frames, **info, "seconds_per_song": min(ours), "songs_per_s": 1 / min(ours),
           "ms_per_step": 1000 * min(ours) / max(info["steps"], 1), "all_seconds": ours}
    if base:
        out.update(baseline_seconds_per_song=min(base), baseline_songs_per_s=1 / min(base),
                   speedup=min(base) / min(ours), baseline_all_seconds=base, baseline_src=args.baseline_src)
    return out


# ----------------------------------------------------------------------------- (b) static vs continuous
POLICY_ORDER = ("static", "static-drop", "continuous")


def _policy_runs(run, songs: int, rounds: int, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Alternate the three policies ``rounds`` times; the best time of each (the machine is shared)."""
    outs: dict[str, Any] = {}
    best: dict[str, float] = {}
    for _ in range(rounds):
        for policy in POLICY_ORDER:
            t0 = time.perf_counter()
            outs[policy] = run(policy)
            best[policy] = min(best.get(policy, math.inf), time.perf_counter() - t0)
    res: dict[str, Any] = {}
    for policy in POLICY_ORDER:
        out, dt = outs[policy], best[policy]
        frames = int(out.lengths.sum())
        res[policy] = {"seconds": dt, "songs_per_s": songs / dt, "frames_per_s": frames / dt, "decode_steps": out.steps,
                       "prefilled_rows": out.prefilled_rows, "moves": out.moves}
        print(f"  (b) {label}, {policy:11s}: {dt:7.2f} s, {songs / dt:8.3f} songs/s, {frames / dt:6.0f} frames/s, "
              f"{out.steps} decode steps, {out.prefilled_rows} rows prefilled, {out.moves} moves", flush=True)
    res["bit_identical"] = all(torch.equal(outs[p].raw_codes, outs["continuous"].raw_codes) for p in POLICY_ORDER)
    res["speedup"] = res["continuous"]["songs_per_s"] / res["static"]["songs_per_s"]
    res["speedup_vs_static_drop"] = res["continuous"]["songs_per_s"] / res["static-drop"]["songs_per_s"]
    return res, outs


def bench_mixed(args: argparse.Namespace, delays: list[int], lo: int, hi: int, songs: int) -> dict[str, Any]:
    """Songs of distinct lyrics and uniform frame limits (EOS never sampled: each runs to its limit)."""
    m = bench_model(256, 2, 2, 1, 512, delays)
    rng = random.Random(args.seed)
    frames = [rng.randint(lo, hi) for _ in range(songs)]
    L, S = song_lyrics(songs, args.seed), [STYLE] * songs
    seeds = list(range(songs))
    generate(m, L[:1], S[:1], max_frames=2, compat=True, top_k=50, seed=0)  # warm-up
    res: dict[str, Any] = {"delays": delays, "songs": songs, "slots": args.slots, "frames_lo": lo, "frames_hi": hi,
                           "frames_mean": sum(frames) / songs, "distribution": f"uniform integer {lo}..{hi} frames",
                           "planned_steps": {p: planned_steps([f + max(delays) for f in frames], args.slots, p)
                                             for p in ("static", "continuous")}}
    run = lambda policy: generate(m, L, S, max_frames=frames, compat=True, top_k=50, temperature=0.8,  # noqa: E731
                                  seed=seeds, slots=args.slots, policy=policy)
    out, _ = _policy_runs(run, songs, args.mixed_rounds,
                          f"delays {delays}, {songs} songs of {lo}..{hi} frames, {args.slots} slots")
    res.update(out)
    return res


def bench_mixed_toy(args: argparse.Namespace) -> dict[str, Any]:
    """The toy world's own workload (``levo-eval toy`` / sDPO rounds: ``Sampling.batch_size`` 128 slots, one
    engine call of ``QUEUE_PER_SLOT`` songs per slot): held-out conditions sampled at temperature 1 from a
    toy SFT export, up to 96 frames, lengths set by the policy's EOS."""
    scorer = ToyOracleScorer(0)
    m = load_model(args.toy_init)
    prompts = heldout_prompts(scorer.world, args.toy_songs, seed=args.seed, tier="top")
    lyr, sty = [p.lyric for p in prompts], [p.style for p in prompts]
    seeds = [args.seed * 1_000_003 + i for i in range(len(prompts))]
    generate(m, lyr[:2], sty[:2], max_frames=4, seed=0)  # warm-up
    res: dict[str, Any] = {"songs": len(prompts), "slots": args.toy_slots, "max_frames": 96,
                           "distribution": "the toy SFT export's own EOS-driven lengths (held-out top-tier "
                                           "conditions, temperature 1, at most 96 frames)"}
    run = lambda policy: generate(m, lyr, sty, max_frames=96, temperature=1.0, seed=seeds,  # noqa: E731
                                  slots=args.toy_slots, policy=policy)
    out, outs = _policy_runs(run, len(prompts), args.rounds, f"toy SFT export, {len(prompts)} songs, {args.toy_slots} slots")
    res.update(out)
    lengths = outs["static"].lengths.float()
    res.update(frames_mean=float(lengths.mean()), frames_min=int(lengths.min()), frames_max=int(lengths.max()),
               frames_std=float(lengths.std()))
    return res


# ----------------------------------------------------------------------------- (c) planner vs measured peak
PEAK_CHILD = MODEL_SRC + textwrap.dedent("""
    import json, sys
    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * 4096
    def peak():
        for line in open('/proc/self/status'):
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    from levo_infer.generate import generate
    torch.set_num_threads(1)
    dims = json.loads(sys.argv[1]); slots, frames, kv = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    base = rss()
    m = bench_model(*dims, [0, 250, 250])
    class Stop(Exception):
        pass
    def progress(step, total, running):
        if step >= 3:
            raise Stop
    n = 2 * slots  # a queue longer than the slots: every slot is filled
    try:
        generate(m, song_lyrics(n), [{style!r}] * n, max_frames=frames, compat=True, top_k=50, seed=0, slots=slots,
                 kv_bits=None if kv == 'none' else int(kv), progress=progress)
    except Stop:
        pass
    print(json.dumps({{"base": base, "peak": peak()}}))
""").format(style=STYLE)


def bench_planner_check(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    grid = {"tiny": (4, 16, 32), "medium": (1, 3, 6)}
    for size, slot_counts in grid.items():
        dim, heads, layers, layers_sub, inter = SIZES[size]
        cfg = _cfg(dim, heads, layers, layers_sub, inter)
        for slots in slot_counts[:1] if args.quick else slot_counts:
            plan = plan_generation(cfg, memory_gb=1e6, max_frames=args.peak_frames, dtype=torch.float32,
                                   prompt_ban=False, max_slots=slots)
            r = _child(PEAK_CHILD, [json.dumps(list(SIZES[size])), str(slots), str(args.peak_frames), "none"])
            measured = r["peak"] - r["base"]
            pred = plan.predicted_bytes(slots)
            row = {"size": size, "slots": slots, "frames": args.peak_frames, "predicted_mib": pred / 2**20,
                   "measured_mib": measured / 2**20, "error": measured / pred - 1,
                   "weights_mib": plan.weights_bytes / 2**20, "cache_mib": slots * plan.cache_bytes_per_song / 2**20,
                   "workspace_mib": plan.workspace_bytes(slots) / 2**20}
            rows.append(row)
            print(f"  (c) {size:6s} {slots:3d} slots, {args.peak_frames} frames: predicted {row['predicted_mib']:8.1f} MiB "
                  f"(weights {row['weights_mib']:.0f}, cache {row['cache_mib']:.0f}, workspace "
                  f"{row['workspace_mib']:.0f}), measured {row['measured_mib']:8.1f} MiB ({row['error']:+.1%})",
                  flush=True)
    return rows


def _cfg(dim: int, heads: int, layers: int, layers_sub: int, inter: int) -> ModelConfig:
    return make_config(dim=dim, num_heads=heads, num_layers=layers, num_layers_sub=layers_sub, intermediate_size=inter,
                       code_size=16384, delays=[0, 250, 250], lyric_max_len=600, style_max_len=100, prompt_frames=250,
                       text_words=WORDS)


# ----------------------------------------------------------------------------- (d) v2-large on real cards
def bench_planner_v2(args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = make_config(dim=2048, num_heads=16, num_layers=36, num_layers_sub=12, intermediate_size=11008)
    params = param_count(cfg)
    frames = int(args.v2_seconds * cfg.frame_rate)
    rows = []
    for gb in (16, 24, 80):
        for kv in (None, 8):
            try:
                p = plan_generation(cfg, memory_gb=gb * 1e9 / GIB, max_frames=frames, dtype=torch.bfloat16, kv_bits=kv,
                                    params=params)
                row = {"card_gb": gb, "kv": "8-bit" if kv else "bf16", "slots": p.slots,
                       "weights_gib": p.weights_bytes / GIB, "cache_gib_per_song": p.cache_bytes_per_song / GIB,
                       "predicted_gib": p.predicted_bytes() / GIB}
            except InsufficientMemoryError as e:
                row = {"card_gb": gb, "kv": "8-bit" if kv else "bf16", "slots": 0, "refused": str(e)}
            rows.append(row)
            print(f"  (d) v2-large ({params / 1e9:.2f} B params, bf16), {frames}-frame songs, {gb} GB card, KV "
                  f"{row['kv']}: {row['slots']} slots" + (f" (predicted {row['predicted_gib']:.1f} GiB, cache "
                                                         f"{row['cache_gib_per_song']:.2f} GiB/song)"
                                                         if row['slots'] else f": {row['refused']}"), flush=True)
    return rows


# ----------------------------------------------------------------------------- (e) 8-bit KV cache quality
@torch.no_grad()
def teacher_forced_logits(m: LeLM, lyric: str, style: str, tokens: torch.Tensor, bits: int | None) -> torch.Tensor:
    """CFG logits [S, K, V] along pattern steps ``tokens`` [K, S] through the engine's cache path."""
    K, S = tokens.shape
    cond = m.prepare_conditions([lyric, None], [style, null_styles([style], m.cfg.version)[0]])
    caches = m.new_slot_caches(2, m.cfg.prefix_len + S + 1, bits=bits)
    for c in caches:
        c.rows, c.pos, c.mask = slice(0, 2), None, None
    empty = torch.empty((2, K, 0), dtype=torch.long)
    m.step_hidden(empty, m.condition_prefix(cond), caches)
    kpos = torch.arange(caches[0].max_len)
    out = []
    for s in range(S):
        pos = torch.full((2,), m.cfg.prefix_len + s)
        n = int(pos[0]) + 1
        mask = torch.where(kpos[:n][None] <= pos[:, None], 0.0, float("-inf")).view(2, 1, 1, n)
        for c in caches:
            c.pos, c.mask, c.key_len = pos, mask, n
        h1, h2 = m.step_hidden(tokens[None, :, s:s + 1].expand(2, K, 1), None, caches)
        lg = torch.stack([m.head(k, (h1 if k == 0 else h2)[:, -1]).float() for k in range(K)], 1)
        out.append(lg[1] + (lg[0] - lg[1]) * m.cfg.cfg_coef)
    return torch.stack(out)


def logit_error(m: LeLM, lyrics: list[str], styles: list[str], frames: int) -> dict[str, float]:
    gen = generate(m, lyrics, styles, max_frames=frames, compat=True, top_k=1, seed=0)
    errs, rel, agree, n = 0.0, 0.0, 0.0, 0
    for i in range(len(lyrics)):
        L = int(gen.lengths[i])
        if L < 2:
            continue
        steps = build_delayed(gen.codes[i:i + 1, :, :L], m.cfg.delays, m.pad_id)[0, :, :-1]
        full = teacher_forced_logits(m, lyrics[i], styles[i], steps, None)
        q8 = teacher_forced_logits(m, lyrics[i], styles[i], steps, 8)
        ok = torch.isfinite(full) & torch.isfinite(q8)
        d = (q8 - full)[ok].abs()
        errs = max(errs, float(d.max()))
        rel += float(d.mean() / full[ok].std()) * 1
        agree += float((q8.argmax(-1) == full.argmax(-1)).float().mean())
        n += 1
    return {"max_abs": errs, "mean_abs_over_logit_std": rel / max(n, 1), "argmax_agreement": agree / max(n, 1),
            "songs": n}


def toy_quality(init: str, n: int, seed: int) -> dict[str, Any]:
    scorer = ToyOracleScorer(0)
    m = load_model(init)
    prompts = heldout_prompts(scorer.world, n, seed=seed, tier="top")
    lyr, sty = [p.lyric for p in prompts], [p.style for p in prompts]
    res: dict[str, Any] = {"n": n, "seed": seed}
    q = {}
    for bits in (None, 8):
        out = generate(m, lyr, sty, max_frames=96, temperature=1.0, seed=[seed * 1_000_003 + i for i in range(n)],
                       kv_bits=bits, slots=128)
        songs = [Song(f"s{i}", np.ascontiguousarray(out.codes[i, :, :int(out.lengths[i])].numpy(), dtype=np.int64),
                      p.lyric, p.style or "", None, {}) for i, p in enumerate(prompts)]
        q[bits] = [s["quality"] for s in scorer.score(songs)]
        mean = sum(q[bits]) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in q[bits]) / (n - 1) / n)
        res["8bit" if bits else "full"] = {"quality": mean, "se": se}
    same = sum(a == b for a, b in zip(q[None], q[8]))
    diff = [b - a for a, b in zip(q[None], q[8])]
    md = sum(diff) / n
    res["paired_diff"] = md
    res["paired_se"] = math.sqrt(sum((x - md) ** 2 for x in diff) / (n - 1) / n)
    res["identical_scores"] = same
    res["logit_error"] = logit_error(m, lyr[:8], sty[:8], 96)
    return res


def bench_kv8(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = bench_model(256, 2, 2, 1, 512, [0, 2, 2])
    with torch.no_grad():  # random weights with trained-like logit spread (std ~1)
        m.transformer.lm_head.weight.mul_(20.0)
        for lin in m.linears:
            lin.weight.mul_(20.0)
    out["random_tiny"] = logit_error(m, [LYRIC] * 2, [STYLE] * 2, 48)
    print(f"  (e) 8-bit KV cache, random tiny model: {out['random_tiny']}", flush=True)
    if args.toy_init:
        out["toy"] = toy_quality(args.toy_init, args.toy_n, args.seed)
        t = out["toy"]
        print(f"  (e) toy SFT export, {t['n']} held-out songs: full cache {t['full']['quality']:.4f} ± "
              f"{t['full']['se']:.4f}, 8-bit {t['8bit']['quality']:.4f} ± {t['8bit']['se']:.4f}; paired difference "
              f"{t['paired_diff']:+.4f} ± {t['paired_se']:.4f}; logit error {t['logit_error']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-src", default=None, help="a source tree with inference/levo_infer to compare (a)")
    ap.add_argument("--latency-frames", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--songs", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--peak-frames", type=int, default=1000)
    ap.add_argument("--v2-seconds", type=float, default=270.0)
    ap.add_argument("--toy-init", default=None, help="toy SFT export for the 8-bit cache's toy quality")
    ap.add_argument("--toy-n", type=int, default=512)
    ap.add_argument("--toy-songs", type=int, default=1024, help="songs of the toy workload in (b)")
    ap.add_argument("--toy-slots", type=int, default=128, help="slots of the toy workload (Sampling.batch_size)")
    ap.add_argument("--mixed-rounds", type=int, default=3, help="rounds of the uniform workload in (b) (~1.5 min each)")
    ap.add_argument("--v2-workload", action="store_true", help="(b) also with v2's delays and 100..1000-frame songs "
                    "(minutes on CPU)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="sections: latency mixed peak v2 kv8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.rounds, args.reps, args.songs, args.toy_n, args.toy_songs, args.toy_slots = 1, 1, 16, 128, 128, 32
        args.mixed_rounds = 1
    want = lambda s: args.only is None or s in args.only  # noqa: E731
    res: dict[str, Any] = {"threads": 1, "torch": torch.__version__}
    if want("latency"):
        res["latency"] = bench_latency(args)
    if want("mixed"):
        res["mixed"] = [bench_mixed(args, [0, 2, 2], 25, 250, args.songs)] if args.songs else []
        if args.v2_workload:
            res["mixed"].append(bench_mixed(args, [0, 250, 250], 100, 1000, args.songs))
        if args.toy_init:
            res["mixed_toy"] = bench_mixed_toy(args)
    if want("peak"):
        res["planner_check"] = bench_planner_check(args)
    if want("v2"):
        res["planner_v2_large"] = bench_planner_v2(args)
    if want("kv8"):
        res["kv8"] = bench_kv8(args)
    text = json.dumps(res, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
