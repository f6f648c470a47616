"""The user-facing model: what :func:`load_model` returns.

:class:`SongLM` is an :class:`~levo_infer.model.LeLM` (same parameters, state dict, forward,
``.logits``, ``.prepare_conditions``, ``.to``/``.eval``/training: everything callers do with a model
keeps working) with the released-folder API on top: ``.generate(lyrics, styles, ...)`` and
``.save(folder)``. The model class itself has neither: generation is
:func:`levo_infer.generate.generate` and saving :func:`levo_infer.checkpoint.save_released`, so
``model.py`` needs neither module (no import cycle), and training code that builds a plain LeLM calls
those functions directly.

    from levo_infer import load_model
    model = load_model("ckpt/songgeneration_v2_large", device="cuda", dtype="bf16")
    out = model.generate(["[verse] ..."], ["[Musicality-very-high], pop"], max_frames=250, top_k=50)
    model.save("out/model")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

import torch

from .checkpoint import load_released, save_released
from .config import ModelConfig
from .generate import GenerationOutput, generate
from .model import LeLM

__all__ = ["SongLM", "load_model"]


class SongLM(LeLM):
    """An LeLM with ``.generate`` and ``.save`` (see the module docstring); :func:`load_model` builds one."""

    @torch.no_grad()
    def generate(self, lyrics: Sequence[str | None], styles: Sequence[str | None],
                 prompt: torch.Tensor | None = None, **kwargs: Any) -> GenerationOutput:
        """Batched generation (KV cache, CFG, sampling rules): see :func:`levo_infer.generate.generate`
        for the keyword arguments (``max_frames``, ``cfg_coef``, ``top_k``, ``top_p``, ``temperature``,
        ``compat``, ``seed``, ...). Returns tokens [B, K, max_frames] plus ``lengths``."""
        return generate(self, lyrics, styles, prompt, **kwargs)

    def save(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
        """Write the released folder layout (``model.pt`` with ``audiolm.`` keys + ``config.yaml``)."""
        save_released(self, folder, dtype=dtype)


def load_model(path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               config: ModelConfig | None = None, low_mem: bool = False, build_tokenizers: bool = True,
               strict: bool = False) -> SongLM:
    """Load a released model folder (v1 or v2) or one of our exports as a :class:`SongLM` in eval
    mode, its text tokenizers built. Every argument as :func:`levo_infer.checkpoint.load_released`:
    ``path`` the folder or its weights file, ``tokenizer_dir`` a Qwen2 tokenizer folder, ``dtype``
    bf16 / fp16 / fp32 (None: the checkpoint's), ``low_mem`` layer offload on GPU, ``strict`` config
    warnings as errors."""
    model = load_released(path, tokenizer_dir=tokenizer_dir, device=device, dtype=dtype, config=config,
                          low_mem=low_mem, build_tokenizers=build_tokenizers, strict=strict, model_class=SongLM)
    return cast(SongLM, model)
