"""Step time and per-rank memory of DDP vs FSDP2 vs DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU ranks (gloo),
beside the memory model's prediction for the same size (not a test).

Every strategy trains the same SFT module, loss, batches and AdamW (the pieces of
``tests/deepspeed_runner.py``: the module's own ``lm_loss`` with condition dropout drawn for the
global batch, each rank on its slice). DDP is torch's ``DistributedDataParallel``; FSDP2 is
:func:`levo_train.parallel.apply_fsdp` (what ``strategy=fsdp2`` applies); ZeRO-2 / ZeRO-3 run under
``deepspeed.initialize`` (Lightning's DeepSpeed strategy refuses CPU). Per rank it reports the
median step time (steps 3+), peak RSS, and the bytes the rank holds: parameters, gradients and
AdamW state (and ZeRO's fp32 master partition), counted tensor by tensor (local shards only).
The memory model's static terms (``eval/bench/memory_model.py``), for fp32 training here: weights 4 B
per parameter, gradients 4 + AdamW 8 per trainable one; DDP holds all of it on every rank, FSDP2
1/N of all of it, ZeRO-2 whole weights and 1/N of the rest plus a 4 B/N fp32 master partition (the
wrapped optimizer steps a flat copy), ZeRO-3 1/N of everything including that master partition.

    OMP_NUM_THREADS=1 python eval/bench/bench_strategies.py [--dim 256 --layers 4 --layers-sub 2 --steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

SIZE_FLAGS = ("dim", "layers", "layers_sub", "heads", "ffn", "code_size")


def _size_args(a: argparse.Namespace) -> list[str]:
    out = []
    for k in SIZE_FLAGS:
        if getattr(a, k) is not None:
            out += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    return out


def _bytes(ts: Any) -> int:
    import torch

    def local(t: Any) -> Any:
        return t.to_local() if hasattr(t, "to_local") else t

    return sum(local(t).numel() * local(t).element_size() for t in ts if isinstance(t, torch.Tensor))


def worker(a: argparse.Namespace) -> None:
    """One rank of the DDP or FSDP2 run (launched by torchrun)."""
    import torch
    import torch.distributed as dist
    from deepspeed_runner import (
        build_module,
        global_batch,
        optimizer_and_schedule,
        peak_rss,
        rank_slice,
        rss_now,
    )

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss0 = rss_now()
    module = build_module(a)
    module.train()
    if a.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        from levo_train.parallel import apply_fsdp

        apply_fsdp(module.model, init_device_mesh("cpu", (world,)))
        engine: Any = module
    else:
        from torch.nn.parallel import DistributedDataParallel

        engine = DistributedDataParallel(module)
    opt, sched = optimizer_and_schedule(module)
    B, times, losses = a.micro_batch, [], []
    for step in range(a.steps):
        local = rank_slice(global_batch(module, step, world * B, a), rank, B)
        t0 = time.perf_counter()
        loss = engine(local, rank * B, world * B)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        held = {"param_bytes": _bytes(module.model.parameters()),
                "grad_bytes": _bytes(p.grad for p in module.model.parameters()),
                }
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    held["optim_state_bytes"] = _bytes(v for st in opt.state.values() for v in st.values())
    mine = {"rank": rank, "peak_rss_bytes": peak_rss(), "rss_start": rss0, "step_times": times, "losses": losses,
            **held, "n_params": sum(p.numel() for p in module.model.parameters()) if a.strategy == "ddp" else None,
            "n_trainable": sum(p.numel() for p in module.model.parameters() if p.requires_grad)
            if a.strategy == "ddp" else None}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        a.out.write_text(json.dumps({"strategy": a.strategy, "ranks": every}))
    dist.destroy_process_group()


def _torchrun(script: list[str], env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("ddp", "fsdp2"), dest="strategy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layers-sub", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--code-size", type=int, default=1024)
    ap.add_argument("--only", nargs="*", default=["ddp", "fsdp2", "zero2", "zero3"])
    ap.add_argument("--json", type=Path, default=None, help="also write the summary rows here")
    a = ap.parse_args()
    a.lr, a.seed, a.bench = 1e-3, 0, True
    if a.strategy is not None:
        return worker(a)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR="cpu")
    common = ["--steps", str(a.steps), "--micro-batch", str(a.micro_batch), "--frames", str(a.frames), *_size_args(a)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only:
            if name in ("ddp", "fsdp2"):
                out = Path(tmp) / f"{name}.json"
                _torchrun([__file__, "--worker", name, "--out", str(out), *common], env)
                results[name] = json.loads(out.read_text())
            else:
                out = Path(tmp) / name
                _torchrun([str(REPO / "tests" / "deepspeed_runner.py"), "--stage", name[-1], "--bench", "--out", str(out),
                           "--lr", "1e-3", *common], env)
                r = json.loads((out / "result.json").read_text())
                for rk in r["ranks"]:
                    rk["param_bytes"] = rk["policy_param_bytes"]
                results[name] = r
    if "ddp" not in results:
        raise SystemExit("--only must include ddp (the reference for sizes and losses)")
    n, nt = results["ddp"]["ranks"][0]["n_params"], results["ddp"]["ranks"][0]["n_trainable"]
    W, mib = 2, 2**20
    # static bytes per rank, fp32: weights 4 B per parameter; gradients 4 + Adam 8 per trainable one
    # (the released layout's unused keys train nothing); ZeRO keeps a 4 B fp32 master partition too
    predicted = {"ddp": 4 * n + 12 * nt, "fsdp2": (4 * n + 12 * nt) / W, "zero2": 4 * n + 16 * nt / W,
                 "zero3": (4 * n + 16 * nt) / W}
    print(f"{n / 1e6:.1f} M parameters, 2 ranks, {a.micro_batch} songs x {a.frames} frames per rank, "
          f"{os.environ.get('OMP_NUM_THREADS', '1')} thread(s) per rank\n")
    print("| strategy | step (median) | peak RSS per rank (above torch + process group) | held per rank: params + grads + Adam (+ ZeRO fp32 master) "
          "| memory model (static, per rank) | losses equal to DDP |")
    print("|---|---|---|---|---|---|")
    def mean_losses(rk: list[dict[str, Any]]) -> list[float]:
        return [sum(k["losses"][s] for k in rk) / len(rk) for s in range(len(rk[0]["losses"]))]

    ref = mean_losses(results["ddp"]["ranks"]) if "ddp" in results else None
    summary: dict[str, Any] = {}
    for name, r in results.items():
        rk = r["ranks"]
        t = sorted(x for k in rk for x in k["step_times"][2:])
        peak = max(k["peak_rss_bytes"] for k in rk)
        above = max(k["peak_rss_bytes"] - (k.get("rss_start") or k["rss_bytes"]["start"]) for k in rk)
        master = name.startswith("zero")
        held = max(k["param_bytes"] + k["grad_bytes"] + k["optim_state_bytes"] + k.get("master_bytes", 0) * master
                   for k in rk)
        same = "—"
        if ref is not None and name != "ddp":
            same = f"max diff {max(abs(x - y) for x, y in zip(mean_losses(rk), ref)):.1e}"
        summary[name] = {"step_ms": t[len(t) // 2] * 1e3, "peak_rss_mib": peak / mib, "above_pg_mib": above / mib,
                         "held_mib": held / mib, "model_mib": predicted[name] / mib, "loss_diff": same}
        print(f"| {name} | {t[len(t) // 2] * 1e3:.0f} ms | {peak / mib:.0f} MiB ({above / mib:.0f} above the "
              f"process group) | {held / mib:.1f} MiB "
              f"| {predicted[name] / mib:.1f} MiB | {same} |")
    if a.json is not None:
        a.json.write_text(json.dumps({"params_m": n / 1e6, "strategies": summary}, indent=1))


if __name__ == "__main__":
    main()
