"""What a resume may trust: checkpoints loaded without running code, content fingerprints,
reference log-probs tied to their pairs, the LR schedule carried by the checkpoint, and a resume
that finds the newest loadable checkpoint (or refuses) instead of silently restarting at step 0."""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY

from levo_infer import load_model
from levo_infer.checkpoint import save_released
from levo_train.cli import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toycache"))


def sft(cache: str, run_dir: Path, *extra: str) -> list[str]:
    return ["recipe=sft", f"run_dir={run_dir}", f"data.toy.cache_dir={cache}", *TINY,
            "trainer.val_check_interval=1000", *extra]


def weights(rd: Path) -> dict[str, torch.Tensor]:
    return torch.load(rd / "export" / "model.pt", weights_only=True)


def same_weights(a: Path, b: Path) -> list[str]:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


@pytest.fixture(scope="module")
def short_run(cache, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at 2 and 4: the checkpoint a resume test starts from."""
    rd = tmp_path_factory.mktemp("short") / "run"
    assert main(sft(cache, rd, "trainer.max_steps=4", "checkpoint.every_n_steps=2")) == 0
    return rd


# ----------------------------------------------------------------------------- 1. no code on resume
class _Payload:
    """Unpickling this touches a file: what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_resume_never_unpickles_code(tmp_path, cache, short_run, capsys):
    marker = tmp_path / "code-ran"
    ck = torch.load(short_run / "checkpoints" / "last.ckpt", weights_only=True)
    ck["levo"]["evil"] = _Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ck, evil)
    assert main(sft(cache, tmp_path / "r", "trainer.max_steps=6", f"ckpt_path={evil}")) == 2
    assert not marker.exists(), "loading the checkpoint ran code"
    err = capsys.readouterr().err
    assert str(evil) in err and "weights_only" in err


@pytest.mark.parametrize("levo", [[1, 2], "levo", None])
def test_resume_checkpoint_with_bad_levo_section(tmp_path, cache, short_run, capsys, levo):
    ck = torch.load(short_run / "checkpoints" / "last.ckpt", weights_only=True)
    if levo is None:
        del ck["levo"]
    else:
        ck["levo"] = levo
    bad = tmp_path / "bad.ckpt"
    torch.save(ck, bad)
    assert main(sft(cache, tmp_path / "r", "trainer.max_steps=6", f"ckpt_path={bad}")) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "levo" in err and "Traceback" not in err


def test_resume_checkpoint_that_is_not_a_dict(tmp_path, cache, capsys):
    bad = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], bad)
    assert main(sft(cache, tmp_path / "r", "trainer.max_steps=2", f"ckpt_path={bad}")) == 2
    assert "not a levo-train checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2. fingerprints
def _export(folder: Path, seed: int = 0, **kw) -> Path:
    from conftest import tiny_config

    from levo_infer.model import LeLM

    torch.manual_seed(seed)
    # > 2 MiB of fp32 weights: the old fingerprint read only the first and the last MiB
    m = LeLM(tiny_config(dim=128, num_heads=4, intermediate_size=512, **kw))
    m.init_weights(std=0.2)
    save_released(m, folder)
    return folder


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_fingerprint_sees_every_byte(tmp_path, fmt):
    """Two exports of one size that differ only past the first MiB (the old fingerprint hashed the
    first MiB, and the last one only above 2 MiB; a bf16 .pt of 1.7 MiB, or the middle of a
    .safetensors) must not share a fingerprint."""
    from levo_train.fingerprint import model_fingerprint

    st = fmt == "safetensors"
    dtype = None if st else torch.bfloat16
    model = load_model(_export(tmp_path / "init"), dtype=torch.float32)
    a, b = tmp_path / "a", tmp_path / "b"
    save_released(model, a, safetensors=st, dtype=dtype)
    with torch.no_grad():  # past the first MiB of either file, before the last MiB of the .safetensors
        (model.transformer2 if dtype else model.transformer).model.layers[-1].mlp.down_proj.weight[0, 0] += 1.0
    save_released(model, b, safetensors=st, dtype=dtype)
    name = "model.safetensors" if st else "model.pt"
    assert (a / name).stat().st_size == (b / name).stat().st_size
    assert model_fingerprint(a) != model_fingerprint(b)


def test_fingerprint_of_large_identical_heads(tmp_path):
    """Same first and last MiB, different middle: a real content hash tells them apart."""
    from levo_train.fingerprint import file_digest

    head, tail = b"h" * (1 << 20), b"t" * (1 << 20)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(head + b"x" * 4096 + tail)
    b.write_bytes(head + b"y" * 4096 + tail)
    assert file_digest(a) != file_digest(b)


def test_fingerprint_cached_beside_the_file_and_refreshed_on_change(tmp_path, monkeypatch):
    from levo_train import fingerprint as fpm

    exp = _export(tmp_path / "e")
    first = fpm.model_fingerprint(exp)
    sidecars = sorted(p.name for p in exp.iterdir() if p.name.startswith("."))
    assert ".model.pt.sha256" in sidecars, sidecars
    fpm.clear_memo()
    calls = []
    real = fpm._hash_file
    monkeypatch.setattr(fpm, "_hash_file", lambda p: calls.append(p) or real(p))
    assert fpm.model_fingerprint(exp) == first and calls == [], "re-hashed although the file did not change"
    # rewrite the weights (same size): the cached digest must not be served
    m = load_model(exp)
    with torch.no_grad():
        m.linears[0].weight[0, 0] += 1.0
    save_released(m, exp)
    assert fpm.model_fingerprint(exp) != first
    # a sidecar written for another state of the file is ignored, never served
    truth = fpm.model_fingerprint(exp)
    side = exp / ".model.pt.sha256"
    data = json.loads(side.read_text())
    data.update(size=data["size"] + 1, sha256="0" * 64)
    side.write_text(json.dumps(data))
    fpm.clear_memo()
    assert fpm.model_fingerprint(exp) == truth


