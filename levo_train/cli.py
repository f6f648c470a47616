"""``levo-train recipe=NAME [overrides]``: wires hydra config -> data, model, Lightning Trainer.

Configs live in ``configs/`` (groups model/ data/ optim/ trainer/ logger/) and recipes in
``recipes/`` (the ``recipe`` group). With no data given, the built-in toy song world is used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from levo_infer.jsonio import write_json_atomic

log = logging.getLogger("levo_train")

MAIN_OVERRIDES = """\
main overrides:
  recipe=NAME                 which recipe to run (required)
  run_dir=PATH                output folder (default runs/<recipe>-<time>, or $LEVO_RUNS/...)
  model.init=PATH             start from a released model folder or a levo-train export
  model.strict=true           unknown or missing keys in its config.yaml are errors (default: warnings)
  data.train=DIR data.val=DIR song shards (default: the built-in toy song world): a folder, a .tar, a glob
                              'DIR/*.tar', a brace pattern "'DIR/train-{000000..000009}.tar'" or a list [A,B]
  data.truncate_lyrics=true   cut lyrics longer than the model's lyric positions (lyric_max_len), with a
                              warning per song (default: such a record is an error naming shard and key)
  data.batch_size=N           per-device batch size
  optim.lr=X                  peak learning rate (warmup + cosine)
  trainer.max_steps=N         any Lightning Trainer argument: trainer.devices=8, trainer.precision=bf16-mixed, ...
  checkpoint.every_n_steps=N  checkpoint interval (atomic writes; last.ckpt is kept up to date)
  resume=true                 continue run_dir exactly from its newest checkpoint that loads (its LR schedule too)
  ckpt_path=PATH              start from this checkpoint (with resume=true: only while run_dir has none)
  optim.total_steps=N         LR schedule length (default max_steps; on resume the checkpoint's: going past
                              its end needs optim.total_steps explicitly)
  logger=none                 disable wandb (offline by default; WANDB_MODE=online to sync)
  strategy=NAME               auto | ddp | fsdp2 | deepspeed_zero2 | deepspeed_zero3 (configs/strategy/)
  train.activation_checkpointing=true   recompute each decoder layer in backward
  train.nonfinite=stop|skip   a step whose loss or gradient norm is NaN/inf: stop the run before applying it
                              (exit 1, the newest checkpoint is the last finite one; default) or skip its update
                              (counted in summary.json; more than train.nonfinite_max_skips=20 skipped steps stop)

exit status: 0 done; 1 failed (non-finite step, checkpoint write, run folder in use by another run); 2 bad
settings; 143 / 130 stopped by SIGTERM / SIGINT after the current optimizer step and a resumable checkpoint
(continue with the same command plus resume=true). One run per run_dir at a time: a second one is refused,
naming the first (host, pid); a lock left by a dead process is taken over.

levo-train export run_dir=R [ckpt=PATH] [out=DIR] [dtype=bfloat16]
               consolidate R's newest complete checkpoint (any strategy: file, FSDP2 or ZeRO folder) into
               the released-format export (default R/export)

recipe=dpo:    data.pairs=DIR (default: toy pairs sampled from model.init; data.toy_pairs.scorer=rm:DIR ranks
               them by a reward model) dpo.beta=0.5 dpo.loss_type=sigmoid dpo.reference=model|precomputed
recipe=reward: data.train=DIR (scored songs) | data.pairs=DIR (Bradley-Terry) reward.layers=N
               reward.pooling=mean_logp|mean|attn reward.rank_loss=bt|listmle|none
recipe=sdpo:   reward.ckpt=RM_EXPORT | reward.scorer=toy|SPEC  sdpo.sync_every=30 sdpo.prompts_per_round=300
               sdpo.per_prompt=4 sdpo.min_margin=0.05 sdpo.ref_sync_every=0 sdpo.prompts=JSONL|SHARDS
