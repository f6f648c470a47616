"""Distributed strategies (``strategy=auto|ddp|fsdp2|deepspeed_zero2|deepspeed_zero3``) and the
sharded checkpoints they write.

* ``auto`` / ``ddp``: Lightning's own; every rank holds the whole model and optimizer state;
  checkpoints are one file (``last.ckpt``) written by rank 0.
* ``fsdp2``: :class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` with the model sharded
  by :func:`levo_train.parallel.apply_fsdp` from the module's ``configure_model`` (pure data
  parallelism: the mesh is every rank). Checkpoints are torch distributed checkpoint (DCP)
  folders (one ``__R_0.distcp`` per rank + ``.metadata`` + ``meta.pt``), written atomically:
  into a temp folder, then :data:`COMPLETE` last (after every rank wrote), then renamed into
  place. DCP reshards on load, so a run resumes on any number of ranks.
* ``deepspeed_zero2`` / ``deepspeed_zero3``: Lightning's ``DeepSpeedStrategy`` (CUDA only, a
  Lightning restriction); checkpoints are DeepSpeed folders, consolidated by :mod:`levo_train.zero`.

A checkpoint of any kind is consolidated into a released-format export by
:mod:`levo_train.export` (``levo-train export run_dir=R``).

:data:`COMPLETE` lists every file of the folder under ``checksums`` with its size and sha256 (a
torch file: its size and ``zip-crc32``, checked through the CRCs torch stores in it; see
:mod:`levo_infer.integrity`). Every rank hashes its share of the files right after the write;
:func:`levo_train.export.read_checkpoint` checks them all before a folder is resumed or exported,
so a lost, truncated or corrupted rank file makes the folder one that "does not load".
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from levo_infer.jsonio import dumps as strict_dumps

NAMES = ("auto", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
#: the marker that makes a sharded checkpoint folder complete; written last, by rank 0
COMPLETE = "levo_complete.json"
#: the non-tensor part of a DCP checkpoint (Lightning's name)
META = "meta.pt"


class StrategyError(ValueError):
    """A ``strategy`` setting that cannot be used here."""


def remove_checkpoint_path(path: str | os.PathLike) -> None:
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_files(folder: str | os.PathLike) -> list[str]:
    """The files of a checkpoint folder (relative paths, sorted), the marker excluded."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def write_complete_marker(folder: str | os.PathLike, *, fmt: str, world_size: int, global_step: Any,
                          checksums: dict[str, Any] | None = None) -> None:
    """Write :data:`COMPLETE` into a checkpoint folder whose ranks have all written (call last).
    ``checksums``: every file's manifest entry (:func:`folder_checksums`); computed here when None."""
    from levo_infer.integrity import manifest_entries

    folder = Path(folder)
    files = folder_files(folder)
    if checksums is None:
        checksums = manifest_entries(folder, files)
    marker = {"format": fmt, "world_size": world_size, "global_step": global_step, "files": files,
              "checksums": checksums}
    (folder / COMPLETE).write_text(strict_dumps(marker, indent=1))
    _fsync_dir(folder)


def folder_checksums(strategy: Any, folder: Path) -> dict[str, Any]:
    """Manifest entries of every file of a just-written checkpoint folder: rank 0 lists the files,
    rank r hashes files r, r + W, ... (the large ones are the ranks' own shards), rank 0 gathers."""
    from levo_infer.integrity import file_entry

    files = strategy.broadcast(folder_files(folder) if strategy.global_rank == 0 else None)
    world, rank = int(strategy.world_size), int(strategy.global_rank)
    mine = {rel: file_entry(folder / rel) for rel in files[rank::world]}
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return mine if world == 1 else {rel: file_entry(folder / rel) for rel in files}
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, mine)
    return {k: v for part in every for k, v in part.items()}


