"""No file a user hands us runs code: every kind of file, every command that reads it.

Each test plants a payload (``tests/payloads.py``: unpickling it creates a marker file) into one kind
of file -- a one-file checkpoint, a FSDP2 / torch distributed-checkpoint folder (``.metadata``,
``meta.pt``, a tensor item of ``__0_0.distcp``, a non-tensor item of ``__1_0.distcp``), a DeepSpeed
ZeRO folder (every rank's model and optimizer states), an export's ``model.pt`` and ``config.yaml``
(resolver strings, a ``!!python`` tag), a reward export, codec files, song and pair shards,
``ref_logps.json`` -- runs each command that reads it, and asserts that the marker does not exist
and that the command failed with one line naming the file. Commands run in this process where the
code allows; the 2-rank FSDP2 resume and DeepSpeed's own engine load run as subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, released_config_path
from payloads import (
    YAML_PAYLOADS,
    plant_in_dcp_metadata,
    plant_in_dcp_shard,
    plant_in_shard,
    plant_in_torch_file,
    plant_in_yaml,
    python_object_yaml,
)

HAS_DEEPSPEED = __import__("importlib").util.find_spec("deepspeed") is not None
RUNNER = Path(__file__).resolve().parent / "deepspeed_runner.py"
#: the levo-train overrides of every in-process run here (stops before data unless stated)
RUN = ["recipe=sft", *TINY, "trainer.accelerator=cpu", "trainer.max_steps=2"]


def _own(err: str) -> str:
    """``err`` without the "--- Logging error ---" reports of a logging handler that Lightning bound
    to an earlier test's (closed) captured stderr: tracebacks of their own, not the command's."""
    return re.sub(r"--- Logging error ---.*?Arguments: \(.*?\)\n", "", err, flags=re.S)


def _refused(rc: int, err: str, marker: Path, *names: str, status: int | None = 2) -> None:
    """No code ran, the command failed (with exit ``status``; None: any failure -- levo-data's
    commands exit 1), and its last error line names the file(s)."""
    assert not marker.exists(), f"a crafted file ran code: {err[-2000:]}"
    assert rc != 0 and rc == (status or rc), err[-3000:]
    err = _own(err)
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert errors and all(n in errors[-1] for n in names), (names, err[-3000:])


def _train(capsys, run_dir: Path, *extra: str) -> tuple[int, str]:
    from levo_train.cli import main

    capsys.readouterr()
    rc = main([f"run_dir={run_dir}", *RUN, *extra])
    return rc, capsys.readouterr().err


def _export_cmd(capsys, ckpt: Path, out: Path) -> tuple[int, str]:
    from levo_train.cli import main

    capsys.readouterr()
    rc = main(["export", f"ckpt={ckpt}", f"out={out}"])
    return rc, capsys.readouterr().err


def _run_dir_with(ckpt: Path, tmp: Path) -> Path:
    """A run folder whose only checkpoint is ``ckpt`` (as ``checkpoints/last.ckpt``)."""
    rd = tmp / "run"
    (rd / "checkpoints").mkdir(parents=True)
    os.replace(ckpt, rd / "checkpoints" / "last.ckpt")
    return rd


def _checkpoint_commands(capsys, ckpt: Path, tmp: Path, marker: Path, name: str, *extra: str,
                         early: bool = True) -> None:
    """``levo-train export ckpt=``, ``ckpt_path=`` and ``resume=true`` on a crafted checkpoint;
    ``early``: refused before anything is built (else when the weights are read)."""
    _refused(*_export_cmd(capsys, ckpt, tmp / "out"), marker, name)
    _refused(*_train(capsys, tmp / "fresh", f"ckpt_path={ckpt}", *extra), marker, name)
    rd = _run_dir_with(ckpt, tmp)
    _refused(*_train(capsys, rd, "resume=true", *extra), marker, name)
    assert not (tmp / "out").exists() and (rd / "train_config.yaml").exists() != early


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def toy_export(tmp_path_factory) -> Path:
    """An untrained export of the toy-sized tiny model (what TINY trains): commands load it."""
    from levo_infer.checkpoint import save_released
    from levo_infer.model import LeLM
    from levo_train.cli import compose_config
    from levo_train.settings import build_model_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("exp") / "export"
    save_released(LeLM(build_model_config(compose_config(RUN))), folder)
    return folder


@pytest.fixture(scope="module")
def reward_export(tmp_path_factory, toy_export) -> Path:
    from levo_infer.config import load_config
    from levo_train.reward.model import RewardModel, save_reward_model

    folder = tmp_path_factory.mktemp("rm") / "export"
    save_reward_model(RewardModel(load_config(toy_export), ["quality"]), folder, {})
    return folder


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory, toy_cache_dir) -> Path:
    """A 2-rank FSDP2 run of 2 steps: its ``checkpoints/last.ckpt`` is a DCP folder."""
    rd = tmp_path_factory.mktemp("fsdp2") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    out = subprocess.run([sys.executable, "-m", "levo_train.cli", f"run_dir={rd}", f"data.toy.cache_dir={toy_cache_dir}",
                          *RUN, "data.batch_size=4", "trainer.limit_val_batches=1", "trainer.val_check_interval=1000",
                          "strategy=fsdp2", "trainer.devices=2", "export.enabled=false"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return rd


@pytest.fixture(scope="module")
def zero_ckpt(tmp_path_factory) -> Path:
    """A ZeRO-3 folder of 2 ranks (every rank has model and optimizer states), 1 step; the run also
    loads it and a crafted copy through DeepSpeed's engine (``--check-loads``)."""
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    out = tmp_path_factory.mktemp("zero")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(RUNNER), "--stage", "3", "--out", str(out), "--steps", "1", "--check-loads"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return out / "ckpt"