"""


class UsageError(SystemExit):
    """A user-facing configuration error: printed without a traceback, exit status 2."""

    def __init__(self, msg: str) -> None:
        super().__init__(2)
        self.msg = msg


def known_recipes() -> list[str]:
    files = resources.files("levo_train.configs.recipe")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("toy_vocab"):
        def toy_vocab(seed: Any = 0) -> list[str]:
            from levo_train.toy.world import ToyWorld

            return list(ToyWorld(int(seed)).vocabulary())

        OmegaConf.register_new_resolver("toy_vocab", toy_vocab)


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose ``train.yaml`` with the command-line overrides; clear errors for bad recipes."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    _register_resolvers()
    recipes = known_recipes()
    names = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "recipe" and "=" in o]
    if not names:
        raise UsageError(f"no recipe given: pass recipe=NAME with NAME one of {', '.join(recipes)}")
    if names[-1] not in recipes:
        raise UsageError(f"unknown recipe {names[-1]!r}; known recipes: {', '.join(recipes)}")
    try:
        with initialize_config_module(config_module="levo_train.configs", version_base="1.3"):
            # any Lightning Trainer argument may be given as trainer.KEY=VALUE: keys that the
            # trainer config does not list are appended (+trainer.KEY) instead of overridden
            trainer_ovr = [o for o in overrides if o.startswith("trainer.") and "=" in o]
            if trainer_ovr:
                rest = [o for o in overrides if o not in trainer_ovr]
                known = compose(config_name="train", overrides=rest).trainer
                overrides = rest + [o if o.split("=", 1)[0].split(".")[1] in known else "+" + o for o in trainer_ovr]
            return compose(config_name="train", overrides=overrides)
    except HydraException as e:
        raise UsageError(f"bad override: {e}") from e


def print_help() -> None:
    print("usage: levo-train recipe=NAME [key=value ...]\n")
    print(f"recipes: {', '.join(known_recipes())}\n")
    print(MAIN_OVERRIDES)
    print("Show the composed config without running: levo-train recipe=sft --cfg")


# ----------------------------------------------------------------------------- pieces
def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(str(cfg.run_dir))
    root = Path(os.environ.get("LEVO_RUNS", "runs"))
    return root / f"{cfg.recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def toy_cache_root(cfg: DictConfig) -> Path:
    if cfg.data.toy.get("cache_dir"):
        return Path(str(cfg.data.toy.cache_dir))
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "levo-train" / "toy"


def check_init_path(init: str) -> Path:
    p = Path(init)
    if not p.exists():
        raise UsageError(f"model.init={init}: path does not exist (expected a released model folder or a "
                         "levo-train export folder holding config.yaml + model.pt, e.g. RUN_DIR/export)")
    if p.is_file():
        p = p.parent
    missing = [n for n in ("config.yaml",) if not (p / n).is_file()]
    if missing or not any((p / n).is_file() for n in ("model.pt", "model.safetensors")):
        raise UsageError(f"model.init={init}: folder lacks {missing or ['model.pt']} (expected config.yaml + model.pt)")
    from levo_infer.checkpoint import CheckpointError, find_weights, verify_model_files

    try:  # before its config.yaml is read: a corrupted export is refused, not half-used
        verify_model_files(p, find_weights(p))
    except CheckpointError as e:
        raise UsageError(f"model.init={init}: {e}") from None
    return p


def build_model_config(cfg: DictConfig):  # -> ModelConfig
    from levo_infer.config import load_config, make_config

    strict = bool(cfg.model.get("strict", False))
    if cfg.model.get("init"):
        return load_config(check_init_path(str(cfg.model.init)), strict=strict)
    if cfg.model.get("config_file"):
        return load_config(str(cfg.model.config_file), strict=strict)
    return make_config(**OmegaConf.to_container(cfg.model.config, resolve=True))


def check_init_overrides(cfg: DictConfig, argv: list[str]) -> None:
    """``model.config.*`` given with ``model.init``: the init's config.yaml decides the model, so an
    override that asks for something else is an error, not silently ignored (matching ones pass)."""
    ovr = [o for o in argv if o.split("=", 1)[0].lstrip("+~").startswith("model.config.")]
    if not ovr or not cfg.model.get("init"):
        return
    from levo_infer.config import config_differences, load_config, make_config

    base = compose_config([o for o in argv if o not in ovr])
    want = make_config(**OmegaConf.to_container(cfg.model.config, resolve=True))
    asked = {name for name, _, _ in config_differences(make_config(**OmegaConf.to_container(base.model.config,
                                                                                             resolve=True)), want)}
    init = check_init_path(str(cfg.model.init))
    with warnings.catch_warnings():  # build_model_config reports the init's config problems once
        warnings.simplefilter("ignore")
        init_config = load_config(init)
    for name, have, wanted in config_differences(init_config, want):
        if name in asked:
            raise UsageError(f"model.init={init} is a model with {name}={have!r}, but {' '.join(ovr)} asks for "
                             f"{wanted!r}: the init's config.yaml decides the model; drop the model.config "
                             "override or start from an init of that size")


@dataclass
class ResumePoint:
    """A checkpoint to continue from, read (``weights_only``) and checked before anything is built."""

    path: str
    step: int
    levo: dict[str, Any]


#: what every levo-train checkpoint's ``levo`` section holds
LEVO_KEYS = ("samples_seen", "dropout_gen", "rng", "model_config")


def read_checkpoint_state(path: str | os.PathLike, *, verify: bool = True) -> ResumePoint:
    """Read a Lightning checkpoint (a file, or a sharded checkpoint folder's metadata) without
    running code (``weights_only=True``) and check it is one of ours and complete; raises
    ``ValueError`` saying what is wrong. ``verify``: check every byte against its checksums first
    (:func:`levo_train.export.verify_checkpoint`); without, only the metadata is read."""
    from levo_train.export import read_checkpoint

    ck = read_checkpoint(path, verify=verify)
    st = ck.get("levo")
    if st is None:
        raise ValueError("no `levo` section: not a levo-train checkpoint, cannot resume exactly")
    if not isinstance(st, dict):
        raise ValueError(f"its `levo` section is a {type(st).__name__}, expected a dict with {', '.join(LEVO_KEYS)}")
    missing = [k for k in LEVO_KEYS if k not in st]
    sharded = Path(path).is_dir()  # a folder's weights are in the shards, not in this dict
    if missing or not isinstance(ck.get("global_step"), int) or ("state_dict" not in ck and not sharded):
        what = f"`levo` lacks {missing}" if missing else "no global_step / state_dict"
        raise ValueError(f"incomplete levo-train checkpoint ({what})")
    return ResumePoint(str(path), int(ck["global_step"]), st)


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint of a run folder: ``checkpoints/{last,step*}.ckpt`` and the requeue
    checkpoints ``hpc_ckpt_N.ckpt`` in the run root (temp files excluded); each a file, or a
    folder under a sharding strategy."""
    from levo_train.slurm import hpc_checkpoints

    ck = run_dir / "checkpoints"
    last = [ck / "last.ckpt"] if (ck / "last.ckpt").exists() else []
    return last + sorted(ck.glob("step*.ckpt")) + hpc_checkpoints(run_dir)


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> ResumePoint | None:
    """Where this run continues from.

    ``resume=true``: the newest (highest step) checkpoint of ``run_dir`` that loads; one that does
    not load -- unreadable, incomplete, a rank file missing, or bytes that fail their checksums --
    is skipped with a warning naming it; when checkpoints exist but none loads, an error (never a
    silent restart at step 0). Without any checkpoint, ``ckpt_path`` if given, else a fresh start.
    ``ckpt_path`` alone: exactly that file. Neither, into a run folder that already holds
    checkpoints: an error (a fresh run would mix its checkpoints with the old ones). Only the
    metadata of every checkpoint is read to order them; their bytes are verified newest first,
    until one passes.
    """
    from levo_train.export import verify_checkpoint

    found = run_checkpoints(run_dir)
    if cfg.resume and found:
        readable: list[ResumePoint] = []
        failed: list[tuple[Path, ValueError]] = []
        for p in found:
            try:
                readable.append(read_checkpoint_state(p, verify=False))
            except ValueError as e:
                failed.append((p, e))
        best: ResumePoint | None = None
        # the highest step first; at equal steps the first listed (last.ckpt, a step file, hpc)
        for rp in sorted(readable, key=lambda r: -r.step):
            try:
                verify_checkpoint(rp.path)
            except ValueError as e:
                failed.append((Path(rp.path), e))
                continue
            best = rp
            break
        if best is None:  # one line, with each checkpoint's reason (e.g. the file inside it that was refused)
            why = "; ".join(f"{p.name}: {e}" for p, e in failed[:4])
            raise UsageError(f"resume=true: {run_dir} holds {len(found)} checkpoint(s) but no checkpoint loads ({why}); "
                             "refusing to restart from step 0. Move them away (or use a new run_dir) to start over")
        for p, e in failed:
            print(f"levo-train: warning: {p} cannot be loaded ({e}); skipping it", file=sys.stderr)
        if cfg.ckpt_path:
            print(f"levo-train: resume=true and {run_dir} has checkpoints: continuing the run "
                  f"(ckpt_path={cfg.ckpt_path} only starts a run)", file=sys.stderr)
        return best
    if cfg.ckpt_path:
        p = Path(str(cfg.ckpt_path))
        if not p.exists():
            raise UsageError(f"ckpt_path={p}: no such checkpoint file or folder")
        try:
            return read_checkpoint_state(p)
        except ValueError as e:
            raise UsageError(f"ckpt_path={p}: {e}") from None
    if found:
        raise UsageError(f"{run_dir} already holds checkpoints ({', '.join(p.name for p in found[:3])}): pass "
                         "resume=true to continue that run, or choose a new run_dir")
    if cfg.resume:
        log.info("resume=true but %s has no checkpoint yet: starting a fresh run", run_dir)
    return None


def check_resume_checkpoint(rp: ResumePoint, model_config: Any, cfg: DictConfig, init_fp: str | None) -> None:
    """Refuse, before Lightning's loader fails with pages of shape errors, a checkpoint of another
    model config, then run the method's own resume check (e.g. DPO: the reference's init)."""
    st = rp.levo
    mc = st.get("model_config")
    if not isinstance(mc, dict):
        raise UsageError(f"{rp.path}: its `levo.model_config` is a {type(mc).__name__}, expected a dict")
    from levo_train.data.cache import dict_differences

    diff = dict_differences(mc, model_config.to_dict())
    if diff:
        k, have, want = diff[0]
        raise UsageError(f"{rp.path} holds a model with {k}={have!r}, this run builds {k}={want!r} "
                         f"({len(diff)} config field(s) differ): resume with the model.init / model config the run "
                         "was started with, or use a new run_dir")
    from levo_train.lora import lora_spec
    from levo_train.methods import get_method

    lora_then, lora_now = st.get("lora"), (lora_spec(cfg).identity() if lora_spec(cfg).enabled else None)
    if lora_then != lora_now:
        raise UsageError(f"{rp.path} was trained with train.lora={lora_then or 'off'}, this run asks for "
                         f"{lora_now or 'off'}: resume with the run's own adapter settings (or use a new run_dir)")
    check = get_method(str(cfg.method)).check_resume
    if check is not None:
        check(rp, cfg, init_fp)


@dataclass
class Schedule:
    """The LR schedule of a run (AdamW peak ``lr``, linear warmup, cosine to ``min_lr_ratio`` at
    ``total_steps``); stored in every checkpoint so that a resume continues the same one."""

    lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def lr_at(self, step: int) -> float:
        from levo_train.train.base import warmup_cosine

        return self.lr * warmup_cosine(step, warmup=self.warmup_steps, total=self.total_steps,
                                       min_ratio=self.min_lr_ratio)


def resolve_schedule(cfg: DictConfig, rp: ResumePoint | None) -> Schedule:
    """This run's schedule: from ``optim.*`` for a new run (length ``optim.total_steps``, default
    ``trainer.max_steps``); on resume the checkpoint's own, so that stopping and resuming changes
    nothing. Going past its end is explicit (``optim.total_steps``); other ``optim`` values that
    contradict the checkpoint are refused (a resume would silently keep the old ones)."""
    from levo_train.lora import lora_spec

    o, max_steps = cfg.optim, int(cfg.trainer.max_steps)
    asked = int(o.total_steps) if o.get("total_steps") else None
    lora = lora_spec(cfg)
    lr = lora.learning_rate(float(o.lr)) if lora.enabled else float(o.lr)  # LoRA: the adapters' own LR
    new = Schedule(lr, int(o.warmup_steps), asked or max_steps, float(o.min_lr_ratio))
    if rp is None:
        return new
    stored = rp.levo.get("schedule")
    if not isinstance(stored, dict):
        log.warning("%s stores no LR schedule (an older levo-train): using this run's optim settings", rp.path)
        return new
    for k in ("lr", "warmup_steps", "min_lr_ratio"):
        if float(stored[k]) != float(getattr(new, k)):
            raise UsageError(f"{rp.path} was trained with optim.{k}={stored[k]}, this run asks for optim.{k}="
                             f"{getattr(new, k)}: a resume continues the run's own schedule. Drop the override, or "
                             "start a new run from the checkpoint's weights (model.init=RUN/export)")
    then = Schedule(float(stored["lr"]), int(stored["warmup_steps"]), int(stored["total_steps"]),
                    float(stored["min_lr_ratio"]))
    if asked is None:
        if max_steps > then.total_steps:
            stretched = dataclasses.replace(then, total_steps=max_steps)
            raise UsageError(
                f"{rp.path}: the run's LR schedule ends at step {then.total_steps} (optim.total_steps), but "
                f"trainer.max_steps={max_steps} goes past it. Extending a run is explicit: "
                f"optim.total_steps={then.total_steps} goes on at the final LR ({then.lr_at(rp.step):.3g}); "
                f"optim.total_steps={max_steps} stretches the cosine (the LR at step {rp.step} jumps from "
                f"{then.lr_at(rp.step):.3g} to {stretched.lr_at(rp.step):.3g})")
        return then
    if asked != then.total_steps:
        now = dataclasses.replace(then, total_steps=asked)
        msg = (f"optim.total_steps={asked} changes the run's LR schedule (it ended at step {then.total_steps}): at step "
               f"{rp.step} the LR goes from {then.lr_at(rp.step):.3g} to {now.lr_at(rp.step):.3g}")
        print(f"levo-train: warning: {msg}", file=sys.stderr)
        return now
    return then


def _common_module_kwargs(cfg: DictConfig, schedule: Schedule) -> dict[str, Any]:
    t = cfg.train
    return dict(
        lr=schedule.lr, weight_decay=float(cfg.optim.weight_decay), betas=tuple(cfg.optim.betas),
        warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps, min_lr_ratio=schedule.min_lr_ratio,
        stream_weights=list(t.stream_weights) if t.stream_weights is not None else None,
        freeze=list(t.freeze), activation_checkpointing=bool(t.activation_checkpointing), seed=int(cfg.seed),
        init_weights=not cfg.model.get("init"),
    )


def build_module(cfg: DictConfig, model_config: Any, schedule: Schedule, init_fp: str | None = None):
    """The Lightning module of the recipe's method, with ``model.init`` weights loaded
    (``init_fp``: the init's fingerprint, recorded in checkpoints)."""
    from levo_infer.checkpoint import find_weights, load_weights
    from levo_train.lora import apply_lora, lora_spec
    from levo_train.methods import get_method

    method = get_method(str(cfg.method))
    check_lora(cfg, method, model_config)
    lora = lora_spec(cfg)
    module = method.build_module(cfg, model_config, _common_module_kwargs(cfg, schedule), init_fp)
    # data.truncate_lyrics: cut over-long lyrics (the datamodule warns per song) instead of refusing them;
    # copies of the model (a frozen DPO reference) inherit it
    module.model.truncate_lyrics = bool(cfg.data.get("truncate_lyrics", False))
    if cfg.model.get("init"):
        load_weights(module.model, find_weights(check_init_path(str(cfg.model.init))))
        module.init_fingerprint = init_fp
    if lora.enabled:  # after the init weights: the adapters start at zero on top of them
        try:
            apply_lora(module.model, lora)
        except ValueError as e:
            raise UsageError(str(e)) from None
        module.lora = lora
    if method.after_init is not None:
        method.after_init(module, cfg)
    return module


def check_lora(cfg: DictConfig, method: Any, model_config: Any) -> None:
    """Refuse, before any data is built, LoRA settings this run cannot use: a bad ``train.lora``, a
    method without adapters, target names that match no linear layer (checked on a meta model)."""
    from levo_train.lora import check_targets, lora_spec

    try:
        lora = lora_spec(cfg)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e) if str(e).startswith("train.lora") else f"train.lora: {e}") from None
    if not lora.enabled:
        return
    if not method.supports_lora:
        raise UsageError(f"train.lora.r={lora.r}: recipe method {method.name} does not train with LoRA adapters "
                         "(they are for pretrain/sft, dpo and sdpo)")
    import torch

    from levo_infer.model import LeLM

    with torch.device("meta"):
        model = LeLM(model_config)
    try:
        check_targets(model, lora)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_strategy(cfg: DictConfig, method: Any, resume: ResumePoint | None) -> bool:
    """Refuse, before anything is built, a strategy this run cannot use; True when it shards the model."""
    from levo_train.lora import lora_spec
    from levo_train.strategies import is_sharding, strategy_name

    name = strategy_name(cfg.get("strategy"), cfg.trainer.get("strategy", "auto"))
    sharding = is_sharding(name)
    if sharding and not method.supports_sharding:
        raise UsageError(f"strategy={name}: recipe method {method.name} does not train sharded yet; use strategy=ddp")
    if sharding and lora_spec(cfg).enabled:
        raise UsageError(f"strategy={name} with train.lora.r={lora_spec(cfg).r}: LoRA trains with strategy=ddp (the "
                         "frozen base fits each GPU: README \"Memory model\"); drop one of the two")
    if resume is not None and name == "fsdp2" and Path(resume.path).is_file():
        # Lightning maps a one-file checkpoint's AdamW state to parameters by position, which our
        # decay / no-decay parameter groups reorder: refused rather than resumed with mixed-up moments
        raise UsageError(f"{resume.path} is a one-file checkpoint (strategy=auto/ddp): resume it with strategy=ddp, "
                         "or start an fsdp2 run from its weights (`levo-train export ckpt=...`, then model.init=EXPORT)")
    if resume is not None and Path(resume.path).is_dir():
        from levo_train.export import checkpoint_kind

        kind = checkpoint_kind(resume.path)
        needs = "fsdp2" if kind == "dcp" else "deepspeed_zero2/deepspeed_zero3"
        if (kind == "dcp" and name != "fsdp2") or (kind == "zero" and not name.startswith("deepspeed")):
            raise UsageError(f"{resume.path} is a sharded checkpoint of strategy={needs}, this run uses strategy={name}: "
                             f"resume with strategy={needs} (any number of ranks), or consolidate it with "
                             f"`levo-train export run_dir=...` and start from the export (model.init=...)")
    return sharding


