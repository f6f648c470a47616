"""``levo-eval``: evaluation commands.

``levo-eval toy --ckpt EXPORT_DIR --n N --seed S [--tier top|none|high|...]`` samples N songs for
held-out toy-world conditions with the shared sampler and prints one JSON object: the mean hidden
quality with its standard error, the toy PER and the mean of every quality dimension. The same
seed gives the same numbers.

``levo-eval compare --base SFT_EXPORT --ckpt DPO_EXPORT [...] --n N --seed S [--tier ...]`` scores
every export on the same conditions with the same sampling seeds and reports, per export, quality
and toy PER with their standard errors and the change against the base: ``delta``, ``z`` (delta over
the combined standard error of two independent means, the conservative figure) and ``paired_se``
(standard error of the per-condition differences).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

TIERS = {
    "top": "[Musicality-very-high]", "very-high": "[Musicality-very-high]", "high": "[Musicality-high]",
    "medium": "[Musicality-medium]", "low": "[Musicality-low]", "very-low": "[Musicality-very-low]", "none": None,
}


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
    """Generate and score ``n`` songs for held-out conditions; one dict per song."""
    from levo_infer.checkpoint import load_model
    from levo_infer.generate import generate
    from levo_train.data.toy import ToyWorld, style_text

    if tier not in TIERS:
        raise SystemExit(f"levo-eval: unknown --tier {tier!r}; choose from {', '.join(TIERS)}")
    world = ToyWorld(world_seed)
    model = load_model(ckpt, device=device)
    conds = world.heldout_conditions(n, seed)
    out: list[dict[str, Any]] = []
    for start in range(0, n, batch_size):
        chunk = conds[start:start + batch_size]
        lyrics = [c.lyric for c in chunk]
        styles = [style_text(c.style_base, tier) for c in chunk]
        g = generate(model, lyrics, styles, max_frames=max_frames, cfg_coef=cfg_coef, temperature=temperature,
                     top_k=top_k, top_p=top_p, seed=seed * 1_000_003 + start)
        codes, lengths = g.codes.cpu().numpy(), g.lengths.cpu().tolist()
        for i, c in enumerate(chunk):
            toks = codes[i, :, :lengths[i]]
            sc = world.score(toks, c.lyric, styles[i] or "")
            out.append({"lyric": c.lyric, "style": styles[i], "frames": int(lengths[i]),
                        "scores": sc, "per": float(world.per(toks, c.lyric))})
    return out


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
    print(json.dumps(res))
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


def cmd_compare(args: argparse.Namespace) -> int:
    t0 = time.time()
    kw = _sampling_kwargs(args)
    base = toy_samples(args.base, **kw)
    out = {"base": {"ckpt": args.base, **summarize(base)}, "n": args.n, "seed": args.seed, "tier": args.tier,
           "temperature": args.temperature, "top_k": args.top_k, "ckpts": []}
    for ck in args.ckpt:
        out["ckpts"].append({"ckpt": ck, **compare(base, toy_samples(ck, **kw))})
    out["seconds"] = round(time.time() - t0, 2)
    print(markdown_table(out) if args.table else json.dumps(out, indent=1))
    return 0


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


def _sampling_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--n", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--tier", default="top", help=f"style tier tag: {'|'.join(TIERS)} (default: top, as released inference)")
    t.add_argument("--world-seed", type=int, default=0, help="seed of the toy world the model was trained on")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--max-frames", type=int, default=96)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-k", type=int, default=0)
    t.add_argument("--top-p", type=float, default=0.0)
    t.add_argument("--cfg-coef", type=float, default=None, help="default: the model config's inference coef")
    t.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="levo-eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("toy", help="sample and score held-out toy-world songs")
    t.add_argument("--ckpt", required=True, help="export folder (config.yaml + model.pt)")
    _sampling_args(t)
    t.set_defaults(func=cmd_toy)
    c = sub.add_parser("compare", help="score exports against a base export on the same toy conditions")
    c.add_argument("--base", required=True, help="the export to compare against (e.g. the SFT export)")
    c.add_argument("--ckpt", required=True, nargs="+", help="export folder(s) to compare")
    c.add_argument("--table", action="store_true", help="print a markdown table instead of JSON")
    _sampling_args(c)
    c.set_defaults(func=cmd_compare)
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"toy": cmd_toy, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
