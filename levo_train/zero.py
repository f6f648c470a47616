"""DeepSpeed ZeRO: the config we train with and the checkpoint folders it writes.

* :func:`deepspeed_config`: the DeepSpeed config dict of a ZeRO-2 / ZeRO-3 run (what Lightning's
  ``DeepSpeedStrategy(config=...)`` or ``deepspeed.initialize(config=...)`` takes).
* :func:`is_zero_checkpoint`, :func:`read_zero_meta`, :func:`zero_fp32_state_dict`: a ZeRO
  checkpoint folder -- our metadata (the ``levo`` section, ``global_step``, ...) and the policy's
  full fp32 weights under plain LeLM state-dict names, consolidated by DeepSpeed's own
  ``zero_to_fp32`` (nothing reimplemented here).

Layout (DeepSpeed's ``engine.save_checkpoint(dir, tag, client_state)``; Lightning's DeepSpeed
strategy passes ``tag="checkpoint"`` and the Lightning checkpoint dict minus ``state_dict`` and
``optimizer_states`` as ``client_state``)::

    dir/latest                                  the tag, e.g. "checkpoint" (Lightning) or "global_step10"
    dir/<tag>/mp_rank_00_model_states.pt        ZeRO-0/1/2: module weights + client_state
    dir/<tag>/zero_pp_rank_R_mp_rank_00_model_states.pt    ZeRO-3: one per rank, each with client_state
    dir/<tag>/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   one per rank: fp32 master partition + Adam

The client state sits at the top level of the (rank 0) model-states file, beside DeepSpeed's own
keys. It is read with ``weights_only=True`` (memory-mapped): a checkpoint never runs code.
DeepSpeed itself (``zero_to_fp32``, ``engine.load_checkpoint``) unpickles every states file with
``weights_only=False``; so before it reads any, every one of them is read here ``weights_only``
with exactly the DeepSpeed classes they hold allowed (:func:`check_states_files`), and the engine's
own reads go through that reader too (:func:`checked_engine_loads`).
DeepSpeed is imported only inside the functions that need it, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from levo_infer.checkpoint import CheckpointError
from levo_infer.safe_load import torch_load
from levo_train.parallel import plain_name

log = logging.getLogger(__name__)

#: DeepSpeed's own entries of a model-states file (everything else is the client state)
DS_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
    "checkpoint_parallel_dimensions", "universal_checkpoint_info", "autoep_layers",
})
#: leading name segments of the module DeepSpeed wrapped: DeepSpeed's ``module.``, Lightning's
#: ``_forward_module.`` (its ``_LightningModuleWrapperBase``); the policy is then ``model.``
WRAPPER_PREFIXES = ("module.", "_forward_module.")
POLICY_PREFIX = "model."
#: a DPO frozen reference copy (``module.ref``): never part of the policy export
REF_PREFIX = "ref."
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_Z3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_Z2_MODEL = "mp_rank_00_model_states.pt"


def deepspeed_config(
    stage: int,
    *,
    micro_batch: int,
    grad_accum: int = 1,
    bf16: bool = False,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    clip: float = 1.0,
    persistence_threshold: int | None = None,
    bucket_elems: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO ``stage`` run (0 = plain data parallel, for comparisons).

    ``micro_batch``: songs per rank per step; ``clip``: global grad-norm clip (0 = off).
    ``persistence_threshold`` (ZeRO-3): parameters with fewer elements stay whole on every rank
    (DeepSpeed's default 1e5 keeps a tiny model entirely unpartitioned; 0 shards everything).
    ``bucket_elems``: the reduce / all-gather (and ZeRO-3 prefetch) bucket size in elements
    (DeepSpeed's defaults, 5e8 / 5e8 / 5e7, when None): smaller buckets, smaller transient buffers.
    Weights are never gathered into one 16-bit file on save (``stage3_gather_16bit_weights_on_model_save``
    off): the fp32 master partitions are the checkpoint, :func:`zero_fp32_state_dict` consolidates them.
    The optimizer is the client's (``configure_optimizers``' torch AdamW), also under optimizer
    offload (``zero_force_ds_cpu_optimizer`` off), where DeepSpeedCPUAdam would be faster on GPU."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if micro_batch < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch and grad_accum must be >= 1, got {micro_batch} and {grad_accum}")
    if offload_params and stage != 3:
        raise ValueError(f"offload_params needs ZeRO stage 3 (got stage {stage}): only stage 3 partitions parameters")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage >= 1 (the optimizer state must be partitioned)")
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": False,  # nothing to overlap with on CPU; on GPU a small win we do not rely on
        "reduce_scatter": True,
    }
    if bucket_elems is not None:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = int(bucket_elems)
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(bucket_elems)
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = int(persistence_threshold)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(grad_accum),
        "gradient_clipping": float(clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


# ----------------------------------------------------------------------------- the folder
def _tag_dir(path: str | os.PathLike, tag: str | None) -> Path:
    """``path/<tag>`` (tag from ``path/latest`` when not given), or ``path`` itself when it is
    the tag folder; ValueError naming what is missing otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{p}: not a DeepSpeed ZeRO checkpoint (no such folder)")
    if tag is None:
        latest = p / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if not tag:
                raise ValueError(f"{p}: not a complete DeepSpeed ZeRO checkpoint (its `latest` file is empty)")
        elif any(_model_state_files(p)):
            return p  # the tag folder itself
        else:
            raise ValueError(f"{p}: not a DeepSpeed ZeRO checkpoint (no `latest` file naming the tag folder, "
                             "and no *_model_states.pt here)")
    d = p / tag
    if not d.is_dir():
        raise ValueError(f"{p}: incomplete DeepSpeed ZeRO checkpoint: the tag folder {tag!r} is missing")
    return d


