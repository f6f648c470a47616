"""One ``levo-train`` run: a plan resolved once from the composed config, then the trainer, the
data, the module and the datamodule built from it, fit, summary and export.

:func:`resolve_plan` reads everything a run is before anything is built -- the method and its typed
settings, the model config, ``model.init`` and its fingerprint, the LoRA spec, the resume point, the
LR schedule, the strategy -- and refuses settings that cannot work (a
:class:`~levo_train.settings.UsageError` naming the key). Every later step reads the
:class:`RunPlan`, never ``cfg`` for a fact the plan holds.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from levo_infer.checkpoint import CheckpointError, StateSource, check_keys, find_weights, load_weights
from levo_infer.config import ConfigError, ModelConfig
from levo_infer.integrity import IntegrityError
from levo_infer.jsonio import finite_or_none, write_json_atomic
from levo_infer.model import LeLM
from levo_train.checkpointing import AtomicCheckpointIO, clean_stale_temp_files
from levo_train.data.cache import CacheError
from levo_train.data.shards import ShardError
from levo_train.export import checkpoint_kind
from levo_train.fingerprint import model_fingerprint
from levo_train.guard import NONFINITE_MODES, NonFiniteError, RunStopped, StepGuard
from levo_train.locking import folder_lock, launch_rank
from levo_train.lora import LoraSpec, apply_lora, check_targets, lora_spec
from levo_train.methods import DataSpec, Method, get_method, stream_weights
from levo_train.progress import StepProgress
from levo_train.resume import (
    ResumePoint,
    Schedule,
    check_resume_checkpoint,
    find_resume_checkpoint,
    resolve_schedule,
)
from levo_train.settings import UsageError, build_model_config, check_init_path, on_cuda, resolve_run_dir
from levo_train.strategies import StrategyError, build_strategy, is_sharding, strategy_name, uses_meta_init
from levo_train.train.base import DeferredInit

#: errors a run reports in one line naming the file or setting (exit status 2), besides UsageError
USER_ERRORS = (CheckpointError, ConfigError, ShardError, CacheError, IntegrityError)
__all__ = ["USER_ERRORS", "RunPlan", "build_datamodule", "build_module", "build_trainer",
           "resolve_plan", "resolve_precision", "run", "set_tf32"]


@dataclass(frozen=True)
class RunPlan:
    """Everything a run is, resolved once (:func:`resolve_plan`); ``data`` once the trainer is built."""

    cfg: DictConfig
    run_dir: Path
    method: Method
    settings: Any              # the method's typed settings (method.Settings)
    model_config: ModelConfig
    init: Path | None          # model.init, checked
    init_fp: str | None        # its content hash: keys toy pairs and reference log-probs, ties a DPO resume to it
    lora: LoraSpec
    resume: ResumePoint | None = None
    schedule: Schedule | None = None
    strategy: str = "auto"
    sharding: bool = False
    meta_init: bool = False    # the policy is built on the meta device and filled in configure_model
    data: DataSpec | None = None


# ----------------------------------------------------------------------------- the plan
def resolve_plan(cfg: DictConfig, run_dir: Path) -> RunPlan:
    """The run's plan; a :class:`UsageError` for any setting it cannot use, before anything is built."""
    method = get_method(str(cfg.method))
    if method.needs_init and not cfg.model.get("init"):
        raise UsageError(method.needs_init)
    settings = method.settings(cfg)
    init = check_init_path(str(cfg.model.init)) if cfg.model.get("init") else None
    model_config = build_model_config(cfg, init)
    init_fp = model_fingerprint(init) if init is not None else None
    lora = resolve_lora(cfg, method, model_config)
    plan = RunPlan(cfg, run_dir, method, settings, model_config, init, init_fp, lora)
    resume = find_resume_checkpoint(run_dir, resume=bool(cfg.resume), ckpt_path=cfg.ckpt_path)
    if resume is not None:  # before any data or pairs are built
        check_resume_checkpoint(resume, model_config, lora)
        method.check_resume(resume, plan)
        print(f"levo-train: resuming from {resume.path} (step {resume.step})", file=sys.stderr)
    schedule = resolve_schedule(cfg, resume, lora)
    check_nonfinite_settings(cfg)
    strategy = check_strategy(cfg, method, lora, resume)
    # LoRA wraps the decoder's linear layers (``base_layer``, adapters drawn from the global RNG) after
    # the build: meta init does not replay that yet, so a LoRA run builds its (frozen) base whole first
    meta_init = uses_meta_init(cfg.get("strategy"), strategy) and not lora.enabled
    return dataclasses.replace(plan, resume=resume, schedule=schedule, strategy=strategy,
                               sharding=is_sharding(strategy), meta_init=meta_init)