def test_fingerprint_cache_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    """A folder where the digest cannot be written beside the file (read-only shared storage;
    here the sidecar name is taken by a folder, as root ignores file modes)."""
    from levo_train import fingerprint as fpm

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    exp = _export(tmp_path / "ro")
    (exp / ".model.pt.sha256").mkdir()
    fp = fpm.model_fingerprint(exp)
    assert list((tmp_path / "xdg" / "levo-train" / "digests").glob("*.json"))
    fpm.clear_memo()
    calls = []
    real = fpm._hash_file
    monkeypatch.setattr(fpm, "_hash_file", lambda p: calls.append(p) or real(p))
    assert fpm.model_fingerprint(exp) == fp
    assert calls == [], "re-hashed although the digests were cached"


# ----------------------------------------------------------------------------- 4. the LR schedule
def test_unpinned_resume_continues_its_own_schedule(tmp_path, cache):
    """A run stopped early (here: a smaller max_steps with the schedule of the full run) and
    resumed with the run's own command, no optim.total_steps on resume: bit-identical to one run."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["checkpoint.every_n_steps=6"]
    assert main(sft(cache, a, "trainer.max_steps=12", *common)) == 0
    assert main(sft(cache, b, "trainer.max_steps=6", "optim.total_steps=12", *common)) == 0
    assert main(sft(cache, b, "trainer.max_steps=12", "resume=true", *common)) == 0
    diff = same_weights(a, b)
    assert not diff, f"weights differ after resume: {diff[:5]}"


def test_resume_past_the_schedule_end_must_be_explicit(tmp_path, cache, capsys):
    rd = tmp_path / "r"
    assert main(sft(cache, rd, "trainer.max_steps=6", "checkpoint.every_n_steps=6")) == 0
    capsys.readouterr()
    assert main(sft(cache, rd, "trainer.max_steps=12", "resume=true")) == 2
    err = capsys.readouterr().err
    assert "optim.total_steps" in err and "6" in err and "12" in err
    # explicit: continue at the final LR (schedule kept) ...
    assert main(sft(cache, rd, "trainer.max_steps=9", "resume=true", "optim.total_steps=6")) == 0
    assert json.loads((rd / "summary.json").read_text())["global_step"] == 9
    # ... or stretch it: allowed, with a warning saying what happens to the LR
    assert main(sft(cache, rd, "trainer.max_steps=12", "resume=true", "optim.total_steps=12")) == 0
    assert json.loads((rd / "summary.json").read_text())["global_step"] == 12


def test_resume_refuses_a_changed_learning_rate(tmp_path, cache, short_run, capsys):
    rd = tmp_path / "r"
    shutil.copytree(short_run, rd)
    assert main(sft(cache, rd, "trainer.max_steps=6", "resume=true", "optim.lr=0.5", "optim.total_steps=6")) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err


# ----------------------------------------------------------------------------- 5. which checkpoint
def test_resume_without_last_ckpt_uses_newest_step_checkpoint(tmp_path, cache, short_run, capsys):
    rd = tmp_path / "r"
    shutil.copytree(short_run, rd)
    (rd / "checkpoints" / "last.ckpt").unlink()
    assert sorted(p.name for p in (rd / "checkpoints").glob("step*.ckpt")) == ["step0000002.ckpt", "step0000004.ckpt"]
    assert main(sft(cache, rd, "trainer.max_steps=6", "resume=true", "optim.total_steps=4")) == 0
    assert "step0000004.ckpt" in capsys.readouterr().err
    s = json.loads((rd / "summary.json").read_text())
    assert s["global_step"] == 6 and s["resumed_from"]["step"] == 4


def test_resume_skips_an_unloadable_newest_checkpoint(tmp_path, cache, short_run, capsys):
    rd = tmp_path / "r"
    shutil.copytree(short_run, rd)
    (rd / "checkpoints" / "last.ckpt").write_bytes(b"garbage, not a zip file")
    (rd / "checkpoints" / "step0000004.ckpt").write_bytes(b"")
    assert main(sft(cache, rd, "trainer.max_steps=4", "resume=true")) == 0
    err = capsys.readouterr().err
    assert "last.ckpt" in err and "cannot be loaded" in err and "step0000002.ckpt" in err
    assert json.loads((rd / "summary.json").read_text())["resumed_from"]["step"] == 2


def test_resume_refuses_when_no_checkpoint_loads(tmp_path, cache, short_run, capsys):
    rd = tmp_path / "r"
    shutil.copytree(short_run, rd)
    for p in (rd / "checkpoints").glob("*.ckpt"):
        p.write_bytes(b"broken")
    assert main(sft(cache, rd, "trainer.max_steps=6", "resume=true")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "loads" in err


def test_resume_prefers_a_newer_hpc_checkpoint(tmp_path, cache, short_run, capsys):
    rd = tmp_path / "r"
    shutil.copytree(short_run, rd)
    ck = torch.load(rd / "checkpoints" / "step0000002.ckpt", weights_only=True)
    torch.save(ck, rd / "hpc_ckpt_1.ckpt")  # older than last.ckpt (step 4)
    assert main(sft(cache, rd, "trainer.max_steps=4", "resume=true")) == 0
    assert json.loads((rd / "summary.json").read_text())["resumed_from"]["path"].endswith("last.ckpt")


def test_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path, cache, short_run, capsys):
    rd = tmp_path / "r"
    shutil.copytree(short_run, rd)
    assert main(sft(cache, rd, "trainer.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert "resume=true" in err and str(rd) in err
