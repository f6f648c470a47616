"""Released folder format: ``config.yaml`` + ``model.pt`` (flat ``{"audiolm.<key>": tensor}``).

Loading never runs pickled code (``model.pt`` is read with ``weights_only=True`` by
:func:`levo_infer.safe_load.torch_load`, whose every error names the file; ``.safetensors``
holds no code), memory-maps the file, builds the model on the meta device and assigns the mapped
tensors, so peak memory stays near one model copy. When a dtype conversion is asked for, each
tensor is converted on its own and the file pages it was read from are released right away
(Linux), so the peak is the converted model plus one tensor. Unlike the released loader
(``strict=False``), every used key must be present with its shape, else the error names the key.

Integrity (:mod:`levo_infer.integrity`): :func:`save_released` writes ``checksums.json`` last (size
and sha256 of ``config.yaml`` / ``model.safetensors``; ``model.pt`` is checked by the CRC-32s torch
stores in it); every load checks it when present, and the CRC-32 of every record of a ``model.pt``
always (a released folder has no manifest, but its ``model.pt`` has CRCs). A corrupted, truncated or
edited file is a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, load_config, save_config
from .errors import LevoInferError
from .integrity import IntegrityError, remove_manifest, verify_folder, verify_torch_zip, write_manifest
from .jsonio import atomic_file
from .model import LeLM
from .offload import enable_layer_offload
from .safe_load import is_zip, torch_load

PREFIX = "audiolm."
# present in the released state dict but never read by the forward pass
UNUSED_KEYS = frozenset({
    "transformer.model.embed_tokens.weight",
    "transformer2.model.embed_tokens.weight",
    "transformer2.lm_head.weight",
    "layer2_emb.0.weight",
    "out_norm.weight",
    "out_norm.bias",
})
WEIGHT_FILES = ("model.pt", "model.safetensors")
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(LevoInferError):
    """A checkpoint does not fit the model; the message names the file and the key."""


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` / ``"bf16"`` / ``"fp16"`` / ``"fp32"`` ... -> a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"model dtype must be a floating type, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key in ("auto", "none", ""):
        return None
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of bf16, fp16, fp32")
    return DTYPES[key]


# ----------------------------------------------------------------------------- writing
def released_state_dict(model: LeLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under released names (``audiolm.`` prefix)."""
    out = {}
    for k, v in model.state_dict().items():
        t = v.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[PREFIX + k] = t.contiguous()
    return out


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path`` (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def save_released(model: LeLM, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                  safetensors: bool = False) -> Path:
    """Write ``folder/model.pt`` (or ``model.safetensors``) and ``folder/config.yaml``, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_manifest(folder)  # rewritten below, last: never a manifest describing other files
    sd = released_state_dict(model, dtype)
    if safetensors:
        target = folder / "model.safetensors"
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            save_file({k: v.cpu() for k, v in sd.items()}, str(tmp))
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
    else:
        target = folder / "model.pt"
        atomic_torch_save(sd, target)
    save_config(model.cfg, folder / "config.yaml")
    write_manifest(folder, [target.name, "config.yaml"])
    return folder


# ----------------------------------------------------------------------------- reading
_MADV_DONTNEED = 4
_libc: Any = None


def _drop_pages(t: torch.Tensor) -> None:
    """Release the resident file pages behind a memory-mapped tensor that is no longer read
    (Linux; private mapping never written to, so the pages would simply be re-read from the file)."""
    global _libc
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = mmap.PAGESIZE
        start, n = t.data_ptr(), t.numel() * t.element_size()
        a = -(-start // page) * page  # whole pages inside the tensor only
        b = (start + n) // page * page
        if b > a:
            _libc.madvise(a, b - a, _MADV_DONTNEED)
    except Exception:  # best effort: never fail a load over this
        pass


def verify_model_files(folder: Path, weights: Path | None = None) -> None:
    """Check ``folder/checksums.json`` when there is one (our exports) and the CRC-32s of a torch
    ``weights`` file (any, released ones too); :class:`CheckpointError` naming the file otherwise.
    Each file is read once per process (:mod:`levo_infer.integrity`)."""
    try:
        verify_folder(folder)
        if weights is not None and weights.is_file() and weights.suffix != ".safetensors":
            verify_torch_zip(weights)
    except IntegrityError as e:
        raise CheckpointError(str(e)) from None


class StateSource:
    """Key -> (shape, dtype) without reading data, and tensors on demand, for ``.pt`` / ``.safetensors``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        verify_model_files(self.path.parent, self.path)
        self.mmapped = False
        self._st: Any = None
        self._sd: dict[str, Any] = {}
        if self.path.suffix == ".safetensors":
            try:
                self._st = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{self.path}: not a readable safetensors file: {e}") from e
            self.meta: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
            for k in self._st.keys():
                sl = self._st.get_slice(k)
                self.meta[k] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype()))
            return
        sd = self._torch_load()
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{self.path}: expected a flat dict of tensors, got {type(sd).__name__}")
        for wrapper in ("state_dict", "model"):
            if wrapper in sd and isinstance(sd[wrapper], Mapping) and len(sd) <= 3:
                sd = sd[wrapper]
        self._sd = dict(sd)
        self.meta = {}
        for k, v in self._sd.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry {k!r} is not a tensor ({type(v).__name__})")
            self.meta[k] = (tuple(v.shape), v.dtype)

    def _torch_load(self) -> Any:
        sd = torch_load(self.path, error=CheckpointError)  # weights_only; every error names the file
        self.mmapped = is_zip(self.path)  # torch_load maps a zip file, reads a legacy one
        return sd

    def tensor(self, key: str) -> torch.Tensor:
        if self._st is not None:
            return self._st.get_tensor(key)
        return self._sd[key]

    def floating_dtype(self) -> torch.dtype | None:
        """The floating dtype holding most parameters (None when there are none)."""
        count: dict[torch.dtype, int] = {}
        for shape, dt in self.meta.values():
            if dt is not None and dt.is_floating_point:
                n = 1
                for s in shape:
                    n *= s
                count[dt] = count.get(dt, 0) + n
        return max(count, key=count.get) if count else None

    def close(self) -> None:
        self._sd = {}
        self._st = None