def resolve_lora(cfg: DictConfig, method: Method, model_config: ModelConfig) -> LoraSpec:
    """``train.lora``, refused when this run cannot use it: bad settings, a method without adapters,
    target names that match no linear layer (checked on a meta model)."""
    try:
        lora = lora_spec(cfg)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e) if str(e).startswith("train.lora") else f"train.lora: {e}") from None
    if not lora.enabled:
        return lora
    if not method.supports_lora:
        raise UsageError(f"train.lora.r={lora.r}: recipe method {method.name} does not train with LoRA adapters "
                         "(they are for pretrain/sft, dpo and sdpo)")
    with torch.device("meta"):
        model = LeLM(model_config)
    try:
        check_targets(model, lora)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return lora


def check_nonfinite_settings(cfg: DictConfig) -> None:
    """``train.nonfinite`` / ``train.nonfinite_max_skips``, refused when unusable."""
    mode = str(cfg.train.get("nonfinite", "stop"))
    if mode not in NONFINITE_MODES:
        raise UsageError(f"train.nonfinite={mode}: expected one of {', '.join(NONFINITE_MODES)}")
    try:
        skips = int(cfg.train.get("nonfinite_max_skips", 20))
    except (TypeError, ValueError):
        skips = -1
    if skips < 0:
        raise UsageError(f"train.nonfinite_max_skips={cfg.train.get('nonfinite_max_skips')}: expected an integer >= 0")
    name = strategy_name(cfg.get("strategy"), cfg.trainer.get("strategy", "auto"))
    if mode == "skip" and name.startswith("deepspeed"):
        raise UsageError(f"train.nonfinite=skip with strategy={name}: DeepSpeed keeps the gradients inside its engine, "
                         "so a step cannot be skipped from outside; use train.nonfinite=stop")


def check_strategy(cfg: DictConfig, method: Method, lora: LoraSpec, resume: ResumePoint | None) -> str:
    """The effective strategy's name, refused when this run cannot use it."""
    name = strategy_name(cfg.get("strategy"), cfg.trainer.get("strategy", "auto"))
    sharding = is_sharding(name)
    if sharding and not method.supports_sharding:
        raise UsageError(f"strategy={name}: recipe method {method.name} does not train sharded yet; use strategy=ddp")
    if name.startswith("deepspeed") and not method.supports_deepspeed:
        raise UsageError(f"strategy={name}: recipe method {method.name} trains sharded under strategy=fsdp2 (or "
                         "unsharded under strategy=ddp), not under DeepSpeed")
    if name.startswith("deepspeed") and lora.enabled:
        raise UsageError(f"strategy={name} with train.lora.r={lora.r}: LoRA trains under strategy=fsdp2 (adapters "
                         "sharded with their layers) or strategy=ddp, not under DeepSpeed; drop one of the two")
    if resume is not None and name == "fsdp2" and Path(resume.path).is_file():
        # Lightning maps a one-file checkpoint's AdamW state to parameters by position, which our
        # decay / no-decay parameter groups reorder: refused rather than resumed with mixed-up moments
        raise UsageError(f"{resume.path} is a one-file checkpoint (strategy=auto/ddp): resume it with strategy=ddp, "
                         "or start an fsdp2 run from its weights (`levo-train export ckpt=...`, then model.init=EXPORT)")
    if resume is not None and Path(resume.path).is_dir():
        kind = checkpoint_kind(resume.path)
        needs = "fsdp2" if kind == "dcp" else "deepspeed_zero2/deepspeed_zero3"
        if (kind == "dcp" and name != "fsdp2") or (kind == "zero" and not name.startswith("deepspeed")):
            raise UsageError(f"{resume.path} is a sharded checkpoint of strategy={needs}, this run uses strategy={name}: "
                             f"resume with strategy={needs} (any number of ranks), or consolidate it with "
                             f"`levo-train export run_dir=...` and start from the export (model.init=...)")
    return name


# ----------------------------------------------------------------------------- built from the plan
def common_module_kwargs(plan: RunPlan) -> dict[str, Any]:
    """The keywords every Lightning module takes: optimiser, schedule, freezing, seed."""
    cfg, t, schedule = plan.cfg, plan.cfg.train, plan.schedule
    assert schedule is not None
    return dict(
        lr=schedule.lr, weight_decay=float(cfg.optim.weight_decay), betas=tuple(cfg.optim.betas),
        warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps, min_lr_ratio=schedule.min_lr_ratio,
        stream_weights=stream_weights(cfg), freeze=list(t.freeze),
        activation_checkpointing=bool(t.activation_checkpointing), seed=int(cfg.seed), init_weights=plan.init is None,
        meta_init=plan.meta_init,
    )


