"""Packaging: a non-editable install works (configs and recipes ship inside levo_train), and the
slim inference package never pulls in training-only libraries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "pytorch_lightning", "deepspeed", "wandb", "trl", "hydra", "webdataset", "transformers")


def test_non_editable_install(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, cwd=tmp_path)
    code = (
        "import levo_train, levo_infer, levo_data, levo_eval\n"
        f"assert levo_train.__file__.startswith({str(target)!r}), levo_train.__file__\n"
        f"assert levo_infer.__file__.startswith({str(target)!r}), levo_infer.__file__\n"
        "from levo_train.cli import compose_config, known_recipes\n"
        "assert {'pretrain', 'sft', 'dpo'} <= set(known_recipes()), known_recipes()\n"
        "cfg = compose_config(['recipe=dpo', 'model.init=x'])\n"
        "assert cfg.method == 'dpo' and cfg.recipe_name == 'dpo'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_inference_package_stays_slim():
    code = (
        "import sys, levo_infer, levo_infer.cli, levo_infer.generate, levo_infer.checkpoint, levo_infer.lyrics\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(','.join(sorted(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"levo_infer imported training-only packages: {out.stdout}"
