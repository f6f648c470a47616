"""LoRA adapters (peft) from outside the model: merged export, adapters-off reference, CLI runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

from levo_infer import load_model
from levo_train.cli import main
from levo_train.lora import LoraSpec, adapters_disabled, apply_lora, merged_copy

LORA = ["train.lora.r=4", "train.lora.alpha=8"]


def _logits(model, codes, lyrics, styles):
    with torch.no_grad():
        return model.logits(codes, lyrics, styles).float()


def _nudge_adapters(model, seed: int = 0) -> None:
    """peft starts B at zero (the adapted model equals the base): give it a real update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_merged_weights_give_the_adapted_logits_and_adapters_off_gives_the_base(tiny_model, tmp_path):
    codes = torch.randint(0, 16, (2, 3, 9))
    lyrics, styles = ["[verse] love night", "[chorus] la da"], ["rock", None]
    base = _logits(tiny_model, codes, lyrics, styles)
    apply_lora(tiny_model, LoraSpec(r=4, alpha=8))
    assert all(p.requires_grad == (".lora_" in n) for n, p in tiny_model.named_parameters())
    assert torch.equal(_logits(tiny_model, codes, lyrics, styles), base)  # B = 0 at the start
    _nudge_adapters(tiny_model)
    adapted = _logits(tiny_model, codes, lyrics, styles)
    assert (adapted - base).abs().max() > 1e-3
    with adapters_disabled(tiny_model):
        assert torch.equal(_logits(tiny_model, codes, lyrics, styles), base)
    assert torch.equal(_logits(tiny_model, codes, lyrics, styles), adapted)  # switched back on
    merged = merged_copy(tiny_model).eval()
    assert (_logits(merged, codes, lyrics, styles) - adapted).abs().max() <= 1e-5
    from levo_infer.checkpoint import save_released

    save_released(merged, tmp_path / "m")
    reloaded = load_model(tmp_path / "m", device="cpu").eval()
    assert (_logits(reloaded, codes, lyrics, styles) - adapted).abs().max() <= 1e-5


def test_targets_that_match_nothing_are_named(tiny_model):
    with pytest.raises(ValueError, match=r"train.lora.targets=\['q_proj', 'qkv'\]: \['qkv'\] name no linear layer"):
        apply_lora(tiny_model, LoraSpec(r=2, targets=("q_proj", "qkv")))


def sft_args(cache: str, run_dir: Path, init: Path, *extra: str) -> list[str]:
    return ["recipe=sft", f"run_dir={run_dir}", f"model.init={init}", f"data.toy.cache_dir={cache}", *TINY,
            "trainer.val_check_interval=1000", "trainer.limit_val_batches=1", *LORA, *extra]


