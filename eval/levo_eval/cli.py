"""``levo-eval``: evaluation commands.

``levo-eval toy --ckpt EXPORT_DIR --n N --seed S [--tier top|none|high|...]`` samples N songs for
held-out toy-world conditions with the shared sampler and prints one JSON object: the mean hidden
quality with its standard error, the toy PER and the mean of every quality dimension. The same
seed gives the same numbers.

``levo-eval compare --base SFT_EXPORT --ckpt DPO_EXPORT [...] --n N --seed S [--tier ...]`` scores
every export on the same conditions with the same sampling seeds and reports, per export, quality
and toy PER with their standard errors and the change against the base: ``delta``, ``z`` (delta over
the combined standard error of two independent means, the conservative figure) and ``paired_se``
(standard error of the per-condition differences). ``--tier top none`` (or ``both``) compares each
tier on its own: a JSON list, or with ``--table`` one markdown table per tier.

``levo-eval reward --rm RM_EXPORT --policy SFT_EXPORT --n N --seed S [--tier both|top|none]`` samples N
held-out toy songs from the policy, scores them with the reward model and prints, as its last line,
one JSON object: for ``overall`` (against the hidden quality) and each dimension ``{"lcc", "srcc",
"ktau", "pair_acc"}`` (pairs whose hidden margin is >= 0.05). The same seed gives the same numbers.
``--table`` prints them as a markdown table instead.

``levo-eval audio-score --audio DIR [--scorer MODULE:FUNCTION ...] [--requested JSONL] [--out FILE.json]``
runs audio scorer functions over a folder of audio files (see :mod:`levo_eval.audio_score`).

``levo-eval tokens --ref DIR --gen DIR [--rm EXPORT] [--out FILE.json]``: length, EOS, codebook and
repetition metrics of two token sets, reward-model scores and their Fréchet distance (see
:mod:`levo_eval.token_metrics`).

``levo-eval per --audio DIR|JSONL --lyrics FILE.jsonl --asr MODEL_DIR [--lang en|zh|auto] [--out FILE.json]``
transcribes songs with a local Whisper model and prints a per-song table, then as its last line one JSON
object with ``corpus_per`` and ``songs`` (see :mod:`levo_eval.per`; needs ``pip install -e '.[eval]'``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from levo_eval.audio_score import AUDIO_SCORE_COMMANDS
from levo_eval.errors import UsageError
from levo_eval.per import PER_COMMANDS
from levo_eval.token_metrics import TOKENS_COMMANDS
from levo_infer import load_model
from levo_infer.checkpoint import CheckpointError
from levo_infer.commands import Command, add_commands, run_command
from levo_infer.config import ConfigError
from levo_infer.jsonio import dumps as strict_dumps
from levo_train.reward.evaluate import reward_eval
from levo_train.rollout import Sampling, sample_and_score
from levo_train.toy.pairs import heldout_prompts
from levo_train.toy.scorer import ToyOracleScorer
from levo_train.toy.world import TIER_CHOICES


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def toy_samples(ckpt: str, *, n: int, seed: int, tier: str = "top", world_seed: int = 0,
                batch_size: int = 128, max_frames: int = 96, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 0.0, cfg_coef: float | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """Generate and score ``n`` songs for held-out conditions (:func:`levo_train.rollout.sample_and_score`
    with the toy world's hidden scores); one dict per song."""
    if tier not in TIER_CHOICES:
        raise UsageError(f"unknown --tier {tier!r}; choose from {', '.join(TIER_CHOICES)}")
    scorer = ToyOracleScorer(world_seed)
    model = load_model(ckpt, device=device)
    prompts = heldout_prompts(scorer.world, n, seed=seed, tier=tier)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg_coef, max_frames=max_frames,
                        batch_size=batch_size)
    cands = sample_and_score(model, prompts, scorer, sampling, seed=seed)
    return [{"lyric": c.song.lyric, "style": c.song.style, "frames": c.frames, "scores": c.scores,
             "per": float(scorer.world.per(c.song.tokens, c.song.lyric))} for c in cands]


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    q, se = mean_se([s["scores"]["quality"] for s in samples])
    per, per_se = mean_se([s["per"] for s in samples])
    dims = sorted({k for s in samples for k in s["scores"] if k != "quality"})
    frames, _ = mean_se([float(s["frames"]) for s in samples])
    return {
        "quality": q, "quality_se": se, "n": len(samples), "per": per, "per_se": per_se,
        "dimensions": {d: mean_se([s["scores"][d] for s in samples])[0] for d in dims},
        "mean_frames": frames,
    }