def check_keys(model: LeLM, meta: Mapping[str, tuple[tuple[int, ...], Any]], *, source: str) -> dict[str, str]:
    """Check checkpoint keys and shapes against ``model``; returns {model key: checkpoint key}.

    Missing used keys, unknown keys and shape mismatches raise :class:`CheckpointError` naming the
    key; missing unused keys (present in the released layout, never read) are tolerated.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names: dict[str, str] = {}
    for k in meta:
        names[k[len(PREFIX):] if k.startswith(PREFIX) else k] = k
    unknown = sorted(set(names) - set(expected))
    if unknown:
        raise CheckpointError(
            f"{source}: unexpected key {PREFIX + unknown[0]!r} (and {len(unknown) - 1} more) — the checkpoint "
            "does not match this model config (different layer count or vocabulary?)")
    missing = sorted(k for k in set(expected) - set(names) if k not in UNUSED_KEYS)
    if missing:
        raise CheckpointError(f"{source}: missing key {PREFIX + missing[0]!r}"
                              + (f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else ""))
    for k, orig in names.items():
        shape = tuple(meta[orig][0])
        if shape != expected[k]:
            raise CheckpointError(f"{source}: key {PREFIX + k!r} has shape {shape}, the config expects {expected[k]}")
    return names


def check_state_dict(model: LeLM, sd: Mapping[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Strip the ``audiolm.`` prefix and check keys and shapes against ``model`` (see :func:`check_keys`)."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is not a tensor ({type(v).__name__})")
    names = check_keys(model, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, source=source)
    return {k: sd[orig] for k, orig in names.items()}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    src = StateSource(path)
    return {k: src.tensor(k) for k in src.meta}


def load_weights(model: LeLM, path: str | os.PathLike, *, assign: bool = False) -> LeLM:
    """Load a released-format ``model.pt`` (or ``.safetensors``) into ``model`` with full checks."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    sd = check_state_dict(model, _read_state_dict(path), source=str(path))
    if assign:
        # meta-initialised model: fill in tensors the file lacks (unused keys) with zeros
        for k, v in model.state_dict().items():
            if k not in sd:
                sd[k] = torch.zeros(v.shape, dtype=v.dtype)
    model.load_state_dict(sd, strict=assign, assign=assign)
    return model


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no model.pt or model.safetensors in this folder")


