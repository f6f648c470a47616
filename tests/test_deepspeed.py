"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU ranks (gloo) with our module and loss, and the ZeRO
checkpoint helpers of :mod:`levo_train.zero`.

Lightning's DeepSpeed strategy runs on CUDA only, so ``tests/deepspeed_runner.py`` drives
``deepspeed.initialize`` itself (as Lightning does on GPU: same wrapper attribute, same checkpoint
tag and client state), launched by torchrun on 2 ranks. Each run trains, saves, consolidates to
fp32, exports, and is compared with a single-process run of the same loss and AdamW on the whole
global batch: ZeRO partitions the fp32 master weights, gradients and Adam state but every update
is elementwise, so the weights agree up to float reduction order. Measured (10 steps, lr 1e-2,
tiny model, weights ~0.1): at most 8.2e-6 apart (ZeRO-2) and 5.2e-6 (ZeRO-3), losses 4e-6.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from levo_train.zero import (
    deepspeed_config,
    is_zero_checkpoint,
    policy_name,
    read_zero_meta,
    zero_fp32_state_dict,
)

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
RUNNER = Path(__file__).resolve().parent / "deepspeed_runner.py"
STEPS, MICRO, WORLD = 10, 2, 2
#: absolute, on weights of magnitude ~0.1 after 10 AdamW steps (measured: 8.2e-6 ZeRO-2, 5.2e-6 ZeRO-3)
WEIGHT_TOL = 1e-4
LOSS_TOL = 1e-4  # per step (measured: at most 4e-6)