def build_trainer(cfg: DictConfig, run_dir: Path):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from levo_train.checkpointing import AtomicCheckpointIO

    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=int(cfg.checkpoint.every_n_steps), save_top_k=int(cfg.checkpoint.keep_last),
                        monitor="step", mode="max", save_last=True,
                        # step-named files never collide; last.ckpt is always replaced (never last-v1.ckpt)
                        enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
    ]
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if cfg.logger.get("enabled"):
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", str(cfg.logger.mode))
        loggers.append(WandbLogger(project=str(cfg.logger.project), name=cfg.logger.name or run_dir.name,
                                   save_dir=str(run_dir), mode=str(cfg.logger.mode)))
    plugins: list[Any] = [AtomicCheckpointIO()]
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from levo_train.guard import StepGuard

    requeue = None
    if SLURMEnvironment.detect():
        # requeue on preemption at a step boundary (Lightning's in-handler save can deadlock DDP)
        plugins.append(SLURMEnvironment(auto_requeue=False))
        requeue = signal.SIGUSR1
    # non-finite steps, SIGTERM/SIGINT and the Slurm requeue, all at optimizer-step boundaries
    callbacks.append(StepGuard(nonfinite=str(cfg.train.get("nonfinite", "stop")),
                               max_skips=int(cfg.train.get("nonfinite_max_skips", 20)), requeue_signal=requeue))
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from levo_train.strategies import StrategyError, build_strategy, strategy_name

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