def build_module(plan: RunPlan) -> Any:
    """The method's Lightning module with the ``model.init`` weights loaded, then its LoRA adapters."""
    module = plan.method.build_module(plan, common_module_kwargs(plan))
    # data.truncate_lyrics: cut over-long lyrics (the datamodule warns per song) instead of refusing them;
    # copies of the model (a frozen DPO reference) inherit it
    module.model.truncate_lyrics = bool(plan.cfg.data.get("truncate_lyrics", False))
    if plan.init is not None:
        weights = find_weights(plan.init)
        if plan.meta_init:  # checked now, read in configure_model (rank 0 reads, every rank gets its shards)
            check_keys(module.model, StateSource(weights).meta, source=str(weights))
            module.deferred_init = DeferredInit(weights=weights)
        else:
            load_weights(module.model, weights)
        module.init_fingerprint = plan.init_fp
    if plan.lora.enabled:  # after the init weights: the adapters start at zero on top of them
        try:
            apply_lora(module.model, plan.lora)
        except ValueError as e:
            raise UsageError(str(e)) from None
        module.lora = plan.lora
    plan.method.after_init(module, plan)
    return module


def build_datamodule(plan: RunPlan, lyric_fit: Any = None) -> Any:
    """The method's datamodule over ``plan.data``; ``lyric_fit`` (the model's
    :class:`~levo_infer.model.LyricFit`) checks every record's lyric length."""
    d, data = plan.cfg.data, plan.data
    assert data is not None
    common = dict(train=data.train, val=data.val, batch_size=int(d.batch_size), val_batch_size=int(d.val_batch_size),
                  num_workers=int(d.num_workers), seed=int(plan.cfg.seed), code_size=plan.model_config.lm.code_size,
                  shuffle_buffer=int(d.shuffle_buffer), skip_bad=bool(d.skip_bad), lyric_fit=lyric_fit)
    return plan.method.build_datamodule(plan, common)


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """The Lightning Trainer: checkpoints (atomic; last.ckpt kept up to date), CSV and wandb logs,
    the step guard (non-finite steps, stop signals, the Slurm requeue) and the strategy."""
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=int(cfg.checkpoint.every_n_steps), save_top_k=int(cfg.checkpoint.keep_last),
                        monitor="step", mode="max", save_last=True,
                        # step-named files never collide; last.ckpt is always replaced (never last-v1.ckpt)
                        enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
    ]
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if cfg.logger.get("enabled"):
        os.environ.setdefault("WANDB_MODE", str(cfg.logger.mode))
        loggers.append(WandbLogger(project=str(cfg.logger.project), name=cfg.logger.name or run_dir.name,
                                   save_dir=str(run_dir), mode=str(cfg.logger.mode)))
    plugins: list[Any] = [AtomicCheckpointIO()]
    requeue = None
    if SLURMEnvironment.detect():
        # requeue on preemption at a step boundary (Lightning's in-handler save can deadlock DDP)
        plugins.append(SLURMEnvironment(auto_requeue=False))
        requeue = signal.SIGUSR1
    # non-finite steps, SIGTERM/SIGINT and the Slurm requeue, all at optimizer-step boundaries
    callbacks.append(StepGuard(nonfinite=str(cfg.train.get("nonfinite", "stop")),
                               max_skips=int(cfg.train.get("nonfinite_max_skips", 20)), requeue_signal=requeue))
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs["precision"] = resolve_precision(kwargs.get("precision"), str(kwargs.get("accelerator", "auto")))
    set_tf32(cfg.train.get("tf32", "auto"), str(kwargs.get("accelerator", "auto")))
    if kwargs.get("enable_progress_bar", True):  # step lines in place of Lightning's epoch bar
        callbacks.append(StepProgress(int(cfg.data.batch_size), every=int(cfg.train.get("progress_every", 50))))
    given = {k: kwargs.get(k) for k in ("accelerator", "devices", "num_nodes") if k in kwargs}
    given["strategy"] = strategy_name(cfg.get("strategy"), kwargs.get("strategy", "auto"))
    try:
        kwargs["strategy"] = build_strategy(cfg.get("strategy"), kwargs.get("strategy", "auto"),
                                            str(kwargs.get("accelerator", "auto")))
        if not isinstance(kwargs["strategy"], str):  # a sharding strategy writes its own (atomic) checkpoints
            plugins = [p for p in plugins if not isinstance(p, AtomicCheckpointIO)]
        return L.Trainer(default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers, plugins=plugins, **kwargs)
    except StrategyError as e:
        raise UsageError(str(e)) from None
    except (MisconfigurationException, ValueError, TypeError) as e:
        raise UsageError(f"the trainer settings {given} cannot be used here: {str(e).splitlines()[0]}") from None


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """``trainer.precision=auto``: ``bf16-mixed`` (fp32 weights, gradients and AdamW; bf16 autocast)
    on a CUDA GPU with bf16, else ``32-true`` (CPU: the toy world's figures and every test stay
    fp32). Any other value is Lightning's, passed as given."""
    if str(precision) != "auto":
        return precision
    if on_cuda(accelerator) and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def set_tf32(setting: Any, accelerator: str) -> bool:
    """``train.tf32``: TF32 for the fp32 matmuls and convolutions left outside autocast (``auto``:
    on with a CUDA GPU). The released model trains in bf16, whose 8-bit mantissa is coarser than
    TF32's 10 bits, so TF32 changes nothing it relies on. Returns whether it is on."""
    value = str(setting).lower()
    if value not in ("auto", "true", "false"):
        raise UsageError(f"train.tf32={setting}: expected auto, true or false")
    on = on_cuda(accelerator) if value == "auto" else value == "true"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


