"""SongDataModule: deterministic order, rank partitioning, exact resume, workers, validation."""

from __future__ import annotations

import io
import json

import lightning as L
import numpy as np
import pytest
import torch
from webdataset import TarWriter

from levo_train.data.batch import collate_songs
from levo_train.data.datamodule import SongDataModule, epoch_order
from levo_train.data.shards import ShardError, ShardWriter, Song, iter_songs
from levo_train.toy.world import TOY_CODE_SIZE, write_toy_dataset

CS = TOY_CODE_SIZE
N_TRAIN, N_VAL, B = 300, 50, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    write_toy_dataset(d, seed=0, n_train=N_TRAIN, n_val=N_VAL, records_per_shard=40)
    return d


def _dm(data, **kw) -> SongDataModule:
    kw.setdefault("batch_size", B)
    kw.setdefault("seed", 1)
    kw.setdefault("shuffle_buffer", 64)
    return SongDataModule(str(data / "train"), str(data / "val"), code_size=CS, **kw)


def _take(dm: SongDataModule, k: int) -> list[dict]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(k)]


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.fixture(scope="module")
def stream(data):
    """The reference global stream (rank 0 of 1, no workers): 180 batches of 4 = 2.4 epochs."""
    return _take(_dm(data), 180)


def test_epoch_order_is_a_permutation():
    sizes = [5, 0, 7, 3]
    for epoch in range(3):
        _, ids = epoch_order(sizes, 0, epoch, 4)
        assert sorted(ids.tolist()) == list(range(15))
    assert np.array_equal(epoch_order(sizes, 0, 1, 4)[1], epoch_order(sizes, 0, 1, 4)[1])
    assert not np.array_equal(epoch_order(sizes, 0, 1, 4)[1], epoch_order(sizes, 0, 2, 4)[1])
    assert not np.array_equal(epoch_order(sizes, 0, 1, 4)[1], epoch_order(sizes, 1, 1, 4)[1])


def test_same_seed_same_batches_and_epochs(data, stream):
    dm = _dm(data)
    assert dm.samples_per_epoch == N_TRAIN and dm.batch_samples_global == B
    again = _take(_dm(data), 60)
    for a, b in zip(again, stream):
        assert a["keys"] == b["keys"] and torch.equal(a["codes"], b["codes"])
    keys = _keys(stream)
    epochs = [keys[e * N_TRAIN : (e + 1) * N_TRAIN] for e in range(2)]
    all_keys = {s.key for s in iter_songs(data / "train", code_size=CS)}
    for ep in epochs:
        assert len(ep) == N_TRAIN and set(ep) == all_keys  # every record exactly once per epoch
    assert epochs[0] != epochs[1]
    assert keys[:40] != sorted(keys[:40])  # shuffled
    other = _keys(_take(_dm(data, seed=2), 20))
    assert other != keys[:80]


def test_batch_contents(data, stream):
    b = stream[0]
    assert set(b) >= {"codes", "lengths", "lyrics", "styles", "prompts", "keys", "meta", "n_bad"}
    assert b["codes"].dtype == torch.long and b["codes"].shape[:2] == (B, 3)
    assert b["codes"].shape[2] == int(b["lengths"].max())
    assert b["prompts"] is None and b["n_bad"] == 0
    songs = {s.key: s for s in iter_songs(data / "train", code_size=CS)}
    for i, key in enumerate(b["keys"]):
        s = songs[key]
        n = int(b["lengths"][i])
        assert n == s.tokens.shape[1]
        assert torch.equal(b["codes"][i, :, :n], torch.from_numpy(s.tokens))
        assert (b["codes"][i, :, n:] == CS + 1).all()
        assert b["lyrics"][i] == s.lyric and b["styles"][i] == s.style and b["meta"][i] == s.meta


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_the_global_batch(data, stream, world):
    keys = _keys(stream)
    per_rank = [_keys(_take(_dm(data, rank=r, world_size=world), 15)) for r in range(world)]
    for g in range(15):
        for r in range(world):
            lo = g * B * world + r * B
            assert per_rank[r][g * B : (g + 1) * B] == keys[lo : lo + B]
    flat = [k for r in per_rank for k in r]
    assert len(flat) == len(set(flat))  # disjoint within the epoch


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (1, 2), (2, 2)])
def test_resume_continues_exactly(data, world, workers):
    K, M = 30, 20  # with W=2: samples 240..400 cross the epoch boundary at 300
    for rank in range(world):
        ref = _take(_dm(data, rank=rank, world_size=world, max_frames=24), K + M)
        dm = _dm(data, rank=rank, world_size=world, num_workers=workers, max_frames=24)
        dm.set_position(K * dm.batch_samples_global)
        resumed = _take(dm, M)
        for a, b in zip(resumed, ref[K:]):
            assert a["keys"] == b["keys"]
            assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["lengths"], b["lengths"])


def test_workers_match_single_process(data, stream):
    with_workers = _take(_dm(data, num_workers=2), 12)
    assert _keys(with_workers) == _keys(stream[:12])


def test_position_at_any_sample(data, stream):
    dm = _dm(data)
    dm.set_position(7)
    assert _keys(_take(dm, 3)) == _keys(stream)[7 : 7 + 3 * B]
    dm.set_position(2 * N_TRAIN + 5)  # deep into epoch 2: nothing before it is decoded
    assert _keys(_take(dm, 2)) == _keys(stream)[2 * N_TRAIN + 5 : 2 * N_TRAIN + 5 + 2 * B]