def build_datamodule(cfg: DictConfig, train: Any, val: Any, code_size: int, init_fp: str | None = None,
                     lyric_fit: Any = None):
    """The recipe method's datamodule over ``train`` / ``val``; ``lyric_fit`` (the model's
    :class:`~levo_infer.model.LyricFit`) checks every record's lyric length."""
    from levo_train.methods import get_method

    d = cfg.data
    common = dict(train=train, val=val, batch_size=int(d.batch_size), val_batch_size=int(d.val_batch_size),
                  num_workers=int(d.num_workers), seed=int(cfg.seed), code_size=code_size,
                  shuffle_buffer=int(d.shuffle_buffer), skip_bad=bool(d.skip_bad), lyric_fit=lyric_fit)
    return get_method(str(cfg.method)).build_datamodule(cfg, train, val, code_size, init_fp, common)


def check_nonfinite_settings(cfg: DictConfig) -> None:
    """``train.nonfinite`` / ``train.nonfinite_max_skips``, refused before anything is built when unusable."""
    from levo_train.guard import NONFINITE_MODES
    from levo_train.strategies import strategy_name

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


# ----------------------------------------------------------------------------- run
def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one recipe; returns (and writes to run_dir/summary.json) where the outputs are.

    One launch writes into a run folder at a time: launch rank 0 holds its lock
    (:mod:`levo_train.locking`) for the whole run; a second run into it is refused at once,
    naming the first one's host and pid."""
    from levo_train.locking import folder_lock, launch_rank

    run_dir = resolve_run_dir(cfg)
    with folder_lock(run_dir, "levo-train", rank=launch_rank()):
        return _train(cfg, run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    import lightning as L

    from levo_train.checkpointing import clean_stale_temp_files

    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    from levo_train.methods import get_method

    method = get_method(str(cfg.method))
    if method.needs_init and not cfg.model.get("init"):
        raise UsageError(method.needs_init)
    model_config = build_model_config(cfg)
    # the init's content hash, once per run: it keys the toy pairs and reference log-probs and
    # ties a DPO resume to its reference
    init_fp = None
    if cfg.model.get("init"):
        from levo_train.fingerprint import model_fingerprint

        init_fp = model_fingerprint(check_init_path(str(cfg.model.init)))
    resume = find_resume_checkpoint(cfg, run_dir)
    if resume is not None:  # before any data or pairs are built
        check_resume_checkpoint(resume, model_config, cfg, init_fp)
        print(f"levo-train: resuming from {resume.path} (step {resume.step})", file=sys.stderr)
    schedule = resolve_schedule(cfg, resume)
    check_lora(cfg, method, model_config)
    check_nonfinite_settings(cfg)
    sharding = check_strategy(cfg, method, resume)
    trainer = build_trainer(cfg, run_dir)  # bad trainer settings fail here, before any data is built
    if method.uses_toy(cfg) and model_config.lm.code_size != 64:  # checked before any toy data is built
        raise UsageError(f"the toy world has 64 codes but the model has code_size={model_config.lm.code_size}; "
                         f"pass {method.data_hint} for real data or a toy-sized model.init")
    train, val, _ = method.resolve_data(cfg, init_fp)
    module = build_module(cfg, model_config, schedule, init_fp)
    dm = build_datamodule(cfg, train, val, model_config.lm.code_size, init_fp, module.model.lyric_fit())
    for folder in (run_dir, run_dir / "checkpoints"):  # writes killed mid-way (checkpoints, requeue checkpoints)
        clean_stale_temp_files(folder)
    OmegaConf.save(cfg, run_dir / "train_config.yaml", resolve=True)
    val_start = None
    if resume is None and val is not None:
        val_start = trainer.validate(module, datamodule=dm, verbose=False)[0].get("val/loss")
    from levo_train.guard import NonFiniteError, RunStopped, StepGuard

    guard = next(c for c in trainer.callbacks if isinstance(c, StepGuard))
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume.path if resume else None, weights_only=True)
    except (NonFiniteError, RunStopped) as e:
        _stopped_summary(e, trainer, run_dir, guard, resume)
        raise
    finally:
        guard.restore()
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)  # the full state (not "weights only"): an exact resume needs it
    summary: dict[str, Any] = {"status": "done", "run_dir": str(run_dir), "last_checkpoint": str(last),
                               "global_step": trainer.global_step,
                               "data": {"train": _location(train), "val": _location(val)},
                               "resumed_from": {"path": resume.path, "step": resume.step} if resume else None,
                               "val_loss_start": _to_float(val_start),
                               "val_loss_end": _to_float(trainer.callback_metrics.get("val/loss")),
                               "val_metrics": {k: _to_float(v) for k, v in trainer.callback_metrics.items()
                                               if k.startswith("val/")},
                               "nonfinite_skipped": {"count": len(guard.skipped_steps),
                                                     "steps": guard.skipped_steps[:100]}}
    bad_val = [k for k, v in trainer.callback_metrics.items() if k.startswith("val/") and _to_float(v) is None]
    if bad_val:
        print(f"levo-train: warning: validation metrics {', '.join(bad_val)} are not finite (null in summary.json)",
              file=sys.stderr)
    if sharding:  # the sharded last.ckpt is complete on every rank before rank 0 consolidates it
        trainer.strategy.barrier("levo-export")
    if trainer.is_global_zero:
        if cfg.export.enabled:
            import torch

            from levo_train.methods import export_policy

            dtype = getattr(torch, str(cfg.export.dtype)) if cfg.export.dtype else None
            export = run_dir / "export"
            if sharding:  # consolidated from the checkpoint just written: `levo-train export` does the same
                from levo_train.export import export_checkpoint

                export_checkpoint(last, export, dtype)
            else:
                (method.export or export_policy)(module, export, dtype)
            summary["export"] = str(export)
        write_json_atomic(run_dir / "summary.json", summary, indent=2)
        print(f"\nlevo-train {cfg.recipe_name}: done at step {trainer.global_step}")
        if guard.skipped_steps:
            print(f"  non-finite steps skipped: {len(guard.skipped_steps)} (train.nonfinite=skip; "
                  f"steps {guard.skipped_steps[:10]}{' ...' if len(guard.skipped_steps) > 10 else ''})")
        for k in ("run_dir", "last_checkpoint", "export"):
            if k in summary:
                print(f"  {k:16s} {summary[k]}")
        if val_start is not None:
            print(f"  val/loss         {val_start:.4f} -> {summary['val_loss_end']}")
    return summary


