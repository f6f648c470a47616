"""Corruption never goes unnoticed (issue #18, items 5 and 6).

Seeded truncations and byte flips (:mod:`corruption_kit`, 24 per file kind) of every file kind
levo-train writes or reads, each read through the code path of the command that uses it: each is
refused naming the file, or loads exactly the intact content; where no checksum of ours can exist
(released codec files, tars written by another tool) a changed read is allowed only with finite
weights and the same record count, and is reported. The FSDP2 and ZeRO folders are swept in
tests/test_fsdp2.py and tests/test_deepspeed.py, on the folders those tests train anyway.
Plus the acceptance cases of the issue: 256 bytes overwritten inside a tensor of ``last.ckpt``
(resume skips it to the intact older checkpoint), and a flipped tar-header byte in a 100-record
shard without ``index.json`` (``levo-data validate`` fails naming the shard, not "50 records").
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_config
from corruption_kit import sweep

CS = 64
LYRIC = "[intro-short] ; [verse] a b . c ; [chorus] d e"
N_SONGS = 12


def _sft(cache: str, rd: Path, *extra: str) -> list[str]:
    return ["recipe=sft", f"run_dir={rd}", f"data.toy.cache_dir={cache}", *TINY, "trainer.val_check_interval=1000",
            *extra]


@pytest.fixture(scope="module")
def run(toy_cache_dir, tmp_path_factory) -> Path:
    """A 2-step tiny SFT run: checkpoints at steps 1 and 2 (+ last.ckpt) and its export."""
    from levo_train.cli import main

    rd = tmp_path_factory.mktemp("corrupt") / "run"
    assert main(_sft(toy_cache_dir, rd, "trainer.max_steps=2", "checkpoint.every_n_steps=1")) == 0
    return rd


def _songs(n: int = N_SONGS):
    rng = np.random.default_rng(0)
    for i in range(n):
        prompt = rng.integers(0, CS, size=(3, 4)) if i % 3 == 0 else None
        yield f"song-{i:03d}", rng.integers(0, CS, size=(3, 6 + i)), f"pop {i}", prompt


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from levo_train.data.shards import ShardWriter

    d = tmp_path_factory.mktemp("shards") / "songs"
    with ShardWriter(d, max_records=N_SONGS // 2, code_size=CS) as w:
        for key, tokens, style, prompt in _songs():
            w.write_song(key, tokens, LYRIC, style, {"language": "en"}, prompt)
    return d


def _read_songs(d: Path) -> list:
    from levo_train.data.shards import iter_songs

    return [(s.key, s.tokens, s.lyric, s.style, s.prompt, s.meta) for s in iter_songs(d, code_size=CS)]


def _damage_largest_tensor(path: Path, data: bytes, *, xor: bool = False) -> None:
    """Overwrite (or xor) bytes 64.. of the largest tensor storage of a torch file (a zip record)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    b = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 64
    assert start + len(data) <= info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size
    old = b[start:start + len(data)]
    b[start:start + len(data)] = bytes(x ^ y for x, y in zip(old, data)) if xor else data
    assert b[start:start + len(data)] != old
    path.write_bytes(bytes(b))


# ----------------------------------------------------------------------------- checkpoints
def test_one_file_checkpoint(run, tmp_path):
    """Lightning's one-file checkpoint, read as resume and export read it."""
    from levo_train.export import policy_state_dict
    from levo_train.resume import read_checkpoint_state

    def read(p: Path):
        rp = read_checkpoint_state(p)
        sd, levo = policy_state_dict(p)
        return {"step": rp.step, "levo": levo, "weights": sd}

    c = sweep(run / "checkpoints" / "last.ckpt", [""], read, work=tmp_path, seed=1)
    assert c["refused"] >= 20