def _copy(src: Path, tmp: Path, name: str = "ck") -> Path:
    dst = tmp / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


# ----------------------------------------------------------------------------- checkpoints
def test_one_file_checkpoint(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    ck = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "global_step": 1, "levo": {}}, ck)
    plant_in_torch_file(ck, marker)
    _checkpoint_commands(capsys, ck, tmp_path, marker, "last.ckpt")


DCP_FILES = {  # file -> how to plant the payload there
    ".metadata": lambda d, m: plant_in_dcp_metadata(d, m),
    "meta.pt": lambda d, m: plant_in_torch_file(d / "meta.pt", m),
    "__0_0.distcp": lambda d, m: plant_in_dcp_shard(d, m, "__0_0.distcp", key="state_dict.model.mlp.0.bias"),
    "__1_0.distcp": lambda d, m: plant_in_dcp_shard(d, m, "__1_0.distcp"),  # an optimizer's lr (non-tensor)
}


@pytest.mark.parametrize("name", list(DCP_FILES))
def test_fsdp2_checkpoint_folder(tmp_path, capsys, dcp_run, name):
    marker = tmp_path / "code-ran"
    ck = _copy(dcp_run / "checkpoints" / "last.ckpt", tmp_path)
    DCP_FILES[name](ck, marker)
    # a tensor item is read weights_only by torch itself, when the weights load; the rest up front
    _checkpoint_commands(capsys, ck, tmp_path, marker, f"{name}", "strategy=fsdp2", early=name != "__0_0.distcp")


def test_fsdp2_resume_on_2_ranks_refuses_a_crafted_metadata(tmp_path, dcp_run, toy_cache_dir):
    """The acceptance case as a user runs it: exit 2, one line naming .metadata, no marker, no step."""
    marker = tmp_path / "code-ran"
    rd = _copy(dcp_run, tmp_path, "run")
    plant_in_dcp_metadata(rd / "checkpoints" / "last.ckpt", marker)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    out = subprocess.run([sys.executable, "-m", "levo_train.cli", f"run_dir={rd}", f"data.toy.cache_dir={toy_cache_dir}",
                          *RUN, "trainer.max_steps=4", "resume=true", "strategy=fsdp2", "trainer.devices=2"],
                         env=env, capture_output=True, text=True, timeout=600)
    _refused(out.returncode, out.stderr, marker, "last.ckpt/.metadata")
    assert len([ln for ln in out.stderr.splitlines() if "levo-train: error" in ln]) == 1
    assert not (rd / "checkpoints" / "step0000004.ckpt").exists()


