"""``levo-infer``: generation from released or finetuned checkpoints (see the levo-infer issue).

Until the full CLI lands this entry point generates token files for a JSONL input with the
shared sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="levo-infer", description="generate songs (tokens) from a checkpoint folder")
    ap.add_argument("ckpt_dir")
    ap.add_argument("input_jsonl")
    ap.add_argument("out_dir")
    ap.add_argument("--duration", type=float, default=None, help="seconds (default: max_dur of the config)")
    ap.add_argument("--cfg-coef", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    from .checkpoint import load_model
    from .generate import generate

    model = load_model(args.ckpt_dir, device=args.device)
    out = Path(args.out_dir) / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    dur = args.duration if args.duration is not None else model.cfg.max_dur
    max_frames = int(dur * model.cfg.frame_rate)
    status = 0
    for n, line in enumerate(Path(args.input_jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            idx, lyric = str(rec["idx"]), rec["gt_lyric"]
        except (json.JSONDecodeError, KeyError) as e:
            print(f"{args.input_jsonl}:{n}: bad record ({e}); expected a JSON object with idx and gt_lyric",
                  file=sys.stderr)
            status = 1
            continue
        desc = rec.get("descriptions")
        style = f"[Musicality-very-high], {desc.lower()}" if desc else "."
        if model.cfg.version != "v2":
            style = desc.lower() if desc else None
        g = generate(model, [lyric], [style], max_frames=max_frames, cfg_coef=args.cfg_coef, top_k=args.top_k,
                     temperature=args.temperature, seed=args.seed)
        torch.save(g.codes[0, :, :int(g.lengths[0])].cpu(), out / f"{idx}.pt")
    return status


if __name__ == "__main__":
    sys.exit(main())
