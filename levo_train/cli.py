"""``levo-train recipe=NAME [overrides]`` and ``levo-train export``: the command line's face.

It composes the hydra config (``configs/`` groups model/ data/ optim/ trainer/ logger/ and the
``recipe`` group, ``recipes/``), prints help, and hands the run to :mod:`levo_train.run`; errors
become exit statuses. With no data given, the built-in toy song world is used.
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from levo_infer.config import config_differences, load_config, make_config
from levo_train.locking import launch_rank
from levo_train.settings import UsageError, check_init_path, check_override_keys
from levo_train.toy.world import ToyWorld

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
  trainer.max_steps=N         any Lightning Trainer argument: trainer.devices=8, trainer.precision=32-true, ...
  trainer.precision=auto      the default: bf16-mixed on a GPU with bf16 (fp32 weights, bf16 autocast), 32-true on CPU;
                              train.tf32=auto: TF32 matmuls on a GPU
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

An unknown key (key=value, +key=value or ++key=value) is an error naming the nearest real key; only
trainer.KEY passes any Lightning Trainer argument through.

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


def known_recipes() -> list[str]:
    files = resources.files("levo_train.configs.recipe")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("toy_vocab"):
        def toy_vocab(seed: Any = 0) -> list[str]:
            return list(ToyWorld(int(seed)).vocabulary())

        OmegaConf.register_new_resolver("toy_vocab", toy_vocab)


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose ``train.yaml`` with the command-line overrides; clear errors for bad recipes."""
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
            groups = {p.name for p in resources.files("levo_train.configs").iterdir() if p.is_dir()}
            keyed = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in groups]
            check_override_keys(keyed, compose(config_name="train", overrides=[o for o in overrides if o not in keyed]))
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


def check_init_overrides(cfg: DictConfig, argv: list[str]) -> None:
    """``model.config.*`` given with ``model.init``: the init's config.yaml decides the model, so an
    override that asks for something else is an error, not silently ignored (matching ones pass)."""
    ovr = [o for o in argv if o.split("=", 1)[0].lstrip("+~").startswith("model.config.")]
    if not ovr or not cfg.model.get("init"):
        return
    base = compose_config([o for o in argv if o not in ovr])
    want = make_config(**OmegaConf.to_container(cfg.model.config, resolve=True))
    asked = {name for name, _, _ in config_differences(make_config(**OmegaConf.to_container(base.model.config,
                                                                                             resolve=True)), want)}
    init = check_init_path(str(cfg.model.init))
    with warnings.catch_warnings():  # the run reads the init's config again and reports its problems once
        warnings.simplefilter("ignore")
        init_config = load_config(init)
    for name, have, wanted in config_differences(init_config, want):
        if name in asked:
            raise UsageError(f"model.init={init} is a model with {name}={have!r}, but {' '.join(ovr)} asks for "
                             f"{wanted!r}: the init's config.yaml decides the model; drop the model.config "
                             "override or start from an init of that size")


def _export_args(argv: list[str]) -> dict[str, str] | str:
    """``levo-train export``'s ``key=value`` arguments, or the usage error to print."""
    args: dict[str, str] = {}
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in ("run_dir", "ckpt", "out", "dtype"):
            return (f"unexpected argument {a!r}; usage: levo-train export run_dir=R [ckpt=PATH] [out=DIR] "
                    "[dtype=bfloat16]")
        args[k] = v
    if "run_dir" not in args and "ckpt" not in args:
        return "give run_dir=R (its newest complete checkpoint) or ckpt=PATH"
    return args


def export_command(argv: list[str]) -> int:
    """``levo-train export run_dir=R [ckpt=PATH] [out=DIR] [dtype=NAME]``: consolidate a run's newest
    complete checkpoint (or ``ckpt``) of any strategy into the released-format export."""
    from levo_train import methods, resume  # lightning: a slow import that --help does not need

    args = _export_args(argv)
    if isinstance(args, str):
        print(f"levo-train export: error: {args}", file=sys.stderr)
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
            rp = resume.find_resume_checkpoint(run_dir, resume=True, ckpt_path=None)
        except UsageError as e:
            print(f"levo-train export: error: {e.msg}", file=sys.stderr)
            return 2
        if rp is None:
            print(f"levo-train export: error: {run_dir} holds no checkpoint", file=sys.stderr)
            return 2
        ckpt = Path(rp.path)
    out = Path(args.get("out") or (Path(args["run_dir"]) / "export" if "run_dir" in args else ckpt.parent / "export"))
    try:
        methods.export_checkpoint(ckpt, out, dtype)
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "export":
        return export_command(argv[1:])
    from levo_train import checkpointing, progress, run  # lightning: a slow import that --help does not need

    progress.quiet_lightning_logging()

    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    try:
        cfg = compose_config(argv)
        check_init_overrides(cfg, argv)
        if show_cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        run.run(cfg)
    except UsageError as e:
        print(f"levo-train: error: {e.msg}", file=sys.stderr)
        return 2
    except checkpointing.CheckpointWriteError as e:
        print(f"levo-train: error: {e.strerror}", file=sys.stderr)
        return 1
    except (FileNotFoundError, *run.USER_ERRORS) as e:
        print(f"levo-train: error: {e}", file=sys.stderr)
        return 2
    return 0


def _ended_early(e: BaseException) -> int | None:
    """The exit status of a run that ended for a reason of its own, after its one-line message (rank 0
    of a launch prints it): stopped by a signal (143 / 130, or Lightning's SIGTERM exit outside the
    training loop), a non-finite step (1), its run folder in use by another run (1), unusable scores
    (1). None for anything else. The modules that define these were imported by whatever raised
    them, so nothing heavy is imported here."""
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
    finally:  # each rank closes its process group before exit: a gloo group left to interpreter shutdown
        # aborted a finished rank now and then ("terminate called without an active exception")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
