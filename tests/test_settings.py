"""The typed settings of the training methods: each read and validated once, a bad value refused naming
its key (exit 2, before anything is built); semi-online DPO's scorer keys (reward.*) read into their own
class, apart from the reward recipe's settings; the usage error is a ValueError the CLI turns into 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from levo_train.cli import compose_config, main
from levo_train.methods import (
    METHODS,
    DPOSettings,
    RewardSettings,
    SDPOScorerSettings,
    SDPOSettings,
    get_method,
)
from levo_train.settings import UsageError


def test_usage_error_is_a_value_error_not_an_exit():
    e = UsageError("x.y=1: expected z")
    assert isinstance(e, ValueError) and not isinstance(e, SystemExit)
    assert e.msg == str(e) == "x.y=1: expected z"


def test_every_recipe_method_reads_its_settings():
    for recipe, cls in (("sft", "LMSettings"), ("dpo", "DPOSettings"), ("reward", "RewardSettings"),
                        ("sdpo", "SDPOSettings")):
        cfg = compose_config([f"recipe={recipe}", "reward.ckpt=RM" if recipe == "sdpo" else "seed=0"])
        assert type(get_method(str(cfg.method)).settings(cfg)).__name__ == cls
    assert set(METHODS) == {"lm", "dpo", "reward", "sdpo"}


def test_sdpo_scorer_keys_are_their_own_settings():
    """recipe=sdpo's reward.ckpt / reward.scorer / reward.key / reward.dimensions / reward.device (the
    README's keys) describe the scorer; recipe=reward's reward.* describe the model it trains."""
    cfg = compose_config(["recipe=sdpo", "reward.ckpt=RM/export", "reward.key=lyrics", "reward.device=cpu",
                          "reward.dimensions=[lyrics,mix]"])
    s = SDPOSettings.from_cfg(cfg)
    assert s.scorer == SDPOScorerSettings(setting="reward.ckpt", value="RM/export", spec="rm:RM/export",
                                          key="lyrics", dimensions=("lyrics", "mix"), device="cpu")
    assert s.dpo == DPOSettings(beta=0.5, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0,
                                reference="model")
    toy = SDPOSettings.from_cfg(compose_config(["recipe=sdpo", "reward.scorer=toy"])).scorer
    assert (toy.setting, toy.spec, toy.key, toy.dimensions, toy.device) == ("reward.scorer", "toy", None, None, None)
    r = RewardSettings.from_cfg(compose_config(["recipe=reward", "reward.dimensions=[lyrics]", "reward.layers=1"]))
    assert (r.dimensions, r.layers, r.pooling, r.rank_loss) == (("lyrics",), 1, "mean_logp", "bt")


@pytest.mark.parametrize("overrides,message", [
    (["recipe=dpo", "dpo.beta=abc"], "dpo.beta=abc: expected a number > 0"),
    (["recipe=dpo", "dpo.loss_type=nope"], "dpo: unknown DPO loss_type 'nope'"),
    (["recipe=dpo", "dpo.reference=other"], "dpo: reference must be 'model' or 'precomputed', got 'other'"),
    (["recipe=reward", "reward.pooling=max"], "reward.pooling='max': expected one of"),
    (["recipe=reward", "reward.rank_loss=x"], "reward.rank_loss='x': expected one of"),
    (["recipe=sdpo", "reward.scorer=toy", "sdpo.per_prompt=1"], "sdpo.per_prompt=1: expected >= 2"),
    (["recipe=sdpo", "reward.scorer=toy", "sdpo.sync_every=2.5"], "sdpo.sync_every=2.5: expected an integer"),
    (["recipe=sdpo", "reward.scorer=toy", "sdpo.oracle=always"], "sdpo.oracle=always: expected one of auto, none"),
    (["recipe=sdpo", "reward.scorer=toy", "sdpo.gen_dtype=fp8"], "sdpo.gen_dtype=fp8: expected one of auto, float32"),
    (["recipe=sdpo", "reward.scorer=toy", "dpo.reference=precomputed"], "sdpo: semi-online DPO needs dpo.reference"),
    (["recipe=sdpo", "reward.scorer=toy", "reward.ckpt=RM"], "give reward.ckpt=EXPORT (a reward model) or reward"),
    (["recipe=sdpo"], "recipe=sdpo needs a reward"),
])
def test_a_bad_setting_is_refused_naming_its_key(tmp_path, capsys, overrides, message):
    """Refused when the plan is resolved: before model.init is even read (here it does not exist)."""
    rd = tmp_path / "run"
    assert main([*overrides, f"model.init={tmp_path / 'no-such-init'}", f"run_dir={rd}", "logger=none"]) == 2
    err = capsys.readouterr().err
    assert f"levo-train: error: {message}" in err, err[-2000:]
    assert not (Path(rd) / "checkpoints").exists()


def test_precision_and_tf32_defaults_are_bf16_and_tf32_on_a_gpu_and_fp32_on_cpu(monkeypatch):
    """trainer.precision=auto (the default): bf16-mixed where a CUDA GPU with bf16 runs the model,
    32-true on CPU (the toy world and every test stay fp32); a given precision is kept. train.tf32=auto:
    TF32 matmuls on a GPU only."""
    import torch

    from levo_train.run import resolve_precision, set_tf32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert resolve_precision("auto", "cpu") == "32-true" and resolve_precision("auto", "auto") == "32-true"
        assert not set_tf32("auto", "auto") and not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert resolve_precision("auto", "auto") == "bf16-mixed" and resolve_precision("auto", "gpu") == "bf16-mixed"
        assert resolve_precision("auto", "cpu") == "32-true" and resolve_precision("16-mixed", "gpu") == "16-mixed"
        assert set_tf32("auto", "gpu") and torch.backends.cuda.matmul.allow_tf32
        assert not set_tf32("false", "gpu") and not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        assert resolve_precision("auto", "gpu") == "32-true"  # no bf16 (e.g. V100): fp32, not fp16 without asking
        with pytest.raises(UsageError, match="train.tf32=maybe"):
            set_tf32("maybe", "cpu")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    cfg = compose_config(["recipe=sft"])
    assert cfg.trainer.precision == "auto" and cfg.train.tf32 == "auto"


def test_v2_large_scale_configs_set_bf16_checkpointing_fsdp2_and_sizes_per_card():
    """scale=v2_large_80gb / v2_large_141gb: the released size's settings on top of any recipe, each
    still overridable on the command line (strategy included)."""
    for scale, batch in (("v2_large_80gb", 4), ("v2_large_141gb", 8)):
        for recipe in ("sft", "dpo"):
            c = compose_config([f"recipe={recipe}", f"scale={scale}"])
            assert c.strategy.name == "fsdp2" and c.trainer.precision == "bf16-mixed" and c.train.tf32 is True
            assert c.train.activation_checkpointing is True and c.data.batch_size == batch and c.recipe_name == recipe
    c = compose_config(["recipe=dpo", "scale=v2_large_80gb", "strategy=ddp", "data.batch_size=1"])
    assert c.strategy.name == "ddp" and c.data.batch_size == 1
@pytest.mark.parametrize("override, nearest", [
    ("optim.lrr=1e-4", "did you mean optim.lr?"), ("+optim.lrr=1e-4", "did you mean optim.lr?"),
    ("++dpo.betta=0.1", "did you mean dpo.beta?"), ("model.config.dimm=64", "did you mean model.config.dim?"),
    ("sed=3", "did you mean seed?"),
])
def test_an_unknown_override_key_names_the_nearest_real_key(tmp_path, capsys, override, nearest):
    """Hydra answers a misspelt ``optim.lrr=1e-4`` with a hint to write ``+optim.lrr``, which then trains
    silently at the default LR: an unknown key is an error, ``+`` or not; Trainer arguments pass."""
    assert main(["recipe=dpo", override, f"run_dir={tmp_path / 'run'}", "logger=none"]) == 2
    err = capsys.readouterr().err
    assert f"levo-train: error: unknown setting '{override.lstrip('+').partition('=')[0]}'" in err and nearest in err
    cfg = compose_config(["recipe=dpo", "optim.lr=1e-4", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                          "strategy=ddp", "~seed"])
    assert cfg.optim.lr == 1e-4 and cfg.trainer.log_every_n_steps == 1 and "seed" not in cfg
