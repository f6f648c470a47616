"""Distributed strategies (``strategy=auto|ddp|fsdp2|deepspeed_zero2|deepspeed_zero3``) and the
sharded checkpoints they write.

* ``auto`` / ``ddp``: Lightning's own; every rank holds the whole model and optimizer state;
  checkpoints are one file (``last.ckpt``) written by rank 0.
* ``fsdp2``: :class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` with the model sharded
  by :func:`levo_train.parallel.apply_fsdp` from the module's ``configure_model`` (pure data
  parallelism: the mesh is every rank). Checkpoints are torch distributed checkpoint (DCP)
  folders (one ``__R_0.distcp`` per rank + ``.metadata`` + ``meta.pt``), written atomically:
  into a temp folder, then :data:`~levo_train.checkpointing.COMPLETE` last (after every rank wrote), then renamed into
  place. DCP reshards on load, so a run resumes on any number of ranks.
* ``deepspeed_zero2`` / ``deepspeed_zero3``: Lightning's ``DeepSpeedStrategy`` (CUDA only, a
  Lightning restriction); checkpoints are DeepSpeed folders, consolidated by :mod:`levo_train.zero`.

A checkpoint of any kind is consolidated into a released-format export by
:mod:`levo_train.export` (``levo-train export run_dir=R``).

Atomic folder writes, the completion marker and checksums: :mod:`levo_train.checkpointing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from levo_infer.checkpoint import CheckpointError
from levo_infer.safe_load import torch_load
from levo_train import dcp
from levo_train.checkpointing import META, remove_checkpoint_path, save_folder_atomically
from levo_train.zero import checked_engine_loads

NAMES = ("auto", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")


class StrategyError(ValueError):
    """A ``strategy`` setting that cannot be used here."""


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
        self._fresh_optimizers: dict[int, bool] = {}  # id(optimizer) -> it had no state when last saved

    def setup_environment(self) -> None:
        # Lightning's "auto" would be one data-parallel group per node and tensor parallelism inside it
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def data_parallel_mesh(self) -> Any:
        return self.device_mesh["data_parallel"]

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Lightning's, but an optimizer that never stepped stays so. torch's ``get_optimizer_state_dict``
        first gives such an optimizer a state by a fake step (AdamW: ``step`` 1, zero moments), so a
        checkpoint written before the first update (inside step 0: a semi-online round interrupted by a
        signal) would resume with that step count, and another bias correction than a run never
        interrupted. Such an optimizer is saved as torch has it, marked fresh (``meta.pt``), its live
        state put back to none, and cleared again when the checkpoint is loaded."""
        opt = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        fresh = not opt.state
        state = super().optimizer_state(optimizer)
        if fresh:
            opt.state.clear()
        self._fresh_optimizers[id(opt)] = fresh
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """``filepath`` as a DCP folder (every rank's shard, DCP's ``.metadata``, ``meta.pt``),
        written by :func:`~levo_train.checkpointing.save_folder_atomically`."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        checkpoint["fresh_optimizers"] = [self._fresh_optimizers.get(id(getattr(o, "_optimizer", o)), False)
                                          for o in self.optimizers]
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
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only=True)
        module = self.model
        assert module is not None and self.lightning_module is not None
        state = {"state_dict": get_model_state_dict(module)}
        dcp.load(state, path)
        module.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        meta = torch_load(path / META, error=CheckpointError)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path / META}: a {type(meta).__name__}, expected the checkpoint dict")
        fresh = meta.get("fresh_optimizers") or []
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            ostate = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(ostate, path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=ostate[key],
                                     options=StateDictOptions(cpu_offload=True))
            if i < len(fresh) and fresh[i]:  # saved before its first step (optimizer_state): none again
                getattr(optimizer, "_optimizer", optimizer).state.clear()
        return meta

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_checkpoint_path(filepath)


class LevoDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` whose checkpoint folders are written like FSDP2's: into a
    temp folder, :data:`~levo_train.checkpointing.COMPLETE` last, renamed into place (DeepSpeed itself
    overwrites ``last.ckpt``'s files in place). DeepSpeed is an optional extra: Lightning imports it
    only when the strategy is built."""

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        save = super().save_checkpoint
        save_folder_atomically(self, filepath, lambda tmp: save(checkpoint, tmp, storage_options),
                               fmt="deepspeed", global_step=checkpoint.get("global_step"))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # DeepSpeed unpickles every states file unchecked: on every rank they are all checked
        # first, and each one the engine opens is read by us (levo_train.zero)
        if not Path(checkpoint_path).is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only=True)
        with checked_engine_loads(self.deepspeed_engine, checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=True)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_checkpoint_path(filepath)


def deepspeed_strategy(**kwargs: Any) -> LevoDeepSpeedStrategy:
    """:class:`LevoDeepSpeedStrategy` with Lightning's ``DeepSpeedStrategy`` keywords. With
    ``offload_optimizer``, its config says ``zero_force_ds_cpu_optimizer: false``: the optimizer is
    ours (``configure_optimizers``' torch AdamW, also what checkpoints hold), which DeepSpeed
    otherwise refuses at start-up under ZeRO-Offload (it wants its own DeepSpeedCPUAdam; as in
    :func:`levo_train.zero.deepspeed_config`)."""
    strategy = LevoDeepSpeedStrategy(**kwargs)
    if kwargs.get("offload_optimizer") and isinstance(strategy.config, dict):
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy


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
        import deepspeed  # noqa: F401  # deepspeed: optional extra, heavy; only asked whether it is installed
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


def uses_meta_init(scfg: Any, name: str) -> bool:
    """Whether the policy is built on the meta device and each rank materialises only its shards
    (``strategy=fsdp2`` and ``deepspeed_zero3``, unless ``strategy.meta_init=false``: every rank
    then builds the whole model on the host first, as before)."""
    if name not in ("fsdp2", "deepspeed_zero3"):
        return False
    return bool(scfg.get("meta_init", True)) if scfg is not None else True


def is_sharding(name: str) -> bool:
    """Whether strategy ``name`` shards the model (FSDP2, any DeepSpeed ZeRO stage)."""
    return name == "fsdp2" or name.startswith("deepspeed")


__all__ = ["NAMES", "FSDP2Strategy", "LevoDeepSpeedStrategy", "StrategyError", "build_strategy",
           "deepspeed_strategy", "is_sharding", "strategy_name", "uses_meta_init"]