def save_folder_atomically(strategy: Any, filepath: Any, write: Any, *, fmt: str, global_step: Any) -> None:
    """Write a sharded checkpoint folder so that it is either complete or absent: every rank's
    ``write(tmp)`` fills a temp folder beside the target; after a barrier rank 0 writes
    :data:`COMPLETE` (last) and renames the folder into place, replacing an older one of that name
    only then. A failed write removes the temp folder and raises
    :class:`~levo_train.checkpointing.CheckpointWriteError`; the previous checkpoints are intact."""
    from levo_train.checkpointing import CheckpointWriteError

    path = Path(strategy.broadcast(str(filepath)))
    tmp = path.with_name(f".{path.name}.tmp{strategy.broadcast(os.getpid())}")
    rank0 = strategy.global_rank == 0
    try:
        if rank0:
            remove_checkpoint_path(tmp)
            tmp.mkdir(parents=True)
        strategy.barrier("levo-ckpt-mkdir")
        write(tmp)
        strategy.barrier("levo-ckpt-written")
        checksums = folder_checksums(strategy, tmp)
        if rank0:
            write_complete_marker(tmp, fmt=fmt, world_size=strategy.world_size, global_step=global_step,
                                  checksums=checksums)
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            remove_checkpoint_path(old)
            _fsync_dir(path.parent)
    except OSError as e:
        if rank0:
            remove_checkpoint_path(tmp)
        raise CheckpointWriteError(e.errno, f"writing sharded checkpoint {path} failed ({e.strerror or e}); the "
                                   "previous checkpoints are intact. Free space (or fix the folder) and continue "
                                   "with resume=true") from e
    finally:
        strategy.barrier("levo-ckpt-done")


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every rank, with atomic, marked, resharding-on-load DCP checkpoints.

    ``shards_model`` tells the module's ``configure_model`` to call
    :func:`levo_train.parallel.parallelize` with this strategy's data-parallel mesh and options.
    """

    shards_model = True

    def __init__(self, *, mixed_precision: str | None = None, reshard_after_forward: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True,
                         **kwargs)
        self.fsdp_options = {"mixed_precision": mixed_precision, "reshard_after_forward": reshard_after_forward}

    def setup_environment(self) -> None:
        # Lightning's "auto" would be one data-parallel group per node and tensor parallelism inside it
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def data_parallel_mesh(self) -> Any:
        return self.device_mesh["data_parallel"]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """``filepath`` as a DCP folder (every rank's shard, DCP's ``.metadata``, ``meta.pt``),
        written by :func:`save_folder_atomically`."""
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})

        def write(tmp: Path) -> None:
            _distributed_checkpoint_save(state, tmp)  # collective; DCP's .metadata follows every rank's shard
            if self.global_rank == 0:
                torch.save(checkpoint, tmp / META)

        save_folder_atomically(self, filepath, write, fmt="torch-dcp", global_step=checkpoint.get("global_step"))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A DCP folder as Lightning's ``ModelParallelStrategy`` loads one (the module's sharded
        weights, then each optimizer's, then ``meta.pt`` as the rest of the checkpoint dict), but on
        every rank through :mod:`levo_train.dcp`, whose reads never run code (torch's own reader
        unpickles ``.metadata`` and the optimizers' non-tensor items unchecked). A one-file
        checkpoint goes to Lightning (read ``weights_only``)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from levo_infer.checkpoint import CheckpointError
        from levo_infer.safe_load import torch_load
        from levo_train import dcp

        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only=True)
        module = self.model
        assert module is not None and self.lightning_module is not None
        state = {"state_dict": get_model_state_dict(module)}
        dcp.load(state, path)
        module.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            ostate = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(ostate, path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=ostate[key],
                                     options=StateDictOptions(cpu_offload=True))
        meta = torch_load(path / META, error=CheckpointError)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path / META}: a {type(meta).__name__}, expected the checkpoint dict")
        return meta

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_checkpoint_path(filepath)


def deepspeed_strategy(**kwargs: Any) -> Any:
    """Lightning's ``DeepSpeedStrategy`` whose checkpoint folders are written like FSDP2's:
    into a temp folder, :data:`COMPLETE` last, renamed into place (DeepSpeed itself overwrites
    ``last.ckpt``'s files in place). Built on demand: DeepSpeed is an optional extra."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class LevoDeepSpeedStrategy(DeepSpeedStrategy):
        def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
            save = super().save_checkpoint
            save_folder_atomically(self, filepath, lambda tmp: save(checkpoint, tmp, storage_options),
                                   fmt="deepspeed", global_step=checkpoint.get("global_step"))

        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            # DeepSpeed unpickles every states file unchecked: on every rank they are all checked
            # first, and each one the engine opens is read by us (levo_train.zero)
            if not Path(checkpoint_path).is_dir():
                return super().load_checkpoint(checkpoint_path, weights_only=True)
            from levo_train.zero import checked_engine_loads

            with checked_engine_loads(self.deepspeed_engine, checkpoint_path):
                return super().load_checkpoint(checkpoint_path, weights_only=True)

        def remove_checkpoint(self, filepath: Any) -> None:
            if self.is_global_zero:
                remove_checkpoint_path(filepath)

    return LevoDeepSpeedStrategy(**kwargs)


def build_strategy(scfg: Any, trainer_strategy: Any, accelerator: str) -> Any:
    """The Lightning ``strategy`` argument for ``strategy=NAME`` (``scfg``: the ``strategy`` config
    group). ``strategy=auto`` leaves ``trainer.strategy`` (Lightning's own names) in charge."""
    name = str(scfg.get("name", "auto")) if scfg is not None else "auto"
    if name not in NAMES:
        raise StrategyError(f"strategy={name} is not a strategy; known: {', '.join(NAMES)}")
    if name == "auto":
        return trainer_strategy
    if str(trainer_strategy) not in ("auto", name, "None"):
        raise StrategyError(f"strategy={name} and trainer.strategy={trainer_strategy} disagree: set only strategy=NAME "
                            f"({', '.join(NAMES)})")
    if name == "ddp":
        return "ddp"
    if name == "fsdp2":
        return FSDP2Strategy(mixed_precision=scfg.get("mixed_precision"),
                             reshard_after_forward=bool(scfg.get("reshard_after_forward", True)))
    # deepspeed_zero2 / deepspeed_zero3
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise StrategyError(f"strategy={name} needs DeepSpeed: pip install -e '.[deepspeed]'") from None
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise StrategyError(f"strategy={name}: Lightning's DeepSpeed strategy runs on CUDA GPUs only; on CPU use "
                            "strategy=fsdp2 (the same sharding of weights, gradients and optimizer state) or ddp")
    return deepspeed_strategy(stage=int(scfg.stage), offload_optimizer=bool(scfg.get("offload_optimizer", False)),
                              offload_parameters=bool(scfg.get("offload_parameters", False)))


def strategy_name(scfg: Any, trainer_strategy: Any) -> str:
    """The effective strategy's name (``trainer.strategy`` when ``strategy=auto``)."""
    name = str(scfg.get("name", "auto")) if scfg is not None else "auto"
    return name if name != "auto" else str(trainer_strategy)


def is_sharding(name: str) -> bool:
    """Whether strategy ``name`` shards the model (FSDP2, any DeepSpeed ZeRO stage)."""
    return name == "fsdp2" or name.startswith("deepspeed")


__all__ = ["COMPLETE", "META", "NAMES", "FSDP2Strategy", "StrategyError", "build_strategy", "deepspeed_strategy",
           "folder_checksums", "folder_files", "is_sharding", "remove_checkpoint_path",
           "save_folder_atomically", "strategy_name", "write_complete_marker"]
