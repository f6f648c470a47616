"""Deterministic, exactly resumable song DataModule for any number of ranks and workers.

The train stream is one infinite sequence of records: epoch ``e`` visits every train record once,
in an order fixed by ``(seed, e)`` alone: the shard order is a permutation drawn from
``(seed, e)``, and records flow (in file order) through a shuffle buffer of ``shuffle_buffer``
slots seeded from ``(seed, e)``; epochs are concatenated. The shuffle is computed on record
*indices* from the shard sizes (``index.json``), so the order never depends on I/O; bytes are read
in the same streaming order and only the records a process needs are kept and decoded -- shards
holding none of them are not even opened, which makes resuming cheap.

Global batching: with ``B`` = ``batch_size`` (per rank), ``W`` = world size and ``P0`` = the
start position, global batch ``g`` holds stream samples ``[P0 + g*B*W, P0 + (g+1)*B*W)``; rank
``r`` takes slice ``[r*B, (r+1)*B)`` of it. With ``num_workers = n > 0``, worker ``w`` builds the
rank's local batches ``j`` with ``j % n == w``; the DataLoader's round-robin then yields them in
the same order as ``num_workers=0``.

Position bookkeeping belongs to the training module: it counts ``batch_samples_global`` per
optimizer step (or micro-batch), stores the total through :meth:`SongDataModule.set_position` (so
``state_dict()`` carries it into the checkpoint), and on resume calls ``set_position`` (or
Lightning calls ``load_state_dict``) *before* ``train_dataloader()`` is created. The next loader
then starts exactly there: no repeats, no skips.

Cropping (``max_frames``): longer songs are cropped to a window of ``max_frames`` frames whose
start is random but deterministic -- drawn from ``(seed, stream position)`` -- with
``crop="random"`` (default), or to the first ``max_frames`` with ``crop="start"``. Validation
always crops from the start. The lyric is not cropped along.

Bad records: without ``skip_bad`` a bad record raises :class:`ShardError`. With it, the record is
logged, counted (``batch["n_bad"]``; :attr:`SongDataModule.bad_records` in the main process) and
left out of its batch, which is then smaller; positions still count it, so resuming stays exact.

Lyric length (``lyric_fit``, the model's :class:`~levo_infer.model.LyricFit`): a record whose lyric
needs more tokens than the lyric conditioner holds is a bad record naming the shard, the key and
both lengths (the released conditioner would cut it silently), unless the fit truncates
(``data.truncate_lyrics=true``): then the record is kept, cut by the model, with one warning per
record and process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from levo_infer.model import LyricFit, LyricTooLong
from levo_train.data.batch import collate_songs
from levo_train.data.pairs import REF_LOGPS_NAME, Pair, RefEntry, collate_pairs, decode_pair, read_ref_logps
from levo_train.data.shards import ShardError, Song, decode_song, iter_raw, resolve_shards, shard_sizes

__all__ = ["PairDataModule", "SongDataModule", "epoch_order"]

log = logging.getLogger(__name__)


def epoch_order(
    sizes: Sequence[int], seed: int, epoch: int, shuffle_buffer: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(shard_order, record_ids)`` of one train epoch.

    ``record_ids`` are global record indices (shard offsets + index within the shard) in stream
    order: shards in ``shard_order`` stream their records in file order through a shuffle buffer
    (fill ``shuffle_buffer`` slots; each new record replaces a uniformly chosen slot, which is
    emitted; at the end the buffer drains in random order). Depends only on (sizes, seed, epoch).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    shard_order = np.random.default_rng([seed, epoch, 0]).permutation(len(sizes))
    incoming = np.concatenate(
        [np.arange(offsets[s], offsets[s + 1]) for s in shard_order] or [np.zeros(0, np.int64)]
    )
    n = len(incoming)
    if shuffle_buffer <= 1 or n <= 1:
        return shard_order, incoming
    u = np.random.default_rng([seed, epoch, 1]).random(n)
    out = np.empty(n, dtype=np.int64)
    fill = min(shuffle_buffer, n)
    buf = incoming[:fill].tolist()
    k = 0
    for x in incoming[fill:].tolist():
        j = int(u[k] * len(buf))
        out[k] = buf[j]
        buf[j] = x
        k += 1
    while buf:
        j = int(u[k] * len(buf))
        out[k] = buf[j]
        buf[j] = buf[-1]
        buf.pop()
        k += 1
    return shard_order, out


class _SongStream(IterableDataset):
    """Yields whole collated batches (use with ``DataLoader(batch_size=None)``)."""

    def __init__(
        self,
        *,
        shards: list[str],
        sizes: list[int],
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        start: int,
        seed: int,
        code_size: int,
        shuffle_buffer: int,
        max_frames: int | None,
        crop: str,
        skip_bad: bool,
        owner: SongDataModule | None = None,
        lyric_fit: LyricFit | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.sizes = shards, [int(s) for s in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.train = train
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start, self.seed, self.code_size = start, seed, code_size
        self.shuffle_buffer, self.max_frames = shuffle_buffer, max_frames
        self.crop, self.skip_bad = crop, skip_bad
        self.owner = owner
        self.n_bad = 0
        self.lyric_fit = lyric_fit
        self._cut_warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ reading
    def _read_needed(
        self, shard_order: np.ndarray, need: np.ndarray, shards_needed: set[int]
    ) -> Iterator[tuple[int, dict]]:
        """(record id, raw sample) for needed records, in streaming (shard-order, file-order) order."""
        for s in shard_order.tolist():
            if s not in shards_needed:
                continue
            base, size, path = int(self.offsets[s]), self.sizes[s], self.shards[s]
            i = 0
            for raw in iter_raw(path, keep_corrupt=self.skip_bad):
                if i >= size:
                    raise ShardError(
                        f"holds more records than the {size} its index/scan reported", shard=path
                    )
                if need[base + i]:
                    yield base + i, raw
                i += 1
            if i != size:
                raise ShardError(f"holds {i} records, but its index/scan reported {size}", shard=path)

    def _epoch_samples(
        self, order: tuple[np.ndarray, np.ndarray], positions: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        """Raw samples at the given (sorted) positions within one epoch's order."""
        shard_order, ids = order
        if len(positions) == 0:
            return
        wanted = ids[positions]
        need = np.zeros(self.n, dtype=bool)
        need[wanted] = True
        shards_needed = set((np.searchsorted(self.offsets, wanted, side="right") - 1).tolist())
        reader = self._read_needed(shard_order, need, shards_needed)
        store: dict[int, dict] = {}
        for pos, rid in zip(positions.tolist(), wanted.tolist()):
            while rid not in store:
                try:
                    got, raw = next(reader)
                except StopIteration:
                    raise ShardError(f"record {rid} of the stream was never read (shards changed?)") from None
                store[got] = raw
            yield pos, store.pop(rid)

    # ------------------------------------------------------------------ decoding
    def _skip_bad(self, err: ShardError) -> None:
        """Count and log a bad record (``skip_bad``), or re-raise it."""
        if not self.skip_bad:
            raise err
        self.n_bad += 1
        if self.owner is not None:
            self.owner.bad_records += 1
        log.warning("skipping bad record: %s", err)

    def _lyric_fits(self, record: Any) -> bool:
        """Check a decoded record's lyric against :attr:`lyric_fit` (a bad record when it does not
        fit; a warning, once per record, when the fit truncates)."""
        if self.lyric_fit is None:
            return True
        try:
            cut = self.lyric_fit.check(record.lyric, None, "data.truncate_lyrics=true")
        except LyricTooLong as e:
            self._skip_bad(ShardError(str(e), shard=record.shard or None, key=record.key))
            return False
        if cut and (record.shard, record.key) not in self._cut_warned:
            self._cut_warned.add((record.shard, record.key))
            log.warning("%s", ShardError(cut, shard=record.shard or None, key=record.key))
        return True

    def _decode(self, raw: dict, position: int) -> Song | None:
        try:
            song = decode_song(raw, code_size=self.code_size)
        except ShardError as e:
            self._skip_bad(e)
            return None
        if not self._lyric_fits(song):
            return None
        mf = self.max_frames
        if mf is not None and song.tokens.shape[1] > mf:
            off = 0
            if self.train and self.crop == "random":
                off = int(
                    np.random.default_rng([self.seed, position, 7]).integers(0, song.tokens.shape[1] - mf + 1)
                )
            song.tokens = song.tokens[:, off : off + mf]
        return song

    def _batch(self, raws: list[tuple[int, dict]]) -> dict[str, Any] | None:
        bad_before = self.n_bad
        songs = [s for s in (self._decode(raw, pos) for pos, raw in raws) if s is not None]
        n_bad = self.n_bad - bad_before
        if not songs:
            raise ShardError(
                f"all {len(raws)} records of a batch (stream positions {raws[0][0]}..{raws[-1][0]}) are bad"
            )
        batch = collate_songs(songs, self.code_size)
        batch["n_bad"] = n_bad
        return batch

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = (
            self._train_samples(worker, n_workers) if self.train else self._val_samples(worker, n_workers)
        )
        current, group = None, []
        for batch_idx, pos, raw in samples:
            if batch_idx != current and group:
                yield self._batch(group)
                group = []
            current = batch_idx
            group.append((pos, raw))
        if group:
            yield self._batch(group)

    def _train_samples(self, worker: int, n_workers: int) -> Iterator[tuple[int, int, dict]]:
        if self.n == 0:
            raise ValueError("the train set has no records")
        B, BW, P0, N = self.batch_size, self.batch_size * self.world_size, self.start, self.n
        epoch = P0 // N
        while True:
            lo = max(P0, epoch * N)
            q = np.arange(lo, (epoch + 1) * N, dtype=np.int64) - P0
            keep = ((q % BW) // B == self.rank) & ((q // BW) % n_workers == worker)
            q = q[keep]
            order = epoch_order(self.sizes, self.seed, epoch, self.shuffle_buffer)
            for pos, raw in self._epoch_samples(order, q + P0 - epoch * N):
                yield (pos + epoch * N - P0) // BW, pos + epoch * N, raw
            epoch += 1

    def _val_samples(self, worker: int, n_workers: int) -> Iterator[tuple[int, int, dict]]:
        ids = np.arange(self.rank, self.n, self.world_size, dtype=np.int64)
        local_batch = np.arange(len(ids)) // self.batch_size
        keep = local_batch % n_workers == worker
        order = (np.arange(len(self.sizes)), np.arange(self.n, dtype=np.int64))
        batch_of = dict(zip(ids[keep].tolist(), local_batch[keep].tolist()))
        for pos, raw in self._epoch_samples(order, ids[keep]):
            yield batch_of[pos], pos, raw


class SongDataModule(L.LightningDataModule):
    """Song shards -> deterministic, exactly resumable batches (see the module docstring).

    Args:
        train: shard dir(s), tar paths or brace/glob patterns of the train set.
        val: the same for the validation set, or None.
        batch_size: songs per rank per batch (``val_batch_size`` defaults to it).
        num_workers: DataLoader worker processes (``fork`` context, not persistent).
        seed: seed of the stream order (and crop windows).
        code_size: codes are in [0, code_size); padding uses ``code_size + 1``.
        max_frames: crop longer songs (see ``crop``); None keeps full songs.
        crop: ``"random"`` (deterministic per seed and position) or ``"start"``.
        shuffle_buffer: slots of the record shuffle buffer (<= 1: no record shuffle).
        skip_bad: log, count and drop bad records instead of raising.
        lyric_fit: the model's lyric-length check (:meth:`levo_infer.model.LeLM.lyric_fit`); None: no check.
        rank, world_size: override the trainer's (for tests and custom launchers).
    """

    def __init__(
        self,
        train: str | Sequence[str],
        val: str | Sequence[str] | None = None,
        *,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        code_size: int = 16384,
        max_frames: int | None = None,
        crop: str = "random",
        shuffle_buffer: int = 1000,
        skip_bad: bool = False,
        val_batch_size: int | None = None,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        lyric_fit: LyricFit | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if crop not in ("random", "start"):
            raise ValueError(f"crop must be 'random' or 'start', got {crop!r}")
        if max_frames is not None and max_frames < 1:
            raise ValueError("max_frames must be >= 1 or None")
        self.train_spec = train
        self.val_spec = val
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = int(seed)
        self.code_size = code_size
        self.max_frames = max_frames
        self.crop = crop
        self.shuffle_buffer = shuffle_buffer
        self.skip_bad = skip_bad
        self.pin_memory = pin_memory
        self.lyric_fit = lyric_fit
        self._rank, self._world_size = rank, world_size
        self._position = 0
        self.bad_records = 0  #: bad records skipped in this process (workers count their own)
        self._train: tuple[list[str], list[int]] | None = None
        self._val: tuple[list[str], list[int]] | None = None

    # ------------------------------------------------------------------ sizes
    def setup(self, stage: str | None = None) -> None:
        """Resolve shard lists and record counts (index.json, else a header scan)."""
        self._train_shards()
        if self.val_spec is not None:
            self._val_shards()

    def _train_shards(self) -> tuple[list[str], list[int]]:
        if self._train is None:
            shards = resolve_shards(self.train_spec)
            self._train = (shards, shard_sizes(shards))
        return self._train

    def _val_shards(self) -> tuple[list[str], list[int]]:
        if self._val is None:
            shards = resolve_shards(self.val_spec)
            self._val = (shards, shard_sizes(shards))
        return self._val

    @property
    def samples_per_epoch(self) -> int:
        """Number of train records (one epoch of the stream)."""
        return int(sum(self._train_shards()[1]))

    @property
    def val_samples(self) -> int:
        return int(sum(self._val_shards()[1])) if self.val_spec is not None else 0

    # ------------------------------------------------------------------ ranks & position
    def rank_world(self) -> tuple[int, int]:
        """(rank, world size): explicit args, else the attached trainer's, else (0, 1)."""
        trainer = getattr(self, "trainer", None)
        rank = self._rank if self._rank is not None else (trainer.global_rank if trainer is not None else 0)
        world = (
            self._world_size
            if self._world_size is not None
            else (trainer.world_size if trainer is not None else 1)
        )
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        return int(rank), int(world)

    @property
    def batch_samples_global(self) -> int:
        """Stream samples consumed by one global batch: ``batch_size * world_size``. The training
        module adds this per consumed batch to keep the position."""
        return self.batch_size * self.rank_world()[1]

    @property
    def position(self) -> int:
        """Stream samples consumed globally; the next ``train_dataloader()`` starts here."""
        return self._position

    def set_position(self, samples: int) -> None:
        """Make the next ``train_dataloader()`` start at stream sample ``samples`` (global count).
        Call it on resume before the loader is created; also keep it current (e.g. before a
        checkpoint is saved) so ``state_dict()`` holds the true position. Live loaders are unaffected."""
        if samples < 0:
            raise ValueError("position must be >= 0")
        self._position = int(samples)

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self._position,
            "seed": self.seed,
            "samples_per_epoch": self.samples_per_epoch,
            "batch_samples_global": self.batch_samples_global,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; a different seed raises (the stream would not continue)."""
        if int(state_dict.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"data seed mismatch: checkpoint has seed {state_dict['seed']}, this datamodule {self.seed}; "
                "resuming would not continue the same stream"
            )
        spe = state_dict.get("samples_per_epoch")
        if spe is not None and int(spe) != self.samples_per_epoch:
            log.warning(
                "train set size changed (%s -> %s records): the resumed stream order differs",
                spe,
                self.samples_per_epoch,
            )
        self.set_position(int(state_dict["position"]))

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds: IterableDataset) -> DataLoader:
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw = {"multiprocessing_context": "fork", "persistent_workers": False}
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kw)

    #: the IterableDataset class that decodes records (pairs override it)
    stream_cls: type = _SongStream

    def stream_kwargs(self, train: bool) -> dict[str, Any]:
        """Extra keyword arguments for :attr:`stream_cls` (none for songs)."""
        return {}

    def _stream(self, spec_shards: tuple[list[str], list[int]], *, train: bool, batch_size: int,
                start: int) -> IterableDataset:
        shards, sizes = spec_shards
        rank, world = self.rank_world()
        return self.stream_cls(
            shards=shards,
            sizes=sizes,
            train=train,
            batch_size=batch_size,
            rank=rank,
            world_size=world,
            start=start,
            seed=self.seed,
            code_size=self.code_size,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            max_frames=self.max_frames,
            crop=self.crop if train else "start",
            skip_bad=self.skip_bad,
            owner=self,
            lyric_fit=self.lyric_fit,
            **self.stream_kwargs(train=train),
        )

    def train_dataloader(self) -> DataLoader:
        """Infinite loader of collated batches starting at :attr:`position`."""
        return self._loader(self._stream(self._train_shards(), train=True, batch_size=self.batch_size,
                                         start=self._position))

    def val_dataloader(self) -> DataLoader | list:
        """Finite, ordered loader: rank r gets records r, r+W, ... in batches of ``val_batch_size``.
        Ranks may get one batch more or less than others when the count does not divide."""
        if self.val_spec is None:
            return []
        return self._loader(self._stream(self._val_shards(), train=False, batch_size=self.val_batch_size, start=0))


class _PairStream(_SongStream):
    """The song stream's exact-resume machinery, decoding pair records."""

    def __init__(self, *, ref: dict[str, RefEntry] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.ref = ref

    def _decode(self, raw: dict, position: int) -> Pair | None:  # type: ignore[override]
        try:
            pair = decode_pair(raw, code_size=self.code_size)
        except ShardError as e:
            self._skip_bad(e)
            return None
        return pair if self._lyric_fits(pair) else None

    def _batch(self, raws: list[tuple[int, dict]]) -> dict[str, Any]:
        bad_before = self.n_bad
        pairs = [p for p in (self._decode(raw, pos) for pos, raw in raws) if p is not None]
        if not pairs:
            raise ShardError(f"all {len(raws)} records of a batch are bad")
        batch = collate_pairs(pairs, self.code_size, self.ref)
        batch["n_bad"] = self.n_bad - bad_before
        return batch


class PairDataModule(SongDataModule):
    """Deterministic, exactly resumable batches of preference pairs (see :class:`SongDataModule`).

    ``use_ref_logps``: attach the precomputed reference log-probs found beside the shards
    (required; an error says how to make them when absent) and check they were computed by
    ``ref_fingerprint`` when given.
    """

    stream_cls = _PairStream

    def __init__(self, *a: Any, use_ref_logps: bool = False, ref_fingerprint: str | None = None,
                 ref_stream_weights: Sequence[float] | None = None, **kw: Any) -> None:
        if kw.get("max_frames") is not None:
            raise ValueError("max_frames cropping is not allowed for pairs (it would change their log-probs)")
        super().__init__(*a, **kw)
        self.use_ref_logps = use_ref_logps
        self.ref_fingerprint = ref_fingerprint
        self.ref_stream_weights = list(ref_stream_weights) if ref_stream_weights is not None else None

    def _ref_for(self, spec: Any) -> dict[str, RefEntry] | None:
        if not self.use_ref_logps or spec is None:
            return None
        dirs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
        out: dict[str, RefEntry] = {}
        for d in dirs:
            path = Path(d) / REF_LOGPS_NAME
            data = read_ref_logps(d)
            if data is None:
                raise FileNotFoundError(f"{path}: no precomputed reference log-probs; run "
                                        f"`levo-data ref-logps --pairs {d} --model INIT_EXPORT` or use dpo.reference=model")
            if self.ref_fingerprint is not None and data.get("model") != self.ref_fingerprint:
                raise ShardError(f"reference log-probs were computed with model {data.get('model')!r}, but model.init "
                                 f"is {self.ref_fingerprint!r} (another export): recompute them with `levo-data "
                                 f"ref-logps --pairs {d} --model INIT_EXPORT`", shard=str(path))
            have = [float(w) for w in data.get("stream_weights") or []]
            want = self.ref_stream_weights if self.ref_stream_weights is not None else [1.0] * len(have)
            if have and [float(w) for w in want] != have:
                raise ShardError(f"reference log-probs were computed with stream weights {have}, training uses "
                                 f"{want}: recompute them with `levo-data ref-logps --stream-weights ...`",
                                 shard=str(path))
            out.update(data["logps"])
        return out

    def stream_kwargs(self, train: bool) -> dict[str, Any]:
        return {"ref": self._ref_for(self.train_spec if train else self.val_spec)}