# ----------------------------------------------------------------------------- run
def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one recipe; returns (and writes to run_dir/summary.json) where the outputs are.

    One launch writes into a run folder at a time: launch rank 0 holds its lock
    (:mod:`levo_train.locking`) for the whole run; a second run into it is refused at once,
    naming the first one's host and pid."""
    run_dir = resolve_run_dir(cfg)
    with folder_lock(run_dir, "levo-train", rank=launch_rank()):
        return _train(cfg, run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    plan = resolve_plan(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir)  # bad trainer settings fail here, before any data is built
    code_size = plan.model_config.lm.code_size
    if plan.method.uses_toy(plan) and code_size != 64:  # checked before any toy data is built
        raise UsageError(f"the toy world has 64 codes but the model has code_size={code_size}; "
                         f"pass {plan.method.data_hint} for real data or a toy-sized model.init")
    plan = dataclasses.replace(plan, data=plan.method.resolve_data(plan))
    module = build_module(plan)
    dm = build_datamodule(plan, module.model.lyric_fit())
    for folder in (run_dir, run_dir / "checkpoints"):  # writes killed mid-way (checkpoints, requeue checkpoints)
        clean_stale_temp_files(folder)
    OmegaConf.save(cfg, run_dir / "train_config.yaml", resolve=True)
    val_start = None
    if plan.resume is None and plan.data.val is not None:
        val_start = trainer.validate(module, datamodule=dm, verbose=False)[0].get("val/loss")
    guard = next(c for c in trainer.callbacks if isinstance(c, StepGuard))
    try:
        with warnings.catch_warnings():  # frozen parts (a DPO reference) are in eval mode on purpose
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
            trainer.fit(module, datamodule=dm, ckpt_path=plan.resume.path if plan.resume else None,
                        weights_only=True)
    except (NonFiniteError, RunStopped) as e:
        _stopped_summary(e, trainer, run_dir, guard, plan.resume)
        _finish_wandb(trainer)
        raise
    finally:
        guard.restore()
    try:
        return _finish(plan, trainer, module, guard, val_start)
    finally:
        _finish_wandb(trainer)


def _finish_wandb(trainer: L.Trainer) -> None:
    """Close the wandb run now, not at interpreter exit: its closing lines printed from the exit hook
    carry colour codes into log files (printed here, they are plain when stderr is not a terminal)."""
    for lg in trainer.loggers:
        run = getattr(lg, "_experiment", None) if isinstance(lg, WandbLogger) else None
        if run is not None and hasattr(run, "finish"):
            run.finish()


def _finish(plan: RunPlan, trainer: L.Trainer, module: Any, guard: StepGuard, val_start: Any) -> dict[str, Any]:
    """After the fit: the full last checkpoint, summary.json and (rank 0) the export."""
    run_dir, resume, data = plan.run_dir, plan.resume, plan.data
    assert data is not None
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)  # the full state (not "weights only"): an exact resume needs it
    metrics = trainer.callback_metrics
    summary: dict[str, Any] = {"status": "done", "run_dir": str(run_dir), "last_checkpoint": str(last),
                               "global_step": trainer.global_step,
                               "data": {"train": _location(data.train), "val": _location(data.val)},
                               "resumed_from": {"path": resume.path, "step": resume.step} if resume else None,
                               "val_loss_start": finite_or_none(val_start),
                               "val_loss_end": finite_or_none(metrics.get("val/loss")),
                               "val_metrics": {k: finite_or_none(v) for k, v in metrics.items() if k.startswith("val/")},
                               "nonfinite_skipped": {"count": len(guard.skipped_steps),
                                                     "steps": guard.skipped_steps[:100]}}
    bad_val = [k for k, v in metrics.items() if k.startswith("val/") and finite_or_none(v) is None]
    if bad_val:
        print(f"levo-train: warning: validation metrics {', '.join(bad_val)} are not finite (null in summary.json)",
              file=sys.stderr)
    if plan.sharding:  # the sharded last.ckpt is complete on every rank before rank 0 consolidates it
        trainer.strategy.barrier("levo-export")
    if trainer.is_global_zero:
        if plan.cfg.export.enabled:
            dtype = getattr(torch, str(plan.cfg.export.dtype)) if plan.cfg.export.dtype else None
            export = run_dir / "export"
            if plan.sharding:  # consolidated from the checkpoint just written: `levo-train export` does the same
                plan.method.export_checkpoint(last, export, dtype)
            else:
                plan.method.export(module, export, dtype)
            summary["export"] = str(export)
        write_json_atomic(run_dir / "summary.json", summary, indent=2)
        _print_done(plan, trainer, guard, summary, val_start)
    return summary