def test_dcp_reads_themselves_never_unpickle_unchecked(tmp_path, dcp_run):
    """The reads every rank of an FSDP2 resume does (levo_train.dcp.SafeReader / SafePlanner), with
    the up-front check bypassed: a crafted non-tensor item is refused there too; on a clean folder
    they give exactly what torch's own reader gives."""
    import torch.distributed.checkpoint as tdcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from levo_infer.checkpoint import CheckpointError
    from levo_train import dcp

    clean = dcp_run / "checkpoints" / "last.ckpt"
    md = dcp.read_metadata(clean)
    keys = [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    keys += [k for k in md.state_dict_metadata if k.startswith("state_dict.model.mlp")]

    def state() -> dict:  # the optimizer's non-tensor items and some weights
        return {k: None if isinstance(m, BytesStorageMetadata) else torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in md.state_dict_metadata.items() if k in keys}

    ours, theirs = state(), state()
    tdcp.load(ours, storage_reader=dcp.SafeReader(clean), planner=dcp.SafePlanner(), no_dist=True)
    tdcp.load(theirs, storage_reader=tdcp.FileSystemReader(str(clean)), no_dist=True)  # our own clean file
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for k in ours:
        assert (torch.equal(ours[k], theirs[k]) if isinstance(ours[k], torch.Tensor) else ours[k] == theirs[k]), k

    marker = tmp_path / "code-ran"
    bad = _copy(clean, tmp_path)
    key = plant_in_dcp_shard(bad, marker, "__1_0.distcp")
    with pytest.raises(CheckpointException) as e:  # the check dcp.load makes first is bypassed here
        tdcp.load({key: None}, storage_reader=dcp.SafeReader(bad), planner=dcp.SafePlanner(), no_dist=True)
    (exc, _), = e.value.failures.values()
    assert isinstance(exc, CheckpointError) and re.search(r"__1_0\.distcp: item .*lr.*refused", str(exc)), exc
    assert not marker.exists()


ZERO_FILES = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
              "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.parametrize("name", ZERO_FILES)
def test_zero_checkpoint_folder(tmp_path, capsys, zero_ckpt, name):
    marker = tmp_path / "code-ran"
    ck = _copy(zero_ckpt, tmp_path)
    plant_in_torch_file(ck / "checkpoint" / name, marker)
    _refused(*_export_cmd(capsys, ck, tmp_path / "out"), marker, name)
    rd = _run_dir_with(ck, tmp_path)
    _refused(*_train(capsys, rd, "resume=true", "strategy=deepspeed_zero3"), marker, name)


def test_deepspeed_engine_load_reads_every_file_checked(zero_ckpt):
    """DeepSpeed's own ``engine.load_checkpoint`` (what Lightning's DeepSpeed strategy calls on GPU)
    inside ``levo_train.zero.checked_engine_loads``, on both ranks of the fixture's run: its clean
    folder loads; the copy with a payload in rank 1's optimizer states is refused on both, naming it."""
    out = zero_ckpt.parent
    assert not (out / "code-ran").exists()
    for rank in (0, 1):
        r = json.loads((out / f"load_rank{rank}.json").read_text())
        assert r[str(zero_ckpt)] == {"global_step": 1}
        err = r[str(out / "crafted")]["error"]
        assert str(out / "crafted" / "checkpoint" / ZERO_FILES[3]) in err and "refused" in err, err


# ----------------------------------------------------------------------------- exports
def _model_commands(capsys, folder: Path, tmp: Path, toy_cache_dir: str) -> list[tuple[str, int, str]]:
    """Every command that reads a model export: (name, exit status, stderr)."""
    from levo_data.cli import main as data_main
    from levo_eval.cli import main as eval_main
    from levo_infer.cli import main as infer_main

    prompts = tmp / "prompts.jsonl"
    prompts.write_text(json.dumps({"idx": "a", "gt_lyric": "[verse] la da", "descriptions": "pop"}) + "\n")
    out: list[tuple[str, int, str]] = []
    for name, fn in [
        ("levo-infer", lambda: infer_main([str(folder), str(prompts), str(tmp / "inf"), "--tokens-only",
                                           "--device", "cpu", "--no-progress"])),
        ("levo-eval toy", lambda: eval_main(["toy", "--ckpt", str(folder), "--n", "2"])),
        ("levo-data sample", lambda: data_main(["sample", "--model", str(folder), "--prompts", str(prompts),
                                                "--per-prompt", "1", "--out", str(tmp / "cands"), "--device", "cpu"])),
        ("levo-train model.init", lambda: __import__("levo_train.cli").cli.main(
            [f"run_dir={tmp / 'init'}", *RUN, f"model.init={folder}", f"data.toy.cache_dir={toy_cache_dir}"])),
    ]:
        capsys.readouterr()
        rc = fn()
        out.append((name, rc, capsys.readouterr().err))
    return out


def test_export_model_pt(tmp_path, capsys, toy_export, toy_cache_dir):
    marker = tmp_path / "code-ran"
    folder = _copy(toy_export, tmp_path, "export")
    plant_in_torch_file(folder / "model.pt", marker)
    for name, rc, err in _model_commands(capsys, folder, tmp_path, toy_cache_dir):
        assert not marker.exists(), name
        _refused(rc, err, marker, str(folder / "model.pt"), status=None if name.startswith("levo-data") else 2)


def test_truncated_model_pt_is_named(tmp_path, capsys, toy_export, toy_cache_dir):
    """A model.pt cut where torch's zip reader says only ``[Errno 22] Invalid argument``."""
    folder = _copy(toy_export, tmp_path, "export")
    with open(folder / "model.pt", "r+b") as f:
        f.truncate(4300)
    for name, rc, err in _model_commands(capsys, folder, tmp_path, toy_cache_dir):
        assert rc in (1, 2) and "Traceback" not in _own(err), (name, err[-2000:])
        assert str(folder / "model.pt") in err and "truncated" in err, (name, err[-2000:])


@pytest.mark.parametrize("payload", [*YAML_PAYLOADS, "python_object"])
def test_export_config_yaml(tmp_path, capsys, toy_export, toy_cache_dir, payload):
    """Refused by every command, naming the file and the key (the read alone: under a second);
    the released v2-large config, with its two resolver forms, still loads."""
    from levo_infer.config import ConfigError, load_config

    marker = tmp_path / "code-ran"
    folder = _copy(toy_export, tmp_path, "export")
    key = "conditioners.prompt_audio.qt_embedding.max_len"
    if payload == "python_object":
        (folder / "config.yaml").write_text(python_object_yaml(marker) + (folder / "config.yaml").read_text())
        released = load_config(released_config_path())  # ${eval:${prompt_len}*...+2}, ${load_yaml:conf/vocab.yaml}
        assert released.prompt_max_len == 252 and len(released.lyric_tags) == 13
        key = "config.yaml"
    else:
        plant_in_yaml(folder / "config.yaml", key, YAML_PAYLOADS[payload])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(folder)
    assert time.perf_counter() - t0 < 1.0
    for name, rc, err in _model_commands(capsys, folder, tmp_path, toy_cache_dir):
        _refused(rc, err, marker, str(folder / "config.yaml"), key, status=None if name.startswith("levo-data") else 2)


# ----------------------------------------------------------------------------- reward, codec, data
def test_reward_export(tmp_path, capsys, reward_export, toy_export, toy_cache_dir):
    from levo_data.cli import main as data_main
    from levo_eval.cli import main as eval_main
    from levo_train.cli import main as train_main
    from levo_train.data.shards import ShardWriter

    cands = tmp_path / "cands"
    with ShardWriter(cands, code_size=64) as w:
        w.write_song("s0", torch.randint(0, 64, (3, 12)).numpy(), "[verse] la da", "pop", {})
    for what in ("reward.pt", "config.yaml", "reward.json"):
        marker = tmp_path / f"code-ran-{what}"
        folder = _copy(reward_export, tmp_path, f"rm-{what}")
        if what == "reward.pt":
            plant_in_torch_file(folder / what, marker)
        elif what == "config.yaml":
            plant_in_yaml(folder / what, "lm.dim", "${oc.env:HOME}")
        else:
            (folder / what).write_text("{not json")
        for argv, fn in [
            (["score", str(cands), "--scorer", f"rm:{folder}", "--out", str(tmp_path / "scored"), "--device", "cpu"],
             data_main),
            (["reward", "--rm", str(folder), "--policy", str(toy_export), "--n", "2"], eval_main),
            ([f"run_dir={tmp_path / 'sdpo'}", *RUN, "recipe=sdpo", f"model.init={toy_export}", f"reward.ckpt={folder}",
              f"data.toy.cache_dir={toy_cache_dir}"], train_main),
        ]:
            capsys.readouterr()
            rc = fn(argv)
            _refused(rc, capsys.readouterr().err, marker, f"{folder / what}", status=None if fn is data_main else 2)


def test_codec_files(tmp_path, capsys):
    from codec_fixtures import write_tiny_codec

    from levo_infer.cli import main as infer_main
    from levo_infer.codec.decoder import VAE_CKPT, VAE_JSON

    toks = tmp_path / "tokens"
    toks.mkdir()
    torch.save(torch.zeros(3, 4, dtype=torch.long), toks / "s.pt")
    for what in (VAE_CKPT, VAE_JSON):
        marker = tmp_path / "code-ran"
        codec = write_tiny_codec(tmp_path / f"codec-{Path(what).name}")
        if what == VAE_CKPT:
            plant_in_torch_file(codec / what, marker)
        else:
            (codec / what).write_text("{not json")
        capsys.readouterr()
        rc = infer_main(["decode", str(toks), str(tmp_path / "wav"), "--codec", str(codec), "--device", "cpu"])
        _refused(rc, capsys.readouterr().err, marker, str(codec / what))


def test_song_and_pair_shards_and_ref_logps(tmp_path, capsys):
    import numpy as np

    from levo_data.cli import main as data_main
    from levo_train.data.pairs import PairWriter, read_ref_logps
    from levo_train.data.shards import ShardError, ShardWriter, Song, iter_raw
    from levo_train.train.ref_logps import iter_pairs

    marker = tmp_path / "code-ran"
    songs = tmp_path / "songs"
    tok = np.zeros((3, 8), dtype=np.int16)
    with ShardWriter(songs, code_size=64) as w:
        w.write_song("s0", tok, "[verse] la da", "pop", {})
    shard = next(songs.glob("*.tar"))
    plant_in_shard(shard, "tokens.npy", marker)
    capsys.readouterr()
    rc = data_main(["validate", str(songs), "--code-size", "64"])
    err = capsys.readouterr().err
    assert not marker.exists() and rc != 0 and str(shard) in err and "Traceback" not in err, err[-2000:]

    pairs = tmp_path / "pairs"
    with PairWriter(pairs, code_size=64) as w:
        a = Song("a", tok, "[verse] la da", "pop", None, {})
        w.write_pair("p0", a, Song("b", tok + 1, "[verse] la da", "pop", None, {}), {})
    shard = next(pairs.glob("*.tar"))
    plant_in_shard(shard, "chosen.npy", marker)
    with pytest.raises(ShardError, match=str(shard)):
        list(iter_pairs(pairs, code_size=64))
    assert not marker.exists() and len(list(iter_raw(str(shard)))) == 1

    (pairs / "ref_logps.json").write_text('{"model": "x", "logps": {"p0": "not a pair"}')
    with pytest.raises(ShardError, match="ref_logps.json"):
        read_ref_logps(pairs)
