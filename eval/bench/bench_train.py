"""Training-throughput benchmark (not a test).

Compares, on the same LeLM weights and batch, one optimiser step of
  * ours: SDPA attention, logits only at target positions and only for the three used heads;
  * naive: our re-creation of the released step (not the released code) — eager attention, logits for every prefix+step position from
    all heads (including the unused ``transformer2.lm_head``), a full fp32 copy of the
    [B, K, S, V] logits, pattern reverted on the logits, masked CE.
Also measures data-loader throughput on toy-world shards against the model's consumption.

    python eval/bench/bench_train.py [--dim 128] [--code-size 16384] [--batch 8] [--frames 100]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from levo_infer.config import make_config
from levo_infer.model import LeLM, apply_rope, rope_cos_sin
from levo_infer.pattern import build_delayed
from levo_infer.tokens import append_eos
from levo_train.train.lm import LMModule


def eager_stack(stack, x: torch.Tensor) -> torch.Tensor:
    """The Llama stack with explicit matmul/softmax attention (fp32 softmax), no SDPA."""
    L = x.shape[1]
    cos, sin = rope_cos_sin(torch.arange(L), stack.head_dim, stack.theta, x.dtype)
    mask = torch.full((L, L), float("-inf")).triu(1)
    for layer in stack.model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        B = h.shape[0]
        q = a.q_proj(h).view(B, L, a.heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(B, L, a.heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(B, L, a.heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = (q @ k.transpose(-1, -2)) / a.head_dim ** 0.5 + mask
        att = torch.softmax(att.float(), dim=-1).to(q.dtype)
        x = x + a.o_proj((att @ v).transpose(1, 2).reshape(B, L, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return stack.model.norm(x)


def naive_loss(m: LeLM, codes: torch.Tensor, cond) -> torch.Tensor:
    p1, p2 = m.condition_prefix(cond)
    seq = build_delayed(codes, m.cfg.delays, m.pad_id)
    x1 = torch.cat([p1, m.emb[0](seq[:, 0])], 1)
    h1 = eager_stack(m.transformer, x1)
    x2 = torch.cat([p2, sum(m.layer2_emb[k](seq[:, k]) for k in range(1, m.code_depth))], 1)
    h2 = eager_stack(m.transformer2, m.mlp(torch.cat([x2, h1], -1)))
    logits = [m.transformer.lm_head(h1)] + [lin(h2) for lin in m.linears]
    _unused = m.transformer2.lm_head(h2)  # the released forward computes it too
    P, T = p1.shape[1], codes.shape[2]
    full = torch.stack(logits, 1)[:, :, P:].float()  # [B, K, S, V] fp32 copy
    per = torch.stack([full[:, k, d:d + T] for k, d in enumerate(m.cfg.delays)], 1)
    mask = codes != m.pad_id
    ce = F.cross_entropy(per[mask], codes[mask], reduction="none")
    k_idx = torch.arange(m.code_depth)[None, :, None].expand_as(codes)[mask]
    return torch.stack([ce[k_idx == k].mean() for k in range(m.code_depth)]).mean() + 0 * _unused.sum()


def make_batch(B: int, T: int, code_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    codes = torch.randint(0, code_size, (B, 3, T), generator=g)
    t = torch.arange(T)[None, None]
    codes = torch.where(t < lengths[:, None, None], codes, torch.full_like(codes, code_size + 1))
    words = " ".join(["la"] * 20)
    return {"codes": codes, "lengths": lengths, "lyrics": [f"[verse] {words}"] * B, "styles": ["pop"] * B,
            "prompts": None}


def time_steps(step, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The benchmark model's shape and batch geometry (shared with ``bench_dpo.py``)."""
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--layers-sub", type=int, default=1)
    ap.add_argument("--code-size", type=int, default=16384)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--delay", type=int, default=25)
    ap.add_argument("--lyric-len", type=int, default=100)
    ap.add_argument("--prompt-frames", type=int, default=25)


