"""Execution options applied from outside the model (levo_train.parallel): activation checkpointing."""

from __future__ import annotations

import json

import torch
from conftest import TINY, tiny_config

from levo_infer.generate import generate
from levo_infer.model import LeLM
from levo_train.cli import main
from levo_train.lora import LoraSpec, apply_lora, merged_state_dict
from levo_train.parallel import apply_activation_checkpointing, is_checkpointed, plain_name


def _loss_and_grads(model: LeLM, codes: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    cond = model.prepare_conditions(["la da", "love night"], ["rock", None])
    loss = model(codes, cond).float().logsumexp(-1).mean()
    loss.backward()
    return loss.item(), {plain_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_layers_give_the_same_loss_gradients_and_state_dict():
    torch.manual_seed(0)
    m = LeLM(tiny_config())
    m.init_weights(std=0.2)
    m.train()
    codes = torch.randint(0, 16, (2, 3, 8))
    keys = list(m.state_dict())
    l0, g0 = _loss_and_grads(m, codes)
    apply_activation_checkpointing(m)
    apply_activation_checkpointing(m)  # idempotent
    assert is_checkpointed(m) and list(m.state_dict()) == keys  # checkpoints and exports look the same
    l1, g1 = _loss_and_grads(m, codes)
    assert l0 == l1 and g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    apply_lora(m, LoraSpec(r=2, targets=("q_proj",)))  # adapters inside wrapped layers still merge by name
    assert set(merged_state_dict(m)) == set(keys)
    m.eval()
    with torch.no_grad():  # KV-cache generation runs the layers as they are
        assert generate(m, ["la da"], ["rock"], max_frames=4, seed=1).codes.shape == (1, 3, 4)


def test_activation_checkpointing_run_equals_plain_run(tmp_path, toy_cache_dir, monkeypatch):
    """train.activation_checkpointing=true wraps the layers (through configure_model) and trains the
    same weights (CPU recomputation is exact)."""
    import levo_train.parallel as par

    wrapped: list[bool] = []
    real = par.apply_activation_checkpointing

    def spy(model):
        out = real(model)
        wrapped.append(is_checkpointed(model))
        return out

    monkeypatch.setattr(par, "apply_activation_checkpointing", spy)
    common = ["recipe=sft", f"data.toy.cache_dir={toy_cache_dir}", *TINY, "trainer.max_steps=4",
              "trainer.val_check_interval=1000", "trainer.limit_val_batches=1"]
    assert main([*common, f"run_dir={tmp_path / 'a'}"]) == 0
    assert wrapped == []
    assert main([*common, f"run_dir={tmp_path / 'b'}", "train.activation_checkpointing=true"]) == 0
    assert wrapped and all(wrapped)
    wa = torch.load(tmp_path / "a" / "export" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "export" / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["global_step"] == 4
