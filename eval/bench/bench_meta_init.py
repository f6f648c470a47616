"""Host memory of building a sharded model, and of consolidating its checkpoint (not a test).

At the released v2-large widths (D 2048, F 11008, 16 heads, 16384 codes, the Qwen2 text tables)
with a few decoder layers (default 2+1: 1.32 B parameters, 5.3 GB in fp32, most of it the root
unit's tables), on ``--world`` CPU ranks (gloo), what ``LeLMTrainModule.configure_model`` does
under ``strategy=fsdp2``:

* ``meta`` (the default path): the policy (``--method dpo``: and its frozen reference) built on
  the meta device, ``fully_shard``-ed, materialised, filled from rank 0's memory-mapped read of
  ``model.init`` (one tensor broadcast at a time);
* ``legacy`` (``strategy.meta_init=false``, the path before): every rank builds the whole model on
  the host, loads ``model.init`` into it (and copies it for a reference), then shards.

Per rank: peak RSS while building (``psutil`` sampled every 2 ms, and the kernel's ``ru_maxrss``)
above the RSS before it (torch imported, process group up), beside the bound the issue sets for
meta init: every rank but 0 at most 1.5 x (its shards + one full copy of the largest tensor),
rank 0 that plus the init file (read by mmap). Then the sharded weights are written as a DCP
checkpoint folder and consolidated into ``model.pt`` the way ``levo-train export`` does it
(streamed tensor by tensor), and the way it did before (``--export-legacy``: the whole state dict,
then a model loaded from it, then ``torch.save``), each in its own process: peak RSS.

    OMP_NUM_THREADS=1 python eval/bench/bench_meta_init.py [--method sft|dpo] [--legacy] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from levo_infer.checkpoint import PREFIX, find_weights, load_weights
from levo_infer.config import make_config, save_config
from levo_infer.model import LeLM
from levo_train.checkpointing import META, write_complete_marker, write_torch_stream
from levo_train.parallel import parallelize
from levo_train.train.base import DeferredInit
from levo_train.train.dpo import DPOModule
from levo_train.train.lm import LMModule

GB = 1e9
HERE = Path(__file__).resolve()


def rss() -> int:
    return psutil.Process().memory_info().rss


class PeakRSS:
    """The highest RSS seen while it runs (a thread sampling every ``every`` seconds)."""

    def __init__(self, every: float = 0.002) -> None:
        self.every, self.peak, self._stop = every, rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def config(args: argparse.Namespace) -> Any:
    return make_config(dim=args.dim, num_heads=args.heads, num_layers=args.layers, num_layers_sub=args.layers_sub,
                       intermediate_size=args.ffn, code_size=args.code_size)


def write_init(cfg: Any, folder: Path) -> dict[str, Any]:
    """A released-format init folder of ``cfg`` with random weights, written tensor by tensor (this
    process never holds the model)."""
    with torch.device("meta"):
        sd = LeLM(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_torch_stream(folder / "model.pt", [(PREFIX + k, v.shape, v.dtype) for k, v in sd.items()],
                       lambda k: torch.randn(sd[k[len(PREFIX):]].shape, generator=g) * 0.02)
    save_config(cfg, folder / "config.yaml")
    largest = max(v.numel() * v.element_size() for v in sd.values())
    return {"params": sum(v.numel() for v in sd.values()), "file_bytes": (folder / "model.pt").stat().st_size,
            "largest_tensor_bytes": largest}


# ----------------------------------------------------------------------------- one rank
def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    cfg = config(args)
    weights = find_weights(args.init)
    meta = args.mode == "meta"
    dist.barrier()
    before = rss()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        if args.method == "dpo":
            module: Any = DPOModule(cfg, reference="model", meta_init=meta)
        else:
            module = LMModule(cfg, init_weights=False, meta_init=meta)
        if meta:
            module.deferred_init = DeferredInit(weights=weights)
        else:
            load_weights(module.model, weights)
        if args.method == "dpo":
            module.freeze_reference()
        parallelize(module.model, mesh=mesh)
        if args.method == "dpo":
            parallelize(module.ref, mesh=mesh)
        if meta:
            module.materialize_model("cpu", mesh.get_group())
    seconds = time.perf_counter() - t0
    mods = [module.model] + ([module.ref] if args.method == "dpo" else [])
    shard = sum(p.to_local().numel() * p.element_size() for m in mods for p in m.parameters())
    mine = {"rank": rank, "rss_before": before, "peak_rss": peak.peak, "peak_above_before": peak.peak - before,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "shard_bytes": shard,
            "seconds": round(seconds, 2)}
    if args.save is not None and meta:  # the sharded weights as a levo-train DCP checkpoint (what fsdp2 writes)
        state = {"state_dict": {"model." + k: v for k, v in get_model_state_dict(module.model).items()}}
        _distributed_checkpoint_save(state, args.save)
        dist.barrier()
        if rank == 0:
            ck: dict[str, Any] = {}
            module.on_save_checkpoint(ck)
            torch.save({"levo": ck["levo"], "global_step": 0}, args.save / META)
            write_complete_marker(args.save, fmt="torch-dcp", world_size=world, global_step=0)
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def launch(args: argparse.Namespace, mode: str, init: Path, result: Path, save: Path | None) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world}", str(HERE),
           "--worker", "--mode", mode, "--init", str(init), "--result", str(result), "--method", args.method,
           *(["--save", str(save)] if save else []), *size_flags(args)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        raise SystemExit(f"bench_meta_init: {mode} ranks failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(result.read_text())


def size_flags(args: argparse.Namespace) -> list[str]:
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("dim", "ffn", "heads", "layers", "layers_sub",
                                                                    "code_size")]


def export_worker(args: argparse.Namespace) -> None:
    """Consolidate ``--init`` (here: a DCP checkpoint folder) into ``--result``'s folder; prints the
    RSS before and the peak while exporting."""
    from omegaconf import OmegaConf

    from levo_infer.checkpoint import save_released
    from levo_infer.config import config_from_omegaconf
    from levo_train.export import export_checkpoint, policy_state_dict

    before = rss()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        if args.mode == "legacy":  # what the export did before: the whole state dict, a model loaded from it, save
            sd, levo = policy_state_dict(args.init)
            m = LeLM(config_from_omegaconf(OmegaConf.create(levo["model_config"])))
            m.load_state_dict(sd, strict=True)
            save_released(m, args.result)
        else:
            export_checkpoint(args.init, args.result)
    print(json.dumps({"rss_before": before, "peak_rss": peak.peak, "peak_above_before": peak.peak - before,
                      "seconds": round(time.perf_counter() - t0, 2)}))


def export_peak(ckpt: Path, out: Path, legacy: bool) -> dict[str, Any]:
    """Consolidate ``ckpt`` into ``out/model.pt`` in a child process: its RSS before, peak, time."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(HERE), "--export-worker", "--mode", "legacy" if legacy else "stream",
                        "--init", str(ckpt), "--result", str(out)], env=env, capture_output=True, text=True,
                       timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"bench_meta_init: export failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--layers-sub", type=int, default=1)
    ap.add_argument("--code-size", type=int, default=16384)
    ap.add_argument("--legacy", action="store_true", help="also measure the path before (every rank: whole model)")
    ap.add_argument("--export-legacy", action="store_true", help="also measure the export before (whole state dict)")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    # worker side
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--export-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="meta", help=argparse.SUPPRESS)
    ap.add_argument("--init", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.export_worker:
        export_worker(args)
        return 0
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        cfg = config(args)
        t0 = time.perf_counter()
        facts = write_init(cfg, work / "init")
        facts["write_init_s"] = round(time.perf_counter() - t0, 1)
        res: dict[str, Any] = {"config": {"dim": args.dim, "ffn": args.ffn, "heads": args.heads, "layers": args.layers,
                                          "layers_sub": args.layers_sub, "code_size": args.code_size},
                               "method": args.method, "world": args.world, **facts}
        ckpt = None if args.no_export else work / "ckpt"
        modes = ["meta"] + (["legacy"] if args.legacy else [])
        for mode in modes:
            ranks = launch(args, mode, work / "init", work / f"{mode}.json", ckpt if mode == "meta" else None)
            for r in ranks:
                bound = 1.5 * (r["shard_bytes"] + facts["largest_tensor_bytes"])
                r["bound"] = bound + (facts["file_bytes"] if r["rank"] == 0 else 0)
                r["within_bound"] = r["peak_above_before"] <= r["bound"]
            res[mode] = ranks
        if ckpt is not None:
            res["export"] = export_peak(ckpt, work / "export", legacy=False)
            if args.export_legacy:
                res["export_legacy"] = export_peak(ckpt, work / "export_legacy", legacy=True)
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    gb = lambda x: f"{x / GB:.2f} GB"  # noqa: E731
    for mode in modes:
        for r in res[mode]:
            print(f"{mode} rank {r['rank']}: peak RSS +{gb(r['peak_above_before'])} over {gb(r['rss_before'])} "
                  f"(shards {gb(r['shard_bytes'])}; bound {gb(r['bound'])}; {r['seconds']} s)", file=sys.stderr)
    for k in ("export", "export_legacy"):
        if k in res:
            print(f"{k}: peak RSS +{gb(res[k]['peak_above_before'])} ({res[k]['seconds']} s) for a "
                  f"{gb(res['file_bytes'])} model.pt", file=sys.stderr)
    return 0 if all(r["within_bound"] for r in res["meta"]) else 1


if __name__ == "__main__":
    sys.exit(main())