def _run_ranks(out: Path, stage: int, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(RUNNER),
           "--stage", str(stage), "--out", str(out), "--steps", str(STEPS), "--micro-batch", str(MICRO), *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads((out / "result.json").read_text())


@needs_deepspeed
@pytest.mark.parametrize("stage, extra", [
    (2, ["--frozen-ref"]),  # + a DPO-style frozen reference copy the consolidation must leave out
    (3, ["--activation-checkpointing"]),  # + wrapped layers: `_checkpoint_wrapped_module.` in the raw names
])
def test_zero_run_trains_saves_consolidates_and_matches_one_process(tmp_path, stage, extra):
    from deepspeed_runner import build_module, parse_args, reference_run

    from levo_infer import load_model
    from levo_infer.checkpoint import load_weights
    from levo_infer.model import LeLM

    r = _run_ranks(tmp_path, stage, *extra)
    losses = r["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.15, losses  # measured 2.83 -> 2.54

    # the checkpoint: Lightning's layout, every rank's files, our metadata as client state
    ckpt = Path(r["ckpt"])
    assert is_zero_checkpoint(ckpt) and (ckpt / "latest").read_text().strip() == "checkpoint"
    meta = read_zero_meta(ckpt)
    assert meta["deepspeed"]["stage"] == stage and meta["deepspeed"]["world_size"] == WORLD
    assert meta["global_step"] == STEPS and meta["levo"]["samples_seen"] == STEPS * WORLD * MICRO
    cfg = tiny_config()
    assert meta["levo"]["model_config"] == cfg.to_dict()

    # consolidated: exactly the LeLM state dict
    sd = torch.load(tmp_path / "consolidated.pt", weights_only=True)
    want = LeLM(cfg).state_dict()
    assert sorted(sd) == sorted(want)
    assert all(sd[k].shape == want[k].shape and sd[k].dtype == torch.float32 for k in want)

    # the export loads with levo_infer and gives the consolidated model's logits
    from_sd = LeLM(cfg)
    from_sd.load_state_dict(sd)
    exported = load_weights(LeLM(cfg), Path(r["export"]) / "model.pt")
    released = load_model(r["export"])
    codes = torch.randint(0, 16, (2, 3, 8), generator=torch.Generator().manual_seed(1))
    args = (codes, ["la da", "love night"], ["rock", None])
    want_logits = from_sd.eval().logits(*args)
    assert torch.equal(exported.eval().logits(*args), want_logits)
    assert torch.equal(released.logits(*args), want_logits)
    # `levo-train export` consolidates the same ZeRO folder (as it does FSDP2 and one-file checkpoints)
    from levo_train.cli import main

    assert main(["export", f"ckpt={ckpt}", f"out={tmp_path / 'cli_export'}"]) == 0
    cli_sd = torch.load(tmp_path / "cli_export" / "model.pt", weights_only=True)
    ref_sd_file = torch.load(Path(r["export"]) / "model.pt", weights_only=True)
    assert cli_sd.keys() == ref_sd_file.keys() and all(torch.equal(cli_sd[k], ref_sd_file[k]) for k in cli_sd)

    # the same training in one process on the whole global batch
    ref_args = parse_args(["--out", str(tmp_path), "--steps", str(STEPS), "--micro-batch", str(MICRO),
                           "--world", str(WORLD)])
    init = build_module(ref_args).model.state_dict()
    ref_losses, ref_sd = reference_run(ref_args)
    dw = max((sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd)
    dl = max(abs(a - b) for a, b in zip(losses, ref_losses))
    print(f"ZeRO-{stage} vs one process: max |weight diff| {dw:.2e}, max |loss diff| {dl:.2e}")
    assert dw < WEIGHT_TOL and dl < LOSS_TOL
    assert max((sd[k] - init[k]).abs().max().item() for k in sd) > 100 * WEIGHT_TOL  # they did train

    # what each rank holds: the fp32 master weights, gradients and Adam moments are halves;
    # parameters are halves under ZeRO-3 only
    n = r["n_params"]
    for rk in r["ranks"]:
        assert rk["policy_param_bytes"] == (4 * n if stage == 2 else pytest.approx(2 * n, rel=0.02)), rk
        assert rk["master_bytes"] < 0.55 * 4 * n and rk["grad_bytes"] < 0.55 * 4 * n, rk
        assert rk["optim_state_bytes"] == pytest.approx(2 * rk["master_bytes"], abs=64), rk

    # an incomplete copy (a rank's optimizer states missing) is refused, naming the rank
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    next((bad / "checkpoint").glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")).unlink()
    for fn in (zero_fp32_state_dict, read_zero_meta):
        with pytest.raises(ValueError, match=r"incomplete ZeRO-\d checkpoint of 2 ranks.*rank\(s\) \[1\]"):
            fn(bad)
    # a folder whose completion marker was never written (a rank died mid-save) is not exported
    unmarked = tmp_path / "unmarked"
    shutil.copytree(ckpt, unmarked)
    (unmarked / "levo_complete.json").unlink()
    from levo_train.export import ExportError, export_checkpoint

    with pytest.raises(ExportError, match="incomplete sharded checkpoint"):
        export_checkpoint(unmarked, tmp_path / "never")

    # every rank's model and optimizer states, `latest` and the marker are checked before resume or
    # export: a truncation or a flipped byte is refused naming the file (issue #18)
    from corruption_kit import sweep

    from levo_train.export import policy_state_dict
    from levo_train.resume import read_checkpoint_state

    def read(p: Path):
        rp = read_checkpoint_state(p)
        sd, levo = policy_state_dict(p)
        return {"step": rp.step, "levo": levo, "weights": sd}

    states = sorted(str(f.relative_to(ckpt)) for f in ckpt.rglob("*_states.pt"))
    assert len(states) == (3 if stage == 2 else 4)  # model states (one, or one per rank) + each rank's optimizer
    c = sweep(ckpt, [*states, "latest", "levo_complete.json"], read, work=tmp_path / "sweep", seed=12 + stage)
    assert c["refused"] >= len(states) * 20


def test_not_a_zero_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        zero_fp32_state_dict(tmp_path / "nope")
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not a DeepSpeed ZeRO checkpoint \(no `latest` file"):
        zero_fp32_state_dict(tmp_path)
    assert not is_zero_checkpoint(tmp_path) and not is_zero_checkpoint(tmp_path / "junk.txt")
    (tmp_path / "latest").write_text("global_step3")
    with pytest.raises(ValueError, match="incomplete.*tag folder 'global_step3' is missing"):
        read_zero_meta(tmp_path)
    (tmp_path / "global_step3").mkdir()
    with pytest.raises(ValueError, match="no mp_rank_00_model_states.pt"):
        zero_fp32_state_dict(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "global_step3" / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="not a DeepSpeed model-states file"):
        zero_fp32_state_dict(tmp_path)


def test_policy_names_are_plain_lelm_names():
    assert policy_name("_forward_module.model.transformer.model.layers.0._checkpoint_wrapped_module."
                       "self_attn.q_proj.weight") == "transformer.model.layers.0.self_attn.q_proj.weight"
    assert policy_name("module.model.emb.0.weight") == "emb.0.weight"
    assert policy_name("model.transformer.model.norm.weight") == "transformer.model.norm.weight"  # inner `model.` stays
    assert policy_name("_forward_module.ref.emb.0.weight") is None  # a DPO reference copy


def test_deepspeed_config():
    c3 = deepspeed_config(3, micro_batch=4, grad_accum=2, bf16=True, persistence_threshold=0)
    z = c3["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is False
    assert z["stage3_param_persistence_threshold"] == 0
    assert c3["train_micro_batch_size_per_gpu"] == 4 and c3["gradient_accumulation_steps"] == 2
    assert c3["bf16"]["enabled"] and c3["gradient_clipping"] == 1.0
    c2 = deepspeed_config(2, micro_batch=1, offload_optimizer=True)
    assert c2["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and "offload_param" not in c2["zero_optimization"]
    with pytest.raises(ValueError, match="offload_params needs ZeRO stage 3"):
        deepspeed_config(2, micro_batch=1, offload_params=True)
    with pytest.raises(ValueError, match="stage must be"):
        deepspeed_config(4, micro_batch=1)


@needs_deepspeed
def test_lightning_deepspeed_config_lets_our_adamw_run_under_optimizer_offload():
    """strategy.offload_optimizer=true: Lightning's default DeepSpeed config lacked
    `zero_force_ds_cpu_optimizer: false`, so DeepSpeed refused our torch AdamW at start-up (ZeRO-2
    and ZeRO-3); the strategy levo-train builds now carries it (and only with optimizer offload)."""
    from omegaconf import OmegaConf

    from levo_train.strategies import build_strategy

    for stage in (2, 3):
        scfg = OmegaConf.create({"name": f"deepspeed_zero{stage}", "stage": stage, "offload_optimizer": True,
                                 "offload_parameters": stage == 3})
        s = build_strategy(scfg, "auto", "gpu")  # what build_trainer passes on a GPU machine
        z = s.config["zero_optimization"]
        assert s.config["zero_force_ds_cpu_optimizer"] is False and z["offload_optimizer"]["device"] == "cpu"
        assert ("offload_param" in z) == (stage == 3)
        plain = build_strategy(OmegaConf.create({"name": f"deepspeed_zero{stage}", "stage": stage}), "auto", "gpu")
        assert "zero_force_ds_cpu_optimizer" not in plain.config and "offload_optimizer" not in plain.config.get(
            "zero_optimization", {})


@needs_deepspeed
def test_zero3_meta_init_with_optimizer_offload_through_lightnings_config(tmp_path):
    """strategy=deepspeed_zero3 as configure_model runs it: the policy and a frozen reference built on
    the meta device, rebuilt inside deepspeed.zero.Init (each parameter partitioned as it is created)
    and filled from rank 0's read of the init file; trained with AdamW offloaded to the CPU under the
    config Lightning passes (the start-up refusal fixed above). Same weights as one process training
    from the same init (measured: bit-identical to ZeRO-3 without meta init)."""
    from deepspeed_runner import build_module, parse_args, reference_run

    from levo_infer.checkpoint import save_released

    ref_args = parse_args(["--out", str(tmp_path), "--steps", str(STEPS), "--micro-batch", str(MICRO),
                           "--world", str(WORLD)])
    save_released(build_module(ref_args).model, tmp_path / "init")
    r = _run_ranks(tmp_path, 3, "--meta-init", str(tmp_path / "init" / "model.pt"), "--frozen-ref",
                   "--lightning-config", "--offload-optimizer")
    m = r["meta_init"]
    assert m["partitioned_at_build"] and m["local_elems"] * WORLD == pytest.approx(m["full_elems"], rel=0.02)
    assert r["ds_config"]["zero_force_ds_cpu_optimizer"] is False
    assert r["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    sd = torch.load(tmp_path / "consolidated.pt", weights_only=True)
    ref_losses, ref_sd = reference_run(ref_args)
    assert max((sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd) < WEIGHT_TOL
    assert max(abs(a - b) for a, b in zip(r["losses"], ref_losses)) < LOSS_TOL