def test_resume_skips_a_checkpoint_with_overwritten_tensor_bytes(run, toy_cache_dir, tmp_path, capsys):
    """The issue's case: 256 bytes overwritten inside a tensor of last.ckpt. resume=true names it,
    skips it and continues from the intact step-1 checkpoint (its own step-2 file is damaged too);
    ckpt_path= pointing at it is exit 2 naming it; never exit 0 with NaN weights."""
    from levo_train.cli import main

    rd = tmp_path / "r"
    shutil.copytree(run, rd)
    for name in ("last.ckpt", "step0000002.ckpt"):
        _damage_largest_tensor(rd / "checkpoints" / name, b"\xff" * 256)  # NaN patterns in fp32
    assert main(_sft(toy_cache_dir, tmp_path / "other", "trainer.max_steps=2",
                     f"ckpt_path={rd / 'checkpoints' / 'last.ckpt'}")) == 2
    err = capsys.readouterr().err
    assert "last.ckpt" in err and "CRC-32" in err
    assert main(_sft(toy_cache_dir, rd, "trainer.max_steps=2", "resume=true", "checkpoint.every_n_steps=100")) == 0
    err = capsys.readouterr().err
    assert "last.ckpt cannot be loaded" in err and "step0000002.ckpt cannot be loaded" in err and "CRC-32" in err
    assert "resuming from" in err and "step0000001.ckpt (step 1)" in err
    w = torch.load(rd / "export" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in w.values())


def test_export_cli_refuses_a_corrupted_checkpoint(run, tmp_path):
    """`levo-train export ckpt=...` as a user runs it: exit 2 and one line naming the file."""
    bad = tmp_path / "bad.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", bad)
    _damage_largest_tensor(bad, b"\x40", xor=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "levo_train.cli", "export", f"ckpt={bad}", f"out={tmp_path / 'x'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert str(bad) in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x" / "model.pt").exists()


def test_export_model_pt_and_config_yaml(run, tmp_path):
    """An export as levo-infer, model.init and the DPO reference load it (load_model)."""
    from levo_infer import load_model

    def read(folder: Path):
        m = load_model(folder, build_tokenizers=False)
        return {"cfg": m.cfg.to_dict(), "weights": m.state_dict()}

    c = sweep(run / "export", ["model.pt", "config.yaml", "checksums.json"], read, work=tmp_path, seed=2)
    assert c["refused"] >= 40


def test_model_init_with_an_edited_config_is_refused_before_anything_is_built(run, toy_cache_dir, tmp_path, capsys):
    from levo_train.cli import main

    init = tmp_path / "init"
    shutil.copytree(run / "export", init)
    cfg = (init / "config.yaml").read_text()
    assert "dim: 32" in cfg
    (init / "config.yaml").write_text(cfg.replace("dim: 32", "dim: 33", 1))  # still valid YAML, same size
    rd = tmp_path / "r"
    assert main(_sft(toy_cache_dir, rd, "trainer.max_steps=1", f"model.init={init}")) == 2
    err = capsys.readouterr().err
    assert f"model.init={init}" in err and "config.yaml: its sha256 differs" in err
    assert not (rd / "train_config.yaml").exists()


def test_released_folder_without_checksums_still_loads_and_its_model_pt_is_crc_checked(run, tmp_path):
    """A released SongGeneration folder has no checksums.json: it loads; its model.pt is still
    checked through the CRC-32s torch wrote into it."""
    from levo_infer import load_model
    from levo_infer.checkpoint import CheckpointError

    rel = tmp_path / "released"
    shutil.copytree(run / "export", rel)
    (rel / "checksums.json").unlink()
    want = load_model(run / "export", build_tokenizers=False).state_dict()
    got = load_model(rel, build_tokenizers=False).state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    _damage_largest_tensor(rel / "model.pt", b"\x01", xor=True)
    with pytest.raises(CheckpointError, match="model.pt.*CRC-32"):
        load_model(rel, build_tokenizers=False)


def test_reward_export(tmp_path):
    from levo_train.reward.model import RewardModel, load_reward_model, save_reward_model

    torch.manual_seed(0)
    folder = save_reward_model(RewardModel(tiny_config(), ["melody", "vocal"]), tmp_path / "rm", {"source": "t"})

    def read(f: Path):
        model, info = load_reward_model(f)
        return {"info": info, "weights": model.state_dict(), "cfg": model.config.to_dict()}

    c = sweep(folder, ["reward.pt", "reward.json", "config.yaml"], read, work=tmp_path / "w", seed=3)
    assert c["refused"] >= 60


def test_lora_adapters(tmp_path):
    from levo_infer.model import LeLM
    from levo_train.lora import LoraSpec, apply_lora, read_adapters, save_adapters

    torch.manual_seed(0)
    model = LeLM(tiny_config())
    spec = LoraSpec(r=2)
    apply_lora(model, spec)
    with torch.no_grad():  # trained-looking adapters (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    folder = save_adapters(model, tmp_path / "adapters", spec, base_fingerprint="f" * 64)
    c = sweep(folder, ["adapter_model.safetensors", "adapter_config.json"], read_adapters, work=tmp_path / "w",
              seed=4)
    assert c["refused"] >= 40


