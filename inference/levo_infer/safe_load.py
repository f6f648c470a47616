"""Reading pickled files that a user hands us, without ever running code from them.

Two readers, both refusing anything outside an explicit allowlist, both naming the file in every
error (a truncated zip, an I/O error, a refused global):

* :func:`torch_load`: a ``torch.save`` file (``model.pt``, a Lightning ``.ckpt``, a DeepSpeed
  states file, a codec ``.ckpt``) through torch's own restricted unpickler (``weights_only=True``),
  memory-mapped where the format allows it, with ``allow`` adding the exact extra classes a kind of
  file holds (e.g. DeepSpeed's loss scaler) for this one load.
* :func:`restricted_unpickle`: a plain pickle (torch distributed checkpoint ``.metadata``) through
  :class:`RestrictedUnpickler`, which resolves only the ``(module, name)`` globals it is given.

Every other module reads such files through these two; nothing here imports more than torch.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

#: refusing to run code: the phrase every refusal carries (tests and users grep for it)
REFUSED = "refused: a file is never allowed to run code"


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only the globals in ``allowed`` (``(module,
    name) -> object``); any other global -- ``os.system``, ``builtins.eval``, a class we did not
    list -- is an :class:`pickle.UnpicklingError` before it is looked up. Persistent ids are refused."""

    def __init__(self, file: IO[bytes], allowed: Mapping[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def error_detail(e: BaseException) -> str:
    """The informative line of an error: torch's weights-only refusal buries it under advice."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error:" in ln:
            return ln.split("WeightsUnpickler error:", 1)[1].split(" was not an allowed global")[0].strip()
    return lines[0] if lines else type(e).__name__


def restricted_unpickle(path: str | os.PathLike, allowed: Mapping[tuple[str, str], Any], *,
                        error: type[Exception] = ValueError) -> Any:
    """The object pickled in ``path``, unpickled by :class:`RestrictedUnpickler` with ``allowed``;
    ``error`` (a ValueError subclass of the caller's) naming the file when it cannot be read or
    holds anything else."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return RestrictedUnpickler(f, allowed).load()
    except pickle.UnpicklingError as e:
        raise error(f"{p}: {REFUSED} ({error_detail(e)})") from None
    except Exception as e:  # noqa: BLE001 - truncated pickle, I/O error, a bad argument to an allowed class
        raise error(f"{p}: not a readable pickle ({type(e).__name__}: {error_detail(e)})") from None


def is_zip(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable, non-empty zip (torch's format since 1.6: memory-mappable)."""
    try:
        return Path(path).stat().st_size > 0 and zipfile.is_zipfile(path)
    except OSError:
        return False


def torch_load(path: str | os.PathLike | IO[bytes], *, allow: Iterable[Any] = (), mmap: bool = True,
               error: type[Exception] = ValueError, where: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, memory-mapped when ``mmap`` and the file
    is a (non-empty) zip, with the classes ``allow`` added to torch's allowlist for this load only.
    ``path`` may be an open binary stream (an item inside a bigger file: ``where`` names it).
    Every failure -- a refused global, a truncated or foreign file (torch's zip reader gives a bare
    ``[Errno 22]`` for some), an I/O error -- is ``error`` naming the file."""
    stream = not isinstance(path, (str, os.PathLike))
    name = where or str(path)
    try:
        use_mmap = mmap and not stream and is_zip(path)  # type: ignore[arg-type]
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", mmap=use_mmap, weights_only=True)  # type: ignore[arg-type]
    except pickle.UnpicklingError as e:
        raise error(f"{name}: {REFUSED}: it holds objects other than tensors and plain data (read with "
                    f"weights_only=True: {error_detail(e)})") from None
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except Exception as e:  # noqa: BLE001 - truncated zip ([Errno 22] / PytorchStreamReader), not a torch file
        raise error(f"{name}: not a readable torch file, truncated or of another kind ({type(e).__name__}: "
                    f"{error_detail(e)})") from None


__all__ = ["REFUSED", "RestrictedUnpickler", "error_detail", "is_zip", "restricted_unpickle", "torch_load"]
