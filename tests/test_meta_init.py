"""Meta-device init (levo_train.parallel.materialize, LeLMTrainModule.materialize_model) and the
streamed torch files exports are written with (levo_train.checkpointing.write_torch_stream).

The end-to-end comparisons (a whole ``strategy=fsdp2`` run with and without ``strategy.meta_init``:
the same losses and export, bit for bit) are in tests/test_fsdp2.py; ZeRO-3's ``zero.Init`` path in
tests/test_deepspeed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from levo_infer.checkpoint import save_released
from levo_infer.integrity import verify_torch_zip
from levo_infer.model import LeLM
from levo_train.checkpointing import write_torch_stream
from levo_train.parallel import materialize, weight_source

RUNNER = Path(__file__).resolve().parent / "meta_init_runner.py"


def _init_folders(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    m = LeLM(tiny_config())
    m.init_weights(std=0.2)
    good = save_released(m, tmp_path / "init")
    sd = torch.load(good / "model.pt", weights_only=True)
    del sd["audiolm.emb.0.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    torch.save(sd, broken / "model.pt")
    (broken / "config.yaml").write_text((good / "config.yaml").read_text())
    return good, broken


def test_meta_init_on_2_ranks_equals_building_the_whole_model_first(tmp_path):
    """Policy and frozen reference filled from one rank-0 read of model.init, and the seeded random
    init replayed on rank 0, give every rank exactly the shards the old path gave it; building on
    the meta device draws nothing from the global RNG; an init file that lacks a used key fails on
    every rank with the key named (no rank left waiting in a collective)."""
    good, broken = _init_folders(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RUNNER),
           "--out", str(tmp_path), "--init", str(good), "--broken", str(broken)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["dpo_policy_differs"] == [] and r["dpo_ref_differs"] == [] and r["random_differs"] == []
        assert r["sharded"] and r["ref_frozen"] and r["policy_trains"] > 0 and r["rng_untouched"]
        assert "'emb.0.weight'" in (r["broken"] or "") and "lack" in r["broken"]
    assert sum(r["local_elems"] for r in ranks) == ranks[0]["full_elems"]  # each rank holds only its shards


def test_materialize_in_one_process_fills_unused_keys_with_zeros_and_checks_shapes(tmp_path):
    torch.manual_seed(0)
    full = LeLM(tiny_config())
    full.init_weights(std=0.2)
    sd = {k: v for k, v in full.state_dict().items() if k != "out_norm.weight"}  # unused by the forward
    with torch.device("meta"):
        m, ref = LeLM(tiny_config()), LeLM(tiny_config())
    materialize(m, sd, device="cpu", copies=[ref], may_be_zero=lambda n: n == "out_norm.weight")
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k] if k in sd else torch.zeros_like(v)), k
        assert torch.equal(ref.state_dict()[k], v)
    with torch.device("meta"):
        m = LeLM(tiny_config())
    with pytest.raises(ValueError, match="lack 'out_norm.weight'"):
        materialize(m, sd, device="cpu")
    bad = dict(sd, **{"emb.0.weight": torch.zeros(3, 3)})
    with torch.device("meta"):
        m = LeLM(tiny_config())
    with pytest.raises(ValueError, match=r"emb.0.weight has shape \(3, 3\)"):
        materialize(m, bad, device="cpu", may_be_zero=lambda n: True)
    # a released-format file as the source: names without `audiolm.`, read only when asked for
    src = weight_source(save_released(full, tmp_path / "f") / "model.pt")
    assert set(src) == set(full.state_dict()) and torch.equal(src["emb.0.weight"], full.emb[0].weight)


def test_streamed_torch_file_loads_as_torch_save_would(tmp_path):
    """Each tensor asked for only when its record is written; torch.load (weights_only, mmap) reads
    the file as one torch.save wrote: same keys in order, values, dtypes; records 64-byte aligned
    with their CRC-32s."""
    sd = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(7),
          "d": torch.randn(100, 33).half(), "e": torch.zeros(0), "f": torch.tensor(True)}
    asked: list[str] = []

    def get(k: str) -> torch.Tensor:
        asked.append(k)
        return sd[k]

    path = write_torch_stream(tmp_path / "model.pt", [(k, v.shape, v.dtype) for k, v in sd.items()], get)
    assert asked == list(sd)
    for mmap in (False, True):
        back = torch.load(path, weights_only=True, mmap=mmap)
        assert list(back) == list(sd)
        assert all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)
    verify_torch_zip(path)
    with zipfile.ZipFile(path) as z:
        data = [i for i in z.infolist() if "/data/" in i.filename]
        raw = path.read_bytes()
        for i in data:  # local header: 30 bytes + name + extra, then the data
            n, e = int.from_bytes(raw[i.header_offset + 26:i.header_offset + 28], "little"), \
                int.from_bytes(raw[i.header_offset + 28:i.header_offset + 30], "little")
            assert (i.header_offset + 30 + n + e) % 64 == 0
    with pytest.raises(ValueError, match="expected"):
        write_torch_stream(tmp_path / "x.pt", [("a", (2,), torch.float32)], lambda k: torch.zeros(3))
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.glob(".x.pt.tmp*"))