def test_codec_files(tmp_path):
    """Released codec files carry no checksum of ours: the VAE checkpoint's zip CRC-32s are
    checked; a flow tensor turned NaN/inf is refused; other flips in the safetensors payload or in
    the json may go undetected (reported, weights finite)."""
    from codec_fixtures import write_tiny_codec

    from levo_infer.codec.decoder import SEPTOKEN_FILE, VAE_CKPT, VAE_JSON, load_decoder

    folder = write_tiny_codec(tmp_path / "codec")

    def read(f: Path):
        d = load_decoder(f)
        return {"flow": d.flow.state_dict(), "vae": d.vae.state_dict(), "vae_cfg": vars(d.vae.cfg)}

    c = sweep(folder, [VAE_CKPT, SEPTOKEN_FILE, VAE_JSON], read, work=tmp_path / "w", seed=5, n=20,
              undetectable=[SEPTOKEN_FILE, VAE_JSON])
    assert c["refused"] >= 20


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("index", [True, False])
def test_song_shards(shards, tmp_path, index):
    """Song shards with and without index.json, read as training and `levo-data validate` read them."""
    from levo_data.cli import main as levo_data

    src = shards
    if not index:
        src = tmp_path / "noindex"
        shutil.copytree(shards, src)
        (src / "index.json").unlink()

    def read(d: Path):
        songs = _read_songs(d)
        assert levo_data(["validate", str(d), "--code-size", str(CS)]) == 0
        return songs

    c = sweep(src, ["songs-000000.tar", "songs-000001.tar"], read, work=tmp_path / "w", seed=6 + index)
    assert c["refused"] >= 24  # the rest hit tar padding: unchanged


def test_training_stream_refuses_a_corrupted_record_naming_it(shards, tmp_path):
    """The datamodule's stream (what training reads) goes through the same check; with skip_bad
    the record is counted and logged as bad, never used."""
    from levo_train.data.datamodule import SongDataModule
    from levo_train.data.shards import ShardError

    d = tmp_path / "s"
    shutil.copytree(shards, d)
    p = d / "songs-000001.tar"
    with tarfile.open(p) as tf:
        m = next(m for m in tf if m.name.endswith("tokens.npy"))
    data = bytearray(p.read_bytes())
    data[m.offset_data + m.size - 1] ^= 0x01  # the last code of a song: still in range, another song
    p.write_bytes(bytes(data))
    dm = SongDataModule(str(d), batch_size=4, code_size=CS, shuffle_buffer=0)
    dm.setup()
    with pytest.raises(ShardError, match=f"songs-000001.tar: record '{m.name.split('.')[0]}'.*sha256"):
        for _ in zip(range(4), dm.train_dataloader()):
            pass
    dm = SongDataModule(str(d), batch_size=4, code_size=CS, shuffle_buffer=0, skip_bad=True)
    dm.setup()
    batches = [b for _, b in zip(range(3), dm.train_dataloader())]
    assert sum(b["n_bad"] for b in batches) == 1 and sum(len(b["keys"]) for b in batches) == N_SONGS - 1


def test_validate_all_counts_a_corrupted_record_as_bad(shards, tmp_path, capsys):
    from levo_data.cli import main as levo_data

    d = tmp_path / "s"
    shutil.copytree(shards, d)
    p = d / "songs-000000.tar"
    with tarfile.open(p) as tf:
        m = next(m for m in tf if m.name.endswith("style.txt"))
    data = bytearray(p.read_bytes())
    data[m.offset_data] ^= 0x01
    p.write_bytes(bytes(data))
    capsys.readouterr()
    assert levo_data(["validate", str(d), "--code-size", str(CS), "--all"]) == 1
    out = capsys.readouterr()
    rep = json.loads(out.out)
    assert rep["records"] == N_SONGS and rep["bad"] == 1 and rep["verified"] == N_SONGS - 1 and rep["unverified"] == 0
    key = m.name.split(".")[0]
    assert f"songs-000000.tar: record '{key}': its bytes" in out.err