def test_lora_sft_trains_adapters_only_and_exports_merged_and_adapters(tmp_path, toy_cache_dir, toy_sft_export):
    rd = tmp_path / "run"
    assert main(sft_args(toy_cache_dir, rd, toy_sft_export, "trainer.max_steps=6", "optim.lr=1e-3")) == 0
    ck = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ck["levo"]["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0,
                                  "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"]}
    assert ck["levo"]["schedule"]["lr"] == pytest.approx(1e-2)  # optim.lr x train.lora.lr_scale (10)
    init = torch.load(toy_sft_export / "model.pt", weights_only=True)
    exp = torch.load(rd / "export" / "model.pt", weights_only=True)
    assert exp.keys() == init.keys()
    changed = {k for k in init if not torch.equal(init[k], exp[k])}
    assert changed and all(k.endswith(("_proj.weight",)) for k in changed), sorted(changed)[:5]
    assert (rd / "export" / "adapters" / "adapter_model.safetensors").is_file()
    cfg = json.loads((rd / "export" / "adapters" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    # `levo-train export` of the run's checkpoint: the same merged weights and adapters
    assert main(["export", f"run_dir={rd}", f"out={tmp_path / 'again'}"]) == 0
    again = torch.load(tmp_path / "again" / "model.pt", weights_only=True)
    assert again.keys() == exp.keys() and all(torch.equal(again[k], exp[k]) for k in exp)
    assert (tmp_path / "again" / "adapters" / "adapter_model.safetensors").is_file()


def test_lora_dpo_reference_is_the_policy_without_adapters(tmp_path, toy_cache_dir, toy_sft_export, capsys):
    """No second copy: the checkpoint holds no reference; held-out margins start at 0 (policy =
    reference) and move; resume is exact; another adapter rank is refused on resume."""
    common = ["recipe=dpo", f"model.init={toy_sft_export}", f"data.toy.cache_dir={toy_cache_dir}", *TINY, *LORA,
              "data.toy_pairs.n_train=40", "data.toy_pairs.n_val=16", "data.toy_pairs.max_frames=40",
              "data.toy_pairs.min_margin=0.0", "trainer.val_check_interval=1000", "trainer.limit_val_batches=1",
              "checkpoint.every_n_steps=4", "optim.total_steps=8", "optim.warmup_steps=1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*common, f"run_dir={a}", "trainer.max_steps=8", "trainer.val_check_interval=8"]) == 0
    s = json.loads((a / "summary.json").read_text())
    assert s["val_metrics"]["val/rewards/margins"] != 0
    ck = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert not [k for k in ck["state_dict"] if k.startswith("ref.")]
    assert main([*common, f"run_dir={b}", "trainer.max_steps=4"]) == 0
    assert main([*common, f"run_dir={b}", "trainer.max_steps=8", "resume=true"]) == 0
    wa, wb = (torch.load(x / "export" / "model.pt", weights_only=True) for x in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    capsys.readouterr()
    assert main([*common, f"run_dir={b}", "trainer.max_steps=10", "optim.total_steps=10", "resume=true",
                 "train.lora.r=8"]) == 2
    assert "train.lora=" in capsys.readouterr().err


def test_lora_refused_where_it_does_not_apply(tmp_path, toy_cache_dir, toy_sft_export, capsys):
    assert main(["recipe=reward", f"model.init={toy_sft_export}", f"run_dir={tmp_path / 'r'}", *TINY, *LORA,
                 f"data.toy.cache_dir={toy_cache_dir}"]) == 2
    assert "does not train with LoRA" in capsys.readouterr().err
    assert main(sft_args(toy_cache_dir, tmp_path / "s", toy_sft_export, "train.lora.targets=[qkv]")) == 2
    assert "name no linear layer" in capsys.readouterr().err


def test_reference_kinds(tiny_model):
    """make_reference: a frozen copy for full fine-tuning, the adapters-off policy with LoRA (its
    log-probs equal the frozen copy's of the same init), precomputed from the batch."""
    from levo_train.train.dpo import DPOModule
    from levo_train.train.reference import AdaptersOff, FrozenCopy, Precomputed

    full = DPOModule(tiny_model.cfg, reference="model", init_weights=False)
    full.model.load_state_dict(tiny_model.state_dict())
    full.freeze_reference()
    assert isinstance(full.ref_impl, FrozenCopy) and full.ref is not None
    lora = DPOModule(tiny_model.cfg, reference="model", init_weights=False)
    lora.model.load_state_dict(tiny_model.state_dict())
    apply_lora(lora.model, LoraSpec(r=2))
    lora.freeze_reference()
    assert isinstance(lora.ref_impl, AdaptersOff) and lora.ref is None
    _nudge_adapters(lora.model)
    g = torch.Generator().manual_seed(0)
    batch = {"chosen": torch.randint(0, 16, (2, 3, 6), generator=g), "rejected": torch.randint(0, 16, (2, 3, 5), generator=g),
             "chosen_lengths": torch.tensor([6, 4]), "rejected_lengths": torch.tensor([5, 5]),
             "lyrics": ["la da", "love"], "styles": ["rock", None], "prompts": None}
    from levo_train.train.logps import pair_conditions

    ref_full = full.reference_logps(batch, pair_conditions(full.model, batch))
    ref_lora = lora.reference_logps(batch, pair_conditions(lora.model, batch))
    assert torch.allclose(ref_full, ref_lora, atol=1e-5)
    pol = lora.pair_logps(lora.model, batch, pair_conditions(lora.model, batch))[0]
    assert not torch.allclose(pol, ref_lora, atol=1e-3)  # the adapters are on for the policy
    pre = DPOModule(tiny_model.cfg, reference="precomputed", init_weights=False)
    pre.freeze_reference()
    assert isinstance(pre.ref_impl, Precomputed)
    got = pre.reference_logps({**batch, "ref_chosen_logps": torch.tensor([1.0, 2.0]),
                               "ref_rejected_logps": torch.tensor([3.0, 4.0])}, None)
    assert got.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_inference_copy_holds_the_merged_weights_and_frees_them(tiny_model):
    """The rank-local generation copy of semi-online DPO (levo_train.train.inference_copy): a plain LeLM
    (no LoRA layers, no checkpoint wrappers) holding exactly the merged weights the export writes, in
    the generation dtype; released to the meta device between rounds and refilled with the newest
    weights; the policy itself is used when it is already a plain model in that dtype."""
    from levo_train.lora import merged_state_dict
    from levo_train.parallel import apply_activation_checkpointing
    from levo_train.train.inference_copy import InferenceCopy, gen_dtype, needs_copy

    assert not needs_copy(tiny_model, torch.float32) and needs_copy(tiny_model, torch.bfloat16)
    assert gen_dtype("auto", "cpu") == torch.float32 and gen_dtype("auto", "cuda:0") == torch.bfloat16
    apply_activation_checkpointing(tiny_model)
    apply_lora(tiny_model, LoraSpec(r=4, alpha=8))
    _nudge_adapters(tiny_model)
    assert needs_copy(tiny_model, torch.float32)
    want = merged_state_dict(tiny_model)
    copy = InferenceCopy(tiny_model.cfg, torch.float32)
    assert not copy.allocated  # built on the meta device: no memory until a round
    got = copy.refresh(tiny_model, "cpu").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any("lora" in n or "checkpoint" in n for n, _ in copy.model.named_modules())
    copy.release()
    assert not copy.allocated and copy.model.emb[0].weight.device.type == "meta"
    _nudge_adapters(tiny_model, seed=1)  # the policy moved on: the next refresh holds its new weights
    half = InferenceCopy(tiny_model.cfg, torch.bfloat16).refresh(tiny_model, "cpu")
    new = merged_state_dict(tiny_model)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, new[k].to(torch.bfloat16))
               for k, v in half.state_dict().items())
