"""Native LeVo codec decoder (song tokens -> 48 kHz stereo); being built (issue #11)."""

from __future__ import annotations

import os
from typing import Any


def load_codec(ckpt_dir: str | os.PathLike, device: str) -> Any:
    """None until the decoder lands: levo-infer then writes tokens only."""
    return None