def bench_config(args: argparse.Namespace):  # -> ModelConfig
    """The model config of :func:`add_model_args`' options."""
    words = ["<unk>", ".", ",", ";", "la", "pop"]
    return make_config(dim=args.dim, num_heads=args.dim // 32, num_layers=args.layers, num_layers_sub=args.layers_sub,
                       intermediate_size=args.dim * 3, code_size=args.code_size, delays=[0, args.delay, args.delay],
                       lyric_max_len=args.lyric_len, style_max_len=16, prompt_frames=args.prompt_frames,
                       text_words=words)


def bench_model(args: argparse.Namespace) -> dict:
    cfg = bench_config(args)
    torch.manual_seed(0)
    module = LMModule(cfg, condition_dropout=False)
    m = module.model.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    batch = make_batch(args.batch, args.frames, args.code_size)
    cond = m.prepare_conditions(batch["lyrics"], batch["styles"])
    frames = int(batch["lengths"].sum())

    def ours():
        opt.zero_grad(set_to_none=True)
        loss, _ = module.lm_loss(batch, cond)
        loss.backward()
        opt.step()

    codes_eos = append_eos(batch["codes"], batch["lengths"], m.eos_id, m.pad_id)

    def naive():
        opt.zero_grad(set_to_none=True)
        naive_loss(m, codes_eos, cond).backward()
        opt.step()

    with torch.no_grad():  # both compute the same loss
        a, _ = module.lm_loss(batch, cond)
        b = naive_loss(m, codes_eos, cond)
    t_ours, t_naive = time_steps(ours, args.steps), time_steps(naive, args.steps)
    return {"config": {k: getattr(args, k) for k in ("dim", "layers", "layers_sub", "code_size", "batch", "frames")},
            "loss_ours": float(a), "loss_naive": float(b),
            "ours_frames_per_s": frames / t_ours, "naive_frames_per_s": frames / t_naive,
            "speedup": t_naive / t_ours, "ours_step_s": t_ours, "naive_step_s": t_naive}


def bench_loader(args: argparse.Namespace, model_frames_per_s: float | None) -> dict:
    import tempfile
    from pathlib import Path

    from levo_train.data.datamodule import SongDataModule
    from levo_train.toy.world import TOY_CODE_SIZE, write_toy_dataset

    with tempfile.TemporaryDirectory() as d:
        write_toy_dataset(Path(d), seed=0, n_train=4000, n_val=64, records_per_shard=1000)
        out = {}
        for nw in (0, 2):
            dm = SongDataModule(train=str(Path(d) / "train"), val=None, batch_size=32, num_workers=nw, seed=0,
                                code_size=TOY_CODE_SIZE, rank=0, world_size=1)
            dm.setup("fit")
            it = iter(dm.train_dataloader())
            next(it)
            t0, frames, n = time.perf_counter(), 0, 0
            while n < 100:
                b = next(it)
                frames += int(b["lengths"].sum())
                n += 1
            out[f"workers{nw}_frames_per_s"] = frames / (time.perf_counter() - t0)
        if model_frames_per_s:
            out["toy_model_frames_per_s"] = model_frames_per_s
        return out


def bench_toy_model() -> float:
    """Training frames/s of the default toy recipe's model on a toy-like batch."""
    ns = argparse.Namespace(dim=96, layers=3, layers_sub=1, code_size=64, batch=32, frames=75, delay=4,
                            lyric_len=64, prompt_frames=4, steps=10)
    words = ["<unk>", ".", ",", ";", "la", "pop"]
    cfg = make_config(dim=96, num_heads=4, num_layers=3, num_layers_sub=1, intermediate_size=256, code_size=64,
                      delays=[0, 4, 4], lyric_max_len=64, style_max_len=8, prompt_frames=4, text_words=words)
    module = LMModule(cfg)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = make_batch(ns.batch, ns.frames, 64)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = module.lm_loss(batch, module.conditions(batch, dropout=True))
        loss.backward()
        opt.step()

    return int(batch["lengths"].sum()) / time_steps(step, ns.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-loader", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = {"model": bench_model(args)}
    if not args.skip_loader:
        res["loader"] = bench_loader(args, bench_toy_model())
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