def _model_folder(path: str | os.PathLike) -> tuple[Path, Path | None]:
    p = Path(path)
    if p.is_file() and p.name.endswith((".pt", ".safetensors")):
        return p.parent, p
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a model folder (expected a folder holding config.yaml + model.pt)")
    return p, None


def load_released(path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                  config: ModelConfig | None = None, low_mem: bool = False, build_tokenizers: bool = True,
                  strict: bool = False, model_class: type[LeLM] = LeLM) -> LeLM:
    """Load a released model folder (v1 or v2) or one of our exports; returns the model in eval mode
    with its text tokenizers built (``model.tokenizers``). :func:`levo_infer.load_model` is this
    with ``model_class`` :class:`levo_infer.api.SongLM` (an LeLM that also generates and saves).

    ``path``: the folder (``config.yaml`` + ``model.pt``/``model.safetensors``) or its weights file.
    ``tokenizer_dir``: a Qwen2 tokenizer folder overriding the config's ``token_path`` (without
    one, the released relative path is searched and else the tokenizer is rebuilt offline).
    ``dtype``: bf16 / fp16 / fp32 (None: the checkpoint's own floating dtype). ``low_mem``: keep the
    decoder layers in CPU memory and move each to ``device`` only while it runs (no effect on CPU).
    ``build_tokenizers=False`` leaves the tokenizers to be built on first use. ``strict``: config
    problems that only warn by default (unknown keys, missing keys that change the model) are errors
    (see :func:`levo_infer.config.load_config`). ``model_class``: LeLM or a subclass of it, built.
    """
    folder, weights = _model_folder(path)
    verify_model_files(folder)  # before config.yaml is read
    cfg = config or load_config(folder, strict=strict)
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir)
        if not tdir.is_dir():
            raise CheckpointError(f"tokenizer_dir {tdir}: not a folder (expected a Qwen2 tokenizer folder)")
        cfg.tokenizer_path = str(tdir.resolve())
    weights = weights or find_weights(folder)
    src = StateSource(weights)
    with torch.device("meta"):
        model = model_class(cfg)
    names = check_keys(model, src.meta, source=str(weights))
    target = resolve_dtype(dtype) or src.floating_dtype() or torch.float32
    dev = torch.device(device)
    move_now = dev.type != "cpu" and not low_mem
    sd: dict[str, torch.Tensor] = {}
    mapped: set[int] = set()  # data pointers of file-mapped tensors used as they are
    for k, ref in model.state_dict().items():
        if k not in names:  # an unused key the file lacks
            sd[k] = torch.zeros(ref.shape, dtype=target if ref.is_floating_point() else ref.dtype, device=dev if move_now else "cpu")
            continue
        t = src.tensor(names[k])
        converted = t
        if t.is_floating_point() and t.dtype != target:
            converted = t.to(target)
        if move_now:
            converted = converted.to(dev)
        if src.mmapped:
            if converted is not t:
                _drop_pages(t)
            else:
                mapped.add(t.data_ptr())
        sd[k] = converted
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    src.close()
    model.eval()
    if low_mem and dev.type != "cpu":
        enable_layer_offload(model, dev, release=lambda old: _drop_pages(old) if old.data_ptr() in mapped else None)
    if build_tokenizers:
        _ = model.tokenizers  # build now: a missing or mismatched tokenizer fails at load time
    return model