def _model_state_files(d: Path) -> list[Path]:
    return sorted(f for f in d.glob("*_model_states.pt") if f.name == _Z2_MODEL or _Z3_MODEL_RE.match(f.name))


def is_zero_checkpoint(path: str | os.PathLike) -> bool:
    """A DeepSpeed ZeRO checkpoint folder (``latest`` + tag folder, or the tag folder itself) with
    model-states and optimizer-states files; cheap (no file is read but ``latest``)."""
    try:
        d = _tag_dir(path, None)
    except (ValueError, OSError):
        return False
    return bool(_model_state_files(d)) and any(_OPTIM_RE.match(f.name) for f in d.iterdir())


def deepspeed_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoint files hold beside tensors and plain data (the optimizer
    states' loss scaler, ZeRO stage enum and ZeRO-2 fragment addresses): the exact allowlist they
    are read with (``weights_only=True``); DeepSpeed itself would unpickle them unchecked."""
    try:  # deepspeed: optional extra, heavy
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        raise ValueError("reading a DeepSpeed ZeRO checkpoint needs DeepSpeed: pip install -e '.[deepspeed]'") from None
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_states(f: Path) -> dict[str, Any]:
    sd = torch_load(f, allow=deepspeed_globals(), error=CheckpointError)
    if not isinstance(sd, dict) or "module" not in sd or "dp_world_size" not in sd:
        raise ValueError(f"{f}: not a DeepSpeed model-states file (no `module` / `dp_world_size` entries)")
    return sd


def states_files(d: Path) -> list[Path]:
    """Every file of a tag folder that DeepSpeed would unpickle: what ``zero_to_fp32`` globs
    (``*_model_states.pt``, ``*_optim_states.pt``: every rank's, and any other file so named) and
    what ``engine.load_checkpoint`` opens (a subset)."""
    return sorted(f for f in d.iterdir() if f.name.endswith(("_model_states.pt", "_optim_states.pt")))


def check_states_files(d: Path) -> None:
    """Read every :func:`states_files` file ``weights_only`` with only :func:`deepspeed_globals`
    added (memory-mapped: the tensors are not read), so that nothing DeepSpeed then unpickles can
    run code; :class:`~levo_infer.checkpoint.CheckpointError` naming the first file that holds
    anything else or does not load."""
    allow = deepspeed_globals()
    for f in states_files(d):
        torch_load(f, allow=allow, error=CheckpointError)


class _CheckedLoads:
    """A DeepSpeed checkpoint engine whose ``load`` is :func:`levo_infer.safe_load.torch_load` with
    :func:`deepspeed_globals` (everything else is the wrapped engine's)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return torch_load(path, allow=deepspeed_globals(), error=CheckpointError)


@contextlib.contextmanager
def checked_engine_loads(engine: Any, path: str | os.PathLike, tag: str | None = None) -> Iterator[None]:
    """Around DeepSpeed's ``engine.load_checkpoint(path)`` (Lightning's DeepSpeed strategy, on every
    rank): first :func:`check_states_files` on the tag folder (every rank's model and optimizer
    states, so every rank refuses a crafted folder before any collective), then every file the
    engine opens is read by us ``weights_only`` (:class:`_CheckedLoads`) instead of by its checkpoint
    engine's unchecked ``torch.load``."""
    check_states_files(_tag_dir(path, tag))
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _CheckedLoads(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def _check_complete(d: Path) -> tuple[int, int, dict[str, Any]]:
    """(ZeRO stage, data-parallel world size, rank 0's model states) after checking that every
    rank's files are there; ValueError naming the missing ones."""
    z3 = {int(m.group(1)): f for f in d.iterdir() if (m := _Z3_MODEL_RE.match(f.name))}
    if z3:
        if 0 not in z3:
            raise ValueError(f"{d}: incomplete ZeRO-3 checkpoint: rank 0's zero_pp_rank_0_mp_rank_00_model_states.pt "
                             "is missing")
        first = z3[0]
    elif (d / _Z2_MODEL).is_file():
        first = d / _Z2_MODEL
    else:
        raise ValueError(f"{d}: not a DeepSpeed ZeRO checkpoint (no {_Z2_MODEL} and no "
                         "zero_pp_rank_*_mp_rank_00_model_states.pt)")
    check_states_files(d)  # every rank's model and optimizer states, before DeepSpeed unpickles any
    head = _load_states(first)
    world = int(head["dp_world_size"])
    if int(head.get("mp_world_size", 1) or 1) != 1:
        raise ValueError(f"{d}: a model-parallel DeepSpeed checkpoint (mp_world_size={head['mp_world_size']}); "
                         "only data-parallel ZeRO checkpoints are supported")
    optim = {int(m.group(1)) for f in d.iterdir() if (m := _OPTIM_RE.match(f.name))}
    ds_cfg = head.get("ds_config")
    zcfg = ds_cfg.get("zero_optimization") if isinstance(ds_cfg, dict) else None
    stage = int(zcfg.get("stage", 0)) if isinstance(zcfg, dict) else (3 if z3 else 2 if optim else 0)
    if stage == 0:
        raise ValueError(f"{d}: a DeepSpeed checkpoint without ZeRO (stage 0): nothing to consolidate, its "
                         f"{first.name} holds the full weights under `module`")
    missing = [r for r in range(world) if r not in optim]
    if missing:
        raise ValueError(f"{d}: incomplete ZeRO-{stage} checkpoint of {world} ranks: the optimizer states of rank(s) "
                         f"{missing} (zero_pp_rank_R_mp_rank_00_optim_states.pt) are missing -- a rank did not "
                         "finish writing it")
    if z3:
        missing = [r for r in range(world) if r not in z3]
        if missing:
            raise ValueError(f"{d}: incomplete ZeRO-3 checkpoint of {world} ranks: the model states of rank(s) "
                             f"{missing} (zero_pp_rank_R_mp_rank_00_model_states.pt) are missing")
    extra = sorted(r for r in optim if r >= world)
    if extra:
        raise ValueError(f"{d}: optimizer states of rank(s) {extra} in a checkpoint of {world} ranks: files of "
                         "another run mixed in")
    return stage, world, head


def read_zero_meta(path: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """The client state of a ZeRO checkpoint (for a Lightning run: the checkpoint dict without
    weights and optimizer -- ``levo``, ``global_step``, ``epoch``, ``loops``, ...) plus DeepSpeed's
    facts under ``"deepspeed"`` (``stage``, ``world_size``, ``global_steps``, ``version``, ``tag``).
    Checks first that every rank's files are there; ValueError naming the folder otherwise."""
    d = _tag_dir(path, tag)
    stage, world, head = _check_complete(d)
    meta = {k: v for k, v in head.items() if k not in DS_KEYS}
    meta["deepspeed"] = {"stage": stage, "world_size": world, "global_steps": head.get("global_steps"),
                         "version": head.get("ds_version"), "tag": d.name}
    return meta


def policy_name(name: str) -> str | None:
    """A consolidated parameter name -> the plain LeLM state-dict name, or None when it is not the
    policy's (a DPO reference copy's ``ref.*``). Strips the wrapper prefixes, then the module's
    ``model.`` attribute, then the activation-checkpoint wrapper's segment."""
    name = _unwrap(name)
    if name.startswith(REF_PREFIX):
        return None
    return plain_name(name.removeprefix(POLICY_PREFIX))


def zero_fp32_module_state(path: str | os.PathLike, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Every fp32 weight of the Lightning module in a ZeRO-2/ZeRO-3 checkpoint folder, under the
    module's own names (``model.*``, ``head.*``, ``ref.*``; wrapper prefixes stripped), consolidated
    by DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` from the fp32 master partitions of
    every rank (frozen parameters from the model states). ValueError naming the folder when it is
    not a complete ZeRO checkpoint."""
    d = _tag_dir(path, tag)
    _check_complete(d)
    try:  # deepspeed: optional extra, heavy
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ValueError(f"{path}: consolidating a ZeRO checkpoint needs DeepSpeed: pip install -e '.[deepspeed]'"
                         ) from None
    said = io.StringIO()  # DeepSpeed prints its progress; kept for the debug log
    try:
        with contextlib.redirect_stdout(said):
            raw = get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ValueError(f"{d}: DeepSpeed could not consolidate this ZeRO checkpoint: {e}") from None
    log.debug("zero_to_fp32 on %s: %s", d, said.getvalue().strip())
    out: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        name = _unwrap(k)
        if name in out:
            raise ValueError(f"{d}: two consolidated entries map to the module key {name!r} (one is {k!r})")
        out[name] = v.float() if v.is_floating_point() else v
    return out


def zero_fp32_state_dict(path: str | os.PathLike, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The policy's full fp32 weights from a ZeRO-2/ZeRO-3 checkpoint folder, under plain LeLM
    state-dict names (:func:`policy_name`; a DPO reference copy is dropped), from
    :func:`zero_fp32_module_state`. ValueError naming the folder when it is not a complete ZeRO
    checkpoint."""
    d = _tag_dir(path, tag)
    raw = zero_fp32_module_state(path, tag)
    has_policy = any(k.startswith(POLICY_PREFIX) for k in raw)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in raw.items():
        if has_policy and not k.startswith(POLICY_PREFIX):
            dropped.append(k)  # the module's own non-policy entries (a DPO reference, metric state)
            continue
        name = policy_name(k)
        if name is None:
            dropped.append(k)
            continue
        if name in out:
            raise ValueError(f"{d}: two consolidated entries map to the LeLM key {name!r} (one is {k!r})")
        out[name] = v
    if not out:
        raise ValueError(f"{d}: the ZeRO checkpoint holds no policy weights ({len(raw)} entries, all dropped)")
    if dropped:
        log.info("zero_fp32_state_dict: %d non-policy entries left out (e.g. %s)", len(dropped), dropped[:3])
    return out


def _unwrap(name: str) -> str:
    """``name`` without the leading :data:`WRAPPER_PREFIXES` (any number, any order)."""
    changed = True
    while changed:
        changed = False
        for pre in WRAPPER_PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre):], True
    return name


__all__ = ["check_states_files", "checked_engine_loads", "deepspeed_config", "deepspeed_globals", "is_zero_checkpoint", "policy_name",
           "read_zero_meta", "states_files", "zero_fp32_module_state", "zero_fp32_state_dict"]