def _foreign_tar(path: Path) -> None:
    """A song tar as another tool writes it: no digests."""
    from webdataset import TarWriter

    with open(path, "wb") as f, TarWriter(f, encoder=False) as tw:
        for key, tokens, style, _ in _songs():
            buf = io.BytesIO()
            np.save(buf, tokens.astype(np.int16))
            rec = {"__key__": key, "tokens.npy": buf.getvalue(), "lyric.txt": LYRIC.encode(),
                   "style.txt": style.encode(), "json": b'{"language": "en"}'}
            tw.write(rec)


def test_foreign_tar_is_never_shortened_and_its_unverified_records_are_reported(tmp_path, capsys):
    """A tar without digests: truncations and header damage are refused (the tar must reach its
    end-of-archive blocks); a flipped payload byte cannot be detected, but the record count never
    drops and `levo-data validate` reports every record as unverified."""
    from levo_data.cli import main as levo_data

    d = tmp_path / "foreign"
    d.mkdir()
    _foreign_tar(d / "other-000000.tar")

    def read(dd: Path):
        songs = _read_songs(dd)
        assert len(songs) == N_SONGS
        return songs

    c = sweep(d, ["other-000000.tar"], read, work=tmp_path / "w", seed=8, n=30, undetectable=["other-000000.tar"])
    assert c["refused"] >= 15
    capsys.readouterr()
    assert levo_data(["validate", str(d), "--code-size", str(CS)]) == 0
    out = capsys.readouterr()
    rep = json.loads(out.out)
    assert rep["records"] == N_SONGS and rep["unverified"] == N_SONGS and rep["verified"] == 0
    assert f"{N_SONGS} of {N_SONGS} records carry no digest" in out.err


def test_flipped_header_byte_in_a_100_record_shard_without_index_fails_validate(tmp_path):
    """The issue's case, through the real CLI: one flipped tar-header byte in the middle of a
    100-record shard without index.json used to pass validation with 50 records."""
    from levo_train.data.shards import ShardWriter

    d = tmp_path / "s"
    rng = np.random.default_rng(1)
    with ShardWriter(d, max_records=1000, code_size=CS) as w:
        for i in range(100):
            w.write_song(f"s{i:03d}", rng.integers(0, CS, size=(3, 5)), LYRIC, "rock")
    (d / "index.json").unlink()
    p = d / "songs-000000.tar"
    with tarfile.open(p) as tf:
        m = next(m for m in tf if m.name.startswith("s050."))
    data = bytearray(p.read_bytes())
    data[m.offset + 5] ^= 0x20  # in the member name: the header checksum no longer matches
    p.write_bytes(bytes(data))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "levo_data", "validate", str(d), "--code-size", str(CS)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert str(p) in out.stderr and "header" in out.stderr and "Traceback" not in out.stderr


def test_pair_folders_and_ref_logps(tmp_path):
    from levo_data.cli import main as levo_data
    from levo_train.data.pairs import PairWriter, pair_digest, read_ref_logps, write_ref_logps
    from levo_train.data.shards import Song
    from levo_train.train.ref_logps import iter_pairs

    d = tmp_path / "pairs"
    with PairWriter(d, code_size=CS, max_records=4) as w:
        for key, tokens, style, prompt in _songs(8):
            a = Song(key, tokens, LYRIC, style, prompt)
            b = Song(key + "r", (tokens + 1) % CS, LYRIC, style, prompt)
            w.write_pair("p" + key, a, b, {"dimension": "quality", "margin": 0.5})
    pairs = list(iter_pairs(d, code_size=CS))
    write_ref_logps(d, "fp", {p.key: (-1.5 - i / 7, -2.25 + i / 3, pair_digest(p)) for i, p in enumerate(pairs)},
                    [1.0, 1.0, 1.0])

    def read_pairs(dd: Path):
        got = [(p.key, p.chosen, p.rejected, p.lyric, p.style, p.prompt, p.meta) for p in iter_pairs(dd, code_size=CS)]
        assert levo_data(["validate", str(dd), "--code-size", str(CS)]) == 0
        return got

    c = sweep(d, ["pairs-000000.tar", "pairs-000001.tar"], read_pairs, work=tmp_path / "w", seed=9)
    assert c["refused"] >= 24  # the rest hit tar padding: unchanged
    c = sweep(d, ["ref_logps.json"], read_ref_logps, work=tmp_path / "w2", seed=10)
    assert c["refused"] >= 20
