"""Shared fixtures: tiny LeLM configs (dim <= 64) and environment for offline, quiet runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# one thread: tiny models gain nothing from more, and a shared machine makes 2 threads crawl
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LEVO_SHARED_DIR", REPO.parent / "shared"))
#: the released codec's real-size key layout (shared/codec_real_layout.json; a copy of that facts
#: file is kept in tests/data so the layout tests run wherever the shared folder is not beside the clone)
CODEC_LAYOUT = next((p for p in (SHARED / "codec_real_layout.json", REPO / "tests" / "data" / "codec_real_layout.json")
                     if p.is_file()), SHARED / "codec_real_layout.json")
#: the same for the encoder's two files (shared/encoder_real_layout.json)
ENCODER_LAYOUT = next((p for p in (SHARED / "encoder_real_layout.json",
                                   REPO / "tests" / "data" / "encoder_real_layout.json") if p.is_file()),
                      SHARED / "encoder_real_layout.json")

#: levo-train overrides for a tiny model on a tiny toy world (CLI tests)
TINY = [
    "model.config.dim=32", "model.config.num_heads=2", "model.config.num_layers=2", "model.config.num_layers_sub=1",
    "model.config.intermediate_size=64", "model.config.lyric_max_len=48",
    "data.toy.n_train=400", "data.toy.n_val=64", "data.batch_size=8", "data.val_batch_size=32",
    "trainer.limit_val_batches=2", "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
    "logger=none", "optim.warmup_steps=5",
]

TINY_WORDS = ["<unk>", ".", ",", ";", "la", "da", "love", "night", "rock", "pop", "sad", "happy"]


def tiny_config(**kw):
    from levo_infer.config import make_config

    args = dict(dim=32, num_heads=2, num_layers=2, num_layers_sub=1, intermediate_size=64, code_size=16,
                delays=[0, 2, 2], lyric_max_len=12, style_max_len=6, prompt_frames=3, text_words=TINY_WORDS,
                rope_theta=10000.0)
    args.update(kw)
    return make_config(**args)


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture
def tiny_model(tiny_cfg):
    from levo_infer.model import LeLM

    torch.manual_seed(0)
    m = LeLM(tiny_cfg)
    m.init_weights(std=0.2)
    return m.eval()


def released_config_path() -> Path:
    p = SHARED / "released_configs" / "v2_large_config.yaml"
    if not p.is_file():
        pytest.skip(f"released config not available at {p} (set LEVO_SHARED_DIR)")
    return p


@pytest.fixture(scope="session")
def toy_cache_dir(tmp_path_factory) -> str:
    """A toy-world cache folder shared by the tests that train on the tiny toy world."""
    return str(tmp_path_factory.mktemp("toycache"))


@pytest.fixture(scope="session")
def toy_sft_export(toy_cache_dir, tmp_path_factory) -> Path:
    """A briefly SFT-trained tiny toy model's export (DPO init, levo-eval subject). 600 steps: its
    samples must be songs (quality spread >= 0.05 between a prompt's samples) for toy pairs, since
    the length-aware world scores the fragments of a barely trained model ~0."""
    from levo_train.cli import main

    rd = tmp_path_factory.mktemp("sft")
    assert main(["recipe=sft", f"run_dir={rd}", f"data.toy.cache_dir={toy_cache_dir}", *TINY, "trainer.max_steps=600",
                 "trainer.val_check_interval=1000", "trainer.limit_val_batches=1", "optim.lr=3e-3"]) == 0
    return rd / "export"


@pytest.fixture(autouse=True)
def _no_leaked_distributed_state():
    """A test that runs a command in-process under a distributed strategy (e.g. ``strategy=fsdp2`` on
    one rank, refused after Lightning set up its process group) must not leave that group, or the
    ``MASTER_ADDR``/``MASTER_PORT`` Lightning exported, to the tests after it: the port stays bound by
    this process, and every later multi-rank subprocess inheriting ``MASTER_PORT`` fails with
    EADDRINUSE. Destroys a leftover default group and restores the environment."""
    env = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k in set(os.environ) - set(env):
        del os.environ[k]
    os.environ.update(env)
