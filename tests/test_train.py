"""End-to-end training through the real CLI and Lightning on CPU: SFT on the toy world, export,
exact resume, SIGKILL recovery, freezing, and user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY

from levo_infer import load_model
from levo_infer.checkpoint import atomic_torch_save
from levo_train.cli import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toycache"))


def run_cli(args: list[str]) -> int:
    return main(args)


def base(cache: str, run_dir: Path, *extra: str) -> list[str]:
    return ["recipe=sft", f"run_dir={run_dir}", f"data.toy.cache_dir={cache}", *TINY, *extra]


def test_sft_toy_export_reloads(tmp_path, cache):
    rd = tmp_path / "sft"
    assert run_cli(base(cache, rd, "trainer.max_steps=40", "trainer.val_check_interval=20",
                        "checkpoint.every_n_steps=20", "optim.lr=3e-3")) == 0
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["global_step"] == 40
    assert summary["val_loss_end"] < summary["val_loss_start"] - 0.3, summary
    exp = rd / "export"
    assert (exp / "model.pt").is_file() and (exp / "config.yaml").is_file()
    model = load_model(exp)  # every key checked
    ck = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    from levo_infer.model import LeLM

    ref = LeLM(model.cfg)
    ref.load_state_dict({k[len("model."):]: v for k, v in ck["state_dict"].items()})
    ref.eval()
    codes = torch.randint(0, 64, (2, 3, 9))
    lyr, sty = ["[verse] love . night", None], ["[Musicality-high], rock", None]
    torch.testing.assert_close(model.logits(codes, lyr, sty), ref.logits(codes, lyr, sty), rtol=0, atol=0)


def _weights(rd: Path) -> dict[str, torch.Tensor]:
    return torch.load(rd / "export" / "model.pt", weights_only=True)


def test_exact_resume_bit_identical(tmp_path, cache):
    # the LR schedule length is fixed (optim.total_steps) so that both runs follow the same schedule
    common = ["trainer.val_check_interval=6", "checkpoint.every_n_steps=6", "optim.total_steps=12"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(base(cache, a, "trainer.max_steps=12", *common)) == 0
    assert run_cli(base(cache, b, "trainer.max_steps=6", *common)) == 0
    # continue the same run folder to 12 steps
    assert run_cli(base(cache, b, "trainer.max_steps=12", "resume=true", *common)) == 0
    assert json.loads((b / "summary.json").read_text())["global_step"] == 12
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"


def test_sigkill_then_resume(tmp_path, cache):
    rd = tmp_path / "killed"
    args = base(cache, rd, "trainer.max_steps=400", "checkpoint.every_n_steps=5", "trainer.val_check_interval=1000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # 2 threads crawl on a shared 2-core box
    proc = subprocess.Popen([sys.executable, "-m", "levo_train.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = rd / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if last.is_file() and len(list((rd / "checkpoints").glob("step*.ckpt"))) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early with {proc.returncode}")
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ck = torch.load(last, weights_only=True, map_location="cpu")  # complete, loadable
    step = ck["global_step"]
    assert step >= 5 and step % 5 == 0
    assert run_cli(base(cache, rd, f"trainer.max_steps={step + 5}", "resume=true", "checkpoint.every_n_steps=5",
                        "trainer.val_check_interval=1000")) == 0
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["global_step"] == step + 5
    assert not list((rd / "checkpoints").glob(".*tmp*"))


def test_atomic_save_never_leaves_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"x": torch.ones(3)}, target)

    def boom(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"x": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_freeze_main_stack_trains_sub_stack_only(tmp_path, cache):
    rd0, rd = tmp_path / "init", tmp_path / "frozen"
    assert run_cli(base(cache, rd0, "trainer.max_steps=2", "trainer.val_check_interval=1000")) == 0
    assert run_cli(base(cache, rd, f"model.init={rd0 / 'export'}", "trainer.max_steps=4",
                        "trainer.val_check_interval=1000", "train.freeze=[transformer.]")) == 0
    w0, w1 = _weights(rd0), _weights(rd)
    main_keys = [k for k in w0 if k.startswith("audiolm.transformer.")]
    sub_keys = [k for k in w0 if k.startswith("audiolm.transformer2.model.layers")]
    assert all(torch.equal(w0[k], w1[k]) for k in main_keys)
    assert any(not torch.equal(w0[k], w1[k]) for k in sub_keys)


def test_unknown_recipe_lists_known(capsys):
    assert main(["recipe=nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "sft" in err and "pretrain" in err


def test_missing_init_path(tmp_path, capsys, cache):
    assert main(base(cache, tmp_path / "x", f"model.init={tmp_path / 'does-not-exist'}")) == 2
    err = capsys.readouterr().err
    assert "model.init=" in err and "does not exist" in err


def test_help_lists_recipes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "recipe=NAME" in out and "sft" in out and "trainer.max_steps" in out


def test_init_config_unknown_keys_warn_and_fail_under_strict(tmp_path, cache, capsys):
    """A misspelled key in model.init's config.yaml: a warning naming it (the run goes on), an
    error under model.strict=true."""
    rd0 = tmp_path / "init"
    assert run_cli(base(cache, rd0, "trainer.max_steps=1", "trainer.val_check_interval=1000")) == 0
    cfg = rd0 / "export" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("lm:\n", "lm:\n  rope_thetta: 5000.0\n", 1))
    (rd0 / "export" / "checksums.json").unlink()  # a hand-edited folder (an export's checksums refuse the edit)
    capsys.readouterr()
    args = base(cache, tmp_path / "a", f"model.init={rd0 / 'export'}", "trainer.max_steps=1",
                "trainer.val_check_interval=1000")
    with pytest.warns(UserWarning, match="rope_thetta"):
        assert run_cli(args) == 0
    assert run_cli([*base(cache, tmp_path / "b", f"model.init={rd0 / 'export'}", "trainer.max_steps=1"),
                    "model.strict=true"]) == 2
    err = capsys.readouterr().err
    assert "rope_thetta" in err and "config.yaml" in err