def cmd_toy(args: argparse.Namespace) -> int:
    t0 = time.time()
    samples = toy_samples(args.ckpt, **_sampling_kwargs(args))
    res = summarize(samples)
    res.update({"ckpt": args.ckpt, "seed": args.seed, "tier": args.tier, "temperature": args.temperature,
                "top_k": args.top_k, "seconds": round(time.time() - t0, 2)})
    print(strict_dumps(res, nonfinite="null"))
    return 0


def _paired(a: list[float], b: list[float]) -> dict[str, float]:
    ma, sa = mean_se(a)
    mb, sb = mean_se(b)
    delta = mb - ma
    _, pse = mean_se([y - x for x, y in zip(a, b)])
    comb = math.sqrt(sa * sa + sb * sb)
    return {"delta": delta, "z": delta / comb if comb > 0 else float("nan"), "paired_se": pse}


def compare(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary of ``other`` plus its change against ``base`` (same conditions, same order)."""
    if [s["lyric"] for s in base] != [s["lyric"] for s in other]:
        raise ValueError("compare needs samples of the same conditions in the same order")
    res = summarize(other)
    res["vs_base"] = {
        "quality": _paired([s["scores"]["quality"] for s in base], [s["scores"]["quality"] for s in other]),
        "per": _paired([s["per"] for s in base], [s["per"] for s in other]),
    }
    return res


def compare_tiers(args: argparse.Namespace) -> list[str]:
    """The tiers ``compare --tier`` asks for, in order (``both``: top, then none)."""
    tiers: list[str] = []
    for t in args.tier:
        for x in (("top", "none") if t == "both" else (t,)):
            if x not in tiers:
                tiers.append(x)
    return tiers


def cmd_compare(args: argparse.Namespace) -> int:
    """``levo-eval compare``: one result per tier (``--tier top none`` or ``both``: a JSON list of
    them, or one table each)."""
    results = []
    for tier in compare_tiers(args):
        t0 = time.time()
        kw = {**_sampling_kwargs(args), "tier": tier}
        base = toy_samples(args.base, **kw)
        out = {"base": {"ckpt": args.base, **summarize(base)}, "n": args.n, "seed": args.seed, "tier": tier,
               "temperature": args.temperature, "top_k": args.top_k, "ckpts": []}
        for ck in args.ckpt:
            out["ckpts"].append({"ckpt": ck, **compare(base, toy_samples(ck, **kw))})
        out["seconds"] = round(time.time() - t0, 2)
        results.append(out)
    if args.table:
        print("\n\n".join(markdown_table(r) for r in results))
    else:
        print(strict_dumps(results[0] if len(results) == 1 else results, nonfinite="null", indent=1))
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    """``levo-eval reward``: the last stdout line is the metrics JSON (see the module docstring)."""
    t0 = time.time()
    try:
        res = reward_eval(args.rm, args.policy, n=args.n, seed=args.seed, tier=args.tier, world_seed=args.world_seed,
                          batch_size=args.batch_size, max_frames=args.max_frames, temperature=args.temperature,
                          device=args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"levo-eval: error: {e}", file=sys.stderr)
        return 2
    info = res.pop("_info")
    print(f"levo-eval reward: {info['n']} songs (tier {info['tier']}, temperature {info['temperature']}), mean hidden "
          f"quality {info['mean_quality']:.4f}, {time.time() - t0:.1f}s", file=sys.stderr)
    if args.table:
        print(reward_table(res))
    else:
        print(strict_dumps(res, nonfinite="null"))
    return 0


def reward_table(res: dict[str, Any]) -> str:
    """``levo-eval reward --table``: one markdown row per target (overall, then each dimension) with
    the reward model's correlations to the hidden scores and its pair accuracy."""
    def f(v: Any) -> str:
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"

    rows = ["| target | LCC | SRCC | Kendall τ | pair accuracy |", "|---|---|---|---|---|"]
    for name, m in res.items():
        rows.append(f"| {name} | {f(m['lcc'])} | {f(m['srcc'])} | {f(m['ktau'])} | {f(m['pair_acc'])} |")
    return "\n".join(rows)


def markdown_table(res: dict[str, Any]) -> str:
    """One row per export of a ``compare`` result: quality and PER (mean ± SE), change vs the base."""
    def row(r: dict[str, Any], vs: dict[str, Any] | None) -> str:
        q = f"{r['quality']:.3f} ± {r['quality_se']:.3f}"
        p = f"{r['per']:.3f} ± {r['per_se']:.3f}"
        if vs is None:
            dq = dp = "—"
        else:
            dq = f"{vs['quality']['delta']:+.3f} ({vs['quality']['z']:+.1f} SE)"
            dp = f"{vs['per']['delta']:+.3f} ({vs['per']['z']:+.1f} SE)"
        dims = ", ".join(f"{k} {v:.2f}" for k, v in r["dimensions"].items())
        return f"| {r['ckpt']} | {q} | {dq} | {p} | {dp} | {dims} | {r['mean_frames']:.1f} |"

    head = (f"tier {res['tier']}, n = {res['n']}, seed {res['seed']}, temperature {res['temperature']}\n\n"
            "| export | quality | Δ quality | toy PER | Δ PER | dimensions | frames |\n|---|---|---|---|---|---|---|")
    return "\n".join([head, row(res["base"], None), *(row(r, r["vs_base"]) for r in res["ckpts"])])


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`toy_samples` keywords from the options of :func:`_sampling_args`."""
    return {"n": args.n, "seed": args.seed, "tier": args.tier, "world_seed": args.world_seed,
            "batch_size": args.batch_size, "max_frames": args.max_frames, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "cfg_coef": args.cfg_coef, "device": args.device}


def _sampling_args(t: argparse.ArgumentParser, *, several_tiers: bool = False) -> None:
    t.add_argument("--n", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    if several_tiers:  # compare: each tier its own result
        t.add_argument("--tier", nargs="+", default=["top"], choices=(*TIER_CHOICES, "both"),
                       help="style tier tag(s), each compared on its own (default: top; both = top none); several: "
                            "a JSON list, or one table per tier")
    else:
        t.add_argument("--tier", default="top", choices=TIER_CHOICES,
                       help="style tier tag (default: top, as released inference; none: no tag)")
    t.add_argument("--world-seed", type=int, default=0, help="seed of the toy world the model was trained on")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--max-frames", type=int, default=96)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-k", type=int, default=0)
    t.add_argument("--top-p", type=float, default=0.0)
    t.add_argument("--cfg-coef", type=float, default=None, help="default: the model config's inference coef")
    t.add_argument("--device", default="cpu")


def _toy_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--ckpt", required=True, help="export folder (config.yaml + model.pt)")
    _sampling_args(t)


def _compare_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--base", required=True, help="the export to compare against (e.g. the SFT export)")
    c.add_argument("--ckpt", required=True, nargs="+", help="export folder(s) to compare")
    c.add_argument("--table", action="store_true", help="print a markdown table instead of JSON (one per tier)")
    _sampling_args(c, several_tiers=True)


def _reward_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--rm", required=True, help="reward-model export folder (RUN/export of recipe=reward)")
    r.add_argument("--policy", required=True, help="policy export that samples the songs (e.g. the SFT export)")
    r.add_argument("--n", type=int, default=512)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tier", default="both", choices=("both", "top", "none"),
                   help="style tier: both (half top tier, half untagged; default), top or none")
    r.add_argument("--world-seed", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--max-frames", type=int, default=96)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--device", default="cpu")
    r.add_argument("--table", action="store_true", help="print a markdown table instead of the JSON line")


#: name -> subcommand (the command table of every levo tool, :mod:`levo_infer.commands`)
COMMANDS: dict[str, Command] = {
    "toy": Command("sample and score held-out toy-world songs", _toy_args, cmd_toy),
    "compare": Command("score exports against a base export on the same toy conditions", _compare_args, cmd_compare),
    "reward": Command("how well a reward-model export ranks a policy's held-out toy songs", _reward_args, cmd_reward),
    **AUDIO_SCORE_COMMANDS,  # audio-score (levo_eval.audio_score)
    **TOKENS_COMMANDS,  # tokens (levo_eval.token_metrics)
    **PER_COMMANDS,  # per (levo_eval.per; its heavy packages load only when it runs)
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="levo-eval", description=__doc__.split("\n\n")[0])
    add_commands(p.add_subparsers(dest="command", required=True), COMMANDS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(COMMANDS, args)
    except (CheckpointError, ConfigError, UsageError) as e:  # a model folder that does not load names the file
        print(f"levo-eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