def _print_done(plan: RunPlan, trainer: L.Trainer, guard: StepGuard, summary: dict[str, Any], val_start: Any) -> None:
    print(f"\nlevo-train {plan.cfg.recipe_name}: done at step {trainer.global_step}")
    if guard.skipped_steps:
        print(f"  non-finite steps skipped: {len(guard.skipped_steps)} (train.nonfinite=skip; "
              f"steps {guard.skipped_steps[:10]}{' ...' if len(guard.skipped_steps) > 10 else ''})")
    for k in ("run_dir", "last_checkpoint", "export"):
        if k in summary:
            print(f"  {k:16s} {summary[k]}")
    metrics = {k: finite_or_none(v) for k, v in trainer.callback_metrics.items()}
    end = summary["val_loss_end"]
    if val_start is not None or end is not None:
        start = "n/a" if finite_or_none(val_start) is None else f"{val_start:.4f}"
        print(f"  val/loss         {start} -> {'n/a' if end is None else f'{end:.4f}'}")
    if metrics.get("train/loss") is not None:
        print(f"  train/loss       {metrics['train/loss']:.4f} (last step)")
    for line in plan.method.summary_lines(metrics, Path(summary["run_dir"])):
        print(line)


def _location(spec: Any) -> str | list[str] | None:
    """A data location for summary.json: one path or pattern, a list of them, or None."""
    return None if spec is None else [str(x) for x in spec] if isinstance(spec, (list, tuple)) else str(spec)


def _stopped_summary(e: Exception, trainer: Any, run_dir: Path, guard: Any, resume: ResumePoint | None) -> None:
    """A run that ended early (a non-finite step, a stop signal): ``summary.json`` says so and where
    to continue from; a :class:`~levo_train.guard.NonFiniteError` gets its one-line advice."""
    summary: dict[str, Any]
    if isinstance(e, NonFiniteError):
        if guard.last_saved_step is not None:
            ck, at = str(run_dir / "checkpoints" / "last.ckpt"), guard.last_saved_step
        else:
            ck, at = (resume.path, resume.step) if resume is not None else (None, None)
        if ck:
            e.advice = (f"the last finite checkpoint is {ck} (step {at}). resume=true repeats the same step: export it "
                        f"(`levo-train export run_dir={run_dir}`) and start a new run from it with a lower optim.lr "
                        "(model.init=<that export>), or go on with resume=true train.nonfinite=skip")
        else:
            e.advice = ("no checkpoint was written before it: start again with a lower optim.lr (or "
                        "train.nonfinite=skip to skip such steps)")
        summary = {"status": "failed", "error": f"{e}; {e.advice}", "run_dir": str(run_dir), "failed_step": e.step,
                   "global_step": trainer.global_step, "last_checkpoint": ck, "last_checkpoint_step": at}
    else:
        assert isinstance(e, RunStopped)
        summary = {"status": "stopped", "stopped_by": e.signame, "run_dir": str(run_dir), "global_step": e.step,
                   "last_checkpoint": e.checkpoint, "resume": "the same command plus resume=true"}
    summary["resumed_from"] = {"path": resume.path, "step": resume.step} if resume else None
    summary["nonfinite_skipped"] = {"count": len(guard.skipped_steps), "steps": guard.skipped_steps[:100]}
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "summary.json", summary, indent=2)
