"""Our SFT module and loss under ``deepspeed.initialize`` with ZeRO-2 / ZeRO-3 on CPU ranks (gloo).

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA, so on CPU this script drives DeepSpeed
directly, the way Lightning (>= 2.1) does on GPU: the engine wraps the :class:`LMModule` itself
(parameter names ``model.*``, as in a Lightning run), the optimizer and LR schedule are the module's ``configure_optimizers`` (torch AdamW param groups + LambdaLR), the loss is the one
``LMModule.training_step`` computes (condition dropout drawn for the global batch, then
``lm_loss``), and the checkpoint is saved as Lightning saves it (``tag="checkpoint"``, the
``levo`` section and ``global_step`` as client state). Launch::

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/deepspeed_runner.py --stage 3 --out OUT

Each rank takes its slice ``[r*B, (r+1)*B)`` of a deterministic global batch of ``W*B`` songs.
After ``--steps`` steps: ``OUT/ckpt`` (the ZeRO folder), then on rank 0 ``OUT/consolidated.pt``
(:func:`levo_train.zero.zero_fp32_state_dict`), ``OUT/export`` (loaded into a fresh LeLM and
written by ``levo_infer.checkpoint.save_released``) and ``OUT/result.json`` (losses, step times, and
per rank: peak RSS, and the parameter / gradient / fp32-master / optimizer-state bytes it holds).
``--bench`` sets a bigger model (``--dim``, ``--layers``, ...) and skips the export.

What it takes on this CPU stack (torch 2.13 CPU, deepspeed 0.19.8): nothing special.
``deepspeed.init_distributed(dist_backend="gloo")`` and DeepSpeed's CPU accelerator (chosen on
its own without a GPU; ``DS_ACCELERATOR=cpu`` forces it and is set here) run ZeRO-2 and ZeRO-3
with their default collectives: gloo in torch >= 2.x has ``reduce_scatter_tensor`` and
``all_gather_into_tensor``, so no ``reduce_scatter: false`` or other workaround is needed.
Two things matter: ZeRO-3's ``stage3_param_persistence_threshold`` (default 1e5 elements) would
keep every parameter of a tiny model whole on every rank, so it is 0 here (everything sharded);
and the first ``init_distributed`` on a machine would JIT-compile DeepSpeed's shared-memory
all-reduce op (``deepspeed_shm_comm``: ~40 s on 2 cores, needs a C++ compiler, cached under
``~/.cache/torch_extensions``) that training never uses, so :func:`skip_shm_comm_build` marks it
unavailable first.

:func:`reference_run` is the plain single-process run of the same loss and AdamW on the whole
global batch that the test compares the ZeRO weights with (songs of each rank's slice have the
same lengths, so the mean of the ranks' per-token means is the global per-token mean).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import tiny_config  # noqa: E402

from levo_train.train.lm import LMModule, apply_condition_dropout  # noqa: E402


# ----------------------------------------------------------------------------- the run's pieces
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", type=int, default=3, choices=(0, 1, 2, 3))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=2, help="songs per rank per step")
    ap.add_argument("--frames", type=int, default=10, help="frames of the longest song")
    ap.add_argument("--lr", type=float, default=None, help="1e-2 (tiny), 1e-3 (--bench)")
    ap.add_argument("--bucket", type=float, default=None, help="ZeRO bucket size in elements (DeepSpeed's defaults)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--persistence-threshold", type=int, default=0, help="ZeRO-3: shard params of more elements")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="wrap the decoder layers as train.activation_checkpointing does (configure_model)")
    ap.add_argument("--frozen-ref", action="store_true",
                    help="give the module a frozen copy of the policy as `ref` (DPO's reference): the "
                         "checkpoint holds it, the consolidation must leave it out")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights and compute, fp32 master weights")
    ap.add_argument("--offload-optimizer", action="store_true")
    ap.add_argument("--offload-params", action="store_true")
    ap.add_argument("--lightning-config", action="store_true",
                    help="use the DeepSpeed config levo-train's Lightning strategy passes (strategy=deepspeed_zero*: "
                         "levo_train.strategies.deepspeed_strategy(...).config as Lightning completes it) instead of "
                         "levo_train.zero.deepspeed_config")
    ap.add_argument("--meta-init", type=Path, default=None,
                    help="a model.pt: build the policy (and --frozen-ref) on the meta device and fill it from this file "
                         "inside deepspeed.zero.Init (ZeRO-3), as levo-train's configure_model does under "
                         "strategy=deepspeed_zero3")
    ap.add_argument("--bench", action="store_true", help="a bigger model (the size flags), no export")
    ap.add_argument("--check-loads", action="store_true",
                    help="after saving: OUT/crafted, a copy with a payload in rank 1's optimizer states "
                         "(tests/payloads.py; it would create OUT/code-ran), then engine.load_checkpoint of both "
                         "inside levo_train.zero.checked_engine_loads (as levo-train's DeepSpeed strategy loads); "
                         "OUT/load_rank<R>.json: per folder its global_step, or the error")
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--layers-sub", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--code-size", type=int, default=None)
    ap.add_argument("--world", type=int, default=None, help="reference_run only: the ranks of the run to mirror")
    args = ap.parse_args(argv)
    if args.bench:  # a small but not tiny size; flags given override
        for k, v in dict(dim=256, layers=4, layers_sub=2, heads=4, ffn=1024, code_size=1024).items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        if args.frames == 10:
            args.frames = 64
    if args.lr is None:
        args.lr = 1e-3 if args.bench else 1e-2
    return args


def model_config(args: argparse.Namespace) -> Any:
    """The tiny test config, resized by the size flags."""
    kw: dict[str, Any] = {}
    for flag, key in (("dim", "dim"), ("layers", "num_layers"), ("layers_sub", "num_layers_sub"),
                      ("heads", "num_heads"), ("ffn", "intermediate_size"), ("code_size", "code_size")):
        if getattr(args, flag) is not None:
            kw[key] = getattr(args, flag)
    return tiny_config(**kw)


class SFTModule(LMModule):
    """What DeepSpeed wraps: the Lightning module itself, as Lightning >= 2.1 hands it to
    ``deepspeed.initialize`` (so parameter and checkpoint names are a Lightning run's, ``model.*``),
    with the training loss as ``forward`` (Lightning reroutes ``training_step`` through the
    engine's forward the same way, so ZeRO-3's gather hooks see it)."""

    def forward(self, batch: dict[str, Any], offset: int, size: int) -> torch.Tensor:  # type: ignore[override]
        return sft_loss(self, batch, offset, size)


def build_module(args: argparse.Namespace) -> SFTModule:
    """The SFT module with the same initial weights on every rank and in the reference."""
    torch.manual_seed(args.seed)
    return SFTModule(model_config(args), lr=args.lr, warmup_steps=2, total_steps=max(args.steps, 3), seed=args.seed)


def global_batch(module: LMModule, step: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Step ``step``'s global batch of ``size`` songs: learnable codes (each stream a per-song
    arithmetic progression), lyrics and styles from the toy vocabulary. Song ``i`` has length
    ``lens[i % micro_batch]``, so every rank's slice holds the same number of tokens."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + step)
    B, K, T, V = args.micro_batch, module.model.code_depth, args.frames, module.model_config.lm.code_size
    lens = [max(2, T - 2 * (i % 3)) for i in range(B)]
    start = torch.randint(0, V, (size, K, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1, 1), generator=g)
    codes = (start + stride * torch.arange(T)[None, None, :]) % V
    lengths = torch.tensor([lens[i % B] for i in range(size)])
    codes = torch.where(torch.arange(T)[None, None, :] < lengths[:, None, None], codes,
                        torch.full_like(codes, module.model.pad_id))
    words = ["la", "da", "love", "night"]
    styles = ["rock", "pop", "sad", "happy", None]
    lyrics = [" ".join(words[(i + j + step) % 4] for j in range(3)) for i in range(size)]
    return {"codes": codes, "lengths": lengths, "lyrics": lyrics,
            "styles": [styles[(i + step) % len(styles)] for i in range(size)], "prompts": None}


def rank_slice(batch: dict[str, Any], rank: int, micro: int) -> dict[str, Any]:
    sl = slice(rank * micro, (rank + 1) * micro)
    return {k: (v[sl] if v is not None else None) for k, v in batch.items()}


def sft_loss(module: LMModule, batch: dict[str, Any], offset: int, size: int) -> torch.Tensor:
    """``LMModule.training_step``'s loss for songs ``[offset, offset+len)`` of a global batch of
    ``size``: released condition dropout drawn for the global batch (``module.dropout_gen``), then
    ``lm_loss``. Done here rather than through ``training_step``, which reads its rank and slice
    from the Lightning trainer (absent under bare DeepSpeed)."""
    c = module.model_config
    lyr, sty, pr = apply_condition_dropout(
        batch["lyrics"], batch["styles"], batch.get("prompts"), cfg_p=c.cfg_dropout, attr_p=c.attribute_dropout,
        generator=module.dropout_gen, pad=module.model.pad_id, global_slice=(offset, size))
    loss, _ = module.lm_loss(batch, module.model.prepare_conditions(lyr, sty, pr))
    return loss


def lightning_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config Lightning hands ``deepspeed.initialize`` for ``strategy=deepspeed_zero<stage>``
    (with the offload flags): our strategy's own config, completed as Lightning's
    ``DeepSpeedStrategy._format_config`` completes it at set-up (micro batch, accumulation,
    clipping, precision ``32-true``)."""
    from lightning.fabric.strategies.deepspeed import _format_precision_config

    from levo_train.strategies import deepspeed_strategy

    config = dict(deepspeed_strategy(stage=args.stage, offload_optimizer=args.offload_optimizer,
                                     offload_parameters=args.offload_params).config)
    config.update(gradient_accumulation_steps=1, train_micro_batch_size_per_gpu=args.micro_batch,
                  gradient_clipping=args.clip)
    _format_precision_config(config=config, precision="32-true", loss_scale=0, loss_scale_window=1000,
                             min_loss_scale=1, initial_scale_power=16, hysteresis=2)
    if args.stage == 3:  # a tiny model: shard every parameter (as deepspeed_config does for the tests)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold
    return config


def optimizer_and_schedule(module: LMModule) -> tuple[torch.optim.Optimizer, Any]:
    out = module.configure_optimizers()
    return out["optimizer"], out["lr_scheduler"]["scheduler"]


def reference_run(args: argparse.Namespace) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same steps in one process on the whole global batch (``args.world`` ranks' worth):
    per-step losses and the final LeLM state dict."""
    world = int(args.world or 2)
    module = build_module(args)
    module.train()
    opt, sched = optimizer_and_schedule(module)
    params = [p for p in module.parameters() if p.requires_grad]
    losses = []
    for step in range(args.steps):
        batch = global_batch(module, step, world * args.micro_batch, args)
        loss = module(batch, 0, world * args.micro_batch)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in module.model.state_dict().items()}


# ----------------------------------------------------------------------------- accounting
def _bytes(ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def held_bytes(engine: Any) -> dict[str, int]:
    """Bytes this rank holds: module parameters (all, and the policy's alone; ZeRO-3: its
    partitions ``ds_tensor``), the fp32 master partitions the wrapped optimizer steps (stage 0:
    the model's own parameters, no copy), and that optimizer's state (Adam moments)."""

    def held(ps: Any) -> int:
        return _bytes(getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p for p in ps)

    params, policy = held(engine.module.parameters()), held(engine.module.model.parameters())
    zo, base = engine.optimizer, getattr(engine.optimizer, "optimizer", engine.optimizer)
    flat = getattr(zo, "fp32_partitioned_groups_flat", None) or getattr(zo, "single_partition_of_fp32_groups", None)
    master = _bytes(flat) if flat is not None else _bytes(p for g in base.param_groups for p in g["params"])
    state = _bytes(v for st in base.state.values() for v in st.values())
    return {"param_bytes": params, "policy_param_bytes": policy, "master_bytes": master, "optim_state_bytes": state}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_now() -> int:
    """Current resident set size (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ----------------------------------------------------------------------------- the ranks
def skip_shm_comm_build() -> None:
    """Tell DeepSpeed its shared-memory all-reduce op is unavailable, so ``init_distributed`` does
    not JIT-compile it (~40 s on 2 cores, and a C++ compiler). Only ``inference_all_reduce``
    (tensor-parallel inference layers) uses it; training collectives go through torch.distributed."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def load_folders(engine: Any, folders: list[Path], out: Path) -> None:
    """``engine.load_checkpoint`` of each folder as levo-train's DeepSpeed strategy calls it; writes
    ``{folder: {"global_step": N} or {"error": message}}``."""
    from levo_train.zero import checked_engine_loads

    res: dict[str, Any] = {}
    for d in folders:
        try:
            with checked_engine_loads(engine, d):
                _, client = engine.load_checkpoint(str(d))
            res[str(d)] = {"global_step": client["global_step"]}
        except ValueError as e:
            res[str(d)] = {"error": str(e)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res))


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import deepspeed
    import torch.distributed as dist

    from levo_infer.checkpoint import save_released
    from levo_infer.model import LeLM
    from levo_train.zero import deepspeed_config, zero_fp32_state_dict

    deepspeed.utils.logging.logger.setLevel(logging.WARNING)
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss = {"start": rss_now()}  # torch + deepspeed + the process group, before any model
    B = args.micro_batch
    config = deepspeed_config(args.stage, micro_batch=B, clip=args.clip, offload_optimizer=args.offload_optimizer,
                              offload_params=args.offload_params, bf16=args.bf16,
                              bucket_elems=int(args.bucket) if args.bucket else None,
                              persistence_threshold=args.persistence_threshold if args.stage == 3 else None)
    if args.lightning_config:
        config = lightning_config(args)
    meta = {}
    if args.meta_init is not None:
        from levo_train.train.base import DeferredInit
        from levo_train.train.reference import frozen_copy

        module = SFTModule(model_config(args), lr=args.lr, warmup_steps=2, total_steps=max(args.steps, 3),
                           seed=args.seed, meta_init=True)
        module.deferred_init = DeferredInit(weights=args.meta_init)
        if args.frozen_ref:
            module.ref = frozen_copy(module.model)  # on the meta device too
        rss["built"] = rss_now()
        with deepspeed.zero.Init(config_dict_or_path=config):  # what Lightning opens around configure_model
            module.activation_checkpointing = args.activation_checkpointing
            module.materialize_zero3()
            if args.activation_checkpointing:
                from levo_train.parallel import parallelize

                parallelize(module.model, activation_checkpointing=True)
        rss["materialized"] = rss_now()
        meta = {"partitioned_at_build": all(hasattr(p, "ds_id") for p in module.model.parameters()),
                "local_elems": sum(p.ds_tensor.numel() for p in module.model.parameters()),
                "full_elems": sum(p.ds_numel for p in module.model.parameters())}
    else:
        module = build_module(args)
        rss["built"] = rss_now()  # the whole model on every rank (no deepspeed.zero.Init)
        if args.activation_checkpointing:
            module.activation_checkpointing = True
            module.configure_model()  # before DeepSpeed sees the parameters, as Lightning orders it
        if args.frozen_ref:
            from levo_train.train.reference import frozen_copy

            module.ref = frozen_copy(module.model)
    module.train()
    opt, sched = optimizer_and_schedule(module)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=config)
    rss["initialized"] = rss_now()

    grads: list[int] = []  # gradient bytes handed to the wrapped optimizer's step (its partition)
    model_grads: list[int] = []  # full-size .grad still on model parameters at that moment
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    base.register_step_pre_hook(lambda o, a, k: (
        grads.append(_bytes(p.grad for g in o.param_groups for p in g["params"])),
        model_grads.append(_bytes(p.grad for p in engine.module.parameters())),
    ) and None)

    rank_losses, times = [], []
    for step in range(args.steps):
        local = rank_slice(global_batch(module, step, world * B, args), rank, B)
        t0 = time.perf_counter()
        loss = engine(local, rank * B, world * B)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        rank_losses.append(loss.item())
        module.samples_seen += world * B
    rss["trained"] = rss_now()
    ck: dict[str, Any] = {}
    module.on_save_checkpoint(ck)
    ckpt = args.out / "ckpt"
    t0 = time.perf_counter()
    engine.save_checkpoint(str(ckpt), tag="checkpoint",
                           client_state={"levo": ck["levo"], "global_step": args.steps, "epoch": 0})
    dist.barrier()
    if rank == 0:  # what levo-train's DeepSpeed strategy writes last (levo_train.checkpointing.save_folder_atomically)
        from levo_train.checkpointing import write_complete_marker

        write_complete_marker(ckpt, fmt="deepspeed", world_size=world, global_step=args.steps)
    save_s = time.perf_counter() - t0
    if args.check_loads:
        crafted = args.out / "crafted"
        if rank == 0:
            from payloads import plant_in_torch_file

            shutil.copytree(ckpt, crafted)
            plant_in_torch_file(crafted / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                args.out / "code-ran")
        dist.barrier()
        load_folders(engine, [ckpt, crafted], args.out / f"load_rank{rank}.json")
    mine = {"rank": rank, "peak_rss_bytes": peak_rss(), "rss_bytes": rss, **held_bytes(engine),
            "grad_bytes": max(grads, default=0), "model_grad_bytes": max(model_grads, default=0),
            "losses": rank_losses, "step_times": times, "save_s": save_s}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    dist.barrier()
    if rank == 0:
        result: dict[str, Any] = {
            "stage": args.stage, "world": world, "steps": args.steps, "micro_batch": B, "frames": args.frames,
            "model": {k: getattr(args, k) for k in ("dim", "layers", "layers_sub", "heads", "ffn", "code_size")},
            "n_params": sum(getattr(p, "ds_numel", p.numel()) for p in module.model.parameters()),
            "ds_config": config,
            "losses": [sum(r["losses"][s] for r in every) / world for s in range(args.steps)],
            "ranks": every, "ckpt": str(ckpt), "meta_init": meta,
        }
        if not args.bench:
            t0 = time.perf_counter()
            sd = zero_fp32_state_dict(ckpt)
            result["consolidate_s"] = time.perf_counter() - t0
            torch.save(sd, args.out / "consolidated.pt")
            fresh = LeLM(module.model_config)
            fresh.load_state_dict(sd, strict=True)
            save_released(fresh, args.out / "export")
            result["export"] = str(args.out / "export")
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
        for rk in every:  # the benchmark's numbers (steps after the first two)
            t = sorted(rk["step_times"][2:] or rk["step_times"])
            print(f"ZeRO-{args.stage} rank {rk['rank']}: {result['n_params']:,} params, step {t[len(t) // 2] * 1e3:.0f} ms "
                  f"(median), peak RSS {rk['peak_rss_bytes'] / 2**20:.0f} MiB, holds params "
                  f"{rk['policy_param_bytes'] / 2**20:.1f} + fp32 master {rk['master_bytes'] / 2**20:.1f} + grads "
                  f"{rk['grad_bytes'] / 2**20:.1f} + Adam {rk['optim_state_bytes'] / 2**20:.1f} MiB", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    a = parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    run(a)