def test_state_dict_roundtrip(data):
    dm = _dm(data, rank=0, world_size=2)
    assert dm.batch_samples_global == 2 * B
    dm.set_position(123)
    sd = dm.state_dict()
    assert sd["position"] == 123 and sd["seed"] == 1 and sd["samples_per_epoch"] == N_TRAIN
    dm2 = _dm(data)
    dm2.load_state_dict(sd)
    assert dm2.position == 123
    with pytest.raises(ValueError, match="seed"):
        _dm(data, seed=5).load_state_dict(sd)
    with pytest.raises(ValueError):
        dm.set_position(-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_val_loader_ordered_strided_finite(data, workers):
    val_keys = [s.key for s in iter_songs(data / "val", code_size=CS)]
    full = list(_dm(data, num_workers=workers, val_batch_size=8).val_dataloader())
    assert _keys(full) == val_keys and [len(b["keys"]) for b in full] == [8] * 6 + [2]
    shares = [_keys(_dm(data, rank=r, world_size=3, num_workers=workers).val_dataloader()) for r in range(3)]
    for r in range(3):
        assert shares[r] == val_keys[r::3]


def test_no_val(data):
    dm = SongDataModule(str(data / "train"), None, batch_size=2, code_size=CS)
    assert dm.val_dataloader() == []


def test_crop_windows(data):
    songs = {s.key: s for s in iter_songs(data / "train", code_size=CS)}
    batches = _take(_dm(data, max_frames=16), 30)
    again = _take(_dm(data, max_frames=16), 30)
    offsets = []
    for b, b2 in zip(batches, again):
        assert torch.equal(b["codes"], b2["codes"])
        assert b["codes"].shape[2] <= 16
        for i, key in enumerate(b["keys"]):
            full = torch.from_numpy(songs[key].tokens)
            n = int(b["lengths"][i])
            assert n == min(16, full.shape[1])
            window = b["codes"][i, :, :n]
            starts = [o for o in range(full.shape[1] - n + 1) if torch.equal(full[:, o : o + n], window)]
            assert starts
            offsets.append(starts[0])
    assert max(offsets) > 0 and len(set(offsets)) > 5  # random windows
    for b in _take(_dm(data, max_frames=16, crop="start"), 5):
        for i, key in enumerate(b["keys"]):
            n = int(b["lengths"][i])
            assert torch.equal(b["codes"][i, :, :n], torch.from_numpy(songs[key].tokens[:, :n]))


def test_collate_prompts_and_padding():
    def song(t, prompt=None):
        return Song(
            key=f"k{t}", tokens=np.full((3, t), 3), lyric="[verse] a", style="", prompt=prompt, meta={}
        )

    out = collate_songs([song(2), song(5)], code_size=10)
    assert out["prompts"] is None and out["lengths"].tolist() == [2, 5]
    assert out["codes"].shape == (2, 3, 5) and (out["codes"][0, :, 2:] == 11).all()
    out = collate_songs([song(2), song(3, np.full((3, 4), 7)), song(1, np.full((3, 2), 8))], code_size=10)
    p = out["prompts"]
    assert p.shape == (3, 3, 4) and (p[0] == 11).all() and (p[1] == 7).all()
    assert (p[2, :, :2] == 8).all() and (p[2, :, 2:] == 11).all()
    with pytest.raises(ValueError):
        collate_songs([], code_size=10)


def test_skip_bad_in_the_stream(tmp_path, data):
    d = tmp_path / "mixed"
    good = list(iter_songs(data / "val", code_size=CS))[:10]
    with ShardWriter(d, max_records=5, code_size=CS) as w:
        for s in good:
            w.write_song(s.key, s.tokens, s.lyric, s.style, s.meta)
    # rewrite shard 1 by hand with one bad record (codes out of range)
    path = d / "songs-000001.tar"
    recs = [
        {
            "__key__": s.key,
            "tokens.npy": _npy16(np.full((3, 4), 99) if i == 2 else s.tokens),
            "lyric.txt": s.lyric.encode(),
            "style.txt": s.style.encode(),
            "json": json.dumps(s.meta).encode(),
        }
        for i, s in enumerate(good[5:])
    ]
    with open(path, "wb") as f, TarWriter(f, encoder=False) as tw:
        for r in recs:
            tw.write(r)
    strict = SongDataModule(str(d), batch_size=3, code_size=CS, seed=0, shuffle_buffer=4)
    with pytest.raises(ShardError, match=rf"songs-000001.tar: record '{good[7].key}': tokens.npy code 99"):
        _take(strict, 4)
    lenient = SongDataModule(str(d), batch_size=3, code_size=CS, seed=0, shuffle_buffer=4, skip_bad=True)
    batches = _take(lenient, 10)  # 30 samples = 3 epochs
    assert sum(b["n_bad"] for b in batches) == 3 and lenient.bad_records == 3
    keys = _keys(batches)
    assert len(keys) == 27 and good[7].key not in keys
    assert sorted(len(b["keys"]) for b in batches)[:3] == [2, 2, 2]


def _npy16(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, dtype=np.int16))
    return buf.getvalue()


def test_lightning_trainer_drives_the_stream(data, stream):
    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[str] = []

        def training_step(self, batch, i):
            self.seen += batch["keys"]
            return (self.w - batch["codes"].float().mean()).pow(2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = _dm(data)
    probe = Probe()
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    trainer.fit(probe, datamodule=dm)
    assert dm.rank_world() == (0, 1)
    assert probe.seen == _keys(stream[:3])