def _location(spec: Any) -> str | list[str] | None:
    """A data location for summary.json: one path or pattern, a list of them, or None."""
    return None if spec is None else [str(x) for x in spec] if isinstance(spec, (list, tuple)) else str(spec)


def _to_float(x: Any) -> float | None:
    """A metric as a float for summary.json; None (null) when missing or not finite."""
    from levo_infer.jsonio import finite_or_none

    return finite_or_none(x)


def _stopped_summary(e: Exception, trainer: Any, run_dir: Path, guard: Any, resume: ResumePoint | None) -> None:
    """A run that ended early (a non-finite step, a stop signal): ``summary.json`` says so and where
    to continue from; a :class:`~levo_train.guard.NonFiniteError` gets its one-line advice."""
    from levo_train.guard import NonFiniteError, RunStopped

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


def export_command(argv: list[str]) -> int:
    """``levo-train export run_dir=R [ckpt=PATH] [out=DIR] [dtype=NAME]``: consolidate a run's newest
    complete checkpoint (or ``ckpt``) of any strategy into the released-format export."""
    import torch

    from levo_train.export import export_checkpoint

    args: dict[str, str] = {}
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in ("run_dir", "ckpt", "out", "dtype"):
            print(f"levo-train export: error: unexpected argument {a!r}; usage: levo-train export run_dir=R "
                  "[ckpt=PATH] [out=DIR] [dtype=bfloat16]", file=sys.stderr)
            return 2
        args[k] = v
    if "run_dir" not in args and "ckpt" not in args:
        print("levo-train export: error: give run_dir=R (its newest complete checkpoint) or ckpt=PATH", file=sys.stderr)
        return 2
    try:
        dtype = getattr(torch, args["dtype"]) if "dtype" in args else None
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise AttributeError
    except AttributeError:
        print(f"levo-train export: error: dtype={args['dtype']} is not a torch dtype (e.g. bfloat16)", file=sys.stderr)
        return 2
    if "ckpt" in args:
        ckpt = Path(args["ckpt"])
    else:
        run_dir = Path(args["run_dir"])
        try:
            rp = find_resume_checkpoint(OmegaConf.create({"resume": True, "ckpt_path": None}), run_dir)
        except UsageError as e:
            print(f"levo-train export: error: {e.msg}", file=sys.stderr)
            return 2
        if rp is None:
            print(f"levo-train export: error: {run_dir} holds no checkpoint", file=sys.stderr)
            return 2
        ckpt = Path(rp.path)
    out = Path(args.get("out") or (Path(args["run_dir"]) / "export" if "run_dir" in args else ckpt.parent / "export"))
    try:
        export_checkpoint(ckpt, out, dtype)
    except (ValueError, FileNotFoundError) as e:  # ExportError, CheckpointError, ConfigError: each names its file
        print(f"levo-train export: error: {e if str(ckpt) in str(e) else f'{ckpt}: {e}'}", file=sys.stderr)
        return 2
    print(f"levo-train export: {ckpt} -> {out}")
    return 0


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print_help()
        return 0
    if argv and argv[0] == "export":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return export_command(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    try:
        cfg = compose_config(argv)
        check_init_overrides(cfg, argv)
        if show_cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        run(cfg)
    except UsageError as e:
        print(f"levo-train: error: {e.msg}", file=sys.stderr)
        return 2
    except OSError as e:
        from levo_train.checkpointing import CheckpointWriteError

        if isinstance(e, CheckpointWriteError):
            print(f"levo-train: error: {e.strerror}", file=sys.stderr)
            return 1
        if not isinstance(e, FileNotFoundError):
            raise
        print(f"levo-train: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from levo_infer.checkpoint import CheckpointError
        from levo_infer.config import ConfigError
        from levo_infer.integrity import IntegrityError
        from levo_train.data.cache import CacheError
        from levo_train.data.shards import ShardError

        if isinstance(e, (CheckpointError, ConfigError, ShardError, CacheError, IntegrityError)):
            print(f"levo-train: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


def _ended_early(e: BaseException) -> int | None:
    """The exit status of a run that ended for a reason of its own, after its one-line message (rank 0
    of a launch prints it): stopped by a signal (143 / 130, or Lightning's SIGTERM exit outside the
    training loop), a non-finite step (1), its run folder in use by another run (1), unusable scores
    (1). None for anything else. The modules that define these were imported by whatever raised
    them, so nothing heavy is imported here."""
    from levo_train.locking import launch_rank

    mods = sys.modules
    guard, lock, rollout = (mods.get(f"levo_train.{m}") for m in ("guard", "locking", "rollout"))
    lexc = mods.get("lightning.pytorch.utilities.exceptions")
    say = launch_rank() == 0
    if guard is not None and isinstance(e, guard.RunStopped):
        if say:
            print(f"levo-train: stopped by {e.signame} at step {e.step}; checkpoint {e.checkpoint}; continue with the "
                  "same command plus resume=true", file=sys.stderr)
        return e.exit_code
    if lexc is not None and isinstance(e, lexc.SIGTERMException):  # outside the loop, e.g. the first validation
        if say:
            print("levo-train: stopped by SIGTERM before training reached a step boundary (no new checkpoint); "
                  "continue with the same command plus resume=true", file=sys.stderr)
        return 128 + signal.SIGTERM
    if guard is not None and isinstance(e, guard.NonFiniteError):
        if say:
            print(f"levo-train: error: {e}; {e.advice}" if e.advice else f"levo-train: error: {e}", file=sys.stderr)
        return 1
    if (lock is not None and isinstance(e, lock.FolderLockedError)) or \
            (rollout is not None and isinstance(e, rollout.ScoreError)):
        print(f"levo-train: error: {e}", file=sys.stderr)
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    """``levo-train``; returns the exit status: 0 done, 1 failed (a non-finite step, a checkpoint
    write, a run folder in use), 2 bad settings, 143 / 130 stopped by SIGTERM / SIGINT after writing a
    resumable checkpoint."""
    try:
        return _main(argv)
    except BaseException as e:
        code = _ended_early(e)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
